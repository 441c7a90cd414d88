//! The typed API client every `converge` command other than `serve` uses.

use crate::v1;
use bytes::Bytes;
use futures_util::Stream;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "Cannot reach converge at {server}: is `converge serve` running there? (set --server, or --socket on the node \
         itself)"
    )]
    Unreachable {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Cannot reach converge at {server}: is `converge serve` running there?")]
    NoAnswer {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("{0:?} cannot name anything: a path step")]
    BadSegment(String),
    #[error("Talking to {server}")]
    Http {
        server: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What kind of failure this is, for scripts: `not_found`, `refused` (the request was
    /// understood and said no: bad input, a conflict, no permission), `unreachable` (no
    /// answer, or none now: no node there, no leader), or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Unreachable { .. } | ClientError::NoAnswer { .. } => "unreachable",
            ClientError::Api { status, .. } if *status == StatusCode::NOT_FOUND => "not_found",
            ClientError::Api { status, .. }
                if matches!(status.as_u16(), 502..=504) || *status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                "unreachable"
            }
            ClientError::Api { status, .. } if status.is_client_error() || status.as_u16() == 507 => "refused",
            ClientError::BadSegment(_) => "refused",
            _ => "failed",
        }
    }
}

#[derive(Clone)]
pub struct Client {
    /// Where calls go, as the user would recognise it (in errors).
    server: String,
    /// The URLs' start.
    base: String,
    http: reqwest::Client,
    /// How a websocket reaches the same server.
    ws: WsTarget,
}

/// Where a websocket connects: a node's API port over TLS (with the token), or its local
/// socket.
#[derive(Clone)]
enum WsTarget {
    Tls { authority: String, tls: std::sync::Arc<rustls::ClientConfig>, token: Option<String> },
    Unix(std::path::PathBuf),
}

/// Any stream a websocket runs over.
trait WsIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> WsIo for T {}

/// An interactive console: the guest's output as it comes, and a way to send it keys.
pub struct ConsoleSession {
    pub output: futures_util::stream::BoxStream<'static, Result<Bytes, ClientError>>,
    pub input: tokio::sync::mpsc::Sender<Bytes>,
    /// Ends once every key given to `input` (dropped) was sent and the session closed.
    pub sent: tokio::task::JoinHandle<()>,
}

impl Client {
    /// `server` is `https://host:port` (a bare `host:port` is taken as that); it is trusted
    /// if its certificate is of the cluster CA `ca_pem`. `token` goes with every call.
    pub fn new(server: &str, token: Option<&str>, ca_pem: &str) -> Result<Self, ClientError> {
        let server =
            if server.contains("://") { server.trim_end_matches('/').to_string() } else { format!("https://{server}") };
        if !server.starts_with("https://") {
            return Err(ClientError::Setup(format!(
                "{server}: the API is served over HTTPS only; give https://HOST:PORT"
            )));
        }
        let tls = pki::api_client(ca_pem).map_err(|e| ClientError::Setup(e.to_string()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = token.and_then(|t| format!("Bearer {}", t.trim()).parse().ok()) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let authority = server.trim_start_matches("https://").split('/').next().unwrap_or_default();
        // (A port-less address is HTTPS's 443, as for every other call.)
        let has_port =
            authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !authority.ends_with(']');
        let authority = if has_port { authority.to_string() } else { format!("{authority}:443") };
        let ws = WsTarget::Tls {
            authority,
            tls: std::sync::Arc::new(tls.clone()),
            token: token.map(|t| t.trim().to_string()),
        };
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Client { base: server.clone(), server, http, ws })
    }

    /// Talks to the node whose local socket is `socket` (root on that node; no token).
    pub fn local(socket: &std::path::Path) -> Self {
        let http = reqwest::Client::builder().unix_socket(socket).build().expect("a plain HTTP client builds");
        Client {
            server: format!("the local socket {}", socket.display()),
            base: "http://localhost".into(),
            http,
            ws: WsTarget::Unix(socket.to_path_buf()),
        }
    }

    /// Opens an interactive console on VM `name` (a websocket to the server).
    pub async fn console_session(&self, name: &str) -> Result<ConsoleSession, ClientError> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message;
        let path = format!("/v1/vms/{}/console/session", segment(name)?);
        let unreachable = |source: std::io::Error| ClientError::NoAnswer { server: self.server.clone(), source };
        let (url, io, token): (String, Box<dyn WsIo>, Option<&String>) = match &self.ws {
            WsTarget::Unix(socket) => {
                let io = tokio::net::UnixStream::connect(socket).await.map_err(unreachable)?;
                (format!("ws://localhost{path}"), Box::new(io), None)
            }
            WsTarget::Tls { authority, tls, token } => {
                let tcp = tokio::net::TcpStream::connect(authority.as_str()).await.map_err(unreachable)?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                // Nodes are checked against the cluster CA, whatever name was dialled.
                let name = rustls::pki_types::ServerName::try_from(pki::NODE_NAME).expect("a valid name");
                let io = connector.connect(name, tcp).await.map_err(unreachable)?;
                (format!("wss://{authority}{path}"), Box::new(io), token.as_ref())
            }
        };
        let mut request = url.into_client_request().map_err(|e| ClientError::Setup(e.to_string()))?;
        if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
            request.headers_mut().insert(reqwest::header::AUTHORIZATION, value);
        }
        let (socket, _) = tokio_tungstenite::client_async(request, io).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                let status = response.status();
                let body = response.body().as_deref().unwrap_or_default();
                let message = serde_json::from_slice::<v1::ErrorBody>(body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| format!("the server answered {status}"));
                ClientError::Api { status, message }
            }
            other => ClientError::Setup(format!("opening the console of {name}: {other}")),
        })?;
        let (mut to_server, from_server) = socket.split();
        let (input, mut keys) = tokio::sync::mpsc::channel::<Bytes>(64);
        let sent = tokio::spawn(async move {
            while let Some(bytes) = keys.recv().await {
                if to_server.send(Message::Binary(bytes)).await.is_err() {
                    return;
                }
            }
            let _ = to_server.send(Message::Close(None)).await;
        });
        let server = self.server.clone();
        let output = from_server
            .filter_map(move |message| {
                let server = server.clone();
                async move {
                    match message {
                        Ok(Message::Binary(bytes)) => Some(Ok(bytes)),
                        Ok(Message::Text(text)) => Some(Ok(Bytes::copy_from_slice(text.as_bytes()))),
                        Ok(_) => None,
                        Err(e) => Some(Err(ClientError::Setup(format!("the console from {server} broke off: {e}")))),
                    }
                }
            })
            .boxed();
        Ok(ConsoleSession { output, input, sent })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable { server: self.server.clone(), source }
            } else {
                ClientError::Http { server: self.server.clone(), source }
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        // The API's own errors are JSON; the HTTP layer's (a body too large, JSON that does
        // not parse) are a line of text: either way the user reads the server's reason.
        let text = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<v1::ErrorBody>(&text) {
            Ok(body) => body.error,
            Err(_) if !text.trim().is_empty() => {
                let reason: String = text.trim().chars().take(512).collect();
                format!("the server refused the request ({status}): {reason}")
            }
            Err(_) => format!("the server answered {status}"),
        };
        Err(ClientError::Api { status, message })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request).await?;
        response.json().await.map_err(|source| ClientError::Http { server: self.server.clone(), source })
    }

    pub async fn create_token(&self, request: &v1::CreateToken) -> Result<v1::TokenCreated, ClientError> {
        self.call(Method::POST, "/v1/tokens", Some(request)).await
    }

    pub async fn tokens(&self) -> Result<Vec<v1::TokenInfo>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/tokens", None).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/tokens/{}", segment(id)?)))).await.map(drop)
    }

    pub async fn status(&self) -> Result<v1::ClusterStatus, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/cluster", None).await
    }

    /// The cluster CA's certificate, PEM.
    pub async fn ca(&self) -> Result<String, ClientError> {
        let response = self.send(self.http.get(self.url("/v1/cluster/ca"))).await?;
        response.text().await.map_err(|source| ClientError::Http { server: self.server.clone(), source })
    }

    pub async fn init(&self) -> Result<v1::InitResponse, ClientError> {
        self.call::<(), _>(Method::POST, "/v1/cluster/init", None).await
    }

    pub async fn join(&self, request: &v1::JoinRequest) -> Result<v1::JoinResponse, ClientError> {
        self.call(Method::POST, "/v1/cluster/join", Some(request)).await
    }

    pub async fn add_disk(&self, request: &v1::AddDisk) -> Result<v1::DiskInfo, ClientError> {
        self.call(Method::POST, "/v1/disks", Some(request)).await
    }

    pub async fn volumes(&self) -> Result<Vec<v1::VolumeInfo>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/volumes", None).await
    }

    pub async fn volume(&self, name: &str) -> Result<v1::VolumeInfo, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/volumes/{}", segment(name)?), None).await
    }

    pub async fn create_volume(&self, request: &v1::CreateVolume) -> Result<v1::VolumeInfo, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(request)).await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/volumes/{}", segment(name)?)))).await.map(drop)
    }

    /// Streams `body` into the volume from offset 0.
    pub async fn import<S>(&self, name: &str, body: S) -> Result<v1::ImportResult, ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let request = self
            .http
            .put(self.url(&format!("/v1/volumes/{}/data", segment(name)?)))
            .body(reqwest::Body::wrap_stream(body));
        let response = self.send(request).await?;
        response.json().await.map_err(|source| ClientError::Http { server: self.server.clone(), source })
    }

    pub async fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<v1::VolumeInfo, ClientError> {
        let path = format!("/v1/volumes/{}/resize", segment(name)?);
        self.call(Method::POST, &path, Some(&v1::ResizeVolume { size_bytes })).await
    }

    pub async fn update_vm(&self, name: &str, request: &v1::UpdateVm) -> Result<v1::VmInfo, ClientError> {
        self.call(Method::PATCH, &format!("/v1/vms/{}", segment(name)?), Some(request)).await
    }

    pub async fn add_vm_disk(&self, name: &str, disk: &v1::DiskRequest) -> Result<v1::VmInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/vms/{}/disks", segment(name)?), Some(disk)).await
    }

    pub async fn detach_vm_volume(&self, name: &str, volume: &str) -> Result<v1::VmInfo, ClientError> {
        let path = format!("/v1/vms/{}/disks/{}", segment(name)?, segment(volume)?);
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    /// Copies volume `name` into `request.into`: the server's progress lines as they come.
    pub async fn clone_volume(
        &self,
        name: &str,
        request: &v1::CloneVolume,
    ) -> Result<JsonLines<v1::CloneProgress>, ClientError> {
        let url = self.url(&format!("/v1/volumes/{}/clone", segment(name)?));
        let response = self.send(self.http.post(url).json(request)).await?;
        Ok(JsonLines { response, buffer: Vec::new(), server: self.server.clone(), line: std::marker::PhantomData })
    }

    /// The volume's bytes as a stream, and its length.
    pub async fn export(
        &self,
        name: &str,
    ) -> Result<(u64, impl Stream<Item = Result<Bytes, reqwest::Error>>), ClientError> {
        let response = self.send(self.http.get(self.url(&format!("/v1/volumes/{}/data", segment(name)?)))).await?;
        let len = response.content_length().unwrap_or(0);
        Ok((len, response.bytes_stream()))
    }

    pub async fn events(&self, after: u64) -> Result<Vec<model::Event>, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/events?after={after}"), None).await
    }

    pub async fn drain_node(&self, node: &str) -> Result<v1::NodeDrain, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/nodes/{}/drain", segment(node)?), None).await
    }

    pub async fn resume_node(&self, node: &str) -> Result<v1::NodeDrain, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/nodes/{}/resume", segment(node)?), None).await
    }

    pub async fn remove_node(&self, node: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/nodes/{}", segment(node)?)))).await.map(drop)
    }

    pub async fn check_node(&self, node: &str) -> Result<v1::NodeCheck, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/nodes/{}/check", segment(node)?), None).await
    }

    pub async fn networks(&self) -> Result<Vec<v1::NetworkInfo>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/networks", None).await
    }

    pub async fn create_network(&self, request: &v1::CreateNetwork) -> Result<v1::NetworkInfo, ClientError> {
        self.call(Method::POST, "/v1/networks", Some(request)).await
    }

    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/networks/{}", segment(name)?)))).await.map(drop)
    }

    pub async fn vms(&self) -> Result<Vec<v1::VmInfo>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/vms", None).await
    }

    pub async fn vm(&self, name: &str) -> Result<v1::VmInfo, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/vms/{}", segment(name)?), None).await
    }

    pub async fn create_vm(&self, request: &v1::CreateVm) -> Result<v1::VmInfo, ClientError> {
        self.call(Method::POST, "/v1/vms", Some(request)).await
    }

    pub async fn start_vm(&self, name: &str, request: &v1::StartVm) -> Result<v1::VmInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/vms/{}/start", segment(name)?), Some(request)).await
    }

    pub async fn stop_vm(&self, name: &str, request: &v1::StopVm) -> Result<v1::VmInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/vms/{}/stop", segment(name)?), Some(request)).await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/vms/{}", segment(name)?)))).await.map(drop)
    }

    /// The VM's console output; with `follow`, until the VM stops.
    pub async fn console(
        &self,
        name: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes, reqwest::Error>>, ClientError> {
        let url = self.url(&format!("/v1/vms/{}/console?follow={follow}", segment(name)?));
        Ok(self.send(self.http.get(url)).await?.bytes_stream())
    }
}

/// `text` as one URL path segment: every byte but ASCII letters, digits, '-' and '_'
/// percent-encoded, so a name with '/' or '?' stays one segment. "." and ".." are path
/// steps however they are written, and are refused.
fn segment(text: &str) -> Result<String, ClientError> {
    if text == "." || text == ".." {
        return Err(ClientError::BadSegment(text.to_string()));
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(out)
}

/// An answer of one JSON value per line, read as they arrive.
pub struct JsonLines<T> {
    response: reqwest::Response,
    buffer: Vec<u8>,
    server: String,
    line: std::marker::PhantomData<T>,
}

/// The longest line a server sends: anything longer is not this API.
const JSON_LINE_MAX: usize = 1 << 20;

impl<T: DeserializeOwned> JsonLines<T> {
    /// The next value, or `None` at the end of the answer.
    pub async fn next(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let value = serde_json::from_slice(&line).map_err(|e| ClientError::Api {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("{} sent a line that is not what this client expects: {e}", self.server),
                })?;
                return Ok(Some(value));
            }
            if self.buffer.len() > JSON_LINE_MAX {
                return Err(ClientError::Api {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("{} sent a line longer than {JSON_LINE_MAX} bytes", self.server),
                });
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(source) => return Err(ClientError::Http { server: self.server.clone(), source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn a_name_is_always_one_path_segment() {
        assert_eq!(segment("web-1_a").unwrap(), "web-1_a");
        assert_eq!(segment("../vms/web").unwrap(), "%2E%2E%2Fvms%2Fweb");
        assert_eq!(segment("127.0.0.1:7700").unwrap(), "127%2E0%2E0%2E1%3A7700");
        assert_eq!(segment("a?b#c").unwrap(), "a%3Fb%23c");
        assert!(segment("..").is_err() && segment(".").is_err());
    }
}
