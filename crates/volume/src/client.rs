//! Connections from this node's engine to other nodes' replica servers: one per peer,
//! many requests in flight on it, replies matched by request id.

use crate::error::ReplicaError;
use crate::replica::Reply;
use crate::wire::{Request, ResponseHeader, Status, RESPONSE_HEADER_BYTES};
use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{AlignedBuf, IoMemory};
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a read's data goes when it arrives: straight into the caller's memory.
pub type ReadTarget = (Arc<dyn IoMemory>, Range<usize>);

struct Waiter {
    done: oneshot::Sender<Result<Reply, ReplicaError>>,
    request: Request,
    into: Option<ReadTarget>,
    /// True while the caller still takes the reply's data into `into`. The receiver holds
    /// the lock across each receive into the caller's memory; the caller closes it, under
    /// the lock, whenever it stops waiting (answer, timeout, or its future dropped), so no
    /// byte lands there after that.
    landing: Arc<Mutex<bool>>,
}

/// Closes a request's landing when its caller stops waiting, however it stops.
struct CloseLanding<'a> {
    pending: &'a Pending,
    id: u64,
    landing: Arc<Mutex<bool>>,
}

impl Drop for CloseLanding<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("pending lock").remove(&self.id);
        *self.landing.lock().expect("landing lock") = false;
    }
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// When the last connect to a peer failed, and why.
type LastFailure = Option<(std::time::Instant, String)>;

#[derive(Default)]
pub struct PeerPool {
    connections: Mutex<HashMap<String, Arc<Connection>>>,
    /// Held while a connection to that peer is being made; the last attempt's failure.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<LastFailure>>>>,
    /// The address connections go out from (this node's advertised one), if set.
    local: Option<std::net::IpAddr>,
    /// This node's certificate: connections are mutual TLS with it. Without one (tests, and
    /// the reference a benchmark measures against) they are plain TCP.
    tls: Option<Arc<pki::NodeTls>>,
}

impl PeerPool {
    pub fn new(local: Option<std::net::IpAddr>, tls: Option<Arc<pki::NodeTls>>) -> Self {
        PeerPool { connections: Mutex::default(), connecting: Mutex::default(), local, tls }
    }

    /// Sends `request` (with `payload` for a write) to the replica server at `addr` and waits
    /// up to `timeout` for the answer. When this returns, nothing of this request touches
    /// `into` any more, whatever the peer does later.
    pub async fn call(
        &self,
        addr: &str,
        request: Request,
        payload: Option<(&dyn IoMemory, Range<usize>)>,
        into: Option<ReadTarget>,
        timeout: Duration,
    ) -> Result<Reply, ReplicaError> {
        let connection = self.connection(addr).await?;
        match connection.call(request, payload.clone(), into.clone(), timeout).await {
            // The connection was found retired before a byte of this request was sent (the
            // peer restarted, or another request broke it): nothing reached the peer, so one
            // more try on a fresh connection is safe. A request that was sent, even in part,
            // is never sent again: it could land after a newer write to the same range.
            Err(CallError::NotSent) => {
                let fresh = self.connection(addr).await?;
                fresh.call(request, payload, into, timeout).await.map_err(|e| e.into_replica_error(addr))
            }
            result => result.map_err(|e| e.into_replica_error(addr)),
        }
    }

    async fn connection(&self, addr: &str) -> Result<Arc<Connection>, ReplicaError> {
        let live = || {
            self.connections.lock().expect("pool lock").get(addr).filter(|c| c.alive.load(Ordering::Acquire)).cloned()
        };
        if let Some(c) = live() {
            return Ok(c);
        }
        // One connect per peer at a time: callers arriving meanwhile share its connection
        // (a burst of requests would otherwise open one each, past the peer's limit), or its
        // failure (they would otherwise each wait for a connect of their own, in turn).
        let asked = std::time::Instant::now();
        let connecting = self.connecting.lock().expect("pool lock").entry(addr.to_string()).or_default().clone();
        let mut failed = connecting.lock().await;
        if let Some(c) = live() {
            return Ok(c);
        }
        if let Some((at, reason)) = &*failed {
            if *at >= asked {
                let source = std::io::Error::other(reason.clone());
                return Err(ReplicaError::Connect { addr: addr.to_string(), source });
            }
        }
        let connection = match Connection::connect(addr, self.local, self.tls.as_deref()).await {
            Ok(connection) => Arc::new(connection),
            Err(e) => {
                *failed = Some((std::time::Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        self.connections.lock().expect("pool lock").insert(addr.to_string(), connection.clone());
        Ok(connection)
    }
}

enum CallError {
    NotSent,
    Failed(ReplicaError),
}

impl CallError {
    fn into_replica_error(self, addr: &str) -> ReplicaError {
        match self {
            CallError::NotSent => ReplicaError::ConnectionLost { addr: addr.to_string() },
            CallError::Failed(e) => e,
        }
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The receiving half of a connection. In the clear, a read's data is received straight
/// into the caller's memory; under TLS it is decrypted into a buffer and copied there.
enum Reader {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

impl Reader {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Reader::Plain(r) => r.read_exact(buf).await.map(drop),
            Reader::Tls(r) => r.read_exact(buf).await.map(drop),
        }
    }
}

/// Largest piece of a read's data decrypted before it is copied to the caller.
const TLS_BOUNCE_BYTES: usize = 64 << 10;

struct Connection {
    addr: String,
    writer: tokio::sync::Mutex<Writer>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    /// The task reading replies: it holds the read half, so the socket closes only once it
    /// is gone (over TLS, dropping the write half alone sends nothing).
    receiver: tokio::task::AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

impl Connection {
    async fn connect(
        addr: &str,
        local: Option<std::net::IpAddr>,
        tls: Option<&pki::NodeTls>,
    ) -> Result<Self, ReplicaError> {
        let connect_error = |source| ReplicaError::Connect { addr: addr.to_string(), source };
        let connecting = async {
            let Some(local) = local else { return TcpStream::connect(addr).await };
            // A peer of the other family (a mixed IPv4/IPv6 cluster) is called unbound.
            let Some(target) = tokio::net::lookup_host(addr).await?.find(|a| a.is_ipv4() == local.is_ipv4()) else {
                return TcpStream::connect(addr).await;
            };
            let socket =
                if local.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(std::net::SocketAddr::new(local, 0))?;
            socket.connect(target).await
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let (reader, writer): (Reader, Writer) = match tls {
            None => {
                let (reader, writer) = stream.into_split();
                (Reader::Plain(reader), Box::new(writer))
            }
            Some(tls) => {
                let material = tls.material().ok_or_else(|| {
                    connect_error(std::io::Error::other("this node has no certificate: it is in no cluster"))
                })?;
                let connector = tokio_rustls::TlsConnector::from(material.blocks_client.clone());
                let name = rustls_pki_types::ServerName::try_from(pki::NODE_NAME).expect("a valid DNS name");
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                    .await
                    .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(connect_error)?;
                if stream.get_ref().1.alpn_protocol() != Some(pki::ALPN_BLOCKS) {
                    return Err(connect_error(std::io::Error::other("the peer does not speak the block protocol")));
                }
                let (reader, writer) = tokio::io::split(stream);
                (Reader::Tls(reader), Box::new(writer))
            }
        };
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let receiver = tokio::spawn(receive(reader, addr.to_string(), pending.clone(), alive.clone())).abort_handle();
        Ok(Connection {
            addr: addr.to_string(),
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            alive,
            receiver,
        })
    }

    async fn call(
        &self,
        mut request: Request,
        payload: Option<(&dyn IoMemory, Range<usize>)>,
        into: Option<ReadTarget>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        request.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        let landing = Arc::new(Mutex::new(true));
        let waiter = Waiter { done, request, into, landing: landing.clone() };
        self.pending.lock().expect("pending lock").insert(request.id, waiter);
        let _close = CloseLanding { pending: &self.pending, id: request.id, landing };
        // A frame sent only in part (an error, a timeout, or a caller that gave up) leaves the
        // stream unframed: the guard then retires the connection so nothing is sent after it.
        let mut guard = RetireUnlessSent { alive: &self.alive, sent: false };
        let mut started = false;
        let sent = tokio::time::timeout_at(deadline, async {
            let mut writer = self.writer.lock().await;
            if !self.alive.load(Ordering::Acquire) {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            started = true;
            writer.write_all(&request.encode()).await?;
            if let Some((buf, range)) = payload {
                // Straight from the caller's memory (a guest's, for a guest write) to the socket.
                writer.write_all(buf.bytes(range)).await?;
            }
            // TLS holds back what it could not send at once until flushed.
            writer.flush().await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => guard.sent = true,
            _ if !started => {
                // Nothing was written: the stream is still framed, and the peer saw nothing.
                guard.sent = true;
                self.pending.lock().expect("pending lock").remove(&request.id);
                if sent.is_err() {
                    return Err(CallError::Failed(self.give_up(timeout, true)));
                }
                return Err(CallError::NotSent);
            }
            _ => {
                self.pending.lock().expect("pending lock").remove(&request.id);
                return Err(CallError::Failed(self.give_up(timeout, sent.is_err())));
            }
        }
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result.map_err(CallError::Failed),
            Ok(Err(_)) => Err(CallError::Failed(ReplicaError::ConnectionLost { addr: self.addr.clone() })),
            Err(_) => {
                // A peer that does not answer in time is not trusted with the next request.
                // The landing closes as this returns, so a stalled reply fills nothing later.
                self.alive.store(false, Ordering::Release);
                Err(CallError::Failed(self.give_up(timeout, true)))
            }
        }
    }

    fn give_up(&self, timeout: Duration, timed_out: bool) -> ReplicaError {
        if timed_out {
            ReplicaError::Timeout { addr: self.addr.clone(), timeout_ms: timeout.as_millis() as u64 }
        } else {
            ReplicaError::ConnectionLost { addr: self.addr.clone() }
        }
    }
}

struct RetireUnlessSent<'a> {
    alive: &'a AtomicBool,
    sent: bool,
}

impl Drop for RetireUnlessSent<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.alive.store(false, Ordering::Release);
        }
    }
}

/// Reads replies until the connection fails, then fails every request still waiting. A
/// reply that breaks the protocol (bad header, a payload length other than its request
/// asked for) ends the connection.
async fn receive(mut reader: Reader, addr: String, pending: Pending, alive: Arc<AtomicBool>) {
    let lost = || ReplicaError::ConnectionLost { addr: addr.clone() };
    let protocol = |source| ReplicaError::Protocol { addr: addr.clone(), source };
    let failure = loop {
        let mut header = [0u8; RESPONSE_HEADER_BYTES];
        if reader.read_exact(&mut header).await.is_err() {
            break lost();
        }
        let header = match ResponseHeader::parse(&header) {
            Ok(header) => header,
            Err(source) => break protocol(source),
        };
        // A reply for a request that timed out meanwhile has no one waiting: its payload is
        // read and dropped.
        let waiter = pending.lock().expect("pending lock").remove(&header.id);
        if let Some(Err(source)) = waiter.as_ref().map(|w| header.check_against(&w.request)) {
            let waiter = waiter.expect("checked above");
            let _ = waiter.done.send(Err(protocol(source.clone())));
            break protocol(source);
        }
        let len = header.payload_len as usize;
        let direct = match (&waiter, header.status) {
            (Some(Waiter { into: Some((target, range)), landing, .. }), Status::Ok) if len > 0 => {
                Some((target.clone(), range.clone(), landing.clone()))
            }
            _ => None,
        };
        let epochs = |status| Reply {
            status,
            owner_epoch: header.owner_epoch,
            pg_epoch: header.pg_epoch,
            data: None,
            message: String::new(),
        };
        let reply = if let Some((target, range, landing)) = direct {
            if receive_into(&mut reader, &target, range, &landing).await.is_err() {
                break lost();
            }
            epochs(Status::Ok)
        } else {
            let mut payload = AlignedBuf::zeroed(len);
            if reader.read_exact(payload.as_mut_slice()).await.is_err() {
                break lost();
            }
            match header.status {
                Status::Ok => Reply { data: (len > 0).then_some(payload), ..epochs(Status::Ok) },
                status => Reply { message: String::from_utf8_lossy(payload.as_slice()).into_owned(), ..epochs(status) },
            }
        };
        if let Some(waiter) = waiter {
            let _ = waiter.done.send(Ok(reply));
        }
    };
    alive.store(false, Ordering::Release);
    tracing::debug!(%addr, error = %failure, "data connection to peer ended");
    for (_, waiter) in pending.lock().expect("pending lock").drain() {
        let _ = waiter.done.send(Err(ReplicaError::ConnectionLost { addr: addr.clone() }));
    }
}

/// Reads a read reply's payload from the socket straight into the caller's memory.
/// Fails once the caller has stopped waiting: the rest of the payload is then unread and the
/// connection ends.
async fn receive_into(
    reader: &mut Reader,
    target: &Arc<dyn IoMemory>,
    range: Range<usize>,
    landing: &Mutex<bool>,
) -> std::io::Result<()> {
    let reader = match reader {
        Reader::Plain(reader) => reader,
        Reader::Tls(reader) => return receive_decrypted(reader, target, range, landing).await,
    };
    let stream = reader.as_ref();
    let fd = stream.as_raw_fd();
    let mut done = 0;
    while done < range.len() {
        stream.readable().await?;
        let receive = || {
            let open = landing.lock().expect("landing lock");
            if !*open {
                return Err(std::io::Error::other("the caller stopped waiting for this read"));
            }
            target.recv_into(fd, range.start + done, range.len() - done)
        };
        match stream.try_io(Interest::READABLE, receive) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `receive_into` over TLS: each piece is decrypted into a buffer, then copied to the
/// caller's memory under its landing lock.
async fn receive_decrypted(
    reader: &mut (impl AsyncRead + Unpin),
    target: &Arc<dyn IoMemory>,
    range: Range<usize>,
    landing: &Mutex<bool>,
) -> std::io::Result<()> {
    let mut bounce = vec![0u8; range.len().min(TLS_BOUNCE_BYTES)];
    let mut done = 0;
    while done < range.len() {
        let want = (range.len() - done).min(bounce.len());
        let n = reader.read(&mut bounce[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let open = landing.lock().expect("landing lock");
        if !*open {
            return Err(std::io::Error::other("the caller stopped waiting for this read"));
        }
        target.fill(range.start + done, &bounce[..n]);
        done += n;
    }
    Ok(())
}
