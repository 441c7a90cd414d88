//! The cluster transport over HTTP: one JSON request per peer RPC, on the API address.

use cluster::{PeerReply, PeerRpc, PeerTransport, TransportError};
use futures_util::future::BoxFuture;
use std::time::Duration;

#[derive(Clone)]
pub struct HttpTransport {
    http: reqwest::Client,
}

impl HttpTransport {
    /// Calls go out from `local` when given: the address this node advertises, so peers
    /// see one address per node (and cutting that address off cuts the node off).
    pub fn new(local: Option<std::net::IpAddr>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(30))
            .local_address(local)
            .build()
            .expect("a plain HTTP client builds");
        HttpTransport { http }
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
        let http = self.http.clone();
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
