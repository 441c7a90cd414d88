//! Helpers for tests that run real `converge serve` processes on loopback, driven by the
//! `converge` CLI as a user would. Every process a test starts is killed by its pid when
//! the test ends, pass or fail.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_converge");
/// How long a node may take to answer after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct NodeProcess {
    child: Option<Child>,
    /// Where the CLI reaches the node.
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `converge serve` arguments besides --data-dir.
    serve_args: Vec<String>,
    /// The network namespace the node runs in, if not the test's own.
    netns: Option<String>,
}

impl NodeProcess {
    pub fn start(dir: &Path, ip: u8, port: u16) -> Self {
        let addr = format!("127.0.0.{ip}:{port}");
        Self::start_with(dir, &format!("node-{ip}"), &addr, &["--listen", &addr])
    }

    /// A node named `name` under `dir`, reached at `addr`, served with `serve_args`.
    pub fn start_with(dir: &Path, name: &str, addr: &str, serve_args: &[&str]) -> Self {
        let data_dir = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let serve_args = serve_args.iter().map(|a| a.to_string()).collect();
        sockets().lock().unwrap().insert(addr.to_string(), data_dir.join("api.sock"));
        let mut node = NodeProcess { child: None, addr: addr.to_string(), data_dir, log, serve_args, netns: None };
        node.restart();
        node
    }

    /// A node named `name` under `dir`, run in network namespace `netns` and listening on
    /// `addr` there; the CLI reaches it through its local socket.
    pub fn start_in_netns(dir: &Path, name: &str, netns: &str, addr: &str) -> Self {
        let data_dir = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        sockets().lock().unwrap().insert(addr.to_string(), data_dir.join("api.sock"));
        let serve_args = vec!["--listen".to_string(), addr.to_string()];
        let netns = Some(netns.to_string());
        let mut node = NodeProcess { child: None, addr: addr.to_string(), data_dir, log, serve_args, netns };
        node.restart();
        node
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.addr);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut command = match &self.netns {
            Some(netns) => in_netns(netns, BIN),
            None => Command::new(BIN),
        };
        let child = command
            .args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.serve_args)
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` (STOP, CONT, ...) to the node's process, by its pid.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("bash").args(["-c", &format!("kill -{signal} {pid}")]).status().expect("bash runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// The node's log as plain text (colour codes taken out).
    pub fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut plain = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// A new API token with `role`, made through the node's local socket.
    pub fn token(&self, role: &str) -> String {
        let created = json(&self.cli(&["--json", "token", "create", "--role", role]));
        created["token"].as_str().expect("a token").to_string()
    }

    /// An HTTPS client for the node's API over the network, with an operator's token,
    /// trusting the cluster's CA.
    pub fn http(&self, timeout: Duration) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", self.token("operator")).parse().unwrap());
        let tls = pki::api_client(&std::fs::read_to_string(self.ca()).expect("the node has a CA")).unwrap();
        reqwest::Client::builder().use_preconfigured_tls(tls).timeout(timeout).default_headers(headers).build().unwrap()
    }

    /// The cluster CA's certificate, as this node keeps it (once it is in a cluster).
    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    /// The node's API over the network: `https://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// `cli`, when failing is an answer too.
    /// Where this node keeps the runtime files of VM `vm` (`vm-0`...): under its data dir,
    /// or where the daemon put them when QEMU's user cannot reach that.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        hypervisor::vm_dir(&self.data_dir.join("vms")).join(vm)
    }

    pub fn cli_result(&self, args: &[&str]) -> Result<String, String> {
        run(&self.addr, args)
    }

    pub fn cli(&self, args: &[&str]) -> String {
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

/// `program`, run in the network namespace `netns` (made by `ip netns add`). nsenter enters
/// it and execs the program (its pid is the program's), and leaves mounts alone: `ip netns
/// exec` and `ip -n` remount `/` and `/sys`, which fails in a chroot, where `/` is no mount
/// point.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{netns}")).arg(program);
    command
}

/// The local socket of each node these tests started, by its address: tests are root on
/// every node, as an admin on a node is.
fn sockets() -> &'static std::sync::Mutex<std::collections::HashMap<String, PathBuf>> {
    static SOCKETS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        std::sync::OnceLock::new();
    SOCKETS.get_or_init(Default::default)
}

/// Runs a client command against the node at `addr`, through its local socket when this
/// test started it (else over the network); stdout on success, stderr on failure.
pub fn run(addr: &str, args: &[&str]) -> Result<String, String> {
    let socket = sockets().lock().unwrap().get(addr).cloned();
    let target = match &socket {
        Some(socket) => vec!["--socket".to_string(), socket.display().to_string()],
        None => vec!["--server".to_string(), format!("https://{addr}")],
    };
    run_as(&target, args)
}

/// Runs a client command with `target` (`--socket PATH`, or `--server URL` with or
/// without `--token`).
pub fn run_as(target: &[String], args: &[&str]) -> Result<String, String> {
    let output = Command::new(BIN).args(target).args(args).output().expect("converge runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        // With --json the reason is on stdout.
        let (stderr, stdout) = (String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
        Err(format!("{stderr}{stdout}"))
    }
}

/// Runs a client command against the node at `addr`: its exit code, stdout and stderr.
pub fn run_code(addr: &str, args: &[&str]) -> (i32, String, String) {
    let socket = sockets().lock().unwrap().get(addr).cloned().expect("a node this test started");
    let output = Command::new(BIN).arg("--socket").arg(socket).args(args).output().expect("converge runs");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Starts nodes on 127.0.0.{ips}, forms a cluster and gives each a 1 GiB file disk.
pub fn cluster<const N: usize>(dir: &Path, ips: [u8; N], port: u16) -> Vec<NodeProcess> {
    cluster_and_token(dir, ips, port).0
}

/// `cluster`, and the join token for more nodes.
pub fn cluster_and_token<const N: usize>(dir: &Path, ips: [u8; N], port: u16) -> (Vec<NodeProcess>, String) {
    let nodes: Vec<NodeProcess> = ips.iter().map(|&ip| NodeProcess::start(dir, ip, port)).collect();
    let token = form_cluster(&nodes);
    (nodes, token)
}

/// Makes a cluster of started `nodes` (init on the first, the others join) and gives each
/// a 1 GiB file disk; returns the join token.
pub fn form_cluster(nodes: &[NodeProcess]) -> String {
    let token = json(&nodes[0].cli(&["--json", "cluster", "init"]))["join_token"].as_str().expect("token").to_string();
    for node in &nodes[1..] {
        node.cli(&["cluster", "join", "--peer", &nodes[0].addr, "--join-token", &token]);
    }
    for node in nodes {
        let disk = node.data_dir.with_extension("disk");
        node.cli(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"]);
    }
    token
}

/// Deterministic incompressible bytes (xorshift), so a failure reproduces.
pub fn random_file(path: &Path, len: usize, seed: u64) -> String {
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

pub fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCG guest boots, runs and powers off in about 10 s here; this bounds a slow machine.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Builds the test guest (idempotent) and returns its directory.
pub fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/guest");
    let status = Command::new(root.join("guest/build.sh")).arg(&out).status().expect("guest/build.sh runs");
    assert!(status.success(), "guest/build.sh failed (scripts/setup.sh installs what it needs)");
    out
}

/// Block b is its number as 8 hex digits, repeated over 4 KiB (as the guest's awk makes it).
pub fn pattern_of(blocks: usize) -> Vec<u8> {
    (0..blocks).flat_map(|b| format!("{b:08x}").repeat(512).into_bytes()).collect()
}

/// Creates a VM of the test guest: root filesystem imported onto its first disk, direct
/// kernel boot with `cmdline`, and `disks` as `--disk` values.
pub fn create_guest_vm(node: &NodeProcess, guest: &Path, name: &str, disks: &[&str], cmdline: &str) {
    create_guest_vm_with(node, guest, name, disks, cmdline, &[]);
}

/// `create_guest_vm`, with more `vm create` arguments.
pub fn create_guest_vm_with(
    node: &NodeProcess,
    guest: &Path,
    name: &str,
    disks: &[&str],
    cmdline: &str,
    more: &[&str],
) {
    let path = |file: &str| guest.join(file).display().to_string();
    let mut args = vec!["vm".to_string(), "create".into(), name.into(), "--memory".into(), "256M".into()];
    for disk in disks {
        args.extend(["--disk".to_string(), disk.to_string()]);
    }
    for (flag, file) in [("--image", "rootfs.img"), ("--kernel", "vmlinuz"), ("--initrd", "initramfs.cpio.gz")] {
        args.extend([flag.to_string(), path(file)]);
    }
    args.extend(["--cmdline".to_string(), cmdline.to_string()]);
    args.extend(more.iter().map(|a| a.to_string()));
    node.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
}
