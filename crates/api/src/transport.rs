//! The cluster transport over HTTP: one JSON request per peer RPC, on the API address.

use cluster::{PeerReply, PeerRpc, PeerTransport, TransportError};
use futures_util::future::BoxFuture;
use std::time::Duration;

#[derive(Clone)]
pub struct HttpTransport {
    /// Calls to peers of the advertised address's family go out from that address, so
    /// peers see one address per node (and cutting that address off cuts the node off).
    bound: reqwest::Client,
    local: Option<std::net::IpAddr>,
    /// Calls to peers of the other family (a mixed IPv4/IPv6 cluster).
    unbound: reqwest::Client,
}

impl HttpTransport {
    pub fn new(local: Option<std::net::IpAddr>) -> Self {
        let client = |local| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .pool_idle_timeout(Duration::from_secs(30))
                .local_address(local)
                .build()
                .expect("a plain HTTP client builds")
        };
        HttpTransport { bound: client(local), local, unbound: client(None) }
    }

    pub(crate) fn client_for(&self, addr: &str) -> &reqwest::Client {
        let peer: Option<std::net::SocketAddr> = addr.parse().ok();
        match (self.local, peer) {
            (Some(local), Some(peer)) if local.is_ipv4() != peer.is_ipv4() => &self.unbound,
            _ => &self.bound,
        }
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new(None)
    }
}

impl PeerTransport for HttpTransport {
    fn call(
        &self,
        api_addr: &str,
        rpc: PeerRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>> {
        // A join comes from a node that is no member yet: it has a door of its own.
        let path = if matches!(rpc, PeerRpc::Join { .. }) { "join" } else { "peer" };
        let request = self.client_for(api_addr).post(format!("http://{api_addr}/internal/{path}")).json(&rpc);
        Box::pin(send(request, api_addr.to_string(), timeout))
    }

    fn send_snapshot(
        &self,
        api_addr: &str,
        transfer: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>> {
        let request = self
            .client_for(api_addr)
            .post(format!("http://{api_addr}/internal/snapshot"))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(transfer);
        Box::pin(send(request, api_addr.to_string(), timeout))
    }
}

async fn send(request: reqwest::RequestBuilder, addr: String, timeout: Duration) -> Result<PeerReply, TransportError> {
    let response = request.timeout(timeout).send().await.map_err(|e| {
        if e.is_connect() || e.is_timeout() {
            TransportError::Unreachable { addr: addr.clone(), source: Box::new(e) }
        } else {
            TransportError::Failed { addr: addr.clone(), reason: e.to_string() }
        }
    })?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let reason = format!("HTTP {status}: {}", text.chars().take(200).collect::<String>());
        return Err(TransportError::Failed { addr, reason });
    }
    response.json().await.map_err(|e| TransportError::Failed { addr, reason: e.to_string() })
}
