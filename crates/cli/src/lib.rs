//! The `converge` command line: argument parsing for every subcommand, and the client
//! commands (everything but `serve`), each one or a few calls of the API client.

mod args;
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
        Command::Cluster(ClusterCommand::Init) => {
            let init = api.init().await?;
            out.print(&init, || {
                format!(
                    "Created cluster {}.\n\nAdmin token (shown once; keep it safe):\n  {}\nUse it from any machine with \
                     --server https://{}, --token or CONVERGE_TOKEN, and the cluster's CA certificate (`converge \
                     cluster ca` prints it) with --ca; or put `server`, `token` and `ca` in ~/.config/converge/config.\n\nJoin other nodes \
                     within an hour, running this on each of them:\n  converge --socket DATA_DIR/api.sock cluster join \
                     --peer {} --join-token {}",
                    init.cluster_id, init.admin_token, init.address, init.address, init.join_token
                )
            })
        }
        Command::Cluster(ClusterCommand::Join { peer, join_token }) => {
            let joined = api.join(&v1::JoinRequest { peer, token: join_token }).await?;
            out.print(&joined, || format!("{} joined cluster {}.", joined.node, joined.cluster_id))
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
        Command::Token(command) => token(&api, &out, command).await,
    }
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
