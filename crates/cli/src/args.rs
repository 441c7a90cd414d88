use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "converge",
    version,
    about = "Hypervisor-converged infrastructure: a cluster of servers running VMs on replicated storage pooled from their own disks"
)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// A node to talk to over the network, https://HOST:PORT; needs a token and the
    /// cluster's CA (--ca). [default: this node's local socket if there is one, else
    /// https://127.0.0.1:7700]
    #[arg(long, env = "CONVERGE_SERVER", global = true)]
    pub server: Option<String>,
    /// The node's local socket (`api.sock` in its data dir), for root on the node: no token.
    /// [default: /var/lib/converge/api.sock, if it exists and --server is not given]
    #[arg(long, env = "CONVERGE_SOCKET", global = true, conflicts_with = "server")]
    pub socket: Option<PathBuf>,
    /// The API token for --server (`cluster init` prints the first; `token create` makes
    /// more). Also read from ~/.config/converge/config (`token = ...`, `server = ...`).
    #[arg(long, env = "CONVERGE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA's certificate (PEM) that --server is trusted by: `converge cluster ca`
    /// on a node prints it. Also `ca = PATH` in ~/.config/converge/config.
    #[arg(long, env = "CONVERGE_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Serve(ServeArgs),
    /// Create, join and inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Give disks to converge.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Replicated virtual disks.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Virtual machines whose disks are replicated volumes.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Maintenance of one node: drain it, let VMs back on, ask whether it can go down.
    #[command(subcommand)]
    Node(NodeCommand),
    /// API tokens (admin, operator, viewer) and join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// What happened in the cluster, and when: nodes down and up, failovers, drains.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once and kept nowhere.
    Create {
        /// An API token with this role: viewer (reads), operator (also runs VMs and
        /// volumes), admin (also disks, nodes and tokens).
        #[arg(long, required_unless_present = "join", conflicts_with = "join")]
        role: Option<model::Role>,
        /// A join token for new nodes instead.
        #[arg(long)]
        join: bool,
        /// How long the join token lasts, for example 30m, 2h or 1d.
        #[arg(long, requires = "join", default_value = "1h")]
        ttl: String,
        /// Who or what it is for.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// The tokens that work now (never their secrets).
    List,
    /// Make a token stop working, by its id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Move the node's VMs to other nodes and keep new ones off it.
    Drain {
        /// A node id (node-12) or address (127.0.0.3).
        node: String,
        /// Return at once instead of waiting until its VMs run elsewhere.
        #[arg(long)]
        no_wait: bool,
    },
    /// Let VMs onto a drained node again.
    Resume { node: String },
    /// Whether the node can go down now without stopping a volume or a VM.
    Check { node: String },
    /// Take a node that is gone for good out of the cluster and its Raft voters, so a new
    /// one can join in its place. The node must be down.
    Remove { node: String },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM and create its disks.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        cpus: u16,
        /// Guest memory, for example 512M.
        #[arg(long, default_value = "512M")]
        memory: String,
        /// A disk: SIZE[,replicas=R], for example 10G or 10G,replicas=3. Repeat for more disks.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A raw or qcow2 image copied onto the first disk (booted by BIOS unless --kernel is given).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Boot this kernel directly (kept in a volume, so any node can start the VM).
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
        cmdline: String,
        /// Restart the VM on another node when its node goes down.
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        ha: OnOff,
        /// 0-100: when not every VM of a failed node fits elsewhere, higher goes first.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        priority: u8,
        /// VMs of one group are never restarted onto the same node.
        #[arg(long)]
        anti_affinity: Option<String>,
    },
    /// Start a VM, on NODE or on the least loaded node.
    Start {
        name: String,
        /// A node id (node-12) or address (127.0.0.3).
        #[arg(long)]
        node: Option<String>,
        /// Move a VM that is running on another node.
        #[arg(long)]
        force: bool,
        /// Return at once instead of waiting until it runs.
        #[arg(long)]
        no_wait: bool,
    },
    /// Shut a VM down (ACPI), or end it at once with --force.
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Follow a VM's serial console.
    Console {
        name: String,
        /// Print what is there and return.
        #[arg(long)]
        no_follow: bool,
    },
    /// Delete a stopped VM and its disks.
    Delete {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where this node keeps its identity and its copy of the cluster state.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address for the API and cluster traffic; other nodes reach this node here.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Address of the data path (replica traffic) [default: the --listen host, port + 1].
    #[arg(long)]
    pub data_listen: Option<String>,
    /// The IP address other nodes reach this node at, for both ports [default: the --listen
    /// address]. Needed when --listen is 0.0.0.0 or ::.
    #[arg(long)]
    pub advertise: Option<std::net::IpAddr>,
    /// How long a replica may take to answer a write before it is taken out of its
    /// placement group and the write goes on with the others.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub replica_timeout_ms: u64,
    /// How long a node may go unheard before the leader declares it down and restarts its
    /// HA VMs elsewhere; a node cut off from the majority stops its VMs after half of it.
    #[arg(long, default_value_t = 3500, value_parser = clap::value_parser!(u64).range(2000..=600_000))]
    pub down_after_ms: u64,
    /// Cluster log entries between two snapshots of the cluster state; a node that joins
    /// or returns after more than that gets the snapshot instead of the entries.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub snapshot_every: u64,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create a cluster with this node as its first member; prints the join token.
    Init,
    /// Join this node to an existing cluster.
    Join {
        /// `host:port` of any member.
        #[arg(long)]
        peer: String,
        /// The join token `cluster init` (or `token create --join`) printed.
        #[arg(long)]
        join_token: String,
    },
    /// Nodes, disks, capacity and health.
    Status,
    /// Print the cluster CA's certificate (PEM): what clients trust the nodes by (--ca).
    Ca,
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Give a raw device (or a file standing in for one) to this node, whole.
    Add {
        path: PathBuf,
        /// Create a file of this size at PATH (for example 20G) if it does not exist.
        #[arg(long)]
        size: Option<String>,
        /// Format PATH even if it holds a file system, a partition table or another
        /// cluster's disk: what it holds is lost. A mounted device is refused regardless.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin-provisioned replicated volume.
    Create {
        name: String,
        /// Size, for example 20G.
        #[arg(long)]
        size: String,
        /// Copies of every byte, on different nodes.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Copy a raw or qcow2 image into a volume (created to fit if it does not exist).
    Import {
        name: String,
        file: PathBuf,
        /// Replicas for a volume this creates.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
    },
    /// Copy a volume's bytes into a raw file.
    Export {
        name: String,
        file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}
