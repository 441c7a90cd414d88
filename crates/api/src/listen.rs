//! The node's two TCP doors (docs/threat-model.md).
//!
//! - The **API port** speaks HTTPS with the node's certificate; users bring tokens, and a
//!   node that is not a member yet brings a join token to `/internal/join`. A request in
//!   the clear gets the health check or a 401 saying to use HTTPS, never more.
//! - The **node port** takes only other nodes of the cluster: a client must present a
//!   certificate of the cluster CA whose fingerprint the cluster state records (checked
//!   before a byte of any request is read). ALPN then picks the block protocol or HTTP
//!   for the peer endpoints (Raft, liveness, snapshots, console relay).
//!
//! Both bound what a client can hold: connections per address and in all, and the time a
//! handshake and a request's headers may take.

use crate::services::NodeServices;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// What the API port lets clients hold.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub connections_total: usize,
    pub connections_per_address: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long a request's headers may take to arrive, and an idle connection may wait
    /// for its next request.
    pub header_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            connections_total: 1024,
            connections_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// How long a node port handshake may take (a node's own connect gives up after 2 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// TLS handshakes the node port runs at once, and from one address.
const HANDSHAKES_MAX: usize = 64;
const HANDSHAKES_PER_ADDRESS_MAX: usize = 8;

/// Largest request head (request line and headers) taken.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Counts open connections per address and in all.
struct Counter {
    open: Mutex<HashMap<IpAddr, usize>>,
    limits: ApiLimits,
}

struct Counted {
    counter: Arc<Counter>,
    ip: IpAddr,
}

/// Whom a connection is counted against: its IPv4 address, or its IPv6 /64 (one host
/// commonly holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
        v4 => v4,
    }
}

impl Counter {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Counted> {
        let ip = source(ip);
        let mut open = self.open.lock().expect("counter lock");
        let total: usize = open.values().sum();
        let from = open.get(&ip).copied().unwrap_or(0);
        if total >= self.limits.connections_total || from >= self.limits.connections_per_address {
            return None;
        }
        *open.entry(ip).or_default() += 1;
        Some(Counted { counter: self.clone(), ip })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock().expect("counter lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves HTTP/1.1 on `io` with `router` until the connection ends.
async fn serve_http<S>(io: S, router: Router, header_timeout: Duration) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(HEAD_BYTES_MAX)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .await
}

/// The next connection on `listener` that `counter` has room for; the others are closed at
/// once.
async fn accept_counted(
    listener: &TcpListener,
    counter: &Arc<Counter>,
    door: &str,
) -> (TcpStream, SocketAddr, Counted) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, door, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match counter.take(peer.ip()) {
            Some(counted) => return (stream, peer, counted),
            None => tracing::warn!(%peer, door, "refused a connection: too many from that address or in all"),
        }
    }
}

/// Serves the API port until the task is dropped.
pub async fn serve_api(listener: TcpListener, services: NodeServices, limits: ApiLimits) {
    let counter = Arc::new(Counter { open: Mutex::default(), limits: limits.clone() });
    let router = crate::routes::router(services.clone());
    loop {
        let (stream, peer, counted) = accept_counted(&listener, &counter, "API").await;
        let (router, services, limits) = (router.clone(), services.clone(), limits.clone());
        tokio::spawn(async move {
            let _counted = counted;
            if let Err(e) = api_connection(stream, peer, router, services, &limits).await {
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
        });
    }
}

async fn api_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    services: NodeServices,
    limits: &ApiLimits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(limits.handshake_timeout, stream.peek(&mut first)).await??;
    if peeked == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE {
        return Ok(serve_http(stream, in_the_clear(), limits.header_timeout).await?);
    }
    let Some(material) = services.cluster().tls().material() else {
        return Err("a TLS client before this node has a certificate (it is in no cluster yet)".into());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(material.api_server.clone());
    let tls = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await??;
    tracing::trace!(%peer, "API connection");
    Ok(serve_http(tls, router, limits.header_timeout).await?)
}

/// What a client speaking plain HTTP to the API port gets: the health check, or a 401 that
/// says where the API is.
fn in_the_clear() -> Router {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    Router::new().route("/v1/health", axum::routing::get(|| async { "ok" })).fallback(|| async {
        let body = crate::v1::ErrorBody {
            error: "this API is served over HTTPS only: use https:// with the cluster's CA certificate \
                    (`converge cluster ca` on a node prints it) and a token"
                .into(),
        };
        (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
    })
}

/// Serves the node port until the task is dropped.
pub async fn serve_node_port(listener: TcpListener, services: NodeServices, data: volume::DataServer) {
    let router = crate::routes::peer_router(services.clone());
    let header_timeout = ApiLimits::default().header_timeout;
    // Handshakes in progress have a small pool of their own: until a caller shows a node's
    // certificate it holds none of the slots members' connections use.
    let handshakes = Arc::new(Counter {
        open: Mutex::default(),
        limits: ApiLimits {
            connections_total: HANDSHAKES_MAX,
            connections_per_address: HANDSHAKES_PER_ADDRESS_MAX,
            ..ApiLimits::default()
        },
    });
    loop {
        let (stream, peer, handshake) = accept_counted(&listener, &handshakes, "node port handshake").await;
        let (router, services, data) = (router.clone(), services.clone(), data.clone());
        tokio::spawn(async move {
            let ended = node_connection(stream, peer, handshake, router, services, data, header_timeout).await;
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "node port connection ended");
            }
        });
    }
}

async fn node_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handshake: Counted,
    router: Router,
    services: NodeServices,
    data: volume::DataServer,
    header_timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    stream.set_nodelay(true)?;
    let Some(material) = services.cluster().tls().material() else {
        return Err("a connection before this node has a certificate (it is in no cluster yet)".into());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(material.node_server.clone());
    // The handshake checks the client's chain to the CA; the state says whether it is a node.
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await??;
    let (_, session) = tls.get_ref();
    let presented = session.peer_certificates().and_then(|c| c.first()).map(|c| pki::fingerprint(c));
    if !presented.as_deref().is_some_and(|fpr| services.cluster().accepts_peer(fpr)) {
        tracing::warn!(%peer, "refused a node port connection: its certificate is no node's of this cluster");
        return Ok(());
    }
    drop(handshake);
    // A node's connection counts against the data port's limits, whatever it speaks.
    let Some(slot) = data.admit(peer.ip()) else {
        tracing::warn!(%peer, "refused a node port connection: too many from that address or in all");
        return Ok(());
    };
    let caller = presented.expect("checked above");
    if session.alpn_protocol() == Some(pki::ALPN_BLOCKS) {
        // Each request checks the caller again: a node removed while connected is cut off.
        let cluster = services.cluster().clone();
        let admitted: volume::Admitted = Arc::new(move || cluster.accepts_peer(&caller));
        return Ok(data.serve_while(tls, slot, admitted).await?);
    }
    let _slot = slot;
    // Every request checks the caller again: a node removed while its connection stays
    // open gets nothing more on it.
    let router = router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let (services, caller) = (services.clone(), caller.clone());
            async move {
                if services.cluster().accepts_peer(&caller) {
                    next.run(request).await
                } else {
                    use axum::response::IntoResponse;
                    let body =
                        crate::v1::ErrorBody { error: "this certificate is no node's of the cluster any more".into() };
                    (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
                }
            }
        },
    ));
    Ok(serve_http(tls, router, header_timeout).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_each_ipv4_address_as_itself() {
        let counter = Arc::new(Counter {
            open: Mutex::default(),
            limits: ApiLimits { connections_total: 10, connections_per_address: 2, ..ApiLimits::default() },
        });
        let held: Vec<_> = ["2001:db8::1", "2001:db8::2:3"].iter().map(|a| counter.take(a.parse().unwrap())).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(counter.take("2001:db8::ffff:1:2:3".parse().unwrap()).is_none(), "a third from the same /64");
        assert!(counter.take("2001:db8:0:1::1".parse().unwrap()).is_some(), "another /64");
        let v4: Vec<_> = (0..2).map(|_| counter.take("10.0.0.1".parse().unwrap())).collect();
        assert!(v4.iter().all(Option::is_some) && counter.take("10.0.0.1".parse().unwrap()).is_none());
        assert!(counter.take("10.0.0.2".parse().unwrap()).is_some());
        drop(held);
        assert!(counter.take("2001:db8::9".parse().unwrap()).is_some(), "given back when dropped");
    }
}
