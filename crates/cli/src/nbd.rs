//! A reading NBD client, enough to read an image that `qemu-nbd` exports on a Unix socket:
//! the fixed newstyle handshake with `NBD_OPT_GO`, then `NBD_CMD_READ` with simple replies.
//! The protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;

/// The most a server must accept in one read (the protocol's default maximum is 32 MiB).
pub const READ_MAX: u32 = 4 << 20;
/// Option replies larger than this are not an image server's.
const OPTION_REPLY_MAX: u32 = 64 << 10;

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD: {}", what.into()))
}

/// A connection to one export, in its transmission phase.
pub struct Client {
    stream: UnixStream,
    size: u64,
    next_cookie: u64,
}

impl Client {
    /// Connects to the default (empty-named) export of the server at `socket`.
    pub async fn connect(socket: &std::path::Path) -> io::Result<Client> {
        let mut stream = UnixStream::connect(socket).await?;
        if stream.read_u64().await? != NBDMAGIC || stream.read_u64().await? != IHAVEOPT {
            return Err(protocol("the server does not speak the newstyle handshake"));
        }
        let flags = stream.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak the fixed newstyle handshake"));
        }
        stream.write_u32(u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))).await?;
        // NBD_OPT_GO for the export named "", asking for no extra information.
        let mut go = Vec::with_capacity(26);
        go.extend_from_slice(&IHAVEOPT.to_be_bytes());
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&go).await?;
        let mut size = None;
        loop {
            if stream.read_u64().await? != OPTION_REPLY_MAGIC {
                return Err(protocol("an option reply without its magic"));
            }
            let option = stream.read_u32().await?;
            let kind = stream.read_u32().await?;
            let len = stream.read_u32().await?;
            if option != OPT_GO || len > OPTION_REPLY_MAX {
                return Err(protocol(format!("an unexpected option reply (option {option}, {len} bytes)")));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
                }
                REP_INFO => {}
                kind if kind & REP_FLAG_ERROR != 0 => {
                    return Err(protocol(format!("the server refused the export: {}", String::from_utf8_lossy(&data))));
                }
                kind => return Err(protocol(format!("an unknown option reply type {kind}"))),
            }
        }
        let size = size.ok_or_else(|| protocol("the server did not say the export's size"))?;
        Ok(Client { stream, size, next_cookie: 1 })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` (at most `READ_MAX`) bytes at `offset`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(buf.len()).ok().filter(|len| *len <= READ_MAX);
        let len = len.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an NBD read larger than READ_MAX"))?;
        if offset.checked_add(u64::from(len)).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an NBD read past the export's end"));
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.request(CMD_READ, cookie, offset, len).await?;
        if self.stream.read_u32().await? != SIMPLE_REPLY_MAGIC {
            return Err(protocol("a reply without the simple reply magic"));
        }
        let error = self.stream.read_u32().await?;
        if self.stream.read_u64().await? != cookie {
            return Err(protocol("a reply to another request"));
        }
        if error != 0 {
            // The server's errno: an EIO from qemu-nbd is the image's own read failing.
            return Err(io::Error::other(format!(
                "reading {len} bytes at offset {offset} failed on the image server: {}",
                io::Error::from_raw_os_error(error as i32)
            )));
        }
        self.stream.read_exact(buf).await?;
        Ok(())
    }

    /// Ends the session the way the protocol asks.
    pub async fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0).await?;
        self.stream.shutdown().await
    }

    async fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) -> io::Result<()> {
        let mut request = [0u8; 28];
        request[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request[6..8].copy_from_slice(&kind.to_be_bytes());
        request[8..16].copy_from_slice(&cookie.to_be_bytes());
        request[16..24].copy_from_slice(&offset.to_be_bytes());
        request[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&request).await
    }
}
