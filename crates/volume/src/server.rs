//! The replica server: accepts connections from other nodes' engines on the data address
//! and answers their requests, many in flight per connection.
//!
//! Everything a peer can make this node hold is bounded (`DataLimits`): connections per
//! peer address and in total, requests and bytes in flight per connection and in total,
//! and the time a request's payload or a reply may take on the wire. Bytes are charged
//! when a request's header is read, before its payload is, and released only once its
//! reply is on the wire, so a peer that sends and never reads its replies holds at most
//! its connection's share until the reply timeout closes the connection.

use crate::replica::{Payload, ReplicaService, Reply};
use crate::wire::{Request, ResponseHeader, PAYLOAD_MAX_BYTES, REQUEST_HEADER_BYTES};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::AlignedBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Requests one connection may have in flight.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;

/// What the data port lets peers make this node hold.
#[derive(Clone, Debug)]
pub struct DataLimits {
    pub connections_total: usize,
    pub connections_per_peer: usize,
    /// Request payloads and reply data held for one connection.
    pub bytes_per_connection: usize,
    /// The same, over every connection from one peer address.
    pub bytes_per_peer: usize,
    /// The same, over every connection: bounds the memory the data port can take.
    pub bytes_total: usize,
    /// How long a request's payload may take to arrive, and a reply to be taken by the
    /// peer, before the connection is closed.
    pub io_timeout: Duration,
    /// How long a connection may sit without a request before it is closed (peers connect
    /// again when they need to).
    pub idle_timeout: Duration,
}

impl Default for DataLimits {
    fn default() -> Self {
        DataLimits {
            connections_total: 256,
            connections_per_peer: 16,
            bytes_per_connection: 32 << 20,
            bytes_per_peer: 64 << 20,
            bytes_total: 256 << 20,
            io_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl DataLimits {
    fn check(&self) {
        let smallest = self.bytes_per_connection.min(self.bytes_per_peer).min(self.bytes_total);
        assert!(smallest >= PAYLOAD_MAX_BYTES as usize, "every byte budget holds at least one largest request");
        assert!(self.connections_per_peer >= 1 && self.connections_total >= 1);
    }
}

/// What a reply of unknown length (a list of active ranges) is charged.
const LIST_REPLY_CHARGE_BYTES: u32 = 1 << 20;

/// Bytes are counted in units of this size (a request costs at least one).
const UNIT_BYTES: usize = 4096;

fn units(bytes: usize) -> u32 {
    bytes.div_ceil(UNIT_BYTES).max(1) as u32
}

/// Serves replica requests on `listener` with the default limits until the task is dropped.
pub async fn serve(listener: TcpListener, service: Arc<ReplicaService>) {
    serve_with(listener, service, DataLimits::default()).await
}

/// Serves replica requests on `listener`, in the clear, until the task is dropped. The node
/// itself serves them on its node port, over mutual TLS (`DataServer::serve` on each
/// authenticated stream); this is for tests and for the reference a benchmark compares
/// that with.
pub async fn serve_with(listener: TcpListener, service: Arc<ReplicaService>, limits: DataLimits) {
    let server = DataServer::new(service, limits);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = server.admit(peer.ip()) else {
                    tracing::warn!(%peer, "refused a data connection: too many from that address or in all");
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = server.serve(stream, slot).await {
                        tracing::debug!(%peer, error = %e, "data connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a data connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether a connection's peer may still be served.
pub type Admitted = Arc<dyn Fn() -> bool + Send + Sync>;

/// The block protocol's side of the node port: its limits, and the service that answers.
#[derive(Clone)]
pub struct DataServer {
    shared: Arc<Shared>,
    service: Arc<ReplicaService>,
}

impl DataServer {
    pub fn new(service: Arc<ReplicaService>, limits: DataLimits) -> Self {
        limits.check();
        let shared = Arc::new(Shared {
            bytes: Arc::new(Semaphore::new(units(limits.bytes_total) as usize)),
            connections: Mutex::new(HashMap::new()),
            limits,
        });
        DataServer { shared, service }
    }

    /// A connection from `peer`, counted until the slot is dropped; `None` when that address
    /// or the node has as many as it takes.
    pub fn admit(&self, peer: IpAddr) -> Option<ConnectionSlot> {
        ConnectionSlot::take(&self.shared, peer)
    }

    /// Serves the block protocol on `stream` until it ends.
    pub async fn serve<S>(&self, stream: S, slot: ConnectionSlot) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.serve_while(stream, slot, Arc::new(|| true)).await
    }

    /// `serve`, while `admitted` holds: it is asked before each request, and the connection
    /// closes once it says no (the peer was removed from the cluster).
    pub async fn serve_while<S>(&self, stream: S, slot: ConnectionSlot, admitted: Admitted) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let peer_bytes = slot.peer_bytes.clone();
        let served = serve_connection(stream, self.service.clone(), &self.shared, peer_bytes, admitted).await;
        drop(slot);
        served
    }

    /// How long a connection may take to say who it is before it is closed.
    pub fn io_timeout(&self) -> Duration {
        self.shared.limits.io_timeout
    }
}

struct Shared {
    /// Node-wide byte budget, in `UNIT_BYTES`.
    bytes: Arc<Semaphore>,
    /// Open connections per peer address, and the byte budget they share.
    connections: Mutex<HashMap<IpAddr, (usize, Arc<Semaphore>)>>,
    limits: DataLimits,
}

/// One counted connection; uncounted when dropped.
pub struct ConnectionSlot {
    shared: Arc<Shared>,
    peer: IpAddr,
    /// The byte budget of every connection from `peer`.
    peer_bytes: Arc<Semaphore>,
}

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>, peer: IpAddr) -> Option<Self> {
        let mut open = shared.connections.lock().expect("connections lock");
        let total: usize = open.values().map(|(count, _)| count).sum();
        let from_peer = open.get(&peer).map_or(0, |(count, _)| *count);
        if total >= shared.limits.connections_total || from_peer >= shared.limits.connections_per_peer {
            return None;
        }
        let per_peer = units(shared.limits.bytes_per_peer) as usize;
        let entry = open.entry(peer).or_insert_with(|| (0, Arc::new(Semaphore::new(per_peer))));
        entry.0 += 1;
        Some(ConnectionSlot { shared: shared.clone(), peer, peer_bytes: entry.1.clone() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.shared.connections.lock().expect("connections lock");
        if let Some((count, budget)) = open.get_mut(&self.peer) {
            *count -= 1;
            // The peer's budget is forgotten only once nothing holds any of it (requests
            // of a closed connection may still be finishing): a reconnect gets no fresh one.
            if *count == 0 && Arc::strong_count(budget) == 2 {
                open.remove(&self.peer);
            }
        }
    }
}

/// What one request holds until its reply is on the wire.
struct Held {
    _connection: OwnedSemaphorePermit,
    _peer: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
    _slot: OwnedSemaphorePermit,
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} took longer than the data port allows"))
}

async fn serve_connection<S>(
    stream: S,
    service: Arc<ReplicaService>,
    shared: &Shared,
    peer_bytes: Arc<Semaphore>,
    admitted: Admitted,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (io_timeout, idle_timeout) = (shared.limits.io_timeout, shared.limits.idle_timeout);
    let (mut reader, writer) = tokio::io::split(stream);
    let (replies, mut outgoing) = mpsc::channel::<(u64, Reply, Option<Held>)>(REQUESTS_IN_FLIGHT_MAX);
    // Replies go out in the order they are ready; each must be taken by the peer in time.
    let mut sender = tokio::spawn(async move {
        let mut writer = BufWriter::new(writer);
        while let Some((id, reply, held)) = outgoing.recv().await {
            let payload: &[u8] = match &reply.data {
                Some(data) => data.as_slice(),
                None => reply.message.as_bytes(),
            };
            let header = ResponseHeader {
                status: reply.status,
                id,
                owner_epoch: reply.owner_epoch,
                pg_epoch: reply.pg_epoch,
                payload_len: payload.len() as u32,
            };
            let write = async {
                writer.write_all(&header.encode()).await?;
                writer.write_all(payload).await?;
                if outgoing.is_empty() {
                    writer.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::time::timeout(io_timeout, write).await.map_err(|_| timed_out("a reply"))??;
            drop(held);
        }
        Ok::<_, std::io::Error>(())
    });
    let connection_bytes = Arc::new(Semaphore::new(units(shared.limits.bytes_per_connection) as usize));
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let receiver = async move {
        loop {
            let mut header = [0u8; REQUEST_HEADER_BYTES];
            match tokio::time::timeout(idle_timeout, reader.read_exact(&mut header)).await {
                Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
            }
            // A header that does not parse leaves the stream unframed: close the connection.
            let request =
                Request::parse(&header).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if !admitted() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the peer is no node of the cluster",
                ));
            }
            // A request for another cluster or a disk this node does not have: the peer is
            // misconfigured or hostile. It gets a clear answer, and the connection is closed.
            if let Some(reply) = service.wrong_target(&request) {
                tracing::warn!(disk = %request.disk, cluster = %request.cluster, reason = %reply.message, "refused a request meant for another target");
                let _ = replies.send((request.id, reply, None)).await;
                return Ok(());
            }
            // Charged before the payload is read: a peer out of budget is simply not read
            // from (TCP pushes back on it) until its replies are taken.
            // A list of active ranges is small: bounded like a message, not like an extent.
            let reply_bytes = request.reply_bytes().unwrap_or(LIST_REPLY_CHARGE_BYTES) as usize;
            let bytes = request.payload_bytes().max(reply_bytes);
            let held = Held {
                _slot: slots.clone().acquire_owned().await.expect("never closed"),
                _connection: connection_bytes.clone().acquire_many_owned(units(bytes)).await.expect("never closed"),
                _peer: peer_bytes.clone().acquire_many_owned(units(bytes)).await.expect("never closed"),
                _node: shared.bytes.clone().acquire_many_owned(units(bytes)).await.expect("never closed"),
            };
            let payload = match request.payload_bytes() {
                0 => Payload::None,
                n => {
                    let mut buf = AlignedBuf::zeroed(n);
                    let read = reader.read_exact(buf.as_mut_slice());
                    tokio::time::timeout(io_timeout, read).await.map_err(|_| timed_out("a request's payload"))??;
                    Payload::Write(Arc::new(buf), 0..n)
                }
            };
            let service = service.clone();
            let replies = replies.clone();
            tokio::spawn(async move {
                let reply = service.handle(request, payload).await;
                // The connection may be gone; what the request held goes with the reply.
                let _ = replies.send((request.id, reply, Some(held))).await;
            });
        }
    };
    // Whichever side ends first ends the connection; requests still being handled finish
    // and let go of what they hold.
    let ended = tokio::select! {
        received = receiver => match received {
            // The replies still due go out before the connection closes.
            Ok(()) => (&mut sender).await.map_err(std::io::Error::other).and_then(|sent| sent),
            Err(e) => Err(e),
        },
        sent = &mut sender => sent.map_err(std::io::Error::other).and_then(|sent| sent),
    };
    // Nothing of the connection outlives it (its slot is given back right after).
    sender.abort();
    ended
}
