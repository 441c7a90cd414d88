//! The node's reconcile loop and the life of each local VM: from the cluster's desired
//! state to QEMU processes, and back to the cluster as reports.

use crate::host::{AttachedDisk, Host, HostError};
use crate::plan::{plan, Action, LocalPhase};
use crate::qemu_args::{qemu_args, VmPaths};
use crate::qmp::Qmp;
use model::{Accel, Boot, Vm, VmId, VmRunState};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long a guest gets to shut down after the power button before QEMU is ended.
pub const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// The first wait before an HA VM that failed here is started again; it doubles up to
/// `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Reconcile at least this often, even with no state change.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

pub struct Hypervisor {
    host: Arc<dyn Host>,
    vm_dir: PathBuf,
    qemu: String,
    accel: Accel,
    local: Mutex<BTreeMap<VmId, LocalVm>>,
    /// HA VMs whose start failed or whose QEMU died here: how often in a row, and when to
    /// try again.
    retry: Mutex<BTreeMap<VmId, (u32, std::time::Instant)>>,
    /// VMs moving off this node whose "not running here" report is on its way.
    telling: Mutex<std::collections::BTreeSet<VmId>>,
    changed: Notify,
    /// The user QEMU runs as, when the daemon can switch to one.
    qemu_user: Option<crate::confine::QemuUser>,
    /// The cluster's networks as this node provides them.
    networks: crate::net::HostNetworks,
}

struct LocalVm {
    phase: LocalPhase,
    /// `None` while it should run; `Some(force)` once it should stop. A graceful stop can
    /// become a forced one (the node was cut off meanwhile), never the other way.
    stop: watch::Sender<Option<bool>>,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("Preparing {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Starting {qemu} (install the qemu-system-x86 package)")]
    Spawn {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] crate::qmp::QmpError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("A network card")]
    Network(#[from] crate::net::NetError),
}

/// A start that restarts a VM whose node went down.
#[derive(Clone, Copy)]
struct Failover {
    from: model::NodeId,
    down: model::NodeDown,
    /// When this node began starting it (wall clock ms).
    began_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How a running VM ended.
enum Ended {
    /// We stopped it, as asked.
    Stopped,
    /// The guest powered itself off.
    GuestShutdown,
    /// QEMU died on its own.
    Crashed(String),
}

impl Hypervisor {
    pub fn new(host: Arc<dyn Host>, vm_dir: PathBuf, accel: Accel) -> Arc<Self> {
        let qemu = std::env::var("CONVERGE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        let qemu_user = crate::confine::QemuUser::find();
        // QEMU opens /dev/kvm as its own user: KVM only if that user may.
        let accel = match &qemu_user {
            Some(user) if accel == Accel::Kvm && !user.may_open(std::path::Path::new("/dev/kvm")) => {
                tracing::warn!(
                    user = %user.name,
                    "guests run under TCG, much slower: {} may not open /dev/kvm; add it to the kvm group \
                     (scripts/setup.sh does) and restart",
                    user.name
                );
                Accel::Tcg
            }
            _ => accel,
        };
        match &qemu_user {
            Some(user) => tracing::info!(user = %user.name, uid = user.uid, "guests run as an unprivileged user"),
            None => tracing::warn!(
                "guests run as this daemon's user: run as root with the user {} (scripts/setup.sh makes it) to \
                 confine them",
                crate::confine::QEMU_USER
            ),
        }
        let host_node = host.this_node();
        Arc::new(Hypervisor {
            host,
            vm_dir,
            qemu,
            accel,
            local: Mutex::default(),
            retry: Mutex::default(),
            telling: Mutex::default(),
            changed: Notify::new(),
            qemu_user,
            networks: crate::net::HostNetworks::new(host_node),
        })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Runs the reconcile loop until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut state = self.host.watch();
        let mut isolated = self.host.isolated();
        tokio::spawn(self.clone().provide_networks());
        self.report_died_with_node().await;
        loop {
            self.reconcile(*isolated.borrow_and_update());
            tokio::select! {
                _ = state.changed() => {}
                _ = isolated.changed() => {}
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            }
        }
    }

    /// Keeps the node's bridges in line with the cluster's networks: at each change of the
    /// state, and now and then to mend what was changed behind converge's back.
    async fn provide_networks(self: Arc<Self>) {
        const MEND_INTERVAL: Duration = Duration::from_secs(30);
        // Changes in a burst (a failover is a dozen) make one pass; a VM's start provides
        // its networks itself, so it never waits for this.
        const COALESCE: Duration = Duration::from_secs(1);
        let mut state = self.host.watch();
        let this = self.host.this_node();
        let mut reporting: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let now = state.borrow_and_update().clone();
            self.networks.reconcile(&now).await;
            // What it cannot provide goes into the state, so VMs are placed elsewhere: in a
            // task of its own, one at a time, so that a cluster without a leader does not
            // hold up the links. A failed report is made again at a later pass, which finds
            // the state unchanged.
            let gaps = self.networks.gaps(&now);
            let changed = now.network_gaps.get(&this).unwrap_or(&BTreeMap::new()) != &gaps;
            let cut_off = *self.host.isolated().borrow();
            if changed
                && now.nodes.contains_key(&this)
                && !cut_off
                && reporting.as_ref().is_none_or(|r| r.is_finished())
            {
                let host = self.host.clone();
                reporting = Some(tokio::spawn(async move {
                    if let Err(e) = host.report_network_gaps(gaps).await {
                        tracing::warn!(error = %model::error_chain(&e), "reporting the networks this node cannot provide");
                    }
                }));
            }
            let _ = tokio::time::timeout(MEND_INTERVAL, state.changed()).await;
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// At start: VMs the state shows alive on this node, and not meant to run here any more,
    /// ended with this node's last run (QEMU dies with its daemon). Those meant to run here
    /// are started again by the reconcile loop, which reports them.
    async fn report_died_with_node(self: &Arc<Self>) {
        let state = self.host.state();
        let this = self.host.this_node();
        for vm in state.vms.values() {
            let alive = !matches!(vm.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
            let meant_here = vm.desired == (model::VmDesired::Running { node: this });
            if vm.observed.node == Some(this) && alive && !meant_here {
                let (hypervisor, id) = (self.clone(), vm.id);
                // Raft may not have a leader yet while this node starts: try for a while.
                tokio::spawn(async move {
                    let reason = format!("it ended when {this} stopped");
                    for _ in 0..60 {
                        if hypervisor.host.report(id, VmRunState::Failed { reason: reason.clone() }).await.is_ok() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
            }
        }
    }

    /// The node a VM is being restarted from, if this start is a failover: it last ran on
    /// another node, which is down.
    fn failover_from(&self, vm: &Vm) -> Option<(model::NodeId, model::NodeDown)> {
        let from = vm.observed.node.filter(|n| *n != self.host.this_node())?;
        let down = self.host.state().down.get(&from).copied()?;
        Some((from, down))
    }

    fn reconcile(self: &Arc<Self>, isolated: bool) {
        let state = self.host.state();
        let mut local = self.local.lock().expect("local VMs lock");
        let phases = local.iter().map(|(id, vm)| (*id, vm.phase)).collect();
        for action in plan(&state, self.host.this_node(), &phases, isolated) {
            match action {
                Action::Start(id) => {
                    let Some(vm) = state.vms.get(&id).cloned() else { continue };
                    let waiting = self
                        .retry
                        .lock()
                        .expect("retry lock")
                        .get(&id)
                        .is_some_and(|(_, at)| *at > std::time::Instant::now());
                    if waiting {
                        continue;
                    }
                    let (stop, stopped) = watch::channel(None);
                    local.insert(id, LocalVm { phase: LocalPhase::Starting, stop });
                    tokio::spawn(self.clone().run_vm(vm, stopped));
                }
                Action::Stop { vm, force } => {
                    if let Some(entry) = local.get_mut(&vm) {
                        entry.phase = LocalPhase::Stopping;
                        entry.stop.send_if_modified(|asked| {
                            let next = Some(force || *asked == Some(true));
                            let changed = *asked != next;
                            *asked = next;
                            changed
                        });
                    }
                }
            }
        }
        // A VM moving off this node that does not run here (any more): say so, so the move
        // goes on even if the report of its stop was lost, or it never started here.
        let this = self.host.this_node();
        for vm in state.vms.values() {
            let moving_off = matches!(vm.desired, model::VmDesired::Moving { from, .. } if from == this);
            let told = vm.observed.node == Some(this)
                && matches!(vm.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
            if moving_off
                && !told
                && !local.contains_key(&vm.id)
                && self.telling.lock().expect("telling lock").insert(vm.id)
            {
                let (hypervisor, id) = (self.clone(), vm.id);
                tokio::spawn(async move {
                    hypervisor.report(id, VmRunState::Stopped).await;
                    hypervisor.telling.lock().expect("telling lock").remove(&id);
                });
            }
        }
    }

    fn set_phase(&self, vm: VmId, phase: LocalPhase) {
        if let Some(entry) = self.local.lock().expect("local VMs lock").get_mut(&vm) {
            if entry.phase != LocalPhase::Stopping {
                entry.phase = phase;
            }
        }
    }

    async fn report(&self, vm: VmId, state: VmRunState) {
        if let Err(e) = self.host.report(vm, state).await {
            tracing::warn!(%vm, error = %e, "reporting VM state failed");
        }
    }

    /// The whole life of one VM on this node: start, run until stopped or gone, clean up.
    async fn run_vm(self: Arc<Self>, vm: Vm, stop: watch::Receiver<Option<bool>>) {
        let id = vm.id;
        let failover = self.failover_from(&vm).map(|(from, down)| Failover { from, down, began_ms: now_ms() });
        self.report(id, VmRunState::Starting).await;
        let result = self.start_and_wait(&vm, stop, failover).await;
        let state = match &result {
            Ok(Ended::Stopped) | Ok(Ended::GuestShutdown) => VmRunState::Stopped,
            Ok(Ended::Crashed(reason)) => VmRunState::Failed { reason: reason.clone() },
            Err(e) => VmRunState::Failed { reason: chain(e) },
        };
        match &result {
            Ok(Ended::GuestShutdown) => tracing::info!(vm = %vm.spec.name, "guest powered off"),
            Ok(Ended::Stopped) => tracing::info!(vm = %vm.spec.name, "VM stopped"),
            Ok(Ended::Crashed(reason)) => tracing::error!(vm = %vm.spec.name, %reason, "QEMU ended on its own"),
            Err(e) => tracing::error!(vm = %vm.spec.name, error = %chain(e), "VM failed to start"),
        }
        let failed = matches!(result, Ok(Ended::Crashed(_)) | Err(_));
        if failed && vm.spec.ha.enabled {
            // An HA VM is meant to run: try again here, less and less often (the failure may
            // be passing: a PG whose only replicas are on a node that is coming back).
            let mut retry = self.retry.lock().expect("retry lock");
            let failures = retry.get(&id).map_or(1, |(n, _)| n + 1);
            let wait = RETRY_FIRST.saturating_mul(1 << (failures - 1).min(5)).min(RETRY_MAX);
            retry.insert(id, (failures, std::time::Instant::now() + wait));
            tracing::warn!(vm = %vm.spec.name, failures, retry_in_s = wait.as_secs(), "the HA VM will be started again");
        } else if !matches!(result, Ok(Ended::Stopped)) {
            // The guest powered itself off (or a VM without HA failed): the desired state
            // follows, so the VM is not started again behind the admin's back.
            if let Err(e) = self.host.guest_stopped(id).await {
                tracing::warn!(%id, error = %e, "recording the VM as stopped failed");
            }
        }
        if !failed {
            self.retry.lock().expect("retry lock").remove(&id);
        }
        self.report(id, state).await;
        self.local.lock().expect("local VMs lock").remove(&id);
        self.changed.notify_one();
    }

    async fn start_and_wait(
        &self,
        vm: &Vm,
        mut stop: watch::Receiver<Option<bool>>,
        failover: Option<Failover>,
    ) -> Result<Ended, StartError> {
        let dir = self.vm_dir.join(vm.id.to_string());
        let io = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| StartError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // The VM's directory and everything QEMU opens in it are its user's alone; the
        // directories above only let it pass.
        if let Some(user) = &self.qemu_user {
            use std::os::unix::fs::PermissionsExt;
            let pass = std::fs::Permissions::from_mode(0o711);
            std::fs::set_permissions(&self.vm_dir, pass).map_err(io(&self.vm_dir))?;
            user.give(&dir, 0o700).map_err(io(&dir))?;
        }
        let paths = VmPaths {
            qmp_socket: dir.join("qmp.sock"),
            console_socket: dir.join("console.sock"),
            console_log: crate::console_log(&self.vm_dir, vm.id),
            disk_sockets: Vec::new(),
            kernel: None,
            initrd: None,
            uefi: None,
            cdrom: None,
            nics: Vec::new(),
        };
        for stale in [&paths.qmp_socket, &paths.console_socket, &paths.console_log] {
            let _ = std::fs::remove_file(stale);
        }
        let mut paths = paths;
        if let Boot::Kernel { kernel, initrd, .. } = &vm.spec.boot {
            let kernel_path = dir.join("kernel");
            self.host.fetch_boot_file(*kernel, kernel_path.clone()).await?;
            paths.kernel = Some(kernel_path);
            if let Some(initrd) = initrd {
                let initrd_path = dir.join("initrd");
                self.host.fetch_boot_file(*initrd, initrd_path.clone()).await?;
                paths.initrd = Some(initrd_path);
            }
        }
        if let Some(iso) = vm.spec.cdrom {
            // QEMU's CD-ROM is a block device of its own, not a vhost-user disk: the image
            // is copied here at each start (it is read-only, so nothing goes back).
            let iso_path = dir.join("cdrom.iso");
            self.host.fetch_boot_file(iso, iso_path.clone()).await?;
            paths.cdrom = Some(iso_path);
        }
        // A tap per NIC, in its network's bridge; QEMU inherits them.
        let mut taps = Vec::with_capacity(vm.spec.nics.len());
        if !vm.spec.nics.is_empty() {
            let state = self.host.state();
            for (index, nic) in vm.spec.nics.iter().enumerate() {
                taps.push(self.networks.tap(&state, vm.id, index, nic).await?);
            }
        }
        paths.nics = taps
            .iter()
            .map(|tap| crate::qemu_args::NicFds {
                tap: tap.file.as_raw_fd(),
                vhost: tap.vhost.as_ref().map(|v| v.as_raw_fd()),
                mtu: (tap.mtu < crate::net::GUEST_MTU_DEFAULT).then_some(tap.mtu),
            })
            .collect();
        let inherit = paths.nics.iter().flat_map(|n| std::iter::once(n.tap).chain(n.vhost)).collect();
        // Volumes last before QEMU: attaching fences any earlier owner.
        let fencing = std::time::Instant::now();
        let mut vars = None;
        if let Boot::Uefi { vars: volume } = &vm.spec.boot {
            let code = crate::firmware::code()?;
            let crate::host::AttachedVars { kept, volume: store } = self.host.attach_vars(vm, *volume).await?;
            // A first boot's empty store differs from the volume's zeros: the first sync
            // writes it.
            let bytes = crate::firmware::initial_vars(kept.clone())?;
            let path = dir.join("uefi-vars.fd");
            let mut file = crate::confine::create_fresh(&path).map_err(io(&path))?;
            std::io::Write::write_all(&mut file, &bytes).map_err(io(&path))?;
            if let Some(user) = &self.qemu_user {
                user.give_file(&file).map_err(io(&path))?;
            }
            paths.uefi = Some(crate::qemu_args::UefiPaths { code, vars: path.clone() });
            vars = Some(Arc::new(crate::firmware::VarsSync::new(path, store, kept)));
        }
        let disks: Vec<Box<dyn AttachedDisk>> = self.host.attach_disks(vm, &dir).await?;
        let fencing = fencing.elapsed();
        let spawned = std::time::Instant::now();
        paths.disk_sockets = disks.iter().map(|d| d.socket().to_path_buf()).collect();
        if let Some(user) = &self.qemu_user {
            let files = paths.disk_sockets.iter().chain(&paths.kernel).chain(&paths.initrd).chain(&paths.cdrom);
            for file in files {
                user.give(file, 0o600).map_err(io(file))?;
            }
        }
        let log_path = dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let mut args = qemu_args(&vm.spec, &paths, self.accel);
        args.extend(crate::confine::qemu_args().into_iter().map(Into::into));
        let run_as = self.qemu_user.as_ref().map(|user| user.run_as());
        let mut child = crate::process::spawn(&self.qemu, &args, log, run_as, inherit)
            .map_err(|source| StartError::Spawn { qemu: self.qemu.clone(), source })?;
        // QEMU holds the taps now: they go when it ends.
        drop(taps);
        let pid = child.id().unwrap_or_default();
        // Its memory and CPU bounds, for as long as this QEMU runs.
        let _cgroup = match crate::confine::Cgroup::place(&vm.id.to_string(), pid, vm.spec.memory_bytes, vm.spec.cpus) {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                tracing::warn!(vm = %vm.spec.name, error = %e, "no cgroup for the VM: its memory and CPU are not bounded");
                None
            }
        };
        let qmp = match Qmp::connect(&paths.qmp_socket).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = child.kill().await;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Ok(Ended::Crashed(format!("{}; QEMU said: {}", chain(&e), excerpt(&log))));
            }
        };
        let stop_syncing = Arc::new(tokio::sync::Notify::new());
        let syncing = vars.clone().map(|vars| tokio::spawn(vars.run(stop_syncing.clone(), vm.spec.name.clone())));
        if !vm.spec.nics.is_empty() {
            if let Err(e) = qmp.announce().await {
                tracing::warn!(vm = %vm.spec.name, error = %chain(&e), "announcing the VM's NICs failed");
            }
        }
        tracing::info!(vm = %vm.spec.name, pid, accel = ?self.accel, "VM running");
        self.set_phase(vm.id, LocalPhase::Running);
        self.report(vm.id, VmRunState::Running { accel: self.accel, pid }).await;
        if let Some(failover) = failover {
            let message = format!(
                "VM {} runs on {} again after {} went down: detection {} ms (silence), decision {} ms, \
                 fencing {} ms (owner epochs and reconcile), QEMU up {} ms later; the guest boots from here",
                vm.spec.name,
                self.host.this_node(),
                failover.from,
                failover.down.silent_ms,
                failover.began_ms.saturating_sub(failover.down.at_ms),
                fencing.as_millis(),
                spawned.elapsed().as_millis()
            );
            tracing::info!("{message}");
            self.host.record_event(model::EventKind::VmRestarted, message);
        }

        let ended = tokio::select! {
            status = child.wait() => {
                match status {
                    Ok(s) if s.success() => Ended::GuestShutdown,
                    Ok(s) => {
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        Ended::Crashed(format!("QEMU exited with {s}: {}", excerpt(&log)))
                    }
                    Err(e) => Ended::Crashed(format!("waiting for QEMU failed: {e}")),
                }
            }
            forced = async { stop.wait_for(Option::is_some).await.map(|a| *a == Some(true)) } => {
                // A sender gone (the VM forgotten) ends it at once.
                let mut force = forced.unwrap_or(true);
                if !force {
                    if let Err(e) = qmp.powerdown().await {
                        tracing::warn!(vm = %vm.spec.name, error = %e, "power button failed; ending QEMU");
                    } else {
                        tokio::select! {
                            waited = tokio::time::timeout(POWERDOWN_TIMEOUT, child.wait()) => if waited.is_err() {
                                tracing::warn!(vm = %vm.spec.name, "guest ignored the power button; ending QEMU");
                            },
                            _ = stop.wait_for(|a| *a == Some(true)) => force = true,
                        }
                    }
                }
                if force {
                    // At once: a VM moved elsewhere, or on a node cut off from the majority,
                    // must not run a moment longer (QEMU's own quit can wait on in-flight
                    // disk IO that cannot finish). Every write it saw acknowledged is durable.
                    let _ = child.kill().await;
                } else {
                    let _ = tokio::time::timeout(Duration::from_secs(5), qmp.quit()).await;
                    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                }
                Ended::Stopped
            }
        };
        drop(qmp);
        // QEMU is gone: what the firmware last wrote goes to the volume.
        if let (Some(vars), Some(syncing)) = (&vars, syncing) {
            stop_syncing.notify_one();
            let _ = syncing.await;
            if let Err(e) = vars.sync().await {
                tracing::warn!(vm = %vm.spec.name, error = %chain(&e), "saving the UEFI variables at the end failed");
            }
        }
        // The disks can stop serving; the taps go.
        drop(disks);
        self.networks.release(vm.id, vm.spec.nics.len()).await;
        Ok(ended)
    }
}

/// The end of QEMU's log, where it says why it stopped: at most `LOG_EXCERPT_BYTES`, so a
/// failure's reason stays small in the cluster state (the whole log is in the VM's dir).
fn excerpt(log: &str) -> String {
    let log = log.trim();
    let mut start = log.len().saturating_sub(LOG_EXCERPT_BYTES);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    if start == 0 {
        log.to_string()
    } else {
        format!("...{}", &log[start..])
    }
}

const LOG_EXCERPT_BYTES: usize = 512;

fn chain(e: &dyn std::error::Error) -> String {
    model::error_chain(e)
}
