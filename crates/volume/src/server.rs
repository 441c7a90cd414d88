//! The replica server: accepts connections from other nodes' engines on the data address
//! and answers their requests, many in flight per connection.

use crate::replica::{Payload, ReplicaService, Reply};
use crate::wire::{Request, ResponseHeader, REQUEST_HEADER_BYTES};
use std::sync::Arc;
use store::AlignedBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// Requests one connection may have in flight; bounds the memory a peer can make us hold.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;

/// Serves replica requests on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, service: Arc<ReplicaService>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let service = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, service).await {
                        tracing::debug!(%peer, error = %e, "data connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a data connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, service: Arc<ReplicaService>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, writer) = stream.into_split();
    let (replies, mut outgoing) = mpsc::channel::<(u64, Reply)>(REQUESTS_IN_FLIGHT_MAX);
    let sender = tokio::spawn(async move {
        let mut writer = BufWriter::new(writer);
        while let Some((id, reply)) = outgoing.recv().await {
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
            writer.write_all(&header.encode()).await?;
            writer.write_all(payload).await?;
            if outgoing.is_empty() {
                writer.flush().await?;
            }
        }
        Ok::<_, std::io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    loop {
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        // A header that does not parse leaves the stream unframed: close the connection.
        let request = Request::parse(&header).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        // A request for another cluster or a disk this node does not have: the peer is
        // misconfigured or hostile. It gets a clear answer, and the connection is closed.
        if let Some(reply) = service.wrong_target(&request) {
            tracing::warn!(disk = %request.disk, cluster = %request.cluster, reason = %reply.message, "refused a request meant for another target");
            let _ = replies.send((request.id, reply)).await;
            break;
        }
        let permit = slots.clone().acquire_owned().await.expect("semaphore is never closed");
        let payload = match request.payload_bytes() {
            0 => Payload::None,
            n => {
                let mut buf = AlignedBuf::zeroed(n);
                reader.read_exact(buf.as_mut_slice()).await?;
                Payload::Write(Arc::new(buf), 0..n)
            }
        };
        let service = service.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let reply = service.handle(request, payload).await;
            let _ = replies.send((request.id, reply)).await;
            drop(permit);
        });
    }
    drop(replies);
    sender.await.map_err(std::io::Error::other)?
}
