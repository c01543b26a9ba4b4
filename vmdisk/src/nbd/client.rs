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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::frame::{self, BlockStatusCollector, ChunkPayload, EmptyCollector, FrameError};
use super::frame::{Info, OptionReply, ReadAssembler, Reply, Request};
use super::proto::*;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::BlockStatus;

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

#[derive(Debug, Clone, Copy)]
struct ExportInfo {
    size: u64,
    flags: u16,
    min_block: u32,
    preferred_block: u32,
    max_block: u32,
}

enum Collector {
    Read(ReadAssembler),
    Status(BlockStatusCollector),
    Empty(EmptyCollector),
}

enum Value {
    Data(Bytes),
    Extents(Vec<BlockStatus>),
    Unit,
}

impl Collector {
    fn feed(&mut self, p: ChunkPayload) -> Result<()> {
        match self {
            Collector::Read(c) => c.feed(p),
            Collector::Status(c) => c.feed(p),
            Collector::Empty(c) => c.feed(p),
        }
    }

    fn finish(self) -> Result<Value> {
        match self {
            Collector::Read(c) => c.finish().map(Value::Data),
            Collector::Status(c) => c.finish().map(Value::Extents),
            Collector::Empty(c) => c.finish().map(|()| Value::Unit),
        }
    }

    /// Outcome of a simple reply (allowed only without data, so not for read and block
    /// status unless it reports an error). `Err(true)` = protocol violation.
    fn simple(self, error: u32) -> Result<Value, (Error, bool)> {
        if error != 0 {
            return Err((frame::simple_reply_error(error, "request"), false));
        }
        match self {
            Collector::Empty(_) => Ok(Value::Unit),
            _ => Err((
                Error::protocol("successful simple reply to a read or block status request"),
                true,
            )),
        }
    }
}

struct Pending {
    collector: Collector,
    tx: oneshot::Sender<Result<Value>>,
    _permit: Option<OwnedSemaphorePermit>,
}

enum WireMsg {
    Data(Bytes),
    Disconnect(Bytes, oneshot::Sender<()>),
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    broken: Mutex<Option<String>>,
    tasks: Mutex<Vec<AbortHandle>>,
    sem: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (maps and options) stays consistent for our purposes.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn closed_error(&self) -> Option<Error> {
        lock(&self.broken)
            .as_ref()
            .map(|m| Error::new(ErrorKind::Closed, format!("NBD connection is closed: {m}")))
    }

    /// Marks the connection broken, fails every pending request with `kind`, stops tasks.
    fn break_all(&self, kind: ErrorKind, msg: &str) {
        {
            let mut b = lock(&self.broken);
            if b.is_none() {
                *b = Some(msg.to_owned());
            }
        }
        self.sem.close();
        let drained: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        for p in drained {
            let _ = p.tx.send(Err(Error::new(kind, msg.to_owned())));
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Routes one reply. `Err(msg)` = protocol violation; the connection must be broken.
    fn dispatch(&self, reply: Reply) -> Result<(), String> {
        let cookie = reply.cookie();
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(&cookie) else {
            return Err(format!("reply for unknown cookie {cookie:#x}"));
        };
        match reply {
            Reply::Simple { error, .. } => {
                let Some(p) = pending.remove(&cookie) else {
                    return Ok(());
                };
                drop(pending);
                match p.collector.simple(error) {
                    Ok(v) => {
                        let _ = p.tx.send(Ok(v));
                        Ok(())
                    }
                    Err((e, fatal)) => {
                        let msg = e.context().to_owned();
                        let _ = p.tx.send(Err(e));
                        if fatal {
                            Err(msg)
                        } else {
                            Ok(())
                        }
                    }
                }
            }
            Reply::Chunk(c) => {
                let done = c.is_done();
                if let Err(e) = p.collector.feed(c.payload) {
                    let msg = e.context().to_owned();
                    if let Some(p) = pending.remove(&cookie) {
                        let _ = p.tx.send(Err(e));
                    }
                    return Err(msg);
                }
                if done {
                    if let Some(p) = pending.remove(&cookie) {
                        drop(pending);
                        let _ = p.tx.send(p.collector.finish());
                    }
                }
                Ok(())
            }
        }
    }
}

struct Inner {
    info: ExportInfo,
    contexts: Vec<(String, u32)>,
    timeout: Duration,
    max_in_flight: usize,
    next_cookie: AtomicU64,
    tx: mpsc::UnboundedSender<WireMsg>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

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

// ========================================================================= handshake

async fn read_option_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<OptionReply> {
    let mut buf = vec![0u8; OPT_REPLY_HEADER_LEN];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| Error::io("reading an option reply", e))?;
    let total = match frame::check_option_reply(&buf) {
        Ok(n) => n,
        Err(FrameError::Incomplete { needed: Some(n) }) => n,
        Err(e) => return Err(e.into()),
    };
    buf.resize(total, 0);
    s.read_exact(&mut buf[OPT_REPLY_HEADER_LEN..])
        .await
        .map_err(|e| Error::io("reading option reply data", e))?;
    Ok(frame::parse_option_reply(Bytes::from(buf))?)
}

fn option_error(r: &OptionReply, what: &str) -> Error {
    let msg = frame::sanitize(&r.data);
    let (kind, name) = match r.reply_type {
        REP_ERR_UNSUP => (ErrorKind::Unsupported, "unsupported"),
        REP_ERR_POLICY => (ErrorKind::Unsupported, "forbidden by policy"),
        REP_ERR_PLATFORM => (ErrorKind::Unsupported, "unsupported on this platform"),
        REP_ERR_TLS_REQD => (ErrorKind::Unsupported, "TLS required"),
        REP_ERR_INVALID => (ErrorKind::InvalidArgument, "invalid"),
        REP_ERR_UNKNOWN => (ErrorKind::InvalidArgument, "unknown export"),
        REP_ERR_BLOCK_SIZE_REQD => (ErrorKind::Unsupported, "block size required"),
        REP_ERR_TOO_BIG => (ErrorKind::InvalidArgument, "too big"),
        REP_ERR_SHUTDOWN => (ErrorKind::Closed, "server shutting down"),
        _ => (ErrorKind::Protocol, "unknown error reply"),
    };
    let mut context = format!("{what}: {name} (reply type {:#x})", r.reply_type);
    if !msg.is_empty() {
        context.push_str(": ");
        context.push_str(&msg);
    }
    Error::new(kind, context)
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut buf = BytesMut::new();
    frame::encode_option(&mut buf, option, data)?;
    s.write_all(&buf)
        .await
        .map_err(|e| Error::io("sending an option", e))
}

async fn next_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<OptionReply> {
    let r = read_option_reply(s).await?;
    if r.option != option {
        return Err(Error::protocol(format!(
            "option reply for option {} while waiting for option {option}",
            r.option
        )));
    }
    Ok(r)
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opts: &ConnectOptions,
) -> Result<(ExportInfo, Vec<(String, u32)>)> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)
        .await
        .map_err(|e| Error::io("reading the server greeting", e))?;
    let mut h = &hello[..];
    use bytes::Buf;
    if h.get_u64() != NBDMAGIC {
        return Err(Error::protocol("server greeting lacks NBDMAGIC"));
    }
    match h.get_u64() {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "server uses oldstyle negotiation",
            ))
        }
        m => return Err(Error::protocol(format!("bad newstyle magic {m:#x}"))),
    }
    let hflags = h.get_u16();
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "server does not support fixed newstyle negotiation",
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| Error::io("sending client flags", e))?;

    // Structured replies: required (reads with holes, block status).
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let r = next_reply(s, OPT_STRUCTURED_REPLY).await?;
    if r.reply_type != REP_ACK {
        return Err(if r.is_error() {
            option_error(&r, "NBD_OPT_STRUCTURED_REPLY")
        } else {
            Error::protocol(format!(
                "unexpected reply type {} to NBD_OPT_STRUCTURED_REPLY",
                r.reply_type
            ))
        });
    }

    let mut contexts: Vec<(String, u32)> = Vec::new();
    if !opts.meta_contexts.is_empty() {
        let data = frame::option_meta_context_data(&opts.export, &opts.meta_contexts)?;
        send_option(s, OPT_SET_META_CONTEXT, &data).await?;
        for _ in 0..MAX_OPTION_REPLIES {
            let r = next_reply(s, OPT_SET_META_CONTEXT).await?;
            match r.reply_type {
                REP_META_CONTEXT => {
                    let (id, name) = frame::parse_meta_context(&r.data)?;
                    if contexts.iter().any(|(_, i)| *i == id) {
                        return Err(Error::protocol(format!(
                            "meta context id {id} granted twice"
                        )));
                    }
                    contexts.push((name, id));
                }
                REP_ACK => break,
                t if r.is_error() => {
                    let _ = t;
                    return Err(option_error(&r, "NBD_OPT_SET_META_CONTEXT"));
                }
                t => {
                    return Err(Error::protocol(format!(
                        "unexpected reply type {t} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
        for want in &opts.meta_contexts {
            if !contexts.iter().any(|(n, _)| n == want) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("server did not grant metadata context {want:?}"),
                ));
            }
        }
    }

    let data = frame::option_go_data(&opts.export, &[INFO_BLOCK_SIZE])?;
    send_option(s, OPT_GO, &data).await?;
    let mut export = None;
    let mut block = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let r = next_reply(s, OPT_GO).await?;
        match r.reply_type {
            REP_INFO => match frame::parse_info(&r.data)? {
                Info::Export { size, flags } => export = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => block = Some((min, preferred, max)),
                Info::Other(_) => {}
            },
            REP_ACK => {
                let Some((size, flags)) = export else {
                    return Err(Error::protocol(
                        "NBD_OPT_GO succeeded without NBD_INFO_EXPORT",
                    ));
                };
                if size > i64::MAX as u64 {
                    return Err(Error::protocol(format!(
                        "export size {size} is implausible"
                    )));
                }
                let (min, preferred, max) = block.unwrap_or((1, 4096, DEFAULT_MAX_BLOCK_SIZE));
                return Ok((
                    ExportInfo {
                        size,
                        flags,
                        min_block: min,
                        preferred_block: preferred,
                        max_block: max.min(DEFAULT_MAX_BLOCK_SIZE),
                    },
                    contexts,
                ));
            }
            _ if r.is_error() => {
                return Err(option_error(
                    &r,
                    &format!("NBD_OPT_GO for export {:?}", opts.export),
                ))
            }
            t => {
                return Err(Error::protocol(format!(
                    "unexpected reply type {t} to NBD_OPT_GO"
                )))
            }
        }
    }
    Err(Error::protocol("too many option replies"))
}

// ========================================================================= tasks

async fn reader_loop<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        loop {
            match frame::check_reply(&buf) {
                Ok(n) => {
                    let f = buf.split_to(n).freeze();
                    let res = frame::parse_reply(f)
                        .map_err(|e| Error::from(e).context().to_owned())
                        .and_then(|r| shared.dispatch(r));
                    if let Err(m) = res {
                        tracing::warn!(error = %m, "NBD protocol violation; closing connection");
                        shared.break_all(ErrorKind::Protocol, &m);
                        return;
                    }
                }
                Err(FrameError::Incomplete { needed }) => {
                    if let Some(n) = needed {
                        buf.reserve(n.saturating_sub(buf.len()));
                    }
                    break;
                }
                Err(FrameError::Invalid(m)) => {
                    tracing::warn!(error = %m, "NBD protocol violation; closing connection");
                    shared.break_all(ErrorKind::Protocol, &m);
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                let m = if buf.is_empty() {
                    "server closed the connection"
                } else {
                    "server closed the connection in the middle of a reply"
                };
                shared.break_all(ErrorKind::Closed, m);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                shared.break_all(ErrorKind::Io, &format!("reading from the server: {e}"));
                return;
            }
        }
    }
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<WireMsg>,
    shared: Arc<Shared>,
) {
    while let Some(m) = rx.recv().await {
        let (bytes, done) = match m {
            WireMsg::Data(b) => (b, None),
            WireMsg::Disconnect(b, tx) => (b, Some(tx)),
        };
        if let Err(e) = wr.write_all(&bytes).await {
            shared.break_all(ErrorKind::Io, &format!("writing to the server: {e}"));
            return;
        }
        if let Some(tx) = done {
            let _ = wr.shutdown().await;
            let _ = tx.send(());
            return;
        }
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

    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::invalid(format!(
                "{what} of {len} bytes at {offset} exceeds the export size {}",
                self.size()
            ))),
        }
    }

    async fn call(
        &self,
        req: Request,
        payload: Option<&[u8]>,
        collector: Collector,
    ) -> Result<Value> {
        let inner = &self.inner;
        let shared = &inner.shared;
        if let Some(e) = shared.closed_error() {
            return Err(e);
        }
        let permit = shared.sem.clone().acquire_owned().await.map_err(|_| {
            shared
                .closed_error()
                .unwrap_or_else(|| Error::new(ErrorKind::Closed, "NBD connection is closed"))
        })?;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let req = Request { cookie, ..req };
        let mut msg = BytesMut::with_capacity(REQUEST_HEADER_LEN + payload.map_or(0, <[u8]>::len));
        req.encode(&mut msg);
        if let Some(p) = payload {
            msg.extend_from_slice(p);
        }
        let (tx, rx) = oneshot::channel();
        lock(&shared.pending).insert(
            cookie,
            Pending {
                collector,
                tx,
                _permit: Some(permit),
            },
        );
        // break_all may have drained the map just before our insert.
        if let Some(e) = shared.closed_error() {
            lock(&shared.pending).remove(&cookie);
            return Err(e);
        }
        if inner.tx.send(WireMsg::Data(msg.freeze())).is_err() {
            lock(&shared.pending).remove(&cookie);
            return Err(Error::new(ErrorKind::Closed, "NBD writer task has stopped"));
        }
        match tokio::time::timeout(inner.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(shared
                .closed_error()
                .unwrap_or_else(|| Error::new(ErrorKind::Closed, "NBD connection is closed"))),
            Err(_) => {
                let m = format!(
                    "NBD command {} ({} bytes at {}) timed out after {:?}",
                    req.command, req.length, req.offset, inner.timeout
                );
                shared.break_all(
                    ErrorKind::Closed,
                    &format!("broken by an earlier timeout: {m}"),
                );
                Err(Error::new(ErrorKind::Timeout, m))
            }
        }
    }

    async fn read_one(&self, offset: u64, len: u32) -> Result<Bytes> {
        let req = Request {
            flags: 0,
            command: CMD_READ,
            cookie: 0,
            offset,
            length: len,
        };
        match self
            .call(req, None, Collector::Read(ReadAssembler::new(offset, len)))
            .await?
        {
            Value::Data(b) => Ok(b),
            _ => Err(Error::protocol("internal: read produced no data")),
        }
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let step = self.max_block_size() as u64;
        let end = offset + len;
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            (o, (end - o).min(step) as u32)
        })
    }

    /// Reads `len` bytes at `offset`; holes come back zero-filled. Requests larger than
    /// [`Client::max_block_size`] are split and sent concurrently.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.check_range(offset, len as u64, "read")?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len <= self.max_block_size() {
            return self.read_one(offset, len).await;
        }
        let parts = try_join_all(
            self.pieces(offset, len as u64)
                .map(|(o, l)| self.read_one(o, l)),
        )
        .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// Block status of `[offset, offset + length)` in metadata context `context`,
    /// as contiguous descriptors clipped to the range, adjacent equal flags merged.
    /// Loops while the server answers for less than asked.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<BlockStatus>> {
        let Some(&(_, id)) = self.inner.contexts.iter().find(|(n, _)| n == context) else {
            return Err(Error::invalid(format!(
                "metadata context {context:?} was not negotiated on this connection"
            )));
        };
        self.check_range(offset, length, "block status")?;
        let known: Vec<u32> = self.inner.contexts.iter().map(|(_, i)| *i).collect();
        let end = offset + length;
        let mut cur = offset;
        let mut out: Vec<BlockStatus> = Vec::new();
        while cur < end {
            let len = (end - cur).min(MAX_STATUS_REQUEST) as u32;
            let req = Request {
                flags: 0,
                command: CMD_BLOCK_STATUS,
                cookie: 0,
                offset: cur,
                length: len,
            };
            let col = BlockStatusCollector::new(cur, len, id, known.clone());
            let Value::Extents(v) = self.call(req, None, Collector::Status(col)).await? else {
                return Err(Error::protocol(
                    "internal: block status produced no extents",
                ));
            };
            for e in v {
                cur = e.end();
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.end() == e.offset => {
                        last.length += e.length
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (split at [`Client::max_block_size`]).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "NBD export is read-only",
            ));
        }
        self.check_range(offset, data.len() as u64, "write")?;
        try_join_all(self.pieces(offset, data.len() as u64).map(|(o, l)| {
            let start = (o - offset) as usize;
            let slice = data.get(start..start + l as usize).unwrap_or_default();
            let req = Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: 0,
                offset: o,
                length: l,
            };
            self.call(
                req,
                Some(slice),
                Collector::Empty(EmptyCollector::new(o, l)),
            )
        }))
        .await?;
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` (`NBD_CMD_WRITE_ZEROES`, holes allowed).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "NBD export is read-only",
            ));
        }
        if self.inner.info.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "server does not support WRITE_ZEROES",
            ));
        }
        self.check_range(offset, len as u64, "write zeroes")?;
        if len == 0 {
            return Ok(());
        }
        let req = Request {
            flags: 0,
            command: CMD_WRITE_ZEROES,
            cookie: 0,
            offset,
            length: len,
        };
        self.call(
            req,
            None,
            Collector::Empty(EmptyCollector::new(offset, len)),
        )
        .await
        .map(|_| ())
    }

    /// Asks the server to persist completed writes (`NBD_CMD_FLUSH`).
    pub async fn flush(&self) -> Result<()> {
        if self.inner.info.flags & FLAG_SEND_FLUSH == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "server does not support FLUSH",
            ));
        }
        let req = Request {
            flags: 0,
            command: CMD_FLUSH,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.call(req, None, Collector::Empty(EmptyCollector::new(0, 0)))
            .await
            .map(|_| ())
    }

    /// Waits (bounded by the timeout) for requests in flight, sends `NBD_CMD_DISC` and
    /// closes the connection. Other clones of this client then fail with `Closed`.
    pub async fn disconnect(self) -> Result<()> {
        let inner = &self.inner;
        let shared = &inner.shared;
        if let Some(e) = shared.closed_error() {
            return Err(e);
        }
        let n = u32::try_from(inner.max_in_flight).unwrap_or(u32::MAX);
        let t = inner.timeout;
        let res = async {
            let _all = shared.sem.acquire_many(n).await.map_err(|_| {
                Error::new(ErrorKind::Closed, "NBD connection closed during disconnect")
            })?;
            let mut msg = BytesMut::new();
            Request {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode(&mut msg);
            let (tx, rx) = oneshot::channel();
            inner
                .tx
                .send(WireMsg::Disconnect(msg.freeze(), tx))
                .map_err(|_| Error::new(ErrorKind::Closed, "NBD writer task has stopped"))?;
            rx.await.map_err(|_| {
                Error::new(ErrorKind::Closed, "NBD connection closed during disconnect")
            })
        };
        let r = match tokio::time::timeout(t, res).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("NBD disconnect timed out after {t:?}"),
            )),
        };
        shared.break_all(ErrorKind::Closed, "client disconnected");
        r
    }
}
