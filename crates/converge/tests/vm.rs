//! End to end: a real Linux guest (Debian's cloud kernel, busybox) boots under QEMU with its
//! root filesystem on a replicated volume served over vhost-user-blk, writes a known
//! pattern with O_DIRECT, and its bytes are checked through another node; then the VM moves
//! to another node with new owner epochs and finds all its data.

mod common;

use common::{cluster, create_guest_vm, guest, json, pattern_of, run, wait_until, NodeProcess, GUEST_TIMEOUT};
use std::time::Duration;

/// Blocks of the pattern the guest writes (4 KiB each): guest/rootfs-init.
const PATTERN_BLOCKS: usize = 1024;

fn pattern() -> Vec<u8> {
    pattern_of(PATTERN_BLOCKS)
}

fn vm_state(node: &NodeProcess, name: &str) -> serde_json::Value {
    json(&node.cli(&["--json", "vm", "show", name]))
}

fn wait_for_guest_poweroff(node: &NodeProcess, name: &str) {
    wait_until("the guest powers itself off", GUEST_TIMEOUT, || vm_state(node, name)["state"]["state"] == "stopped");
}

fn console(node: &NodeProcess, name: &str) -> String {
    node.cli(&["vm", "console", name, "--no-follow"])
}

fn volume(node: &NodeProcess, name: &str) -> serde_json::Value {
    json(&node.cli(&["--json", "volume", "show", name]))
}

#[test]
fn guest_on_a_replicated_volume_writes_with_o_direct_and_keeps_its_data_on_another_node() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [31, 32, 33], 18900);
    let cmdline = "console=ttyS0 panic=-1 quiet gmode=test";
    create_guest_vm(&nodes[0], &guest, "tester", &["64M", "64M,replicas=2"], cmdline);

    nodes[0].cli(&["vm", "start", "tester", "--node", &nodes[0].addr]);
    wait_for_guest_poweroff(&nodes[0], "tester");
    let first_boot = console(&nodes[1], "tester");
    let exported = dir.path().join("disk1.raw");
    nodes[1].cli(&["volume", "export", "tester-disk1", exported.to_str().unwrap()]);
    let epoch_on_a = volume(&nodes[0], "tester-disk1")["owner_epoch"].as_u64().unwrap();

    assert!(first_boot.contains("GUEST: root filesystem on /dev/vda, boot number 1"), "{first_boot}");
    assert!(first_boot.contains("GUEST: wrote pattern to /dev/vdb with O_DIRECT"), "{first_boot}");
    assert!(first_boot.contains("GUEST: discard OK"), "{first_boot}");
    assert!(first_boot.contains("GUEST: RESULT rc=0"), "{first_boot}");
    let bytes = std::fs::read(&exported).unwrap();
    assert!(bytes[..pattern().len()] == pattern()[..], "the exported disk holds the guest's pattern");
    assert!(bytes[pattern().len()..].iter().all(|&b| b == 0), "and zeros after it");

    nodes[2].cli(&["vm", "start", "tester", "--node", &nodes[1].addr]);
    wait_for_guest_poweroff(&nodes[1], "tester");
    let second_boot = console(&nodes[2], "tester");
    let disk1 = volume(&nodes[2], "tester-disk1");

    assert!(second_boot.contains("boot number 2"), "the root filesystem came along: {second_boot}");
    assert!(second_boot.contains("GUEST: pattern already on /dev/vdb"), "{second_boot}");
    assert!(second_boot.contains("GUEST: RESULT rc=0"), "{second_boot}");
    assert!(disk1["owner_epoch"].as_u64().unwrap() > epoch_on_a, "the new owner fenced the old one: {disk1}");
    assert_eq!(disk1["owner"], vm_state(&nodes[2], "tester")["node"]);
}

#[test]
fn a_running_vm_stops_on_request_and_a_vm_cannot_start_twice() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [34, 35, 36], 18910);
    create_guest_vm(&nodes[0], &guest, "idle", &["64M"], "console=ttyS0 panic=-1 quiet");
    nodes[0].cli(&["vm", "start", "idle", "--node", &nodes[1].addr]);
    wait_until("the guest is up", GUEST_TIMEOUT, || console(&nodes[0], "idle").contains("GUEST: ready"));

    let volumes_before = nodes[0].cli(&["--json", "volume", "list"]);
    let guest_path = |file: &str| guest.join(file).display().to_string();
    let create_again = ["vm", "create", "idle", "--disk", "64M", "--kernel", &guest_path("vmlinuz")];
    let duplicate = run(&nodes[1].addr, &create_again).unwrap_err();
    let volumes_after = nodes[0].cli(&["--json", "volume", "list"]);
    let elsewhere = run(&nodes[0].addr, &["vm", "start", "idle", "--node", &nodes[2].addr]).unwrap_err();
    let delete_running = run(&nodes[0].addr, &["vm", "delete", "idle"]).unwrap_err();
    let image = dir.path().join("small.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let import_running =
        run(&nodes[2].addr, &["volume", "import", "idle-disk0", image.to_str().unwrap(), "--format", "raw"])
            .unwrap_err();
    let clone_running = run(&nodes[2].addr, &["volume", "clone", "idle-disk0", "idle-copy"]).unwrap_err();
    nodes[2].cli(&["vm", "stop", "idle"]);
    let stopped = vm_state(&nodes[0], "idle");
    let text = console(&nodes[0], "idle");
    nodes[0].cli(&["vm", "delete", "idle"]);
    let volumes = json(&nodes[0].cli(&["--json", "volume", "list"]));

    assert!(duplicate.contains("A VM named \"idle\" exists already"), "{duplicate}");
    assert_eq!(volumes_after, volumes_before, "a refused create touches no volume");
    assert!(elsewhere.contains("stop it first, or move it with `converge vm move idle --node NODE`"), "{elsewhere}");
    assert!(delete_running.contains("stop it before deleting it"), "{delete_running}");
    assert!(import_running.contains("which is running: stop the VM first"), "{import_running}");
    assert!(clone_running.contains("belongs to VM idle, which is active"), "{clone_running}");
    assert_eq!(stopped["state"]["state"], "stopped", "{stopped}");
    assert!(text.contains("GUEST: power button pressed, shutting down"), "a graceful stop: {text}");
    assert_eq!(volumes, serde_json::json!([]), "deleting the VM deleted its volumes");
}

/// Blocks the writer guest writes, one 4 KiB block every 64 KiB: guest/rootfs-init.
const WRITER_BLOCKS: usize = 2000;
const WRITER_STRIDE_BYTES: usize = 64 << 10;
/// The nodes' replica timeout in this test is the default, 3 s; a Raft round is well under 1 s.
const LONGEST_WRITE_MS: u64 = 3000 + 1000;

/// Bytes every node's resyncs copied, as `cluster status` reports them.
fn bytes_resynced(node: &NodeProcess) -> u64 {
    let status = json(&node.cli(&["--json", "cluster", "status"]));
    status["nodes"].as_array().unwrap().iter().map(|n| n["resync"]["bytes_copied"].as_u64().unwrap_or(0)).sum()
}

#[test]
fn a_guest_writing_through_the_death_of_a_replica_node_sees_no_error_and_loses_nothing() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut nodes = cluster(dir.path(), [37, 38, 39], 18920);
    let cmdline = "console=ttyS0 panic=-1 quiet gmode=writer";
    create_guest_vm(&nodes[0], &guest, "writer", &["64M", "160M,replicas=2"], cmdline);
    nodes[0].cli(&["vm", "start", "writer", "--node", &nodes[0].addr]);
    wait_until("the guest writes", GUEST_TIMEOUT, || console(&nodes[0], "writer").contains("WRITER progress 250"));

    nodes[1].sigkill();
    wait_for_guest_poweroff(&nodes[0], "writer");
    let text = console(&nodes[2], "writer");
    let degraded = volume(&nodes[2], "writer-disk1");
    let exported = dir.path().join("writer-disk1.raw");
    nodes[2].cli(&["volume", "export", "writer-disk1", exported.to_str().unwrap()]);

    let done = text.lines().find(|l| l.contains("GUEST: WRITER done")).unwrap_or_else(|| panic!("{text}"));
    assert!(done.contains(&format!("writes={WRITER_BLOCKS} failed=0 ")), "no write failed in the guest: {done}");
    let longest: u64 = done.split("max_write_ms=").nth(1).unwrap().trim().parse().unwrap();
    assert!(longest <= LONGEST_WRITE_MS, "the longest write took {longest} ms");
    assert!(degraded["pgs_degraded"].as_u64().unwrap() > 0, "the volume shows degraded: {degraded}");
    assert!(degraded["degraded"][0].as_str().unwrap().contains("until it is resynced"), "{degraded}");
    let bytes = std::fs::read(&exported).unwrap();
    let pattern = pattern_of(WRITER_BLOCKS);
    for block in 0..WRITER_BLOCKS {
        let at = block * WRITER_STRIDE_BYTES;
        assert!(bytes[at..at + 4096] == pattern[block * 4096..(block + 1) * 4096], "block {block} is intact");
    }

    nodes[1].restart();
    wait_until("node 2 is resynced", Duration::from_secs(120), || {
        json(&nodes[0].cli(&["--json", "cluster", "status"]))["pgs_degraded"] == 0
    });
    // Node 2 learns what the others copied from their pings, and that node 1 is up again
    // from the leader: a moment after the PGs are whole.
    wait_until("node 2 sees the resync and a healthy cluster", Duration::from_secs(30), || {
        bytes_resynced(&nodes[2]) > 0 && json(&nodes[2].cli(&["--json", "cluster", "status"]))["healthy"] == true
    });
    let resynced = bytes_resynced(&nodes[2]);
    // Everything the guest wrote is 8 MiB; whole extents would be 4 MiB each.
    let written = (WRITER_BLOCKS * 4096) as u64;
    println!("longest guest write {longest} ms; resync copied {resynced} bytes; the guest wrote {written} in all");
    assert!(resynced <= 2 * written, "resync copied {resynced} bytes for at most {written} written");
    let status = json(&nodes[2].cli(&["--json", "cluster", "status"]));
    assert_eq!(status["healthy"], true, "{status}");
    // Node 2 reads its own replicas first: an export through it checks what resync copied.
    let through_node_2 = dir.path().join("writer-disk1-node2.raw");
    nodes[1].cli(&["volume", "export", "writer-disk1", through_node_2.to_str().unwrap()]);
    let bytes = std::fs::read(&through_node_2).unwrap();
    for block in 0..WRITER_BLOCKS {
        let at = block * WRITER_STRIDE_BYTES;
        assert!(bytes[at..at + 4096] == pattern[block * 4096..(block + 1) * 4096], "block {block} resynced to node 2");
    }
}
