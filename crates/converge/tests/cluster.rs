//! Multi-process clusters on loopback: real `converge serve` processes, driven by the
//! `converge` CLI as a user would, with real faults (SIGKILL). Every process a test starts
//! is killed by its pid when the test ends, pass or fail.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_converge");
/// How long a node may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

struct NodeProcess {
    child: Option<Child>,
    addr: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl NodeProcess {
    fn start(dir: &Path, ip: u8, port: u16) -> Self {
        let addr = format!("127.0.0.{ip}:{port}");
        let data_dir = dir.join(format!("node-{ip}"));
        let log = dir.join(format!("node-{ip}.log"));
        let mut node = NodeProcess { child: None, addr, data_dir, log };
        node.restart();
        node
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.addr);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.addr])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("converge serve starts");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while run(&self.addr, &["cluster", "status"]).is_err() {
            assert!(Instant::now() < deadline, "{} did not start; log:\n{}", self.addr, self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> String {
        run(&self.addr, args).unwrap_or_else(|e| {
            panic!("converge {args:?} on {} failed: {e}\nnode log:\n{}", self.addr, self.log_text())
        })
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a client command against `addr`; stdout on success, stderr on failure.
fn run(addr: &str, args: &[&str]) -> Result<String, String> {
    let output =
        Command::new(BIN).args(["--server", &format!("http://{addr}")]).args(args).output().expect("converge runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Starts nodes on 127.0.0.{ips}, forms a cluster and gives each a 1 GiB file disk.
fn cluster(dir: &Path, ips: [u8; 3], port: u16) -> Vec<NodeProcess> {
    let nodes: Vec<NodeProcess> = ips.iter().map(|&ip| NodeProcess::start(dir, ip, port)).collect();
    let token = json(&nodes[0].cli(&["--json", "cluster", "init"]))["token"].as_str().expect("token").to_string();
    for node in &nodes[1..] {
        node.cli(&["cluster", "join", "--peer", &nodes[0].addr, "--token", &token]);
    }
    for node in &nodes {
        let disk = node.data_dir.with_extension("disk");
        node.cli(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"]);
    }
    nodes
}

/// Deterministic incompressible bytes (xorshift), so a failure reproduces.
fn random_file(path: &Path, len: usize, seed: u64) -> String {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(path, &bytes).unwrap();
    sha256(path)
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn data_imported_through_a_killed_node_exports_identically_through_another() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut nodes = cluster(dir.path(), [2, 3, 4], 18700);
    let input = dir.path().join("input.raw");
    let output = dir.path().join("output.raw");
    let expected = random_file(&input, 256 << 20, 0x5eed);
    nodes[0].cli(&["volume", "import", "data", input.to_str().unwrap(), "--replicas", "2"]);

    nodes[0].sigkill();
    nodes[1].cli(&["volume", "export", "data", output.to_str().unwrap()]);

    assert_eq!(sha256(&output), expected);
    // The first node was the Raft leader: the other two elect a new one and keep serving.
    nodes[2].cli(&["volume", "create", "after-kill", "--size", "64M"]);
}

#[test]
fn a_restarted_node_rejoins_with_its_state_and_catches_up() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut nodes = cluster(dir.path(), [5, 6, 7], 18710);
    let input = dir.path().join("input.raw");
    let expected = random_file(&input, 24 << 20, 7);
    nodes[0].cli(&["volume", "import", "before", input.to_str().unwrap()]);

    nodes[2].sigkill();
    nodes[0].cli(&["volume", "create", "while-down", "--size", "1G", "--replicas", "3"]);
    wait_until("the cluster shows the killed node down", Duration::from_secs(30), || {
        json(&nodes[0].cli(&["--json", "cluster", "status"]))["healthy"] == false
    });
    nodes[2].restart();

    wait_until("the restarted node sees the volume created while it was down", Duration::from_secs(30), || {
        run(&nodes[2].addr, &["volume", "show", "while-down"]).is_ok()
    });
    wait_until("the cluster is healthy again", Duration::from_secs(30), || {
        run(&nodes[2].addr, &["--json", "cluster", "status"]).is_ok_and(|s| json(&s)["healthy"] == true)
    });
    let output = dir.path().join("output.raw");
    nodes[2].cli(&["volume", "export", "before", output.to_str().unwrap()]);
    assert_eq!(sha256(&output), expected);
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failing_exit() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = NodeProcess::start(dir.path(), 8, 18720);

    let before_init = run(&node.addr, &["volume", "create", "v", "--size", "1G"]).unwrap_err();
    node.cli(&["cluster", "init"]);
    let bad_size = run(&node.addr, &["volume", "create", "v", "--size", "lots"]).unwrap_err();
    let too_few_nodes = run(&node.addr, &["volume", "create", "v", "--size", "1G", "--replicas", "2"]);
    let missing = run(&node.addr, &["volume", "show", "nope"]).unwrap_err();

    assert!(before_init.contains("not in a cluster yet"), "{before_init}");
    assert!(bad_size.contains("is not a number"), "{bad_size}");
    assert!(too_few_nodes.as_ref().unwrap_err().contains("different nodes"), "{too_few_nodes:?}");
    assert!(missing.contains("No volume named \"nope\""), "{missing}");
}

#[test]
fn qcow2_image_imports_as_its_raw_contents_on_a_single_replica_volume() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = NodeProcess::start(dir.path(), 9, 18730);
    node.cli(&["cluster", "init"]);
    node.cli(&["disk", "add", dir.path().join("disk").to_str().unwrap(), "--size", "256M"]);
    let raw = dir.path().join("image.raw");
    let qcow2 = dir.path().join("image.qcow2");
    let expected = random_file(&raw, 8 << 20, 42);
    let converted =
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2).status();
    assert!(converted.expect("qemu-img runs (scripts/setup.sh installs qemu-utils)").success());

    node.cli(&["volume", "import", "image", qcow2.to_str().unwrap(), "--replicas", "1"]);
    let output = dir.path().join("output.raw");
    node.cli(&["volume", "export", "image", output.to_str().unwrap()]);

    assert_eq!(sha256(&output), expected);
}
