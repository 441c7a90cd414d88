//! Guests as people run them: ordinary disk images booted by their firmware from a
//! replicated volume, on whichever node starts them.

mod common;

use common::{cluster, guest, json, wait_until, NodeProcess, GUEST_TIMEOUT};

fn console(node: &NodeProcess, name: &str) -> String {
    node.cli(&["vm", "console", name, "--no-follow"])
}

fn vm_state(node: &NodeProcess, name: &str) -> serde_json::Value {
    json(&node.cli(&["--json", "vm", "show", name]))
}

/// The console once `done` holds for it; on a timeout, the console, the VM's state and
/// QEMU's log of the node running it are in the panic.
fn console_until(nodes: &[NodeProcess], name: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let text = console(&nodes[0], name);
        if done(&text) {
            return text;
        }
        if std::time::Instant::now() > deadline {
            let state = vm_state(&nodes[0], name);
            let id = state["id"].as_u64().unwrap_or_default();
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| std::fs::read_to_string(n.vm_dir(&format!("vm-{id}")).join("qemu.log")).unwrap_or_default())
                .collect();
            panic!("timed out waiting until {what}\nstate: {state}\nconsole:\n{text}\nQEMU logs: {logs:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// What follows `prefix` on the console line that has it.
fn after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|line| line.split_once(prefix).map(|(_, rest)| rest.trim()))
}

#[test]
fn a_gpt_uefi_image_boots_from_a_replicated_volume_and_on_another_node_with_its_variables() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [41, 42, 43], 19000);
    // An ordinary disk image (GPT, an EFI system partition with systemd-boot, an ext4 root):
    // no kernel handed to QEMU, UEFI by default.
    let image = guest.join("uefi.img");
    nodes[0].cli(&[
        "vm",
        "create",
        "efi",
        "--memory",
        "256M",
        "--disk",
        "128M,replicas=2",
        "--image",
        image.to_str().unwrap(),
    ]);
    let vars = json(&nodes[0].cli(&["--json", "volume", "show", "efi-uefi-vars"]));
    assert_eq!(vars["replicas"], 2, "the variables are kept as safely as the disk: {vars}");

    nodes[0].cli(&["vm", "start", "efi", "--node", &nodes[0].addr]);
    let first = console_until(&nodes, "efi", "the guest wrote its UEFI variable and waits", |text| {
        text.contains("GUEST: ready; waiting for the power button")
    });
    assert!(first.contains("GUEST: root filesystem on /dev/vda2, boot number 1"), "{first}");
    assert!(first.contains("GUEST: booted by UEFI"), "{first}");
    let written = after(&first, "GUEST: UEFI variable written:").unwrap_or_else(|| panic!("{first}")).to_string();
    // The firmware found the boot loader on the replicated volume by itself.
    assert!(first.contains("BdsDxe: starting"), "{first}");
    nodes[1].cli(&["vm", "stop", "efi"]);
    wait_until("the guest shut down", GUEST_TIMEOUT, || vm_state(&nodes[0], "efi")["state"]["state"] == "stopped");

    nodes[2].cli(&["vm", "start", "efi", "--node", &nodes[2].addr]);
    let second = console_until(&nodes, "efi", "the guest booted on the third node", |text| {
        text.contains("boot number 2") && text.contains("GUEST: ready; waiting for the power button")
    });
    let kept = after(&second, "GUEST: UEFI variable kept:").unwrap_or_else(|| panic!("{second}"));
    assert_eq!(kept, written, "the variable the guest set on the first node: {second}");
    nodes[2].cli(&["vm", "stop", "efi", "--force"]);
}

#[test]
fn bios_is_refused_for_a_disk_with_the_reason_and_nothing_is_made() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [44], 19010);
    let refused =
        common::run(&nodes[0].addr, &["vm", "create", "legacy", "--disk", "64M,replicas=1", "--firmware", "bios"])
            .unwrap_err();
    assert!(refused.contains("BIOS cannot boot a disk converge serves") && refused.contains("UEFI"), "{refused}");
    let volumes = nodes[0].cli(&["volume", "list"]);
    assert!(!volumes.contains("legacy"), "nothing made: {volumes}");
}

#[test]
fn a_vm_created_with_an_ssh_key_and_a_host_name_finds_them_in_its_cidata_seed() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [46, 47], 19020);
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOq1b3pZ5k9h2K7dR4sT0uVwXyZaBcDeFgHiJkLmNoPq admin@laptop";
    let key_file = dir.path().join("id_ed25519.pub");
    std::fs::write(&key_file, format!("# the admin's key\n{key}\n")).unwrap();
    let path = |file: &str| guest.join(file).display().to_string();
    let args = [
        "vm",
        "create",
        "seeded",
        "--memory",
        "256M",
        "--disk",
        "64M,replicas=2",
        "--image",
        &path("rootfs.img"),
        "--kernel",
        &path("vmlinuz"),
        "--initrd",
        &path("initramfs.cpio.gz"),
        "--cmdline",
        "console=ttyS0 panic=-1 quiet",
        "--ssh-key",
        key_file.to_str().unwrap(),
        "--hostname",
        "seeded-vm.example",
    ];
    nodes[0].cli(&args);
    let vm = vm_state(&nodes[0], "seeded");
    assert_eq!(vm["seed"], "seeded-cidata", "{vm}");

    nodes[0].cli(&["vm", "start", "seeded", "--node", &nodes[1].addr]);
    let console = console_until(&nodes, "seeded", "the guest read its seed", |text| {
        text.contains("GUEST: ready; waiting for the power button")
    });
    assert!(console.contains("GUEST: cidata meta-data: local-hostname: \"seeded-vm.example\""), "{console}");
    assert!(console.contains(&format!("GUEST: cidata meta-data:   - \"{key}\"")), "{console}");
    assert!(console.contains("GUEST: cidata meta-data: instance-id: \"iid-seeded-"), "{console}");
    assert!(console.contains("GUEST: cidata user-data: hostname: \"seeded-vm.example\""), "{console}");
    assert!(console.contains("GUEST: cidata network-config: version: 2"), "{console}");
    nodes[0].cli(&["vm", "stop", "seeded", "--force"]);

    // A key file holding no key, and a host name that would break the seed, are refused.
    let empty = dir.path().join("empty.pub");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    let no_key =
        common::run(&nodes[0].addr, &["vm", "create", "x", "--disk", "64M", "--ssh-key", empty.to_str().unwrap()]);
    assert!(no_key.unwrap_err().contains("holds no SSH public key"));
    let bad_host = common::run(&nodes[0].addr, &["vm", "create", "y", "--disk", "64M", "--hostname", "a b"]);
    assert!(bad_host.unwrap_err().contains("is not a host name"));
    assert!(!nodes[0].cli(&["volume", "list"]).contains("y-disk0"), "nothing made for a refused seed");
}

#[test]
fn three_bare_daemons_become_a_running_vm_on_a_replicated_disk_in_four_commands() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes: Vec<NodeProcess> = [48, 49, 50].iter().map(|&ip| NodeProcess::start(dir.path(), ip, 19030)).collect();
    let disk = |i: usize| format!("{},size=512M", dir.path().join(format!("disk{i}")).display());

    // 1: init with a disk.
    let init = json(&nodes[0].cli(&["--json", "cluster", "init", "--disk", &disk(0)]));
    assert_eq!(init["disks"].as_array().map(Vec::len), Some(1), "{init}");
    let token = init["join_token"].as_str().unwrap();
    // 2, 3: two joins, each with its disk.
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let joined = json(&node.cli(&[
            "--json",
            "cluster",
            "join",
            "--peer",
            &nodes[0].addr,
            "--join-token",
            token,
            "--disk",
            &disk(i),
        ]));
        assert_eq!(joined["disks"][0]["node"], joined["node"], "{joined}");
    }
    // 4: a VM from an ordinary image, on a 2-replica disk, started.
    let image = guest.join("uefi.img");
    let started = json(&nodes[0].cli(&[
        "--json",
        "vm",
        "create",
        "web",
        "--memory",
        "256M",
        "--disk",
        "128M,replicas=2",
        "--image",
        image.to_str().unwrap(),
        "--start",
    ]));
    assert_eq!(started["state"]["state"], "running", "{started}");
    let disk0 = json(&nodes[1].cli(&["--json", "volume", "show", "web-disk0"]));
    assert_eq!(disk0["replicas"], 2, "{disk0}");
    console_until(&nodes, "web", "the guest booted", |text| {
        text.contains("GUEST: ready; waiting for the power button")
    });

    // Starting it again is refused and says how to move it; moving a VM that is not
    // running is refused too; a move is its own verb.
    let again = common::run(&nodes[0].addr, &["vm", "start", "web"]).unwrap_err();
    assert!(again.contains("converge vm move web --node"), "{again}");
    let moved = json(&nodes[0].cli(&["--json", "vm", "move", "web", "--node", &nodes[2].addr]));
    assert_eq!(moved["state"]["state"], "running", "{moved}");
    nodes[0].cli(&["vm", "stop", "web", "--force"]);
    let not_running = common::run(&nodes[0].addr, &["vm", "move", "web", "--node", &nodes[1].addr]).unwrap_err();
    assert!(not_running.contains("is not running"), "{not_running}");

    // With --json, a failure is JSON, and the exit code tells its kind.
    let (code, stdout, _) = common::run_code(&nodes[0].addr, &["--json", "vm", "show", "nothing-here"]);
    assert_eq!((code, json(&stdout)["kind"].as_str()), (3, Some("not_found")), "{stdout}");
    let (code, stdout, _) =
        common::run_code(&nodes[0].addr, &["--json", "vm", "create", "x", "--disk", "1M", "--hostname", "a b"]);
    assert_eq!((code, json(&stdout)["kind"].as_str()), (4, Some("refused")), "{stdout}");
    assert!(json(&stdout)["error"].as_str().unwrap().contains("is not a host name"), "{stdout}");
    let unreachable = std::process::Command::new(common::BIN)
        .args(["--json", "--server", "https://127.0.0.1:1", "--ca", nodes[0].ca().to_str().unwrap(), "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(5), "{unreachable:?}");
    let said = json(&String::from_utf8_lossy(&unreachable.stdout));
    assert_eq!(said["kind"], "unreachable", "{said}");
}

#[test]
fn the_console_is_interactive_through_any_node_and_a_second_viewer_watches() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [51, 52], 19040);
    common::create_guest_vm(&nodes[0], &guest, "typed", &["64M,replicas=2"], "console=ttyS0 panic=-1 quiet");
    nodes[0].cli(&["vm", "start", "typed", "--node", &nodes[1].addr]);
    console_until(&nodes, "typed", "the guest waits", |text| {
        text.contains("GUEST: ready; waiting for the power button")
    });

    // A viewer through the other node, watching only.
    let watcher = std::process::Command::new(common::BIN)
        .args(["--socket", nodes[0].data_dir.join("api.sock").to_str().unwrap(), "vm", "console", "typed", "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A session through the node that does not run the VM: a line typed, then Ctrl-].
    let mut session = std::process::Command::new(common::BIN)
        .args(["--socket", nodes[0].data_dir.join("api.sock").to_str().unwrap(), "vm", "console", "typed"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut keys = session.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        keys.write_all(b"hello through converge\n").unwrap();
        keys.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        keys.write_all(&[0x1d]).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while session.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "Ctrl-] ends the session");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let session = session.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&session.stdout);
    assert!(session.status.success(), "{session:?}");
    assert!(shown.contains("GUEST: console got: hello through converge"), "the session shows the echo: {shown}");
    assert!(String::from_utf8_lossy(&session.stderr).contains("Ctrl-] leaves"));

    // Over the network: an operator's token opens a session (here left at once); a
    // viewer's is refused, since reading a console is as good as typing into it.
    let over_network = |role: &str| {
        let target = [
            "--server".to_string(),
            format!("https://{}", nodes[1].addr),
            "--token".to_string(),
            nodes[0].token(role),
            "--ca".to_string(),
            nodes[0].ca().display().to_string(),
        ];
        let mut child = std::process::Command::new(common::BIN)
            .args(&target)
            .args(["vm", "console", "typed"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut keys = child.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let _ = keys.write_all(&[0x1d]);
        drop(keys);
        child.wait_with_output().unwrap()
    };
    let operator = over_network("operator");
    assert!(operator.status.success(), "{operator:?}");
    assert!(String::from_utf8_lossy(&operator.stdout).contains("GUEST: ready"), "{operator:?}");
    let viewer = over_network("viewer");
    assert_eq!(viewer.status.code(), Some(4), "{viewer:?}");
    assert!(String::from_utf8_lossy(&viewer.stderr).contains("operator"), "{viewer:?}");

    nodes[0].cli(&["vm", "stop", "typed"]);
    let watched = watcher.wait_with_output().unwrap();
    let watched = String::from_utf8_lossy(&watched.stdout);
    assert!(watched.contains("GUEST: console got: hello through converge"), "the watcher saw it too: {watched}");
    assert!(watched.contains("GUEST: power button pressed"), "{watched}");
}

#[test]
fn an_iso_attached_as_a_cd_rom_boots_an_installer_by_uefi() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [53, 54], 19050);
    let iso = guest.join("installer.iso");
    let rootfs = guest.join("rootfs.img");
    nodes[0].cli(&[
        "vm",
        "create",
        "installed",
        "--memory",
        "256M",
        "--disk",
        "64M,replicas=2",
        "--image",
        rootfs.to_str().unwrap(),
        "--cdrom",
        iso.to_str().unwrap(),
    ]);
    let vm = vm_state(&nodes[0], "installed");
    assert_eq!(vm["cdrom"], "installed-cdrom", "{vm}");
    let kept = json(&nodes[0].cli(&["--json", "volume", "show", "installed-cdrom"]));
    assert_eq!(kept["replicas"], 2, "the ISO is kept as safely as the disk: {kept}");

    nodes[0].cli(&["vm", "start", "installed", "--node", &nodes[1].addr]);
    let console = console_until(&nodes, "installed", "the installer booted", |text| {
        text.contains("GUEST: ready; waiting for the power button")
    });
    assert!(console.contains("from PciRoot(0x0)/Pci(0x1F,0x2)/Sata"), "the firmware booted the CD-ROM: {console}");
    assert!(console.contains("GUEST: booted from the CD-ROM"), "{console}");
    assert!(console.contains("GUEST: booted by UEFI"), "{console}");
    nodes[0].cli(&["vm", "stop", "installed", "--force"]);
}

#[test]
fn a_vm_changed_while_stopped_gets_its_cpus_disks_and_sizes_at_the_next_start() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [55, 56], 19060);
    common::create_guest_vm(
        &nodes[0],
        &guest,
        "shaped",
        &["64M,replicas=2", "64M,replicas=2"],
        "console=ttyS0 panic=-1 quiet",
    );
    let set = json(&nodes[0].cli(&["--json", "vm", "set", "shaped", "--cpus", "2", "--memory", "320M"]));
    assert_eq!((set["cpus"].as_u64(), set["memory_bytes"].as_u64()), (Some(2), Some(320 << 20)), "{set}");
    nodes[0].cli(&["volume", "resize", "shaped-disk1", "--size", "96M"]);
    let added = json(&nodes[0].cli(&["--json", "vm", "disk", "add", "shaped", "32M,replicas=1"]));
    assert_eq!(added["disks"], serde_json::json!(["shaped-disk0", "shaped-disk1", "shaped-disk2"]), "{added}");
    let shrink = common::run(&nodes[0].addr, &["volume", "resize", "shaped-disk1", "--size", "64M"]).unwrap_err();
    assert!(shrink.contains("only grows"), "{shrink}");

    nodes[0].cli(&["vm", "start", "shaped", "--node", &nodes[1].addr]);
    let console = console_until(&nodes, "shaped", "the guest booted", |text| text.contains("GUEST: ready"));
    assert!(
        console.contains("GUEST: 2 vCPUs; disks: vda=67108864 vdb=100663296 vdc=33554432"),
        "the guest sees the new shape: {console}"
    );
    // While it runs: its disks and their sizes stay; its vCPUs may change for next time.
    let resize = common::run(&nodes[0].addr, &["volume", "resize", "shaped-disk1", "--size", "128M"]).unwrap_err();
    assert!(resize.contains("which is running: stop it first"), "{resize}");
    let add = common::run(&nodes[0].addr, &["vm", "disk", "add", "shaped", "16M"]).unwrap_err();
    assert!(add.contains("stop it to add a disk"), "{add}");
    let later = nodes[0].cli(&["vm", "set", "shaped", "--cpus", "1"]);
    assert!(later.contains("at its next start"), "{later}");

    nodes[0].cli(&["vm", "stop", "shaped"]);
    let detached = json(&nodes[0].cli(&["--json", "vm", "disk", "detach", "shaped", "shaped-disk2"]));
    assert_eq!(detached["disks"], serde_json::json!(["shaped-disk0", "shaped-disk1"]), "{detached}");
    assert!(nodes[0].cli(&["volume", "list"]).contains("shaped-disk2"), "a detached volume stays");
    let boot_disk = common::run(&nodes[0].addr, &["vm", "disk", "detach", "shaped", "shaped-disk9"]).unwrap_err();
    assert!(boot_disk.contains("shaped-disk9"), "{boot_disk}");
}
