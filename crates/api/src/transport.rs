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

    fn client_for(&self, addr: &str) -> &reqwest::Client {
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
        let http = self.client_for(api_addr).clone();
        let addr = api_addr.to_string();
        Box::pin(async move {
            let response =
                http.post(format!("http://{addr}/internal/peer")).timeout(timeout).json(&rpc).send().await.map_err(
                    |e| {
                        if e.is_connect() || e.is_timeout() {
                            TransportError::Unreachable { addr: addr.clone(), source: Box::new(e) }
                        } else {
                            TransportError::Failed { addr: addr.clone(), reason: e.to_string() }
                        }
                    },
                )?;
            if !response.status().is_success() {
                return Err(TransportError::Failed { addr, reason: format!("HTTP {}", response.status()) });
            }
            response.json().await.map_err(|e| TransportError::Failed { addr, reason: e.to_string() })
        })
    }
}
