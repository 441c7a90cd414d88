//! VM high availability end to end, with a real guest: a node that stalls for 2 s costs no
//! failover; SIGKILL of the node running a VM (its daemon and its QEMU) restarts the VM on
//! another node within seconds, with every write its guest saw acknowledged on its disk;
//! the node that comes back does not take the VM back; and `node check`/`drain` move VMs
//! off a node on purpose.

mod common;

use common::{cluster, create_guest_vm, guest, json, pattern_of, wait_until, NodeProcess, GUEST_TIMEOUT};
use std::time::{Duration, Instant};

/// The guest writes 4 KiB block b of the pattern at 64 KiB * b of its second disk.
const HA_STRIDE_BYTES: usize = 64 << 10;
/// Detection, decision and fencing, by default, on this machine (the bar).
const FAILOVER_MS_MAX: u64 = 5000;

/// The tests here time a failover: they run one at a time, not beside another cluster
/// booting a TCG guest on the same two cores (fencing then took 1.4-2.7 s instead of
/// 0.1-0.8 s, and the bar was missed for the machine's sake, not the product's).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn vm(node: &NodeProcess, name: &str) -> serde_json::Value {
    json(&node.cli(&["--json", "vm", "show", name]))
}

fn events(node: &NodeProcess) -> Vec<serde_json::Value> {
    node.cli(&["--json", "events"]).lines().map(json).collect()
}

fn node_id(node: &NodeProcess) -> u64 {
    json(&node.cli(&["--json", "cluster", "status"]))["this_node"].as_u64().unwrap()
}

/// The last block the guest reported acknowledged in a console log.
fn last_acked(console: &str) -> Option<usize> {
    console.lines().rev().filter_map(|l| l.strip_prefix("GUEST: HA acked ")).find_map(|b| b.trim().parse().ok())
}

/// Exports `volume` through `node` to `to` and checks blocks 0..=`acked` of the guest's
/// pattern are on it, each at its place.
fn assert_acknowledged_on_disk(node: &NodeProcess, volume: &str, to: &std::path::Path, acked: usize) {
    node.cli(&["volume", "export", volume, to.to_str().unwrap()]);
    let bytes = std::fs::read(to).unwrap();
    let pattern = pattern_of(acked + 1);
    for block in 0..=acked {
        let at = block * HA_STRIDE_BYTES;
        assert!(bytes[at..at + 4096] == pattern[block * 4096..(block + 1) * 4096], "acknowledged block {block} intact");
    }
}

/// A number after `key ` and before ` ms` in an event message.
fn ms_after(message: &str, key: &str) -> u64 {
    let rest = message.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {message}"));
    rest.trim_start().split(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("{key:?} in {message}"))
}

#[test]
fn a_vm_whose_node_dies_runs_again_elsewhere_with_every_acknowledged_write() {
    let _alone = one_at_a_time();
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut nodes = cluster(dir.path(), [44, 45, 46], 18960);
    let cmdline = "console=ttyS0 panic=-1 quiet gmode=ha";
    create_guest_vm(&nodes[0], &guest, "ha", &["64M", "160M,replicas=2"], cmdline);
    let home = node_id(&nodes[1]);
    nodes[0].cli(&["vm", "start", "ha", "--node", &nodes[1].addr]);
    let console = |node: &NodeProcess| node.cli(&["vm", "console", "ha", "--no-follow"]);
    wait_until("the guest writes", GUEST_TIMEOUT, || last_acked(&console(&nodes[0])).is_some_and(|b| b >= 50));

    let pid = vm(&nodes[0], "ha")["state"]["pid"].as_u64().unwrap();
    assert_confined(pid, &nodes[1].vm_dir("vm-0"));

    // A 2 s stall of the VM's node is no failure: the VM stays where it runs.
    nodes[1].signal("STOP");
    std::thread::sleep(Duration::from_secs(2));
    nodes[1].signal("CONT");
    wait_until("the stall is told as a slow node", Duration::from_secs(20), || {
        events(&nodes[0]).iter().any(|e| e["kind"] == "node_slow")
    });
    std::thread::sleep(Duration::from_secs(4));
    let after_stall = vm(&nodes[0], "ha");
    assert_eq!(after_stall["desired"]["Running"]["node"], home, "{after_stall}");
    assert_eq!(after_stall["state"]["pid"], pid, "the VM was not restarted: {after_stall}");
    assert!(!events(&nodes[0]).iter().any(|e| e["kind"] == "node_down"), "no node was declared down");

    // SIGKILL of the node: its QEMU dies with it (unprivileged as it is), and the VM runs
    // again on another node.
    let acked_before = last_acked(&console(&nodes[0])).unwrap();
    nodes[1].sigkill();
    let killed = Instant::now();
    let gone = |pid: u64| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status.is_empty() || status.lines().any(|l| l.starts_with("State:") && l.contains('Z'))
    };
    let qemu_died = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        gone(pid)
    });
    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(qemu_died, "the QEMU of a killed node outlived it");
    wait_until("the VM runs on another node", Duration::from_secs(60), || {
        let v = vm(&nodes[0], "ha");
        v["state"]["state"] == "running" && v["node"] != home
    });
    let running_after = killed.elapsed();
    wait_until("the restarted guest boots", GUEST_TIMEOUT, || console(&nodes[0]).contains("GUEST: HA boot 2"));
    let booted_after = killed.elapsed();

    // While the node is dead, a node that holds the only acting replica of some PG cannot go
    // down too (2 replicas, min_size 1): `node check` says so.
    let check = json(&nodes[2].cli(&["--json", "node", "check", &nodes[2].addr]));
    assert_eq!(check["can_go_down"], false, "{check}");
    assert!(check["reasons"][0].as_str().unwrap().contains("min_size"), "{check}");

    // What the guest saw acknowledged before the kill, from the dead node's console log.
    let first_run = std::fs::read_to_string(nodes[1].vm_dir("vm-0").join("console.log")).unwrap();
    let acked = last_acked(&first_run).unwrap();
    assert!(acked >= acked_before);
    assert!(!first_run.contains("GUEST: HA failed"), "no write failed in the guest");
    assert_acknowledged_on_disk(&nodes[2], "ha-disk1", &dir.path().join("ha-disk1.raw"), acked);

    // The event log tells the failover, split into its steps.
    let log = events(&nodes[0]);
    let kinds: Vec<&str> = log.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in ["node_down", "vm_failover", "vm_restarted"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    let restarted = log.iter().find(|e| e["kind"] == "vm_restarted").unwrap()["message"].as_str().unwrap().to_string();
    let (detection, decision, fencing) =
        (ms_after(&restarted, "detection"), ms_after(&restarted, "decision"), ms_after(&restarted, "fencing"));
    println!(
        "failover: detection {detection} ms, decision {decision} ms, fencing {fencing} ms; running {} ms and booted {} ms after the kill",
        running_after.as_millis(),
        booted_after.as_millis()
    );
    assert!(detection + decision + fencing < FAILOVER_MS_MAX, "{restarted}");

    // The dead node comes back: it does not take the VM back, and is up again.
    nodes[1].restart();
    wait_until("the node is declared up again", Duration::from_secs(30), || {
        events(&nodes[0]).iter().any(|e| e["kind"] == "node_up")
    });
    std::thread::sleep(Duration::from_secs(3));
    let settled = vm(&nodes[0], "ha");
    assert_ne!(settled["node"], home, "the VM stays where it was restarted: {settled}");
    assert_eq!(settled["state"]["state"], "running", "{settled}");
    let moved_to = settled["node"].as_u64().unwrap();
    wait_until("the cluster is whole again", Duration::from_secs(120), || {
        json(&nodes[0].cli(&["--json", "cluster", "status"]))["pgs_degraded"] == 0
    });

    // Maintenance, with every node up again: the VM's node can go down, and a drain moves
    // the VM off it.
    let target = nodes.iter().find(|n| node_id(n) == moved_to).unwrap();
    let check = json(&nodes[0].cli(&["--json", "node", "check", &target.addr]));
    assert_eq!(check["can_go_down"], true, "{check}");
    nodes[0].cli(&["node", "drain", &target.addr]);
    let drained = vm(&nodes[0], "ha");
    assert_ne!(drained["node"], moved_to, "{drained}");
    assert_eq!(drained["state"]["state"], "running", "{drained}");
    // Stop then start: the guest shut down cleanly on the drained node before it ran again.
    let left = std::fs::read_to_string(target.vm_dir("vm-0").join("console.log")).unwrap();
    assert!(left.contains("GUEST: power button pressed, shutting down"), "{left}");
    nodes[0].cli(&["node", "resume", &target.addr]);
}

/// The guest's QEMU runs as the unprivileged `converge-qemu` (scripts/setup.sh makes it),
/// in a cgroup of its own, and what it opens in its directory is that user's alone.
fn assert_confined(pid: u64, vm_dir: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("converge-qemu:"))
        .and_then(|rest| rest.split(':').nth(1)?.parse().ok())
        .expect("the converge-qemu user (scripts/setup.sh adds it)");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uids.split_whitespace().skip(1).all(|u| u == uid.to_string()), "QEMU runs as converge-qemu: {uids}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains("/converge/vm-0"), "QEMU is in its VM's cgroup: {cgroups}");
    let sandboxed = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    assert!(sandboxed.ends_with('2'), "QEMU runs under its seccomp sandbox: {sandboxed}");
    for entry in std::fs::read_dir(vm_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata().unwrap();
        if name.ends_with(".sock") && name.starts_with("disk") {
            assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600), "{name} is the guest's alone");
        }
    }
    let dir = std::fs::metadata(vm_dir).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (uid, 0o700));
}

/// Cuts `ip` off from every other address, both ways, until dropped: a route that refuses
/// every packet to it. Nodes send from their advertised address, so their replies and
/// their own calls die too. Loopback only; removed when dropped, pass or fail.
struct Cut(String);

impl Cut {
    fn off(ip: &str) -> Cut {
        // `replace`: a route left by a killed earlier run does not fail this one.
        let status = route("replace", ip);
        assert!(status, "cutting {ip} off needs CAP_NET_ADMIN (root, or sudo without a password)");
        Cut(ip.to_string())
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        route("del", &self.0);
    }
}

/// `ip route add|del prohibit IP/32 table local`, as root or through `sudo -n`.
fn route(verb: &str, ip: &str) -> bool {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let args = ["ip", "route", verb, "prohibit", &format!("{ip}/32"), "table", "local"];
    let (program, rest) = if root { ("ip", &args[1..]) } else { ("sudo", &args[..]) };
    let mut command = std::process::Command::new(program);
    if !root {
        command.arg("-n");
    }
    command.args(rest).status().is_ok_and(|s| s.success())
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn a_node_cut_off_ends_its_vm_before_the_majority_runs_it_elsewhere() {
    let _alone = one_at_a_time();
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [70, 71, 72], 19000);
    let cmdline = "console=ttyS0 panic=-1 quiet gmode=ha";
    create_guest_vm(&nodes[1], &guest, "cut", &["64M", "160M,replicas=2"], cmdline);
    let home = node_id(&nodes[0]);
    nodes[1].cli(&["vm", "start", "cut", "--node", &nodes[0].addr]);
    let console_file = nodes[0].vm_dir("vm-0").join("console.log");
    wait_until("the guest writes", GUEST_TIMEOUT, || {
        last_acked(&std::fs::read_to_string(&console_file).unwrap_or_default()).is_some_and(|b| b >= 20)
    });
    let qemu = vm(&nodes[1], "cut")["state"]["pid"].as_u64().unwrap();

    let cut = Cut::off("127.0.0.70");
    let started = Instant::now();
    let mut qemu_gone = None;
    let mut elsewhere = None;
    while (qemu_gone.is_none() || elsewhere.is_none()) && started.elapsed() < Duration::from_secs(60) {
        if qemu_gone.is_none() && !alive(qemu) {
            qemu_gone = Some(started.elapsed());
        }
        if elsewhere.is_none() {
            let v = vm(&nodes[1], "cut");
            if v["state"]["state"] == "running" && v["node"] != home {
                elsewhere = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = vm(&nodes[1], "cut");
    let (qemu_gone, elsewhere) = (
        qemu_gone.unwrap_or_else(|| panic!("the cut-off node ended its QEMU; log:\n{}", nodes[0].log_text())),
        elsewhere.unwrap_or_else(|| panic!("the VM runs elsewhere: {seen}")),
    );
    println!(
        "cut off: QEMU ended there after {} ms; the VM ran elsewhere after {} ms",
        qemu_gone.as_millis(),
        elsewhere.as_millis()
    );
    assert!(qemu_gone < elsewhere, "never two running copies: ended {qemu_gone:?}, elsewhere {elsewhere:?}");

    // Every write the guest saw acknowledged is on the disk the new copy uses.
    let acked = last_acked(&std::fs::read_to_string(&console_file).unwrap()).unwrap();
    assert_acknowledged_on_disk(&nodes[2], "cut-disk1", &dir.path().join("cut-disk1.raw"), acked);

    // Healed: the node comes back and leaves the VM where it runs now.
    drop(cut);
    wait_until("the node is up again", Duration::from_secs(30), || {
        events(&nodes[1]).iter().any(|e| e["kind"] == "node_up")
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = vm(&nodes[1], "cut");
    assert_ne!(after["node"], home, "{after}");
    assert_eq!(after["state"]["state"], "running", "{after}");
    assert!(nodes[0].log_text().contains("cut off from the majority"), "the node knew it was cut off");
    assert!(events(&nodes[1]).iter().any(|e| e["kind"] == "node_isolated"), "and said so once back");
}
