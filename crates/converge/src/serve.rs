//! The composition root: builds the node's parts and wires them together. No logic beyond
//! wiring lives here.

use anyhow::{Context, Result};
use api::{HttpTransport, NodeServices};
use cli::ServeArgs;
use cluster::{Cluster, ClusterConfig};
use model::{ClusterState, NodeId};
use std::sync::Arc;
use store::DiskSet;
use tokio::net::TcpListener;
use tokio::sync::watch;
use volume::{Engine, ReplicaService, Topology};

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
}

pub async fn run(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let api_listener =
        TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let data_addr = match args.data_listen {
        Some(addr) => addr,
        None => {
            let api = api_listener.local_addr()?;
            format!("{}:{}", api.ip(), api.port() + 1)
        }
    };
    let data_listener = TcpListener::bind(&data_addr).await.with_context(|| format!("listening on {data_addr}"))?;

    let disks = Arc::new(DiskSet::default());
    let reports = disks.clone();
    let config =
        ClusterConfig { data_dir: args.data_dir.clone(), api_addr: args.listen.clone(), data_addr: data_addr.clone() };
    let cluster = Cluster::start(config, Arc::new(HttpTransport::new()), Box::new(move || reports.reports())).await?;
    let topology: Arc<dyn Topology> = Arc::new(ClusterTopology(cluster.clone()));
    let replica = Arc::new(ReplicaService::new(disks.clone(), topology.clone()));
    let vm_dir = args.data_dir.join("vms");
    let engine = Engine::new(replica.clone(), topology);
    let services = NodeServices::new(cluster.clone(), disks.clone(), engine, vm_dir.clone());

    let accel = hypervisor::detect_accel();
    let host = Arc::new(api::NodeHost::new(services.clone(), tokio::runtime::Handle::current()));
    let vms = hypervisor::Hypervisor::new(host, vm_dir, accel);

    services.open_disks().await;
    tokio::spawn(follow_state(services.clone(), disks));
    tokio::spawn(volume::serve(data_listener, replica));
    tokio::spawn(vms.run());
    tracing::info!(node = %cluster.node_id(), api = %args.listen, data = %data_addr, ?accel, "converge node serving");
    axum::serve(api_listener, api::router(services)).with_graceful_shutdown(shutdown_signal()).await?;
    cluster.shutdown().await;
    Ok(())
}

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
