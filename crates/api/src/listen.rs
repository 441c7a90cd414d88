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
    /// How long a request's headers may take to arrive, a request's body may go without a
    /// byte, and an idle connection may wait for its next request.
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
/// TLS handshakes the node port runs at once, and from one address (see `Handshakes`).
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

/// Serves HTTP/1.1 on `io` with `router` until the connection ends; headers must arrive
/// within `timeout`.
async fn serve_http<S>(io: S, router: Router, timeout: Duration) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(HEAD_BYTES_MAX)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        // A console session upgrades its connection to a websocket.
        .with_upgrades()
        .await
}

/// The slowest a request body may arrive on average, after a grace of the idle timeout.
const BODY_RATE_MIN: u64 = 32 << 10;

/// `router`, with every request body bounded in time: it fails when `timeout` passes
/// without a byte of it, or when it falls behind `BODY_RATE_MIN` bytes a second (counted
/// from its first poll, after a grace of `timeout`). A client that stops sending, or
/// trickles a byte at a time, holds its connection (and what the handler holds) for about
/// `timeout`; an upload that keeps moving is never cut.
fn with_body_deadline(router: Router, timeout: Duration) -> Router {
    router.layer(axum::middleware::from_fn(move |request, next| body_keeps_coming(request, next, timeout)))
}

async fn body_keeps_coming(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    timeout: Duration,
) -> axum::response::Response {
    use futures_util::StreamExt;
    let (parts, body) = request.into_parts();
    let started = tokio::time::Instant::now();
    let state = Some((body.into_data_stream(), 0u64));
    let chunks = futures_util::stream::unfold(state, move |state| async move {
        let (mut chunks, received) = state?;
        let behind = started + timeout + Duration::from_secs_f64(received as f64 / BODY_RATE_MIN as f64);
        let deadline = behind.min(tokio::time::Instant::now() + timeout);
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(Ok(chunk))) => {
                let received = received + chunk.len() as u64;
                Some((Ok(chunk), Some((chunks, received))))
            }
            Ok(Some(Err(e))) => Some((Err(e), None)),
            Ok(None) => None,
            Err(_) => {
                let stalled = format!(
                    "the request body came too slowly: {received} bytes in {:.0} s (it may pause {} s at most, \
                     and must average {} KiB/s)",
                    started.elapsed().as_secs_f64(),
                    timeout.as_secs(),
                    BODY_RATE_MIN >> 10
                );
                Some((Err(axum::Error::new(stalled)), None))
            }
        }
    });
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(chunks))).await
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
    let router = with_body_deadline(crate::routes::router(services.clone()), limits.header_timeout);
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

/// TLS handshakes in progress on the node port. Until a caller shows a node's certificate
/// it holds none of the slots members' connections use, only one of these, and a newcomer
/// always gets one: when its source already holds its share, that source's oldest
/// handshake makes room; when the pool is full, the oldest of the source holding the most
/// does. A member completes its handshake within a round trip or two, from a source that
/// holds one, so callers that stall (from as many addresses as they like, or from the
/// member's own) cannot keep it out; they would have to open a pool's worth of
/// connections within that time, again and again.
struct Handshakes {
    inner: Mutex<HandshakesInner>,
}

#[derive(Default)]
struct HandshakesInner {
    next: u64,
    /// In the order they began: the source each counts against, and the sender whose drop
    /// tells its task to give up.
    running: std::collections::BTreeMap<u64, (IpAddr, tokio::sync::oneshot::Sender<()>)>,
    per_source: HashMap<IpAddr, usize>,
}

/// A handshake's place in [`Handshakes`]; given back when dropped.
struct Handshake {
    pool: Arc<Handshakes>,
    id: u64,
    /// Resolves when an older handshake must make room for a newer one.
    evicted: tokio::sync::oneshot::Receiver<()>,
}

impl HandshakesInner {
    fn remove(&mut self, id: u64) {
        if let Some((ip, _)) = self.running.remove(&id) {
            let n = self.per_source.get_mut(&ip).expect("counted when it began");
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
    }
}

impl Handshakes {
    /// A place for a handshake from `ip`, made by ending an older one if need be.
    fn begin(self: &Arc<Self>, ip: IpAddr) -> Handshake {
        let ip = source(ip);
        let mut inner = self.inner.lock().expect("handshakes lock");
        let at_share = inner.per_source.get(&ip).copied().unwrap_or(0) >= HANDSHAKES_PER_ADDRESS_MAX;
        if at_share || inner.running.len() >= HANDSHAKES_MAX {
            let most = inner.per_source.values().copied().max().unwrap_or(0);
            let makes_room = |from: &IpAddr| if at_share { *from == ip } else { inner.per_source[from] == most };
            let oldest = inner.running.iter().find(|(_, (from, _))| makes_room(from)).map(|(id, _)| *id);
            inner.remove(oldest.expect("a source that holds places holds an oldest"));
        }
        let id = inner.next;
        inner.next += 1;
        let (tell, evicted) = tokio::sync::oneshot::channel();
        inner.running.insert(id, (ip, tell));
        *inner.per_source.entry(ip).or_default() += 1;
        Handshake { pool: self.clone(), id, evicted }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.pool.inner.lock().expect("handshakes lock").remove(self.id);
    }
}

/// Serves the node port until the task is dropped.
pub async fn serve_node_port(listener: TcpListener, services: NodeServices, data: volume::DataServer) {
    let timeout = ApiLimits::default().header_timeout;
    let router = with_body_deadline(crate::routes::peer_router(services.clone()), timeout);
    let handshakes = Arc::new(Handshakes { inner: Mutex::default() });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a node port connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handshake = handshakes.begin(peer.ip());
        let (router, services, data) = (router.clone(), services.clone(), data.clone());
        tokio::spawn(async move {
            let ended = node_connection(stream, peer, handshake, router, services, data, timeout).await;
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "node port connection ended");
            }
        });
    }
}

async fn node_connection(
    stream: TcpStream,
    peer: SocketAddr,
    mut handshake: Handshake,
    router: Router,
    services: NodeServices,
    data: volume::DataServer,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    stream.set_nodelay(true)?;
    let Some(material) = services.cluster().tls().material() else {
        return Err("a connection before this node has a certificate (it is in no cluster yet)".into());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(material.node_server.clone());
    // The handshake checks the client's chain to the CA; the state says whether it is a node.
    let tls = tokio::select! {
        tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => tls??,
        _ = &mut handshake.evicted => {
            tracing::debug!(%peer, "a node port handshake made room for a newer one");
            return Ok(());
        }
    };
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
    Ok(serve_http(tls, router, timeout).await?)
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

    #[tokio::test]
    async fn a_body_that_stalls_or_trickles_ends_its_request_and_one_that_keeps_coming_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let router = Router::new()
            .route("/", axum::routing::put(|body: axum::body::Bytes| async move { format!("took {}", body.len()) }));
        let timeout = Duration::from_millis(300);
        let router = with_body_deadline(router, timeout);
        // Sends `chunks` pieces of `piece` bytes, `gap` apart; returns the answer.
        let exchange = |chunks: usize, piece: usize, gap: Duration| {
            let router = router.clone();
            async move {
                let (mut client, server) = tokio::io::duplex(1 << 20);
                let served = tokio::spawn(serve_http(server, router, timeout));
                let head = format!("PUT / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", chunks * piece);
                client.write_all(head.as_bytes()).await.unwrap();
                for _ in 0..chunks {
                    tokio::time::sleep(gap).await;
                    if client.write_all(&vec![b'x'; piece]).await.is_err() {
                        break;
                    }
                }
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await;
                drop(client);
                let _ = served.await;
                String::from_utf8_lossy(&answer).into_owned()
            }
        };
        // 640 KiB over a second: past the grace, but well above the least rate.
        let moving = exchange(10, 64 << 10, Duration::from_millis(100)).await;
        assert!(moving.starts_with("HTTP/1.1 200") && moving.contains("took 655360"), "{moving}");
        let stalled = exchange(2, 1, Duration::from_millis(1000)).await;
        assert!(stalled.starts_with("HTTP/1.1 400"), "{stalled}");
        // A byte every 200 ms: never a pause as long as the timeout, but far below the rate.
        let trickled = exchange(8, 1, Duration::from_millis(200)).await;
        assert!(trickled.starts_with("HTTP/1.1 400"), "{trickled}");
    }

    #[test]
    fn a_newcomer_always_gets_a_handshake_and_the_most_crowded_source_makes_room() {
        let pool = Arc::new(Handshakes { inner: Mutex::default() });
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let evicted =
            |h: &mut Handshake| matches!(h.evicted.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed));
        // Stallers fill the pool, eight per address; a member comes in among them.
        let mut stallers: Vec<_> = (0..HANDSHAKES_MAX).map(|i| pool.begin(ip(&format!("10.0.0.{}", i / 8)))).collect();
        assert!(!stallers.iter_mut().any(evicted), "a full pool, nobody evicted yet");
        let mut member = pool.begin(ip("10.9.9.9"));
        assert!(evicted(&mut stallers[0]), "the oldest of the most crowded made room");

        // Newcomers from fresh addresses: each takes the oldest place of the sources holding
        // the most, never the member's single one, until every source holds one.
        let newcomers: Vec<_> = (0..HANDSHAKES_MAX - 9).map(|i| pool.begin(ip(&format!("10.1.0.{i}")))).collect();
        assert!(!evicted(&mut member), "a source holding one place is among the last to give it up");
        let left = stallers.iter_mut().map(evicted).filter(|gone| !gone).count();
        assert_eq!(left, 8, "the stallers hold one place per address");
        assert_eq!(pool.inner.lock().unwrap().running.len(), HANDSHAKES_MAX);

        drop((newcomers, stallers, member));

        // A source at its share makes room from its own places, oldest first.
        let mut same: Vec<_> = (0..HANDSHAKES_PER_ADDRESS_MAX).map(|_| pool.begin(ip("10.2.0.1"))).collect();
        let newest = pool.begin(ip("10.2.0.1"));
        assert!(evicted(&mut same[0]) && !same[1..].iter_mut().any(evicted));
        assert_eq!(pool.inner.lock().unwrap().per_source[&ip("10.2.0.1")], HANDSHAKES_PER_ADDRESS_MAX);

        drop((same, newest));
        let inner = pool.inner.lock().unwrap();
        assert!(inner.running.is_empty() && inner.per_source.is_empty(), "every place given back");
    }
}
