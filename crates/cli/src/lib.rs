//! The `converge` command line: argument parsing for every subcommand, and the client
//! commands (everything but `serve`), each one or a few calls of the API client.

mod args;
mod console;
mod image;
mod nbd;
mod node;
mod output;
mod transfer;
mod vm;

pub use args::{
    Cli, ClientArgs, ClusterCommand, Command, DiskCommand, NodeCommand, ServeArgs, TokenCommand, VmCommand,
    VolumeCommand,
};

use anyhow::{bail, Context, Result};
use api::client::Client;
use api::v1;
use model::parse_size;
use output::Output;

/// A failure the command's output has told already (with --json, inside its one
/// document): it still sets the exit code, and is printed again only as text.
#[derive(Debug)]
struct Shown(anyhow::Error);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Shown {}

/// Tells the user why a command failed (with `json`, as JSON on stdout, where the answer
/// would have been) and returns the exit code.
pub fn report_failure(e: &anyhow::Error, json: bool) -> u8 {
    let (kind, code) = match e.downcast_ref::<Shown>() {
        Some(shown) => failure(&shown.0),
        None => failure(e),
    };
    if json && e.downcast_ref::<Shown>().is_some() {
        return code;
    }
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    if json {
        println!("{}", serde_json::json!({ "error": text, "kind": kind }));
    } else {
        eprintln!("error: {text}");
    }
    code
}

/// How a failed command ends: its kind (`api::client::ClientError::kind`, or `failed`)
/// and the exit code that tells it: 3 not found, 4 refused, 5 unreachable, 1 anything
/// else (clap's own usage errors exit with 2).
pub fn failure(e: &anyhow::Error) -> (&'static str, u8) {
    let kind =
        e.chain().find_map(|cause| cause.downcast_ref::<api::client::ClientError>()).map_or("failed", |e| e.kind());
    let code = match kind {
        "not_found" => 3,
        "refused" => 4,
        "unreachable" => 5,
        _ => 1,
    };
    (kind, code)
}

/// The local socket a node made with `--data-dir /var/lib/converge` listens on.
const DEFAULT_SOCKET: &str = "/var/lib/converge/api.sock";
const DEFAULT_SERVER: &str = "https://127.0.0.1:7700";

/// Where the CLI talks to, and with which token: flags, then the environment (both by clap),
/// then `~/.config/converge/config`, then this node's local socket, then the default server.
fn connect(client: &ClientArgs) -> Result<Client> {
    if let Some(socket) = &client.socket {
        return Ok(Client::local(socket));
    }
    let config = read_config()?;
    let server = client.server.clone().or_else(|| config.get("server").cloned());
    let token = client.token.clone().or_else(|| config.get("token").cloned());
    let ca = client.ca.clone().or_else(|| config.get("ca").map(std::path::PathBuf::from));
    let server = match server {
        Some(server) => server,
        None if token.is_none() && std::path::Path::new(DEFAULT_SOCKET).exists() => {
            return Ok(Client::local(std::path::Path::new(DEFAULT_SOCKET)));
        }
        None => DEFAULT_SERVER.to_string(),
    };
    let Some(ca) = ca else {
        bail!(
            "{server} is trusted by the cluster's CA certificate: give it with --ca FILE (or CONVERGE_CA, or `ca = FILE` \
             in ~/.config/converge/config); `converge cluster ca` on a node prints it"
        );
    };
    let ca_pem =
        std::fs::read_to_string(&ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
    Ok(Client::new(&server, token.as_deref(), &ca_pem)?)
}

/// `key = value` lines of `$XDG_CONFIG_HOME/converge/config` (or `~/.config/...`), if the
/// file exists; `#` starts a comment.
fn read_config() -> Result<std::collections::HashMap<String, String>> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".config")));
    let Some(path) = dir.map(|d| d.join("converge/config")) else { return Ok(Default::default()) };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut values = std::collections::HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}:{}: expected `key = value`", path.display(), number + 1);
        };
        values.insert(key.trim().to_string(), value.trim().trim_matches('"').to_string());
    }
    Ok(values)
}

/// Runs a client command against the node `client` names.
pub async fn run(command: Command, client: ClientArgs) -> Result<()> {
    let api = connect(&client)?;
    let out = Output { json: client.json };
    match command {
        Command::Serve(_) => unreachable!("serve is run by the binary itself"),
        Command::Cluster(ClusterCommand::Init { disks }) => {
            let requests = disks.iter().map(|d| disk_spec(d)).collect::<Result<Vec<_>>>()?;
            let init = api.init().await?;
            let (added, refused) = add_disks(&api, &requests).await;
            let shown = with_disks(serde_json::to_value(&init)?, &added, refused.as_ref());
            out.print(&shown, || {
                format!(
                    "Created cluster {}.\n\nAdmin token (shown once; keep it safe):\n  {}\nUse it from any machine with \
                     --server https://{}, --token or CONVERGE_TOKEN, and the cluster's CA certificate (`converge \
                     cluster ca` prints it) with --ca; or put `server`, `token` and `ca` in ~/.config/converge/config.\n\nJoin other nodes \
                     within an hour, running this on each of them:\n  converge --socket DATA_DIR/api.sock cluster join \
                     --peer {} --join-token {}{}",
                    init.cluster_id,
                    init.admin_token,
                    init.address,
                    init.address,
                    init.join_token,
                    disks_added(&added)
                )
            })?;
            // The cluster stands (and the tokens were shown) even when a disk was refused;
            // with --json, the one document above says so.
            refused.map_or(Ok(()), |e| {
                Err(Shown(e.context("the cluster was created, but not every disk was added")).into())
            })
        }
        Command::Cluster(ClusterCommand::Join { peer, join_token, disks }) => {
            let requests = disks.iter().map(|d| disk_spec(d)).collect::<Result<Vec<_>>>()?;
            let joined = api.join(&v1::JoinRequest { peer, token: join_token }).await?;
            let (added, refused) = add_disks(&api, &requests).await;
            let shown = with_disks(serde_json::to_value(&joined)?, &added, refused.as_ref());
            out.print(&shown, || {
                format!("{} joined cluster {}.{}", joined.node, joined.cluster_id, disks_added(&added))
            })?;
            refused.map_or(Ok(()), |e| Err(Shown(e.context("this node joined, but not every disk was added")).into()))
        }
        Command::Cluster(ClusterCommand::Ca) => {
            print!("{}", api.ca().await?);
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status) => {
            let status = api.status().await?;
            out.print(&status, || output::cluster_status(&status))
        }
        Command::Disk(DiskCommand::Add { path, size, force }) => {
            let size_bytes = size.as_deref().map(parse_size).transpose()?;
            let disk = api.add_disk(&add_disk(&path, size_bytes, force)?).await?;
            out.print(&disk, || disks_added(std::slice::from_ref(&disk)).trim_start().to_string())
        }
        Command::Volume(command) => volume(&api, &out, command).await,
        Command::Vm(command) => vm::run(&api, &out, command).await,
        Command::Network(command) => network(&api, &out, command).await,
        Command::Node(command) => node::run(&api, &out, command).await,
        Command::Events { follow } => node::events(&api, &out, follow).await,
        Command::Token(command) => token(&api, &out, command).await,
    }
}

/// The request for a disk at `path` (made absolute: the server resolves it, not the CLI).
fn add_disk(path: &std::path::Path, size_bytes: Option<u64>, force: bool) -> Result<v1::AddDisk> {
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(v1::AddDisk { path: absolute.display().to_string(), size_bytes, force })
}

/// Parses `PATH[,size=SIZE][,force]`, the `--disk` of `cluster init` and `cluster join`.
fn disk_spec(text: &str) -> Result<v1::AddDisk> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).with_context(|| format!("--disk {text:?} names no path"))?;
    let (mut size_bytes, mut force) = (None, false);
    for option in parts {
        match option.split_once('=') {
            Some(("size", size)) => size_bytes = Some(parse_size(size)?),
            None if option == "force" => force = true,
            _ => bail!("unknown disk option {option:?} in --disk {text}: use PATH[,size=SIZE][,force]"),
        }
    }
    add_disk(std::path::Path::new(path), size_bytes, force)
}

/// Adds the disks in order until one is refused: the ones added, and the refusal.
async fn add_disks(api: &Client, requests: &[v1::AddDisk]) -> (Vec<v1::DiskInfo>, Option<anyhow::Error>) {
    let mut added = Vec::new();
    for request in requests {
        match api.add_disk(request).await {
            Ok(disk) => added.push(disk),
            Err(e) => return (added, Some(anyhow::Error::new(e).context(format!("adding disk {}", request.path)))),
        }
    }
    (added, None)
}

/// `shown` (init's or join's answer) with the disks added, and why the rest were not.
fn with_disks(
    mut shown: serde_json::Value,
    added: &[v1::DiskInfo],
    refused: Option<&anyhow::Error>,
) -> serde_json::Value {
    shown["disks"] = serde_json::to_value(added).expect("disks serialise");
    if let Some(e) = refused {
        shown["disks_error"] = format!("{e:#}").into();
    }
    shown
}

fn disks_added(disks: &[v1::DiskInfo]) -> String {
    disks
        .iter()
        .map(|d| {
            format!("\nAdded {} at {} on {}: {} usable.", d.id, d.path, d.node, model::format_size(d.capacity_bytes))
        })
        .collect()
}

async fn token(api: &Client, out: &Output, command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create { role, join, ttl, name } => {
            let ttl_secs = join.then(|| parse_duration(&ttl)).transpose()?;
            let created = api.create_token(&v1::CreateToken { role, name, ttl_secs }).await?;
            out.print(&created, || match created.kind {
                model::TokenKind::Api { role } => format!("An {role} token (shown once):\n  {}", created.token),
                model::TokenKind::Join { .. } => format!(
                    "A join token, for {ttl} (shown once):\n  {}\nOn the new node: converge --socket DATA_DIR/api.sock \
                     cluster join --peer MEMBER_ADDRESS --join-token {}",
                    created.token, created.token
                ),
            })
        }
        TokenCommand::List => {
            let tokens = api.tokens().await?;
            out.print(&tokens, || {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let mut lines = vec![format!("{:<18} {:<10} {}", "ID", "KIND", "NAME")];
                for t in &tokens {
                    let kind = match t.kind {
                        model::TokenKind::Api { role } => role.to_string(),
                        model::TokenKind::Join { expires_ms } if expires_ms <= now_ms => "join (expired)".into(),
                        model::TokenKind::Join { expires_ms } => {
                            format!("join ({} min left)", (expires_ms - now_ms) / 60_000)
                        }
                    };
                    lines.push(format!("{:<18} {:<10} {}", t.id, kind, t.name));
                }
                lines.join("\n")
            })
        }
        TokenCommand::Revoke { id } => {
            api.revoke_token(&id).await?;
            let revoked = serde_json::json!({ "revoked": id });
            out.print(&revoked, || format!("Token {id} works no more."))
        }
    }
}

/// `30s`, `30m`, `2h` or `1d` in seconds.
fn parse_duration(text: &str) -> Result<u64> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().with_context(|| format!("{text:?} is not a duration like 30m, 2h or 1d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?} is not a duration like 30m, 2h or 1d"),
    };
    n.checked_mul(seconds).filter(|s| *s > 0).with_context(|| format!("{text:?} is not a usable duration"))
}

async fn network(api: &Client, out: &Output, command: crate::args::NetworkCommand) -> Result<()> {
    use crate::args::NetworkCommand;
    match command {
        NetworkCommand::Create { name, interface, vlan, overlay } => {
            let network = api.create_network(&v1::CreateNetwork { name, interface, vlan, overlay }).await?;
            out.print(&network, || {
                format!("Created network {} ({}); every node provides it as a bridge.", network.name, network.kind)
            })
        }
        NetworkCommand::List => {
            let networks = api.networks().await?;
            out.print(&networks, || output::network_table(&networks))
        }
        NetworkCommand::Delete { name } => {
            api.delete_network(&name).await?;
            out.print(&serde_json::json!({ "deleted": name }), || format!("Deleted network {name}."))
        }
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
        VolumeCommand::Import { name, file, replicas, format } => {
            let report = transfer::import(api, out, &name, &file, replicas, format).await?;
            out.print(&report, || report.describe("Imported", "into"))
        }
        VolumeCommand::Resize { name, size } => {
            let volume = api.resize_volume(&name, parse_size(&size)?).await?;
            out.print(&volume, || format!("Volume {name} has {} now.", model::format_size(volume.size_bytes)))
        }
        VolumeCommand::Clone { source, target, replicas } => {
            let started = std::time::Instant::now();
            let volume = transfer::clone(api, out, &source, &target, replicas).await?;
            out.print(&volume, || {
                format!(
                    "Cloned volume {source} into {target} ({} in {:.1} s).",
                    model::format_size(volume.size_bytes),
                    started.elapsed().as_secs_f64()
                )
            })
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
