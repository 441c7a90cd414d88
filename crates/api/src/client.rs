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
}

#[derive(Clone)]
pub struct Client {
    /// Where calls go, as the user would recognise it (in errors).
    server: String,
    /// The URLs' start.
    base: String,
    http: reqwest::Client,
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
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Client { base: server.clone(), server, http })
    }

    /// Talks to the node whose local socket is `socket` (root on that node; no token).
    pub fn local(socket: &std::path::Path) -> Self {
        let http = reqwest::Client::builder().unix_socket(socket).build().expect("a plain HTTP client builds");
        Client { server: format!("the local socket {}", socket.display()), base: "http://localhost".into(), http }
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
        let message = match response.json::<v1::ErrorBody>().await {
            Ok(body) => body.error,
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
