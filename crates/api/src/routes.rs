//! The HTTP routes. Each handler parses, makes one call, and maps the error.

use crate::error::ApiError;
use crate::services::NodeServices;
use crate::v1;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cluster::{PeerReply, PeerRpc};

/// The API as the node's local socket serves it: root on the node, no token.
pub fn local_router(services: NodeServices) -> Router {
    routes().layer(axum::middleware::from_fn_with_state(services.clone(), fresh_names)).with_state(services)
}

/// The API as the network sees it: every call through `auth::network_gate`, and the door a
/// node that is not a member yet asks to join by.
pub fn router(services: NodeServices) -> Router {
    routes()
        .route("/internal/join", post(join_request).layer(DefaultBodyLimit::max(64 << 10)))
        .layer(axum::middleware::from_fn_with_state(services.clone(), fresh_names))
        .layer(axum::middleware::from_fn_with_state(services.clone(), crate::auth::network_gate))
        .with_state(services)
}

/// What the node port serves over HTTP, to nodes that proved they are the cluster's.
pub fn peer_router(services: NodeServices) -> Router {
    Router::new()
        .route("/internal/peer", post(peer).layer(DefaultBodyLimit::max(cluster::PEER_REQUEST_BYTES_MAX)))
        .route("/internal/snapshot", post(snapshot).layer(DefaultBodyLimit::max(cluster::SNAPSHOT_BYTES_MAX)))
        // A VM's console, relayed by another node for its user.
        .route("/internal/vms/{name}/console", get(internal_vm_console))
        .route(
            "/internal/vms/{name}/console/input",
            post(vm_console_input).layer(DefaultBodyLimit::max(crate::vms::CONSOLE_INPUT_MAX_BYTES)),
        )
        .with_state(services)
}

/// A VM, volume or network named in the path that this node does not know may be one just
/// made through another node (a follower applies a write a round trip after the leader):
/// the node catches up with the leader before the call goes on, so what one node made is
/// there on every other at once. A name that is truly unknown gets its 404 after that.
async fn fresh_names(
    State(node): State<NodeServices>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let unknown = {
        let state = node.cluster().state();
        let segments: Vec<&str> = request.uri().path().trim_start_matches('/').split('/').collect();
        let names: Vec<(&str, bool)> = match segments.as_slice() {
            ["v1", "vms", vm, "disks", volume] => {
                vec![(vm, state.vm_by_name(vm).is_some()), (volume, state.volume_by_name(volume).is_some())]
            }
            ["v1", "vms", vm, ..] => vec![(vm, state.vm_by_name(vm).is_some())],
            ["v1", "volumes", volume, ..] => vec![(volume, state.volume_by_name(volume).is_some())],
            ["v1", "networks", network] => vec![(network, state.network_by_name(network).is_some())],
            _ => vec![],
        };
        state.cluster.is_some()
            && names
                .iter()
                .any(|(name, known)| !known && model::check_name("name", name, model::NAME_MAX_BYTES).is_ok())
    };
    if unknown {
        if let Err(e) = node.cluster().catch_up().await {
            let message =
                format!("this node does not know that name and cannot check with the cluster now ({e}): try again");
            return (StatusCode::SERVICE_UNAVAILABLE, Json(v1::ErrorBody { error: message })).into_response();
        }
    }
    next.run(request).await
}

fn routes() -> Router<NodeServices> {
    Router::new()
        .route("/v1/health", get(|| async { "ok" }))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/ca", get(cluster_ca))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/cluster/join", post(cluster_join))
        .route("/v1/disks", post(add_disk))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/data", get(export_volume).put(import_volume))
        .route("/v1/volumes/{name}/clone", post(clone_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/blocks/{offset}", get(read_blocks).put(write_blocks))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{name}", axum::routing::delete(delete_network))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm).patch(update_vm))
        .route("/v1/vms/{name}/disks", post(add_vm_disk))
        .route("/v1/vms/{name}/disks/{volume}", axum::routing::delete(detach_vm_volume))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/console", get(vm_console))
        .route("/v1/vms/{name}/console/session", get(vm_console_session))
        .route("/v1/events", get(events))
        .route("/v1/nodes/{node}/drain", post(drain_node))
        .route("/v1/nodes/{node}/resume", post(resume_node))
        .route("/v1/nodes/{node}/check", get(check_node))
        .route("/v1/nodes/{node}", axum::routing::delete(remove_node))
}

async fn list_tokens(State(node): State<NodeServices>) -> Json<Vec<v1::TokenInfo>> {
    Json(node.tokens())
}

async fn create_token(
    State(node): State<NodeServices>,
    Json(request): Json<v1::CreateToken>,
) -> Result<(StatusCode, Json<v1::TokenCreated>), ApiError> {
    Ok((StatusCode::CREATED, Json(node.create_token(request).await?)))
}

async fn revoke_token(State(node): State<NodeServices>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    node.revoke_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cluster CA's certificate (public: what clients trust the nodes by).
async fn cluster_ca(State(node): State<NodeServices>) -> Result<String, ApiError> {
    let state = node.cluster().state();
    let ca = state.ca.as_ref().ok_or_else(|| ApiError::from(cluster::ClusterError::NotInitialized))?;
    Ok(ca.cert_pem.clone())
}

async fn cluster_status(State(node): State<NodeServices>) -> Json<v1::ClusterStatus> {
    Json(node.cluster().status().await)
}

async fn events(State(node): State<NodeServices>, Query(query): Query<v1::EventsQuery>) -> Json<Vec<model::Event>> {
    Json(node.cluster().state().events_after(query.after).cloned().collect())
}

async fn drain_node(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
) -> Result<Json<v1::NodeDrain>, ApiError> {
    Ok(Json(node.set_drain(&name, true).await?))
}

async fn resume_node(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
) -> Result<Json<v1::NodeDrain>, ApiError> {
    Ok(Json(node.set_drain(&name, false).await?))
}

async fn check_node(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
) -> Result<Json<v1::NodeCheck>, ApiError> {
    Ok(Json(node.check_node(&name)?))
}

async fn remove_node(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let id = node.cluster().resolve_node(&name)?;
    node.cluster().remove_node(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cluster_init(State(node): State<NodeServices>) -> Result<Json<v1::InitResponse>, ApiError> {
    Ok(Json(node.init().await?))
}

async fn cluster_join(
    State(node): State<NodeServices>,
    Json(request): Json<v1::JoinRequest>,
) -> Result<Json<v1::JoinResponse>, ApiError> {
    Ok(Json(node.join(request).await?))
}

async fn add_disk(
    State(node): State<NodeServices>,
    Json(request): Json<v1::AddDisk>,
) -> Result<Json<v1::DiskInfo>, ApiError> {
    Ok(Json(node.add_disk(request).await?))
}

async fn list_volumes(State(node): State<NodeServices>) -> Json<Vec<v1::VolumeInfo>> {
    Json(node.volumes())
}

async fn create_volume(
    State(node): State<NodeServices>,
    Json(request): Json<v1::CreateVolume>,
) -> Result<(StatusCode, Json<v1::VolumeInfo>), ApiError> {
    Ok((StatusCode::CREATED, Json(node.create_volume(request).await?)))
}

async fn show_volume(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
) -> Result<Json<v1::VolumeInfo>, ApiError> {
    Ok(Json(node.volume(&name)?))
}

async fn delete_volume(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    node.delete_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn import_volume(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<v1::ImportResult>, ApiError> {
    Ok(Json(node.import(&name, body.into_data_stream()).await?))
}

async fn export_volume(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let (size, stream) = node.export(&name)?;
    Ok((
        [(header::CONTENT_LENGTH, size.to_string()), (header::CONTENT_TYPE, "application/octet-stream".into())],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Answers at once and copies in a task of its own, one JSON line per chunk copied and one
/// for the outcome; the copy stops if the client goes away.
async fn clone_volume(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::CloneVolume>,
) -> Result<Response, ApiError> {
    node.volume(&name)?;
    crate::services::check_name("volume", &request.into)?;
    let (lines, receiver) = tokio::sync::mpsc::channel::<v1::CloneProgress>(64);
    tokio::spawn(async move {
        // Progress a slow reader has no room for is skipped; a reader gone stops the copy.
        let progress = |bytes, of| {
            !matches!(
                lines.try_send(v1::CloneProgress::Copied { bytes, of }),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
            )
        };
        let outcome = match node.clone_volume(&name, &request, progress).await {
            Ok(volume) => v1::CloneProgress::Done { volume },
            Err(e) => v1::CloneProgress::Failed { error: e.message },
        };
        let _ = lines.send(outcome).await;
    });
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        let mut text = serde_json::to_vec(&line).expect("progress serialises");
        text.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(text)), receiver))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response())
}

#[derive(serde::Deserialize)]
struct BlockRead {
    len: u64,
}

async fn read_blocks(
    State(node): State<NodeServices>,
    Path((name, offset)): Path<(String, u64)>,
    Query(read): Query<BlockRead>,
) -> Result<Vec<u8>, ApiError> {
    node.read_blocks(&name, offset, read.len).await
}

async fn write_blocks(
    State(node): State<NodeServices>,
    Path((name, offset)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    node.write_blocks(&name, offset, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn peer(State(node): State<NodeServices>, Json(rpc): Json<PeerRpc>) -> Json<PeerReply> {
    Json(node.cluster().handle_peer(rpc).await)
}

/// A node asking to join: it is no member yet, so only its join requests are taken from it
/// (its join token is checked by the member that answers).
async fn join_request(State(node): State<NodeServices>, Json(rpc): Json<PeerRpc>) -> Json<PeerReply> {
    match rpc {
        join @ (PeerRpc::Certify { .. } | PeerRpc::Join { .. }) => Json(node.cluster().handle_peer(join).await),
        _ => Json(PeerReply::Join(Err(cluster::RemoteRefusal::Other("only a join request is taken here".into())))),
    }
}

async fn snapshot(State(node): State<NodeServices>, body: axum::body::Bytes) -> Json<PeerReply> {
    Json(node.cluster().handle_snapshot(Vec::from(body)).await)
}

async fn list_networks(State(node): State<NodeServices>) -> Json<Vec<v1::NetworkInfo>> {
    Json(node.networks())
}

async fn create_network(
    State(node): State<NodeServices>,
    Json(request): Json<v1::CreateNetwork>,
) -> Result<(StatusCode, Json<v1::NetworkInfo>), ApiError> {
    Ok((StatusCode::CREATED, Json(node.create_network(request).await?)))
}

async fn delete_network(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    node.delete_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_vms(State(node): State<NodeServices>) -> Json<Vec<v1::VmInfo>> {
    Json(node.vms())
}

async fn create_vm(
    State(node): State<NodeServices>,
    Json(request): Json<v1::CreateVm>,
) -> Result<(StatusCode, Json<v1::VmInfo>), ApiError> {
    Ok((StatusCode::CREATED, Json(node.create_vm(request).await?)))
}

async fn show_vm(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.vm(&name)?))
}

async fn update_vm(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::UpdateVm>,
) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.update_vm(&name, request).await?))
}

async fn add_vm_disk(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::DiskRequest>,
) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.add_vm_disk(&name, request).await?))
}

async fn detach_vm_volume(
    State(node): State<NodeServices>,
    Path((name, volume)): Path<(String, String)>,
) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.detach_vm_volume(&name, &volume).await?))
}

async fn resize_volume(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::ResizeVolume>,
) -> Result<Json<v1::VolumeInfo>, ApiError> {
    Ok(Json(node.resize_volume(&name, request.size_bytes).await?))
}

async fn delete_vm(State(node): State<NodeServices>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    node.delete_vm(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_vm(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::StartVm>,
) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.start_vm(&name, request).await?))
}

async fn stop_vm(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Json(request): Json<v1::StopVm>,
) -> Result<Json<v1::VmInfo>, ApiError> {
    Ok(Json(node.stop_vm(&name, request).await?))
}

#[derive(serde::Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    follow: bool,
    /// Only the last this many bytes of what was written before.
    #[serde(default)]
    tail: Option<u64>,
}

/// How much earlier output an interactive console session shows first.
const SESSION_TAIL_BYTES: u64 = 16 << 10;

/// An interactive console over a websocket: binary messages from the client are keys for
/// the guest's serial port; the guest's output (its last 16 KiB, then as it comes) goes
/// back as binary messages, until the VM stops or the client leaves. Any number of
/// sessions (up to `SESSIONS_MAX` per node) may watch and type at once; any node serves
/// one, relaying to the VM's node.
async fn vm_console_session(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // A session outlives its HTTP connection (and that connection's place in the API
    // port's count): sessions have a count of their own.
    let Ok(place) = node.console_sessions().clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this node serves {} console sessions already: try another node", crate::services::SESSIONS_MAX),
        ));
    };
    let output = node.console(&name, true, Some(SESSION_TAIL_BYTES), true).await?;
    let upgrade = upgrade
        .max_message_size(crate::vms::CONSOLE_INPUT_MAX_BYTES)
        .max_frame_size(crate::vms::CONSOLE_INPUT_MAX_BYTES);
    Ok(upgrade.on_upgrade(move |socket| async move {
        console_session(node, name, output, socket).await;
        drop(place);
    }))
}

/// A session's heartbeat: a client that answers no ping within two of these is gone.
const SESSION_PING: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a session's end waits on the client's close and the last keys.
const SESSION_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn console_session(
    node: NodeServices,
    name: String,
    mut output: futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
    socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    let (mut to_client, mut from_client) = socket.split();
    // Keys go to the guest from a task of their own, in order, a few at most waiting: a
    // guest slow to take them never holds up its output or the session's end.
    let (keys, mut queued) = tokio::sync::mpsc::channel::<Bytes>(8);
    let (refusals, mut refused) = tokio::sync::mpsc::channel::<String>(1);
    let mut typist = {
        let (node, name) = (node.clone(), name.clone());
        tokio::spawn(async move {
            while let Some(input) = queued.recv().await {
                if let Err(e) = node.console_input(&name, input, true).await {
                    let _ = refusals.try_send(e.message);
                }
            }
        })
    };
    let mut ping = tokio::time::interval(SESSION_PING);
    let mut answered = true;
    loop {
        tokio::select! {
            chunk = output.next() => match chunk {
                Some(Ok(bytes)) => {
                    if to_client.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
                // The VM stopped (or its output broke off): the session ends.
                _ => {
                    let _ = to_client.send(Message::Close(None)).await;
                    break;
                }
            },
            Some(reason) = refused.recv() => {
                let said = format!("\r\n[converge: the console input was refused: {reason}]\r\n");
                if to_client.send(Message::Binary(Bytes::from(said))).await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if !answered || to_client.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
                answered = false;
            }
            message = from_client.next() => {
                let input = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Text(text))) => Bytes::copy_from_slice(text.as_bytes()),
                    Some(Ok(Message::Pong(_))) => {
                        answered = true;
                        continue;
                    }
                    Some(Ok(Message::Ping(_))) => continue,
                    // The client left: its close is answered, so it sees a clean end.
                    Some(Ok(Message::Close(_))) => {
                        let _ = tokio::time::timeout(SESSION_CLOSE_TIMEOUT, to_client.close()).await;
                        break;
                    }
                    Some(Err(_)) | None => break,
                };
                if keys.try_send(input).is_err() {
                    let said = "\r\n[converge: keys dropped: the guest is not taking them]\r\n";
                    if to_client.send(Message::Binary(Bytes::from_static(said.as_bytes()))).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    // Keys typed before the client left still reach the guest, if it takes them soon.
    drop(keys);
    if tokio::time::timeout(SESSION_CLOSE_TIMEOUT, &mut typist).await.is_err() {
        typist.abort();
    }
}

/// Keys relayed by another node, for a VM that runs here.
async fn vm_console_input(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    input: Bytes,
) -> Result<StatusCode, ApiError> {
    node.console_input(&name, input, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_console(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let stream = node.console(&name, query.follow, query.tail, true).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response())
}

/// The console of a VM that runs here, for another node relaying it.
async fn internal_vm_console(
    State(node): State<NodeServices>,
    Path(name): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let stream = node.console(&name, query.follow, query.tail, false).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response())
}
