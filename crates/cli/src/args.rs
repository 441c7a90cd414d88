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

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Networks VMs attach to: each node provides every network as a bridge.
    #[command(subcommand)]
    Network(NetworkCommand),
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
    Revoke {
        /// The token's id, as `token list` shows it.
        id: String,
    },
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
    Resume {
        /// A node id (node-12) or address (127.0.0.3).
        node: String,
    },
    /// Whether the node can go down now without stopping a volume or a VM.
    Check {
        /// A node id (node-12) or address (127.0.0.3).
        node: String,
    },
    /// Take a node that is gone for good out of the cluster and its Raft voters, so a new
    /// one can join in its place. The node must be down.
    Remove {
        /// A node id (node-12) or address (127.0.0.3).
        node: String,
    },
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM and create its disks.
    Create {
        /// The VM's name: letters, digits, '-', '_' and '.'.
        name: String,
        #[arg(long, default_value_t = 1)]
        /// Virtual CPUs.
        cpus: u16,
        /// Guest memory, for example 512M.
        #[arg(long, default_value = "512M")]
        memory: String,
        /// A disk: SIZE[,replicas=R], for example 10G or 10G,replicas=3. Repeat for more disks.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A disk image (qcow2, vmdk, vhdx, vdi, vhd or raw) copied onto the first disk
        /// (booted by its firmware unless --kernel is given).
        #[arg(long)]
        image: Option<PathBuf>,
        /// The image's format, when its header does not tell it.
        #[arg(long, value_enum, requires = "image")]
        image_format: Option<crate::image::Format>,
        /// A volume (an image imported once) copied onto the first disk; the first disk is
        /// made the template's size unless --disk asks for more.
        #[arg(long, conflicts_with = "image")]
        template: Option<String>,
        /// The firmware that boots the first disk: UEFI (its variables kept in a volume of
        /// the VM's) or BIOS for legacy images.
        #[arg(long, value_enum, default_value_t = Firmware::Uefi, conflicts_with = "kernel")]
        firmware: Firmware,
        /// An ISO image (an installer) attached as a CD-ROM and booted first; kept in a
        /// volume (NAME-cdrom), so any node can start the VM.
        #[arg(long)]
        cdrom: Option<PathBuf>,
        /// Boot this kernel directly (kept in a volume, so any node can start the VM).
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        /// An initramfs for --kernel (kept in a volume too).
        initrd: Option<PathBuf>,
        #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
        /// The kernel command line for --kernel.
        cmdline: String,
        /// An SSH public key file for cloud-init (every key line in it); repeat for more.
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        /// A user cloud-init makes, with sudo and the SSH keys (else the keys are the
        /// image's default user's).
        #[arg(long)]
        user: Option<String>,
        /// The guest's host name, for cloud-init.
        #[arg(long)]
        hostname: Option<String>,
        /// Your own cloud-init user-data (a #cloud-config file, a script...), instead of the
        /// one made from --user and --hostname.
        #[arg(long = "cloud-init")]
        cloud_init: Option<PathBuf>,
        /// A network card on NETWORK, with MAC address mac= or one converge picks (kept
        /// with the VM, so it keeps it on every node); repeat for more cards.
        #[arg(long = "nic", value_name = "NETWORK[,mac=MAC]")]
        nics: Vec<String>,
        /// Start the VM once it is made (on the least loaded node, or --node).
        #[arg(long)]
        start: bool,
        /// With --start: the node to start it on.
        #[arg(long, requires = "start")]
        node: Option<String>,
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
        /// The VM's name.
        name: String,
        /// A node id (node-12) or address (127.0.0.3).
        #[arg(long)]
        node: Option<String>,
        /// Return at once instead of waiting until it runs.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a running VM to another node: it stops here and starts there (its disks go
    /// with it; the guest restarts).
    Move {
        /// The VM's name.
        name: String,
        /// A node id (node-12) or address (127.0.0.3).
        #[arg(long)]
        node: String,
        /// Return at once instead of waiting until it runs there.
        #[arg(long)]
        no_wait: bool,
    },
    /// Shut a VM down (ACPI), or end it at once with --force.
    Stop {
        /// The VM's name.
        name: String,
        #[arg(long)]
        /// End it at once instead of asking the guest to shut down (ACPI).
        force: bool,
        #[arg(long)]
        /// Return at once instead of waiting until it stopped.
        no_wait: bool,
    },
    /// Every VM: desired and actual state, the node it runs on, a failure in one line.
    List,
    /// A VM's spec, state and the reason for a failure.
    Show {
        /// The VM's name.
        name: String,
    },
    /// The VM's serial console, interactive: keys go to the guest, Ctrl-] leaves. Works
    /// through any node; others may watch or type at the same time.
    Console {
        /// The VM's name.
        name: String,
        /// Print what the console showed so far and return.
        #[arg(long, conflicts_with = "watch")]
        no_follow: bool,
        /// Only watch: follow the output, send no keys (Ctrl-C leaves).
        #[arg(long)]
        watch: bool,
    },
    /// Delete a stopped VM and its disks.
    Delete {
        /// The VM's name.
        name: String,
    },
    /// Change a VM's vCPUs or memory; it gets them at its next start.
    Set {
        /// The VM's name.
        name: String,
        #[arg(long)]
        /// Virtual CPUs.
        cpus: Option<u16>,
        /// Guest memory, for example 2G.
        #[arg(long)]
        memory: Option<String>,
    },
    /// Add disks to a stopped VM, or take one off.
    #[command(subcommand)]
    Disk(VmDiskCommand),
}

#[derive(Debug, Subcommand)]
pub enum VmDiskCommand {
    /// Give a stopped VM a new empty disk (a volume NAME-diskN).
    Add {
        /// The VM's name.
        name: String,
        /// SIZE[,replicas=R], for example 20G or 20G,replicas=3.
        disk: String,
    },
    /// Take a disk, the cloud-init seed or the CD-ROM off a stopped VM. The volume stays:
    /// `volume delete` removes it.
    Detach {
        /// The VM's name.
        name: String,
        /// The volume's name, as `vm show` lists it.
        volume: String,
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
    Init {
        /// A disk of this node to give converge: PATH[,size=SIZE][,force] (size makes a
        /// file of that size; force claims a device holding data). Repeat for more.
        #[arg(long = "disk")]
        disks: Vec<String>,
    },
    /// Join this node to an existing cluster.
    Join {
        /// `host:port` of any member.
        #[arg(long)]
        peer: String,
        /// The join token `cluster init` (or `token create --join`) printed.
        #[arg(long)]
        join_token: String,
        /// A disk of this node to give converge: PATH[,size=SIZE][,force]. Repeat for more.
        #[arg(long = "disk")]
        disks: Vec<String>,
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
        /// A whole block device (/dev/nvme1n1) or a file (made with --size if it does not exist).
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
        /// The volume's name: letters, digits, '-', '_' and '.'.
        name: String,
        /// Size, for example 20G.
        #[arg(long)]
        size: String,
        /// Copies of every byte, on different nodes.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
    },
    /// Every volume: size, replicas, owner, health.
    List,
    /// A volume's size, placement and health.
    Show {
        /// The volume's name.
        name: String,
    },
    /// Delete a volume no VM uses (its data is gone for good).
    Delete {
        /// The volume's name.
        name: String,
    },
    /// Copy a disk image into a volume (created to fit if it does not exist).
    ///
    /// The image's format (qcow2, vmdk, vhdx, vdi, vhd, raw) is told by its header; a raw
    /// image whose start is no partition table, file system or ISO 9660 image needs
    /// `--format raw`. The image is checked before a byte is sent and streamed without a
    /// temporary copy (qemu-utils reads the formats other than raw).
    Import {
        /// The volume to fill (made to fit if it does not exist).
        name: String,
        /// The image file.
        file: PathBuf,
        /// Replicas for a volume this creates.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// The image's format, when its header does not tell it (raw data of any kind).
        #[arg(long, value_enum)]
        format: Option<crate::image::Format>,
    },
    /// Grow a volume no running VM uses (a guest sees the new size at its next start).
    Resize {
        /// The volume's name.
        name: String,
        /// The new size, for example 40G: never smaller than now.
        #[arg(long)]
        size: String,
    },
    /// Copy a volume into another (made with the source's size if it does not exist): an
    /// image imported once serves as the template of many VMs' disks.
    Clone {
        /// The volume to copy.
        source: String,
        /// The volume to copy into (made with the source's size if it does not exist).
        target: String,
        /// Replicas for a volume this creates (default: the source's).
        #[arg(long)]
        replicas: Option<u8>,
    },
    /// Copy a volume's bytes into a raw file.
    Export {
        /// The volume's name.
        name: String,
        /// The raw file to write (made or overwritten).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Make a network every node provides as a Linux bridge: untagged on a host interface
    /// (--interface), a VLAN (--vlan, on --interface or on each node's own interface), or
    /// a VXLAN overlay between the nodes (--overlay).
    Create {
        /// The network's name: letters, digits, '-', '_' and '.'.
        name: String,
        /// The host interface the network is on, the same name on every node: a bridge of
        /// your own (br0) is used as it is; another interface becomes the port of a bridge
        /// converge makes, so it must hold no address.
        #[arg(long, conflicts_with = "overlay")]
        interface: Option<String>,
        /// An 802.1Q VLAN id (1-4094), tagged on --interface, or on the interface that
        /// holds each node's own address.
        #[arg(long, conflicts_with = "overlay")]
        vlan: Option<u16>,
        /// A VXLAN overlay between the nodes' own addresses: a network of its own that needs
        /// nothing from the switches.
        #[arg(long)]
        overlay: bool,
    },
    /// Every network and the VMs on it.
    List,
    /// Delete a network no VM has a card on.
    Delete {
        /// The network's name.
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    Uefi,
    Bios,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and every flag or argument explains itself in `--help`.
    #[test]
    fn every_command_and_flag_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "converge", &mut missing);
        assert!(missing.is_empty(), "no help text for:\n{}", missing.join("\n"));
    }
}
