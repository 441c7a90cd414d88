//! Networks: guests on different nodes reach each other over converge networks, and still
//! do after one of them moves, with the same MAC.
//!
//! Each node runs in a network namespace of its own, made here, so it has its own bridges,
//! taps and VXLAN devices, as a separate server would. A further namespace stands for the
//! switch between the servers: a bridge for the nodes' own network (their addresses, Raft,
//! replication, and the VXLAN overlay), and one for a "physical" VM network on a second
//! interface of each node (`lan0`, bridged untagged). Nothing of this touches the test
//! machine's own network namespace; all of it goes when the test ends.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Namespaces and links this test makes, taken away (with every process in them gone
/// first) when it is dropped.
struct Topology {
    switch: String,
    nodes: Vec<String>,
}

/// Runs `ip args`, in namespace `ns` if given.
fn ip(ns: Option<&str>, args: &[&str]) {
    let mut command = match ns {
        Some(ns) => in_netns(ns, "ip"),
        None => Command::new("ip"),
    };
    let output = command.args(args).output().expect("ip runs (iproute2)");
    assert!(output.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

/// What `program args` prints in namespace `ns`.
fn shown_in(ns: &str, program: &str, args: &[&str]) -> String {
    let output = in_netns(ns, program).args(args).output().expect("nsenter runs (util-linux)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Topology {
    /// `count` node namespaces, each with `eth0` (10.211.0.N/24) on the nodes' switch and
    /// `lan0` (no address) on the VM network's switch.
    fn new(count: usize) -> Self {
        let tag = std::process::id();
        let topology =
            Topology { switch: format!("cvt{tag}sw"), nodes: (0..count).map(|i| format!("cvt{tag}n{i}")).collect() };
        let switch = Some(topology.switch.as_str());
        ip(None, &["netns", "add", &topology.switch]);
        for bridge in ["nodes", "lan"] {
            ip(switch, &["link", "add", bridge, "type", "bridge"]);
            ip(switch, &["link", "set", bridge, "up"]);
        }
        for (i, ns) in topology.nodes.iter().enumerate() {
            ip(None, &["netns", "add", ns]);
            let node = Some(ns.as_str());
            ip(node, &["link", "set", "lo", "up"]);
            for (port, bridge) in [("eth0", "nodes"), ("lan0", "lan")] {
                let outside = format!("{bridge}{i}");
                ip(node, &["link", "add", port, "type", "veth", "peer", "name", &outside, "netns", &topology.switch]);
                ip(switch, &["link", "set", &outside, "master", bridge, "up"]);
                ip(node, &["link", "set", port, "up"]);
            }
            ip(node, &["addr", "add", &format!("10.211.0.{}/24", i + 1), "dev", "eth0"]);
        }
        topology
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn console(node: &NodeProcess, name: &str) -> String {
    node.cli(&["vm", "console", name, "--no-follow"])
}

/// The console of `name` once `done` holds for it.
fn console_until(node: &NodeProcess, name: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let text = console(node, name);
        if done(&text) {
            return text;
        }
        if Instant::now() > deadline {
            let state = node.cli(&["--json", "vm", "show", name]);
            panic!("timed out waiting until {what}\nstate: {state}\nconsole:\n{text}\nnode log:\n{}", node.log_text());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The guest's `GUEST: nic NAME mac=... mtu=...` line for `nic`.
fn nic_line(console: &str, nic: &str) -> String {
    let prefix = format!("GUEST: nic {nic} ");
    console.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {nic} in:\n{console}")).into()
}

fn pings(console: &str, peer: &str) -> usize {
    console.lines().filter(|l| *l == format!("GUEST: ping {peer} ok")).count()
}

#[test]
fn guests_on_different_nodes_reach_each_other_over_an_overlay_and_a_bridged_network_and_after_a_move() {
    let guest = guest();
    let topology = Topology::new(3);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let addr = |i: usize| format!("10.211.0.{}:7000", i + 1);
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| NodeProcess::start_in_netns(dir.path(), &format!("node-{i}"), &topology.nodes[i], &addr(i)))
        .collect();
    form_cluster(&nodes);

    // Bad requests are refused before anything is made.
    let refused = nodes[0].cli_result(&["network", "create", "nowhere"]).unwrap_err();
    assert!(refused.contains("--interface") && refused.contains("--overlay"), "{refused}");
    let refused = nodes[0].cli_result(&["network", "create", "-x", "--overlay"]).unwrap_err();
    assert!(!refused.is_empty());
    let overlay = json(&nodes[0].cli(&["--json", "network", "create", "over", "--overlay"]));
    assert_eq!(overlay["kind"], "overlay", "{overlay}");
    nodes[0].cli(&["network", "create", "lan", "--interface", "lan0"]);
    let again = nodes[0].cli_result(&["network", "create", "lan", "--overlay"]).unwrap_err();
    assert!(again.contains("exists already"), "{again}");
    let bad_nic = nodes[0].cli_result(&["vm", "create", "x", "--disk", "64M", "--nic", "nowhere"]).unwrap_err();
    assert!(bad_nic.contains("nowhere"), "{bad_nic}");

    let cmdline = |me: u8, peer: u8| {
        format!("console=ttyS0 panic=-1 quiet gip=10.99.1.{me}/24,10.99.2.{me}/24 gping=10.99.1.{peer},10.99.2.{peer}")
    };
    let mac_a = "52:54:00:0a:00:01";
    create_guest_vm_with(
        &nodes[0],
        &guest,
        "a",
        &["64M,replicas=2"],
        &cmdline(1, 2),
        &["--nic", &format!("over,mac={mac_a}"), "--nic", "lan"],
    );
    create_guest_vm_with(
        &nodes[0],
        &guest,
        "b",
        &["64M,replicas=2"],
        &cmdline(2, 1),
        &["--nic", "over", "--nic", "lan"],
    );
    let b = json(&nodes[0].cli(&["--json", "vm", "show", "b"]));
    let mac_b = b["nics"][0]["mac"].as_str().expect("b has a MAC of converge's").to_string();
    assert!(mac_b.starts_with("52:54:00:"), "{b}");
    assert_ne!(b["nics"][1]["mac"], b["nics"][0]["mac"], "{b}");
    let taken = nodes[0].cli_result(&["vm", "create", "c", "--disk", "64M", "--nic", &format!("lan,mac={mac_a}")]);
    assert!(taken.unwrap_err().contains("VM a"), "a MAC is one NIC's");
    let in_use = nodes[0].cli_result(&["network", "delete", "lan"]).unwrap_err();
    assert!(in_use.contains("VM \"a\"") || in_use.contains("VM \"b\""), "{in_use}");

    nodes[0].cli(&["vm", "start", "a", "--node", &addr(0)]);
    nodes[0].cli(&["vm", "start", "b", "--node", &addr(1)]);
    let both = |text: &str, peer: u8| {
        pings(text, &format!("10.99.1.{peer}")) >= 3 && pings(text, &format!("10.99.2.{peer}")) >= 3
    };
    let a = console_until(&nodes[0], "a", "a reaches b on both networks", |text| both(text, 2));
    let before = console_until(&nodes[0], "b", "b reaches a on both networks", |text| both(text, 1));
    // The overlay's MTU is the underlay's less VXLAN's 50 bytes, and the guest is told so.
    assert_eq!(nic_line(&a, "eth0"), format!("mac={mac_a} mtu=1450"), "{a}");
    assert_eq!(
        nic_line(&a, "eth1"),
        format!(
            "mac={} mtu=1500",
            json(&nodes[0].cli(&["--json", "vm", "show", "a"]))["nics"][1]["mac"].as_str().unwrap()
        )
    );
    assert_eq!(nic_line(&before, "eth0"), format!("mac={mac_b} mtu=1450"), "{before}");

    // b moves to the third node: a new tap in that node's bridges, the same MACs. Its QEMU
    // announces it, so the first node's overlay knows where b is before b's guest has
    // said a word (its kernel takes seconds to boot).
    let learned = |i: usize| {
        let fdb = shown_in(&topology.nodes[i], "bridge", &["fdb", "show", "dev", "cvvx0"]);
        fdb.lines().filter(|l| l.starts_with(&mac_b)).map(String::from).collect::<Vec<_>>()
    };
    assert!(learned(0).iter().any(|l| l.contains("dst 10.211.0.2")), "{:?}", learned(0));
    nodes[0].cli(&["vm", "move", "b", "--node", &addr(2)]);
    wait_until("the first node learned b's new node from its QEMU's announcement", Duration::from_secs(60), || {
        learned(0).iter().any(|l| l.contains("dst 10.211.0.3"))
    });
    let spoke = console(&nodes[0], "b");
    assert!(
        !spoke.split("boot number 2").nth(1).is_some_and(|boot| boot.contains("GUEST: eth0 has")),
        "b's guest had configured its card already, so its own frames may have taught the overlay:\n{spoke}"
    );
    wait_until("b runs on the third node", GUEST_TIMEOUT, || {
        let b = json(&nodes[0].cli(&["--json", "vm", "show", "b"]));
        b["state"]["state"] == "running"
            && b["node"] == json(&nodes[2].cli(&["--json", "cluster", "status"]))["this_node"]
    });
    let pinged_before = pings(&console(&nodes[0], "a"), "10.99.1.2");
    let after = console_until(&nodes[0], "b", "b reaches a from the third node", |text| {
        text.contains("boot number 2") && both(text.split("boot number 2").nth(1).unwrap_or_default(), 1)
    });
    let boot = after.split("boot number 2").nth(1).unwrap();
    assert_eq!(nic_line(boot, "eth0"), nic_line(&before, "eth0"), "b keeps its MAC on the overlay");
    assert_eq!(nic_line(boot, "eth1"), nic_line(&before, "eth1"), "b keeps its MAC on the bridged network");
    console_until(&nodes[0], "a", "a reaches b on the third node", |text| {
        pings(text, "10.99.1.2") >= pinged_before + 3
    });

    // Each node made its own bridges: the third holds b's taps now, the second none.
    let links = |i: usize| shown_in(&topology.nodes[i], "ip", &["-br", "link"]);
    assert!(links(2).contains("cvvx0") && links(2).contains("cvbr0") && links(2).contains("cvt1n0"), "{}", links(2));
    assert!(!links(1).contains("cvt1n0"), "b's tap went with its QEMU:\n{}", links(1));
    // The host has no address on a network's links: a guest cannot reach it through them.
    for link in ["cvbr0", "cvbr1", "cvvx0", "cvt0n0"] {
        let shown = shown_in(&topology.nodes[0], "ip", &["addr", "show", "dev", link]);
        assert!(shown.contains(link) && !shown.contains("inet"), "{link} has an address:\n{shown}");
    }

    // A network on the interface that carries a node's own address is never provided:
    // as a bridge's port it would cut the node off. A VM on it fails to start, saying why.
    nodes[0].cli(&["network", "create", "bad", "--interface", "eth0"]);
    nodes[0].cli(&[
        "vm",
        "create",
        "c",
        "--kernel",
        guest.join("vmlinuz").to_str().unwrap(),
        "--nic",
        "bad",
        "--ha",
        "off",
    ]);
    let refused = nodes[0].cli_result(&["vm", "start", "c", "--node", &addr(0)]).unwrap_err();
    assert!(refused.contains("holds the address 10.211.0.1"), "{refused}");
    assert!(links(0).contains("eth0") && !links(0).contains("cvbr2"), "{}", links(0));
    // Each node says so, and the cluster places no VM on it where it cannot be had.
    let gaps = |network: &str| {
        let listed = json(&nodes[0].cli(&["--json", "network", "list"]));
        let found = listed.as_array().unwrap().iter().find(|n| n["name"] == network).cloned().unwrap();
        found["unavailable"].as_array().unwrap().iter().map(|g| g["node"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let node_id = |i: usize| json(&nodes[i].cli(&["--json", "cluster", "status"]))["this_node"].as_u64().unwrap();
    wait_until("every node reported it cannot provide the network", Duration::from_secs(30), || gaps("bad").len() == 3);
    assert!(nodes[0].cli(&["network", "list"]).contains("holds the address 10.211.0.2"));
    let nowhere = nodes[0].cli_result(&["vm", "start", "c"]).unwrap_err();
    assert!(nowhere.contains("cannot provide network \"bad\""), "{nowhere}");
    nodes[0].cli(&["vm", "delete", "c"]);
    nodes[0].cli(&["network", "delete", "bad"]);

    // A network only some nodes have: a VM on it starts on one of them.
    for i in [0, 2] {
        ip(Some(&topology.nodes[i]), &["link", "add", "side0", "type", "veth", "peer", "name", "side1"]);
    }
    nodes[0].cli(&["network", "create", "side", "--interface", "side0"]);
    wait_until("the second node reported it has no side0", Duration::from_secs(30), || gaps("side") == [node_id(1)]);
    nodes[0].cli(&["vm", "create", "d", "--kernel", guest.join("vmlinuz").to_str().unwrap(), "--nic", "side"]);
    let refused = nodes[0].cli_result(&["vm", "start", "d", "--node", &addr(1)]).unwrap_err();
    assert!(refused.contains("cannot provide network \"side\""), "{refused}");
    // a runs on the first node and b on the third: the second, which runs none, would be
    // the least loaded.
    // (A kernel without its initrd: whether it gets far is not the point here; the node
    // that tried reports it, running or failed.)
    let _ = nodes[0].cli_result(&["vm", "start", "d"]);
    wait_until("a node took d", Duration::from_secs(60), || {
        !json(&nodes[0].cli(&["--json", "vm", "show", "d"]))["node"].is_null()
    });
    let d = json(&nodes[0].cli(&["--json", "vm", "show", "d"]));
    assert!(d["node"].as_u64().is_some_and(|n| n != node_id(1)), "{d}");
    nodes[0].cli(&["vm", "stop", "d", "--force"]);
    nodes[0].cli(&["vm", "delete", "d"]);
    nodes[0].cli(&["network", "delete", "side"]);

    // A network is deleted once no VM has a card on it; every node takes its links away.
    nodes[0].cli(&["vm", "stop", "a", "--force"]);
    nodes[0].cli(&["vm", "stop", "b", "--force"]);
    nodes[0].cli(&["vm", "delete", "a"]);
    nodes[0].cli(&["vm", "delete", "b"]);
    nodes[0].cli(&["network", "delete", "over"]);
    wait_until("every node took the overlay's links away", Duration::from_secs(30), || {
        (0..3).all(|i| !links(i).contains("cvvx0") && !links(i).contains("cvbr0"))
    });
    assert!(links(0).contains("cvbr1"), "the other network stays:\n{}", links(0));
    drop(nodes);
}
