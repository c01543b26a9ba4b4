//! Async NBD client (tokio) with request pipelining over one connection.
//!
//! A [`Client`] is cheap to clone; clones share one connection. Requests from many tasks
//! are in flight at once:
//!
//! - a *writer task* owns the socket's write half and writes whole request messages
//!   from a channel, so a caller dropping its future never leaves half a request on the
//!   wire;
//! - a *reader task* owns the read half, decodes replies ([`super::frame`]) and hands
//!   each chunk to the per-request collector registered under its cookie; the final chunk
//!   completes the caller's oneshot;
//! - a semaphore bounds requests in flight ([`ConnectOptions::max_in_flight`]); a permit
//!   is released when the reply arrives, not when the caller gives up.
//!
//! Any protocol violation, I/O error or request timeout *breaks* the connection: every
//! pending request fails and later calls fail with [`ErrorKind::Closed`] (a timed-out
//! request's reply may still arrive, so the stream can no longer be trusted).
//!
//! For more throughput than one connection gives, open several clients
//! ([`Client::connect_many`]); the server must allow it (qemu-nbd `--shared N`).

mod conn;
mod handshake;
mod requests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};

use self::conn::{lock, reader_loop, writer_loop, Inner, Shared};
use self::handshake::{handshake, ExportInfo};
use super::proto::*;
use crate::error::{Error, ErrorKind, Result};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix domain socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddr::Tcp(h) => write!(f, "tcp:{h}"),
        }
    }
}

/// Parameters of [`Client::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Export name ("" is the default export, as qemu-nbd serves).
    pub export: String,
    /// Metadata contexts to negotiate, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:NAME`. Connecting fails if one is not granted.
    pub meta_contexts: Vec<String>,
    /// Timeout of the connection + handshake, and of each request once sent.
    pub timeout: Duration,
    /// Most requests in flight on the connection (default 32).
    pub max_in_flight: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            export: String::new(),
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
            max_in_flight: 32,
        }
    }
}

/// Default maximum block size when the server does not send `NBD_INFO_BLOCK_SIZE`, and
/// the cap applied to what it sends.
pub const DEFAULT_MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;
/// Largest length asked in one `NBD_CMD_BLOCK_STATUS`.
const MAX_STATUS_REQUEST: u64 = 1 << 31;
/// Largest option reply awaited in a handshake loop before giving up.
const MAX_OPTION_REPLIES: usize = 1024;

/// An NBD client connection; clone it to issue requests from several tasks at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.inner.info.size)
            .field("flags", &self.inner.info.flags)
            .field("contexts", &self.inner.contexts)
            .finish()
    }
}

// ========================================================================= client

impl Client {
    /// Connects, negotiates (fixed newstyle, `NO_ZEROES`, structured replies, the
    /// requested metadata contexts, `NBD_OPT_GO` with a block size request) and starts
    /// the reader and writer tasks. The whole handshake is bounded by `opts.timeout`.
    pub async fn connect(addr: &NbdAddr, opts: ConnectOptions) -> Result<Client> {
        if opts.max_in_flight == 0 || opts.timeout.is_zero() {
            return Err(Error::invalid("max_in_flight and timeout must be non-zero"));
        }
        let t = opts.timeout;
        let fut = async {
            match addr {
                NbdAddr::Unix(p) => {
                    let mut s = tokio::net::UnixStream::connect(p)
                        .await
                        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
                    let (info, ctx) = handshake(&mut s, &opts).await?;
                    let (r, w) = s.into_split();
                    Ok(Client::start(r, w, info, ctx, &opts))
                }
                NbdAddr::Tcp(h) => {
                    let mut s = tokio::net::TcpStream::connect(h.as_str())
                        .await
                        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
                    let _ = s.set_nodelay(true);
                    let (info, ctx) = handshake(&mut s, &opts).await?;
                    let (r, w) = s.into_split();
                    Ok(Client::start(r, w, info, ctx, &opts))
                }
            }
        };
        match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("NBD handshake with {addr} timed out after {t:?}"),
            )),
        }
    }

    /// Opens `n` connections to the same export. More than one needs the server to
    /// advertise `NBD_FLAG_CAN_MULTI_CONN`, or a read-only export (the flag is about
    /// flush visibility of writes across connections).
    pub async fn connect_many(
        addr: &NbdAddr,
        opts: ConnectOptions,
        n: usize,
    ) -> Result<Vec<Client>> {
        if n == 0 {
            return Err(Error::invalid("connect_many needs n >= 1"));
        }
        let first = Client::connect(addr, opts.clone()).await?;
        if n > 1 && !first.can_multi_conn() && !first.is_read_only() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "server does not allow multiple connections to a writable export (no CAN_MULTI_CONN)",
            ));
        }
        let rest = try_join_all((1..n).map(|_| Client::connect(addr, opts.clone()))).await?;
        let mut v = vec![first];
        v.extend(rest);
        Ok(v)
    }

    fn start<R, W>(
        rd: R,
        wr: W,
        info: ExportInfo,
        contexts: Vec<(String, u32)>,
        opts: &ConnectOptions,
    ) -> Client
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            broken: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            sem: Arc::new(Semaphore::new(opts.max_in_flight)),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let r = tokio::spawn(reader_loop(rd, shared.clone()));
        let w = tokio::spawn(writer_loop(wr, rx, shared.clone()));
        lock(&shared.tasks).extend([r.abort_handle(), w.abort_handle()]);
        tracing::debug!(
            size = info.size,
            flags = info.flags,
            ?contexts,
            "NBD connected"
        );
        Client {
            inner: Arc::new(Inner {
                info,
                contexts,
                timeout: opts.timeout,
                max_in_flight: opts.max_in_flight,
                next_cookie: AtomicU64::new(1),
                tx,
                shared,
            }),
        }
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// True if the server marked the export read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.info.flags & FLAG_READ_ONLY != 0
    }

    /// True if the server allows several connections (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.inner.info.flags & FLAG_CAN_MULTI_CONN != 0
    }

    /// Raw transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.inner.info.flags
    }

    /// Largest read/write request sent: the server's maximum block size, capped at
    /// 32 MiB (also the default).
    pub fn max_block_size(&self) -> u32 {
        self.inner.info.max_block.max(1)
    }

    /// The server's minimum block size (alignment of requests; 1 if not sent).
    pub fn min_block_size(&self) -> u32 {
        self.inner.info.min_block
    }

    /// The server's preferred block size (4096 if not sent).
    pub fn preferred_block_size(&self) -> u32 {
        self.inner.info.preferred_block
    }

    /// True if metadata context `name` was negotiated.
    pub fn has_meta_context(&self, name: &str) -> bool {
        self.inner.contexts.iter().any(|(n, _)| n == name)
    }

    /// True while the connection is usable.
    pub fn is_open(&self) -> bool {
        self.inner.shared.closed_error().is_none()
    }
}
