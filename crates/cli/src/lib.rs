//! The `converge` command line: argument parsing for every subcommand, and the client
//! commands (everything but `serve`), each one or a few calls of the API client.

mod args;
mod node;
mod output;
mod transfer;
mod vm;

pub use args::{
    Cli, ClientArgs, ClusterCommand, Command, DiskCommand, NodeCommand, ServeArgs, VmCommand, VolumeCommand,
};

use anyhow::{bail, Context, Result};
use api::client::Client;
use api::v1;
use model::parse_size;
use output::Output;

/// Runs a client command against the API server in `client.server`.
pub async fn run(command: Command, client: ClientArgs) -> Result<()> {
    let api = Client::new(&client.server);
    let out = Output { json: client.json };
    match command {
        Command::Serve(_) => unreachable!("serve is run by the binary itself"),
        Command::Cluster(ClusterCommand::Init) => {
            let init = api.init().await?;
            out.print(&init, || {
                format!(
                    "Created cluster {}.\nJoin other nodes with:\n  converge --server http://NEW_NODE cluster join --peer {} --token {}",
                    init.cluster_id,
                    api.server().trim_start_matches("http://"),
                    init.token
                )
            })
        }
        Command::Cluster(ClusterCommand::Join { peer, token }) => {
            let joined = api.join(&v1::JoinRequest { peer, token }).await?;
            out.print(&joined, || format!("{} joined cluster {}.", joined.node, joined.cluster_id))
        }
        Command::Cluster(ClusterCommand::Status) => {
            let status = api.status().await?;
            out.print(&status, || output::cluster_status(&status))
        }
        Command::Disk(DiskCommand::Add { path, size, force }) => {
            let size_bytes = size.as_deref().map(parse_size).transpose()?;
            let absolute = std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?;
            let request = v1::AddDisk { path: absolute.display().to_string(), size_bytes, force };
            let disk = api.add_disk(&request).await?;
            out.print(&disk, || {
                format!(
                    "Added {} at {} on {}: {} usable.",
                    disk.id,
                    disk.path,
                    disk.node,
                    model::format_size(disk.capacity_bytes)
                )
            })
        }
        Command::Volume(command) => volume(&api, &out, command).await,
        Command::Vm(command) => vm::run(&api, &out, command).await,
        Command::Node(command) => node::run(&api, &out, command).await,
        Command::Events { follow } => node::events(&api, &out, follow).await,
    }
}

async fn volume(api: &Client, out: &Output, command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create { name, size, replicas } => {
            let size_bytes = parse_size(&size)?;
            let volume = api.create_volume(&v1::CreateVolume { name, size_bytes, replicas }).await?;
            out.print(&volume, || {
                format!(
                    "Created volume {} ({}, {} replicas).",
                    volume.name,
                    model::format_size(volume.size_bytes),
                    volume.replicas
                )
            })
        }
        VolumeCommand::List => {
            let volumes = api.volumes().await?;
            out.print(&volumes, || output::volume_table(&volumes))
        }
        VolumeCommand::Show { name } => {
            let volume = api.volume(&name).await?;
            out.print(&volume, || output::volume_details(&volume))
        }
        VolumeCommand::Delete { name } => {
            api.delete_volume(&name).await?;
            out.print(&serde_json::json!({ "deleted": name }), || format!("Deleted volume {name}."))
        }
        VolumeCommand::Import { name, file, replicas } => {
            let report = transfer::import(api, out, &name, &file, replicas).await?;
            out.print(&report, || report.describe("Imported", "into"))
        }
        VolumeCommand::Export { name, file } => {
            if file.exists() && !file.is_file() {
                bail!("{} exists and is not a regular file", file.display());
            }
            let report = transfer::export(api, out, &name, &file).await?;
            out.print(&report, || report.describe("Exported", "from"))
        }
    }
}
