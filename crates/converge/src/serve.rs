//! The composition root: builds the node's parts and wires them together. No logic beyond
//! wiring lives here.

use anyhow::{Context, Result};
use api::{HttpTransport, NodeServices};
use cli::ServeArgs;
use cluster::ClusterError;
use cluster::{Cluster, ClusterConfig};
use model::PgEpoch;
use model::{ClusterState, NodeId};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use store::DiskSet;
use tokio::net::TcpListener;
use tokio::sync::watch;
use volume::{
    ActiveLog, DirtyLog, Engine, EngineConfig, PgChange, PgChangeError, ReplicaService, ResyncStats, Topology,
};

/// The engine's view of the cluster, backed by the published Raft state.
struct ClusterTopology(Cluster);

impl Topology for ClusterTopology {
    fn this_node(&self) -> NodeId {
        self.0.node_id()
    }
    fn state(&self) -> Arc<ClusterState> {
        self.0.state()
    }
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.0.watch_state()
    }
    fn is_up(&self, node: NodeId) -> bool {
        self.0.is_up(node)
    }
    fn change_pg(&self, change: PgChange) -> Pin<Box<dyn Future<Output = Result<PgEpoch, PgChangeError>> + Send + '_>> {
        Box::pin(async move {
            match self.0.propose(change.command()).await {
                Ok(outcome) => volume::pg_change_outcome(Ok(outcome)),
                Err(ClusterError::Command(refused)) => volume::pg_change_outcome(Err(refused)),
                Err(e) => Err(PgChangeError::Unavailable { reason: e.to_string() }),
            }
        })
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    // The cluster's secrets and state live here: root's alone.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(&args.data_dir)
            .with_context(|| format!("reading {}", args.data_dir.display()))?;
        let me = effective_uid()?;
        if !meta.is_dir() || meta.uid() != me {
            anyhow::bail!(
                "{} must be a directory owned by the user running converge (uid {me}), not a symlink or \
                 another user's: whoever owns it could read the cluster's secrets",
                args.data_dir.display()
            );
        }
        // Others may pass through (guests' QEMU, as its own user, reaches its VM's
        // directory), never list or read: every file in it is its owner's alone.
        std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("making {} readable by its owner only", args.data_dir.display()))?;
    }
    // The databases hold the cluster's secrets (the CA key, token hashes): made 0600 before
    // anything is written to them, so no one else can hold them open from the start.
    for file in ["cluster.redb", "dirty.redb", "active.redb"] {
        use std::os::unix::fs::OpenOptionsExt;
        let path = args.data_dir.join(file);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    let api_listener =
        TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let api_local = api_listener.local_addr()?;
    let data_listen = match &args.data_listen {
        Some(addr) => addr.clone(),
        None => SocketAddr::new(api_local.ip(), api_local.port() + 1).to_string(),
    };
    let data_listener = TcpListener::bind(&data_listen).await.with_context(|| format!("listening on {data_listen}"))?;
    // Peers are told the --advertise address (default: the address listened on), with the
    // ports actually bound.
    let advertised = args.advertise.unwrap_or(api_local.ip());
    // Outgoing connections leave from the advertised address: it must be this machine's.
    if !advertised.is_unspecified() {
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::new(advertised, 0)) {
            anyhow::bail!(
                "--advertise {advertised} is not an address of this machine ({e}): give one of its own addresses \
                 that the other nodes can reach"
            );
        }
    }
    let api_addr = SocketAddr::new(advertised, api_local.port()).to_string();
    let data_addr = SocketAddr::new(advertised, data_listener.local_addr()?.port()).to_string();

    // The node's key, and its certificate once it is in a cluster (root's alone).
    let tls_dir = args.data_dir.join("tls");
    let tls = Arc::new(pki::NodeTls::open(&tls_dir).with_context(|| format!("opening {}", tls_dir.display()))?);
    let transport = HttpTransport::new(tls.clone(), Some(advertised));
    let disks = Arc::new(DiskSet::default());
    let reports = disks.clone();
    let resync_stats = Arc::new(ResyncStats::default());
    let resync_report = resync_stats.clone();
    let config = ClusterConfig {
        data_dir: args.data_dir.clone(),
        api_addr: api_addr.clone(),
        data_addr: data_addr.clone(),
        down_after: Duration::from_millis(args.down_after_ms),
        snapshot_every: args.snapshot_every,
        tls: tls.clone(),
    };
    let cluster = Cluster::start(
        config,
        Arc::new(transport.clone()),
        Box::new(move || model::NodeReport {
            node: NodeId(0),
            disks: reports.reports(),
            resync: resync_report.report(),
            heard_ms_ago: Default::default(),
        }),
    )
    .await?;
    let topology: Arc<dyn Topology> = Arc::new(ClusterTopology(cluster.clone()));
    let dirty_path = args.data_dir.join("dirty.redb");
    let dirty = DirtyLog::open(&dirty_path).with_context(|| format!("opening {}", dirty_path.display()))?;
    let active_path = args.data_dir.join("active.redb");
    let active = ActiveLog::open(&active_path).with_context(|| format!("opening {}", active_path.display()))?;
    let replica = Arc::new(ReplicaService::new(disks.clone(), topology.clone(), dirty, active));
    for file in ["cluster.redb", "dirty.redb", "active.redb", "node-id"] {
        use std::os::unix::fs::PermissionsExt;
        let path = args.data_dir.join(file);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} its owner's alone", path.display()))?;
        }
    }
    let vm_dir = hypervisor::vm_dir(&args.data_dir.join("vms"));
    let config = EngineConfig {
        replica_timeout: Duration::from_millis(args.replica_timeout_ms),
        local_address: Some(advertised),
        tls: Some(tls),
        ..Default::default()
    };
    let engine = Engine::new(replica.clone(), topology, config);
    let services = NodeServices::new(cluster.clone(), disks.clone(), engine.clone(), vm_dir.clone(), transport);

    let accel = hypervisor::detect_accel();
    let host = Arc::new(api::NodeHost::new(services.clone(), tokio::runtime::Handle::current()));
    let vms = hypervisor::Hypervisor::new(host, vm_dir, accel);

    services.open_disks().await;
    tokio::spawn(follow_state(services.clone(), disks));
    let data = volume::DataServer::new(replica, volume::DataLimits::default());
    tokio::spawn(api::serve_node_port(data_listener, services.clone(), data));
    tokio::spawn(volume::resync_loop(engine.clone(), resync_stats));
    tokio::spawn(vms.run());
    tracing::info!(node = %cluster.node_id(), api = %api_addr, data = %data_addr, listen = %args.listen, ?accel, "converge node serving");
    // Root on this node talks to it here, with no token (docs/threat-model.md).
    let socket_path = args.data_dir.join(LOCAL_SOCKET);
    let _ = std::fs::remove_file(&socket_path);
    let local = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("listening on {}", socket_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} its owner's alone", socket_path.display()))?;
    }
    tokio::spawn(api::serve_api(api_listener, services.clone(), api::ApiLimits::default()));
    axum::serve(local, api::local_router(services))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the local socket")?;
    cluster.shutdown().await;
    Ok(())
}

/// This process's effective user id, from /proc (no unsafe call needed).
fn effective_uid() -> anyhow::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("Uid:")).context("no Uid line in /proc/self/status")?;
    // Real, effective, saved, filesystem.
    line.split_whitespace().nth(2).and_then(|uid| uid.parse().ok()).context("a malformed Uid line")
}

/// The API socket in the data dir, for root on the node.
pub const LOCAL_SOCKET: &str = "api.sock";

/// On every new cluster state: open disks this node gained, free extents of deleted volumes.
async fn follow_state(services: NodeServices, disks: Arc<DiskSet>) {
    let mut state = services.cluster().watch_state();
    loop {
        services.open_disks().await;
        let current = state.borrow_and_update().clone();
        let freed = volume::collect_garbage(&disks, &current).await;
        if freed > 0 {
            tracing::info!(extents = freed, "freed extents of deleted volumes");
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
