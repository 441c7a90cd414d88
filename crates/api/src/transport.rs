//! The cluster transport: one JSON request per peer RPC, over HTTPS. Members call each
//! other's node port presenting their certificates (mutual TLS); a node that is not a member
//! yet knocks on a member's API port, trusting it by the CA fingerprint of its join token.

use cluster::{PeerReply, PeerRpc, PeerTransport, TransportError};
use futures_util::future::BoxFuture;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone)]
pub struct HttpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    tls: Arc<pki::NodeTls>,
    /// Calls to peers of the advertised address's family go out from that address, so
    /// peers see one address per node (and cutting that address off cuts the node off).
    local: Option<IpAddr>,
    /// Clients built on the node's certificate, rebuilt when it changes (it is installed at
    /// init or join).
    clients: Mutex<Option<Clients>>,
}

struct Clients {
    material: Arc<pki::Material>,
    bound: reqwest::Client,
    /// Calls to peers of the other family (a mixed IPv4/IPv6 cluster).
    unbound: reqwest::Client,
}

fn client(tls: rustls::ClientConfig, local: Option<IpAddr>) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(30))
        // Each connection takes one of the peer's node port slots (16 per address).
        .pool_max_idle_per_host(4)
        .local_address(local)
        .build()
}

impl HttpTransport {
    pub fn new(tls: Arc<pki::NodeTls>, local: Option<IpAddr>) -> Self {
        HttpTransport { inner: Arc::new(Inner { tls, local, clients: Mutex::new(None) }) }
    }

    /// A client for another node's node port at `addr`, presenting this node's certificate.
    pub(crate) fn client_for(&self, addr: &str) -> Result<reqwest::Client, TransportError> {
        let failed = |reason: String| TransportError::Failed { addr: addr.to_string(), reason };
        let material = self
            .inner
            .tls
            .material()
            .ok_or_else(|| failed("this node has no certificate: it is in no cluster".into()))?;
        let mut clients = self.inner.clients.lock().expect("clients lock");
        if !clients.as_ref().is_some_and(|c| Arc::ptr_eq(&c.material, &material)) {
            let bound = client(material.http_client.clone(), self.inner.local).map_err(|e| failed(e.to_string()))?;
            let unbound = client(material.http_client.clone(), None).map_err(|e| failed(e.to_string()))?;
            *clients = Some(Clients { material, bound, unbound });
        }
        let clients = clients.as_ref().expect("set above");
        Ok(if self.local_for(addr).is_some() { clients.bound.clone() } else { clients.unbound.clone() })
    }

    /// The address a call to `addr` leaves from: the advertised one, unless `addr` is of
    /// the other family (a mixed IPv4/IPv6 cluster).
    fn local_for(&self, addr: &str) -> Option<IpAddr> {
        let peer: Option<std::net::SocketAddr> = addr.parse().ok();
        match (self.inner.local, peer) {
            (Some(local), Some(peer)) if local.is_ipv4() != peer.is_ipv4() => None,
            (local, _) => local,
        }
    }
}

impl PeerTransport for HttpTransport {
    fn call(
        &self,
        addr: &str,
        rpc: PeerRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>> {
        let request = self.client_for(addr).map(|c| c.post(format!("https://{addr}/internal/peer")).json(&rpc));
        Box::pin(send(request, addr.to_string(), timeout))
    }

    fn knock(
        &self,
        api_addr: &str,
        rpc: PeerRpc,
        ca_sha256: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>> {
        let failed = |reason: String| TransportError::Failed { addr: api_addr.to_string(), reason };
        let local = self.local_for(api_addr);
        let request = pki::joining_client(ca_sha256)
            .map_err(|e| failed(e.to_string()))
            .and_then(|tls| client(tls, local).map_err(|e| failed(e.to_string())))
            .map(|c| c.post(format!("https://{api_addr}/internal/join")).json(&rpc));
        Box::pin(send(request, api_addr.to_string(), timeout))
    }

    fn send_snapshot(
        &self,
        addr: &str,
        transfer: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>> {
        let request = self.client_for(addr).map(|c| {
            c.post(format!("https://{addr}/internal/snapshot"))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(transfer)
        });
        Box::pin(send(request, addr.to_string(), timeout))
    }
}

async fn send(
    request: Result<reqwest::RequestBuilder, TransportError>,
    addr: String,
    timeout: Duration,
) -> Result<PeerReply, TransportError> {
    let response = request?.timeout(timeout).send().await.map_err(|e| {
        if e.is_connect() || e.is_timeout() {
            TransportError::Unreachable { addr: addr.clone(), source: Box::new(e) }
        } else {
            TransportError::Failed { addr: addr.clone(), reason: model::error_chain(&e) }
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
