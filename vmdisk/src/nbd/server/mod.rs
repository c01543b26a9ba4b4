//! A read-only NBD server over any [`BlockSource`] (tokio).
//!
//! Protocol subset (see `docs/format-nbd.md` for the client side; the server speaks the same
//! messages in the other direction):
//! - fixed newstyle handshake only (`NO_ZEROES` offered); options `GO`, `INFO` (replies
//!   `INFO_EXPORT` and `INFO_BLOCK_SIZE` min 1 / preferred [`BlockSource::preferred_block_size`] /
//!   max 32 MiB), `EXPORT_NAME`, `LIST`, `ABORT`, `STRUCTURED_REPLY`, `SET_META_CONTEXT` and
//!   `LIST_META_CONTEXT` for `base:allocation` (context id 1); others get `ERR_UNSUP`.
//! - transmission: `READ` (structured: `OFFSET_DATA` / `OFFSET_HOLE` chunks; simple replies with
//!   zero-filled holes when structured replies were not negotiated), `BLOCK_STATUS`
//!   (`base:allocation`: holes are `HOLE|ZERO`), `FLUSH` (no-op), `DISC`. The export is
//!   read-only: `WRITE`, `WRITE_ZEROES`, `TRIM` get `EPERM`; unknown commands `EINVAL`.
//! - requests are served concurrently (up to [`ServerOptions::max_in_flight`] per connection),
//!   replies are written whole, in completion order; any number of connections
//!   (`CAN_MULTI_CONN`: the data never changes).
//!
//! Malformed input never panics: a bad option gets an error reply, a bad request magic, an
//! oversized write payload or a truncated message closes the connection. The handshake has a
//! timeout; each reply write has a timeout (a client that stops reading is dropped).

mod handshake;
mod transmission;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::proto::*;
use crate::error::{Error, ErrorKind, Result};

/// Largest read the server serves in one request (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// One piece of a read, in order: data bytes or a run of zeroes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// These bytes.
    Data(Bytes),
    /// This many zero bytes (sent as a hole).
    Zero(u32),
}

impl Piece {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(b) => b.len() as u64,
            Piece::Zero(n) => u64::from(*n),
        }
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where an export's data comes from. `read` may block (it runs on tokio's blocking pool);
/// `extents` should be cheap (it runs on the async threads).
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The pieces of `[offset, offset + len)`, in order, covering it exactly. The range is
    /// inside the export and `len` ≤ [`MAX_REQUEST`]. An error is reported to the client as
    /// `EIO` (the connection stays up).
    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>>;

    /// Allocation of `[offset, offset + len)` from `offset` on: consecutive (length, is_zero)
    /// runs; may stop early (the client asks again) but must describe at least one byte. Called
    /// on the blocking thread pool, like [`BlockSource::read`]: it may block.
    fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u32, bool)>>;

    /// Preferred I/O size (advertised in `INFO_BLOCK_SIZE`), a power of two.
    fn preferred_block_size(&self) -> u32 {
        4096
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time allowed for the whole handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to write one reply (a client that stops reading is dropped).
    pub write_timeout: Duration,
    /// Requests served concurrently per connection.
    pub max_in_flight: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(120),
            max_in_flight: 64,
        }
    }
}

/// A read-only NBD server with named exports.
pub struct Server {
    exports: HashMap<String, Arc<dyn BlockSource>>,
    options: ServerOptions,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.exports.keys().collect();
        names.sort();
        f.debug_struct("Server").field("exports", &names).finish()
    }
}

const BASE_ALLOCATION_ID: u32 = 1;
const TRANSMISSION_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;

/// Handshake outcome: the export chosen and what was negotiated.
struct Session {
    source: Arc<dyn BlockSource>,
    structured: bool,
    base_allocation: bool,
}

impl Server {
    /// A server with these exports (name → source).
    pub fn new(exports: HashMap<String, Arc<dyn BlockSource>>, options: ServerOptions) -> Self {
        Server { exports, options }
    }

    /// Binds `path` (removing a stale socket file first) and makes it connectable by anyone
    /// who can reach its directory (mode 0666: QEMU runs as another user).
    pub fn bind_unix(path: &Path) -> Result<UnixListener> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))?;
        Ok(l)
    }

    /// Accepts connections until `shutdown` becomes true, serving each on its own task. On
    /// shutdown, open connections are dropped and the socket file (if `path`) is removed.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        path: Option<PathBuf>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let me = self.clone();
                        conns.spawn(async move {
                            if let Err(e) = me.handle(stream).await {
                                tracing::debug!(error = %e, "NBD connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break; }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        conns.abort_all();
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Serves one connection to the end (client `DISC`, EOF or a protocol error).
    pub async fn handle<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let session = tokio::time::timeout(
            self.options.handshake_timeout,
            self.handshake(&mut rd, &mut wr),
        )
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "NBD handshake timed out"))??;
        let Some(session) = session else {
            return Ok(());
        };
        self.transmission(rd, wr, session).await
    }
}

fn closed(what: &str, e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Closed, format!("reading {what}"), e)
}

/// A [`BlockSource`] over bytes in memory, with runs of zero `block`-sized blocks reported
/// as holes (for tests and examples).
#[derive(Debug, Clone)]
pub struct MemorySource {
    data: Bytes,
    block: u32,
}

impl MemorySource {
    /// Serve `data`; blocks of `block` bytes (a power of two) that are all zero are holes.
    pub fn new(data: impl Into<Bytes>, block: u32) -> Self {
        MemorySource {
            data: data.into(),
            block: block.max(1),
        }
    }

    fn block_is_zero(&self, i: u64) -> bool {
        let b = u64::from(self.block);
        let start = (i * b) as usize;
        let end = ((i + 1) * b).min(self.data.len() as u64) as usize;
        self.data
            .get(start..end)
            .is_none_or(|s| s.iter().all(|&x| x == 0))
    }

    fn runs(&self, offset: u64, len: u32) -> Vec<(u32, bool)> {
        let b = u64::from(self.block);
        let end = offset + u64::from(len);
        let mut out: Vec<(u32, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / b;
            let next = ((i + 1) * b).min(end);
            let z = self.block_is_zero(i);
            let l = (next - pos) as u32;
            match out.last_mut() {
                Some((ll, lz)) if *lz == z => *ll += l,
                _ => out.push((l, z)),
            }
            pos = next;
        }
        out
    }
}

impl BlockSource for MemorySource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>> {
        let mut pos = offset as usize;
        Ok(self
            .runs(offset, len)
            .into_iter()
            .map(|(l, z)| {
                let p = if z {
                    Piece::Zero(l)
                } else {
                    Piece::Data(self.data.slice(pos..pos + l as usize))
                };
                pos += l as usize;
                p
            })
            .collect())
    }

    fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u32, bool)>> {
        Ok(self.runs(offset, len))
    }

    fn preferred_block_size(&self) -> u32 {
        self.block
    }
}

#[cfg(test)]
mod tests;
