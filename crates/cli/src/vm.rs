//! `converge vm ...`.

use crate::args::VmCommand;
use crate::output::Output;
use crate::transfer;
use anyhow::{bail, Context, Result};
use api::client::Client;
use api::v1;
use futures_util::StreamExt;
use model::{format_size, parse_size, VmDesired, VmRunState};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `vm start` and `vm stop` wait for the VM by default (TCG guests are slow).
const WAIT_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run(api: &Client, out: &Output, command: VmCommand) -> Result<()> {
    match command {
        VmCommand::Create {
            name,
            cpus,
            memory,
            disks,
            image,
            image_format,
            template,
            firmware,
            cdrom,
            kernel,
            initrd,
            cmdline,
            ssh_keys,
            user,
            hostname,
            cloud_init,
            nics,
            start,
            node,
            ha,
            priority,
            anti_affinity,
        } => {
            let cloud_init = cloud_init_request(&ssh_keys, user, hostname, cloud_init.as_deref())?;
            let ha = model::HaPolicy { enabled: ha == crate::args::OnOff::On, priority, anti_affinity };
            let memory_bytes = parse_size(&memory)?;
            let nics = nics.iter().map(|n| nic_request(n)).collect::<Result<Vec<_>>>()?;
            let mut disks = disks.iter().map(|d| disk_request(d)).collect::<Result<Vec<_>>>()?;
            if let Some(template) = &template {
                let size_bytes = api.volume(template).await?.size_bytes;
                match disks.first() {
                    None => disks.push(v1::DiskRequest { size_bytes, replicas: 2 }),
                    Some(first) if first.size_bytes < size_bytes => bail!(
                        "the first disk ({}) is smaller than template {template} ({})",
                        format_size(first.size_bytes),
                        format_size(size_bytes)
                    ),
                    Some(_) => {}
                }
            }
            let replicas = disks.first().map(|d| d.replicas).unwrap_or(2);
            if image.is_some() && disks.is_empty() {
                bail!("--image needs a --disk to copy it onto");
            }
            // The image is checked before anything is made.
            let image = image.map(|file| crate::image::inspect(&file, image_format)).transpose()?;
            if let (Some(image), Some(first)) = (&image, disks.first()) {
                if image.virtual_size > first.size_bytes {
                    bail!(
                        "{} holds a disk of {} bytes, which does not fit the first disk ({} bytes)",
                        image.path.display(),
                        image.virtual_size,
                        first.size_bytes
                    );
                }
            }
            // Boot files go into volumes of their own first; if the VM is then refused, they
            // are removed again. Never into volumes that exist: they may be another VM's.
            if api.vm(&name).await.is_ok() {
                bail!("A VM named {name:?} exists already: pick another name or delete it first");
            }
            for (volume, wanted) in [
                (format!("{name}-kernel"), kernel.is_some()),
                (format!("{name}-initrd"), initrd.is_some()),
                (format!("{name}-cdrom"), cdrom.is_some()),
            ] {
                if wanted && api.volume(&volume).await.is_ok() {
                    bail!("Volume {volume} exists already: delete it or pick another VM name");
                }
            }
            let mut uploaded = Vec::new();
            let created = async {
                let boot = match &kernel {
                    None if firmware == crate::args::Firmware::Bios => v1::BootRequest::Disk,
                    None => v1::BootRequest::Uefi,
                    Some(kernel) => {
                        let kernel =
                            upload(api, out, &format!("{name}-kernel"), kernel, replicas, &mut uploaded).await?;
                        let initrd = match &initrd {
                            Some(initrd) => Some(
                                upload(api, out, &format!("{name}-initrd"), initrd, replicas, &mut uploaded).await?,
                            ),
                            None => None,
                        };
                        v1::BootRequest::Kernel { kernel, initrd, cmdline }
                    }
                };
                let cdrom = match &cdrom {
                    Some(iso) => Some(upload(api, out, &format!("{name}-cdrom"), iso, replicas, &mut uploaded).await?),
                    None => None,
                };
                let request = v1::CreateVm {
                    name: name.clone(),
                    cpus,
                    memory_bytes,
                    disks,
                    boot,
                    ha: ha.clone(),
                    cloud_init,
                    cdrom,
                    nics,
                };
                Ok::<_, anyhow::Error>(api.create_vm(&request).await?)
            }
            .await;
            let vm = match created {
                Ok(vm) => vm,
                Err(e) => {
                    for volume in &uploaded {
                        let _ = api.delete_volume(volume).await;
                    }
                    return Err(e);
                }
            };
            // The first disk's contents; a VM whose disk could not be filled is removed again.
            let filled = match (&image, &template, vm.disks.first()) {
                (Some(image), _, Some(disk)) => {
                    transfer::import(api, out, disk, &image.path, replicas, Some(image.format)).await.map(drop)
                }
                (_, Some(template), Some(disk)) => transfer::clone(api, out, template, disk, None).await.map(drop),
                _ => Ok(()),
            };
            if let Err(e) = filled {
                if let Err(cleanup) = api.delete_vm(&name).await {
                    eprintln!("removing VM {name} again failed too: {cleanup}");
                }
                return Err(e.context(format!("VM {name} was not created: its first disk could not be filled")));
            }
            let created = format!(
                "Created VM {name}: {} vCPU, {}, disks {}.",
                vm.cpus,
                format_size(vm.memory_bytes),
                vm.disks.join(", ")
            );
            if !start {
                return out.print(&vm, || created);
            }
            if !out.json {
                eprintln!("{created}");
            }
            start_and_wait(api, out, &name, node, false, false).await
        }
        VmCommand::Start { name, node, no_wait } => start_and_wait(api, out, &name, node, false, no_wait).await,
        VmCommand::Move { name, node, no_wait } => {
            let vm = api.vm(&name).await?;
            if !matches!(vm.desired, VmDesired::Running { .. }) {
                bail!("VM {name} is not running: start it where you want it with `converge vm start {name} --node {node}`");
            }
            start_and_wait(api, out, &name, Some(node), true, no_wait).await
        }
        VmCommand::Stop { name, force, no_wait } => {
            let vm = api.stop_vm(&name, &v1::StopVm { force }).await?;
            let vm = if no_wait { vm } else { wait(api, out, &name, stopped).await? };
            out.print(&vm, || format!("VM {name} {}.", describe(&vm.state)))
        }
        VmCommand::List => {
            let vms = api.vms().await?;
            out.print(&vms, || {
                let mut text = format!(
                    "{:<20} {:<9} {:<34} {:<18} {:>4} {:>10}",
                    "NAME", "DESIRED", "STATE", "NODE", "CPUS", "MEMORY"
                );
                for vm in &vms {
                    let desired = match vm.desired {
                        VmDesired::Stopped => "stopped",
                        VmDesired::Running { .. } => "running",
                        VmDesired::Moving { .. } => "moving",
                    };
                    // The node only while a VM is there; a failure as one short line.
                    let (state, node) = match &vm.state {
                        VmRunState::Failed { reason } => (format!("failed: {}", short(reason, 26)), None),
                        VmRunState::Stopped => ("stopped".to_string(), None),
                        other => (describe(other), vm.node),
                    };
                    let node = node.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
                    let line = format!(
                        "\n{:<20} {:<9} {:<34} {:<18} {:>4} {:>10}",
                        vm.name,
                        desired,
                        state,
                        node,
                        vm.cpus,
                        format_size(vm.memory_bytes)
                    );
                    text.push_str(&line);
                }
                if vms.iter().any(|vm| matches!(vm.state, VmRunState::Failed { .. })) {
                    text.push_str("\n\n`converge vm show NAME` tells why a VM failed.");
                }
                text
            })
        }
        VmCommand::Show { name } => {
            let vm = api.vm(&name).await?;
            out.print(&vm, || details(&vm))
        }
        VmCommand::Console { name, no_follow: false, watch: false } => crate::console::interactive(api, &name).await,
        VmCommand::Console { name, no_follow, .. } => {
            let mut stream = api.console(&name, !no_follow).await?;
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk.context("the console stream broke off")?)?;
                stdout.flush()?;
            }
            Ok(())
        }
        VmCommand::Set { name, cpus, memory } => {
            if cpus.is_none() && memory.is_none() {
                bail!("nothing to change: give --cpus or --memory");
            }
            let memory_bytes = memory.as_deref().map(parse_size).transpose()?;
            let vm = api.update_vm(&name, &v1::UpdateVm { cpus, memory_bytes }).await?;
            let when = if matches!(vm.desired, VmDesired::Stopped) { "when it starts" } else { "at its next start" };
            out.print(&vm, || format!("VM {name} gets {} vCPU and {} {when}.", vm.cpus, format_size(vm.memory_bytes)))
        }
        VmCommand::Disk(crate::args::VmDiskCommand::Add { name, disk }) => {
            let vm = api.add_vm_disk(&name, &disk_request(&disk)?).await?;
            out.print(&vm, || format!("VM {name} has disks {}.", vm.disks.join(", ")))
        }
        VmCommand::Disk(crate::args::VmDiskCommand::Detach { name, volume }) => {
            let vm = api.detach_vm_volume(&name, &volume).await?;
            out.print(&vm, || {
                format!("Took {volume} off VM {name} (the volume stays; `converge volume delete {volume}` removes it).")
            })
        }
        VmCommand::Delete { name } => {
            api.delete_vm(&name).await?;
            out.print(&serde_json::json!({ "deleted": name }), || format!("Deleted VM {name} and its disks."))
        }
    }
}

/// Parses `SIZE[,replicas=R]`.
fn disk_request(text: &str) -> Result<v1::DiskRequest> {
    let mut parts = text.split(',');
    let size_bytes = parse_size(parts.next().unwrap_or_default())?;
    let mut replicas = 2;
    for option in parts {
        match option.split_once('=') {
            Some(("replicas", r)) => replicas = r.parse().with_context(|| format!("replicas={r} is not a number"))?,
            _ => bail!("unknown disk option {option:?} in --disk {text}: use SIZE[,replicas=R]"),
        }
    }
    Ok(v1::DiskRequest { size_bytes, replicas })
}

/// Parses `NETWORK[,mac=MAC]`.
fn nic_request(text: &str) -> Result<v1::NicRequest> {
    let mut parts = text.split(',');
    let network = parts.next().unwrap_or_default().to_string();
    if network.is_empty() {
        bail!("--nic {text:?} names no network: use NETWORK[,mac=MAC]");
    }
    let mut mac = None;
    for option in parts {
        match option.split_once('=') {
            Some(("mac", m)) => mac = Some(m.parse::<model::Mac>().map_err(anyhow::Error::msg)?),
            _ => bail!("unknown NIC option {option:?} in --nic {text}: use NETWORK[,mac=MAC]"),
        }
    }
    Ok(v1::NicRequest { network, mac })
}

/// What cloud-init is to be told, if the user asked anything of it: the key lines of the
/// SSH key files, the user, the host name, the user's own user-data.
fn cloud_init_request(
    ssh_keys: &[PathBuf],
    user: Option<String>,
    hostname: Option<String>,
    user_data: Option<&Path>,
) -> Result<Option<v1::CloudInit>> {
    if ssh_keys.is_empty() && user.is_none() && hostname.is_none() && user_data.is_none() {
        return Ok(None);
    }
    let mut keys = Vec::new();
    for file in ssh_keys {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading the SSH key {}", file.display()))?;
        let lines: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
        if lines.is_empty() {
            bail!("{} holds no SSH public key", file.display());
        }
        keys.extend(lines);
    }
    let user_data = user_data
        .map(|file| std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display())))
        .transpose()?;
    Ok(Some(v1::CloudInit { hostname, user, ssh_keys: keys, user_data }))
}

/// Imports a boot file (a kernel, an initrd, an ISO) into a volume of its own, whose name
/// goes into `uploaded` (removed again if the VM is not made).
async fn upload(
    api: &Client,
    out: &Output,
    volume: &str,
    file: &Path,
    replicas: u8,
    uploaded: &mut Vec<String>,
) -> Result<v1::BootFileRef> {
    // Recorded first: an upload that breaks off leaves a volume made for it (none of these
    // names existed before, `vm create` checks).
    uploaded.push(volume.to_string());
    let report = transfer::import(api, out, volume, file, replicas, Some(crate::image::Format::Raw)).await?;
    Ok(v1::BootFileRef { volume: volume.to_string(), len_bytes: report.bytes })
}

/// Starts (or, with `force`, moves) a VM and, unless `no_wait`, waits until it runs there.
async fn start_and_wait(
    api: &Client,
    out: &Output,
    name: &str,
    node: Option<String>,
    force: bool,
    no_wait: bool,
) -> Result<()> {
    let before = api.vm(name).await?.state;
    let vm = api.start_vm(name, &v1::StartVm { node, force }).await?;
    let target = match vm.desired {
        VmDesired::Running { node } => node,
        VmDesired::Moving { .. } => bail!("VM {name} is moving off a drained node meanwhile"),
        VmDesired::Stopped => bail!("VM {name} was stopped again meanwhile"),
    };
    // A failure this start did not cause (an earlier start's, still shown until the node
    // reports again) is not this start's answer.
    let mut earlier = matches!(before, VmRunState::Failed { .. }).then_some(before);
    let vm = if no_wait {
        vm
    } else {
        wait(api, out, name, |vm| {
            if earlier.as_ref().is_some_and(|e| *e != vm.state) {
                earlier = None;
            }
            running_on(vm, target, earlier.as_ref())
        })
        .await?
    };
    out.print(&vm, || format!("VM {name} {} on {target}.", describe(&vm.state)))
}

/// Whether the VM runs on `node` (or failed there, unless that failure is `earlier`'s).
fn running_on(vm: &v1::VmInfo, node: model::NodeId, earlier: Option<&VmRunState>) -> Option<Result<()>> {
    match &vm.state {
        VmRunState::Running { .. } if vm.node == Some(node) => Some(Ok(())),
        // (A VM without HA that fails is stopped: then the failure is this start's too.)
        VmRunState::Failed { reason }
            if vm.node == Some(node) && (earlier != Some(&vm.state) || vm.desired == VmDesired::Stopped) =>
        {
            Some(Err(anyhow::anyhow!("VM failed to start: {reason}")))
        }
        _ => None,
    }
}

fn stopped(vm: &v1::VmInfo) -> Option<Result<()>> {
    matches!(vm.state, VmRunState::Stopped | VmRunState::Failed { .. }).then_some(Ok(()))
}

async fn wait(
    api: &Client,
    out: &Output,
    name: &str,
    mut done: impl FnMut(&v1::VmInfo) -> Option<Result<()>>,
) -> Result<v1::VmInfo> {
    let started = Instant::now();
    if !out.json {
        eprint!("waiting for VM {name}...");
    }
    loop {
        let vm = api.vm(name).await?;
        if let Some(result) = done(&vm) {
            if !out.json {
                eprintln!(" {:.1} s", started.elapsed().as_secs_f64());
            }
            return result.map(|()| vm);
        }
        if started.elapsed() > WAIT_TIMEOUT {
            bail!(
                "VM {name} is still {} after {} s; see `converge vm show {name}`",
                describe(&vm.state),
                WAIT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `text`'s first line, at most `max` characters (an ellipsis says there was more).
fn short(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max && line.len() == text.len() {
        return line.to_string();
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn describe(state: &VmRunState) -> String {
    match state {
        VmRunState::Stopped => "stopped".into(),
        VmRunState::Starting => "starting".into(),
        VmRunState::Running { accel, pid } => {
            format!("running ({}, pid {pid})", serde_json::to_string(accel).unwrap_or_default().trim_matches('"'))
        }
        VmRunState::Stopping => "stopping".into(),
        VmRunState::Failed { reason } => format!("failed: {reason}"),
    }
}

fn details(vm: &v1::VmInfo) -> String {
    let desired = match vm.desired {
        VmDesired::Stopped => "stopped".to_string(),
        VmDesired::Running { node } => format!("running on {node}"),
        VmDesired::Moving { from, to } => format!("moving from {from} to {to} (shutting down there first)"),
    };
    let boot = match &vm.boot {
        model::Boot::Disk => "BIOS from the first disk".to_string(),
        model::Boot::Uefi { .. } => "UEFI from the first disk, its variables kept in a volume".to_string(),
        model::Boot::Kernel { cmdline, .. } => format!("kernel, cmdline {cmdline:?}"),
    };
    let mut node = vm.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    if vm.node_down {
        node.push_str(" (down)");
    }
    let ha = match (&vm.ha.enabled, &vm.ha.anti_affinity) {
        (false, _) => "off".to_string(),
        (true, None) => format!("on, priority {}", vm.ha.priority),
        (true, Some(group)) => format!("on, priority {}, anti-affinity group {group}", vm.ha.priority),
    };
    let mut attached = String::new();
    if let Some(seed) = &vm.seed {
        attached.push_str(&format!("\nseed:    {seed} (cloud-init)"));
    }
    if let Some(cdrom) = &vm.cdrom {
        attached.push_str(&format!("\ncdrom:   {cdrom} (booted first)"));
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        attached.push_str(&format!("\nnic{i}:    {} on network {}", nic.mac, nic.network));
    }
    format!(
        "name:    {}\nid:      {}\ncpus:    {}\nmemory:  {}\ndisks:   {}{attached}\nboot:    {boot}\nha:      {ha}\ndesired: {desired}\nnode:    {node}\nstate:   {}",
        vm.name,
        vm.id,
        vm.cpus,
        format_size(vm.memory_bytes),
        vm.disks.join(", "),
        describe(&vm.state)
    )
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn a_failure_is_one_short_line() {
        assert_eq!(short("QEMU exited", 26), "QEMU exited");
        assert_eq!(short("QEMU exited with exit status: 1: qemu: could not open", 26), "QEMU exited with exit sta…");
        assert_eq!(short("first\nsecond", 26), "first…");
        assert_eq!(short("", 26), "");
    }
}
