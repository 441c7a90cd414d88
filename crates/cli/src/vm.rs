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
use std::path::Path;
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
            kernel,
            initrd,
            cmdline,
            ha,
            priority,
            anti_affinity,
        } => {
            let ha = model::HaPolicy { enabled: ha == crate::args::OnOff::On, priority, anti_affinity };
            let memory_bytes = parse_size(&memory)?;
            let disks = disks.iter().map(|d| disk_request(d)).collect::<Result<Vec<_>>>()?;
            let replicas = disks.first().map(|d| d.replicas).unwrap_or(2);
            if image.is_some() && disks.is_empty() {
                bail!("--image needs a --disk to copy it onto");
            }
            if let (Some(image), Some(first)) = (&image, disks.first()) {
                let len = std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?.len();
                if len > first.size_bytes {
                    bail!("{} ({len} bytes) does not fit the first disk ({} bytes)", image.display(), first.size_bytes);
                }
            }
            // Boot files go into volumes of their own first; if the VM is then refused, they
            // are removed again. Never into volumes that exist: they may be another VM's.
            if api.vm(&name).await.is_ok() {
                bail!("A VM named {name:?} exists already: pick another name or delete it first");
            }
            for (volume, wanted) in
                [(format!("{name}-kernel"), kernel.is_some()), (format!("{name}-initrd"), initrd.is_some())]
            {
                if wanted && api.volume(&volume).await.is_ok() {
                    bail!("Volume {volume} exists already: delete it or pick another VM name");
                }
            }
            let mut uploaded = Vec::new();
            let created = async {
                let boot = match &kernel {
                    None => v1::BootRequest::Disk,
                    Some(kernel) => {
                        let kernel_volume = format!("{name}-kernel");
                        let kernel = upload(api, out, &kernel_volume, kernel, replicas).await?;
                        uploaded.push(kernel_volume);
                        let initrd = match &initrd {
                            Some(initrd) => {
                                let initrd_volume = format!("{name}-initrd");
                                let file = upload(api, out, &initrd_volume, initrd, replicas).await?;
                                uploaded.push(initrd_volume);
                                Some(file)
                            }
                            None => None,
                        };
                        v1::BootRequest::Kernel { kernel, initrd, cmdline }
                    }
                };
                let request = v1::CreateVm { name: name.clone(), cpus, memory_bytes, disks, boot, ha: ha.clone() };
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
            if let (Some(image), Some(disk)) = (&image, vm.disks.first()) {
                transfer::import(api, out, disk, image, replicas).await?;
            }
            out.print(&vm, || {
                format!(
                    "Created VM {name}: {} vCPU, {}, disks {}.",
                    vm.cpus,
                    format_size(vm.memory_bytes),
                    vm.disks.join(", ")
                )
            })
        }
        VmCommand::Start { name, node, force, no_wait } => {
            let vm = api.start_vm(&name, &v1::StartVm { node, force }).await?;
            let target = match vm.desired {
                VmDesired::Running { node } => node,
                VmDesired::Moving { .. } => bail!("VM {name} is moving off a drained node meanwhile"),
                VmDesired::Stopped => bail!("VM {name} was stopped again meanwhile"),
            };
            let vm = if no_wait { vm } else { wait(api, out, &name, |vm| running_on(vm, target)).await? };
            out.print(&vm, || format!("VM {name} {} on {target}.", describe(&vm.state)))
        }
        VmCommand::Stop { name, force, no_wait } => {
            let vm = api.stop_vm(&name, &v1::StopVm { force }).await?;
            let vm = if no_wait { vm } else { wait(api, out, &name, stopped).await? };
            out.print(&vm, || format!("VM {name} {}.", describe(&vm.state)))
        }
        VmCommand::List => {
            let vms = api.vms().await?;
            out.print(&vms, || {
                let mut text = format!("{:<20} {:>4} {:>10} {:<18} {:<24}", "NAME", "CPUS", "MEMORY", "NODE", "STATE");
                for vm in &vms {
                    let node = vm.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
                    let line = format!(
                        "\n{:<20} {:>4} {:>10} {:<18} {:<24}",
                        vm.name,
                        vm.cpus,
                        format_size(vm.memory_bytes),
                        node,
                        describe(&vm.state)
                    );
                    text.push_str(&line);
                }
                text
            })
        }
        VmCommand::Show { name } => {
            let vm = api.vm(&name).await?;
            out.print(&vm, || details(&vm))
        }
        VmCommand::Console { name, no_follow } => {
            let mut stream = api.console(&name, !no_follow).await?;
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk.context("the console stream broke off")?)?;
                stdout.flush()?;
            }
            Ok(())
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

/// Imports a boot file into a volume of its own.
async fn upload(api: &Client, out: &Output, volume: &str, file: &Path, replicas: u8) -> Result<v1::BootFileRef> {
    let report = transfer::import(api, out, volume, file, replicas).await?;
    Ok(v1::BootFileRef { volume: volume.to_string(), len_bytes: report.bytes })
}

fn running_on(vm: &v1::VmInfo, node: model::NodeId) -> Option<Result<()>> {
    match &vm.state {
        VmRunState::Running { .. } if vm.node == Some(node) => Some(Ok(())),
        VmRunState::Failed { reason } if vm.node == Some(node) => {
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
    done: impl Fn(&v1::VmInfo) -> Option<Result<()>>,
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
    format!(
        "name:    {}\nid:      {}\ncpus:    {}\nmemory:  {}\ndisks:   {}\nboot:    {boot}\nha:      {ha}\ndesired: {desired}\nnode:    {node}\nstate:   {}",
        vm.name,
        vm.id,
        vm.cpus,
        format_size(vm.memory_bytes),
        vm.disks.join(", "),
        describe(&vm.state)
    )
}
