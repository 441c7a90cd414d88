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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a read's data goes when it arrives: straight into the caller's memory.
pub type ReadTarget = (Arc<dyn IoMemory>, Range<usize>);

struct Waiter {
    done: oneshot::Sender<Result<Reply, ReplicaError>>,
    into: Option<ReadTarget>,
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

#[derive(Default)]
pub struct PeerPool {
    connections: Mutex<HashMap<String, Arc<Connection>>>,
}

impl PeerPool {
    /// Sends `request` (with `payload` for a write) to the replica server at `addr`.
    pub async fn call(
        &self,
        addr: &str,
        request: Request,
        payload: Option<(&dyn IoMemory, Range<usize>)>,
        into: Option<ReadTarget>,
    ) -> Result<Reply, ReplicaError> {
        let connection = self.connection(addr).await?;
        match connection.call(request, payload.clone(), into.clone()).await {
            // The connection was retired under this request (another request broke it, or
            // the peer restarted): one more try on a fresh one. Writes and reads are
            // idempotent, and the writer's ordering still holds the range.
            Err(ReplicaError::ConnectionLost { .. }) => self.connection(addr).await?.call(request, payload, into).await,
            result => result,
        }
    }

    async fn connection(&self, addr: &str) -> Result<Arc<Connection>, ReplicaError> {
        if let Some(c) =
            self.connections.lock().expect("pool lock").get(addr).filter(|c| c.alive.load(Ordering::Acquire))
        {
            return Ok(c.clone());
        }
        let connection = Arc::new(Connection::connect(addr).await?);
        self.connections.lock().expect("pool lock").insert(addr.to_string(), connection.clone());
        Ok(connection)
    }
}

struct Connection {
    addr: String,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
}

impl Connection {
    async fn connect(addr: &str) -> Result<Self, ReplicaError> {
        let connect_error = |source| ReplicaError::Connect { addr: addr.to_string(), source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let (reader, writer) = stream.into_split();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(receive(reader, addr.to_string(), pending.clone(), alive.clone()));
        Ok(Connection {
            addr: addr.to_string(),
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            alive,
        })
    }

    async fn call(
        &self,
        mut request: Request,
        payload: Option<(&dyn IoMemory, Range<usize>)>,
        into: Option<ReadTarget>,
    ) -> Result<Reply, ReplicaError> {
        request.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(request.id, Waiter { done, into });
        // A frame sent only in part (an error, a timeout, or a caller that gave up) leaves the
        // stream unframed: the guard then retires the connection so nothing is sent after it.
        let mut guard = RetireUnlessSent { alive: &self.alive, sent: false };
        let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut writer = self.writer.lock().await;
            if !self.alive.load(Ordering::Acquire) {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            writer.write_all(&request.encode()).await?;
            if let Some((buf, range)) = payload {
                // Straight from the caller's memory (a guest's, for a guest write) to the socket.
                writer.write_all(buf.bytes(range)).await?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            self.pending.lock().expect("pending lock").remove(&request.id);
            return Err(ReplicaError::ConnectionLost { addr: self.addr.clone() });
        }
        guard.sent = true;
        match tokio::time::timeout(REQUEST_TIMEOUT, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ReplicaError::ConnectionLost { addr: self.addr.clone() }),
            Err(_) => {
                // A peer that does not answer in time is not trusted with the next request.
                self.alive.store(false, Ordering::Release);
                self.pending.lock().expect("pending lock").remove(&request.id);
                Err(ReplicaError::Timeout { addr: self.addr.clone(), timeout_ms: REQUEST_TIMEOUT.as_millis() as u64 })
            }
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

/// Reads replies until the connection fails, then fails every request still waiting.
async fn receive(mut reader: OwnedReadHalf, addr: String, pending: Pending, alive: Arc<AtomicBool>) {
    let lost = || ReplicaError::ConnectionLost { addr: addr.clone() };
    let failure = loop {
        let mut header = [0u8; RESPONSE_HEADER_BYTES];
        if reader.read_exact(&mut header).await.is_err() {
            break lost();
        }
        let header = match ResponseHeader::parse(&header) {
            Ok(header) => header,
            Err(source) => break ReplicaError::Protocol { addr: addr.clone(), source },
        };
        // A reply for a request that timed out meanwhile has no one waiting: its payload is
        // read and dropped.
        let waiter = pending.lock().expect("pending lock").remove(&header.id);
        let len = header.payload_len as usize;
        let direct = match (&waiter, header.status) {
            (Some(Waiter { into: Some((target, range)), .. }), Status::Ok) if range.len() == len && len > 0 => {
                Some((target.clone(), range.clone()))
            }
            _ => None,
        };
        let reply = if let Some((target, range)) = direct {
            if receive_into(&reader, &target, range).await.is_err() {
                break lost();
            }
            Reply { status: Status::Ok, epoch: 0, data: None, message: String::new() }
        } else {
            let mut payload = AlignedBuf::zeroed(len);
            if reader.read_exact(payload.as_mut_slice()).await.is_err() {
                break lost();
            }
            match header.status {
                Status::Ok => {
                    Reply { status: Status::Ok, epoch: 0, data: (len > 0).then_some(payload), message: String::new() }
                }
                status => {
                    let message = String::from_utf8_lossy(payload.as_slice()).into_owned();
                    Reply { status, epoch: header.epoch, data: None, message }
                }
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
async fn receive_into(reader: &OwnedReadHalf, target: &Arc<dyn IoMemory>, range: Range<usize>) -> std::io::Result<()> {
    let stream = reader.as_ref();
    let fd = stream.as_raw_fd();
    let mut done = 0;
    while done < range.len() {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || target.recv_into(fd, range.start + done, range.len() - done)) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
