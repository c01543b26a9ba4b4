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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch, Semaphore};

use super::frame::{self, Chunk, ChunkPayload, Descriptor, OptionReply, Reply, Request};
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
    /// runs; may stop early (the client asks again) but must describe at least one byte.
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

enum OptOutcome {
    Continue,
    Transmission(Session),
    /// `NBD_OPT_EXPORT_NAME` (no reply framing) or abort: close after the handshake.
    Close,
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

    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = BytesMut::with_capacity(18);
        hello.put_u64(NBDMAGIC);
        hello.put_u64(IHAVEOPT);
        hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        write_all(wr, &hello).await?;
        let client_flags = rd.read_u32().await.map_err(|e| closed("client flags", e))?;
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0
            || client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        {
            return Err(Error::protocol(format!(
                "unsupported client flags {client_flags:#x} (fixed newstyle required)"
            )));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        let mut base_allocation = false;
        // Bounded: a client cannot keep us in the handshake forever (timeout) nor make us
        // buffer more than one option's data.
        for _ in 0..1000 {
            let mut hdr = [0u8; frame::OPTION_HEADER_LEN];
            rd.read_exact(&mut hdr)
                .await
                .map_err(|e| closed("option header", e))?;
            let (option, len) = frame::parse_option_header(&hdr)?;
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data)
                .await
                .map_err(|e| closed("option data", e))?;
            let out = self
                .option(
                    wr,
                    option,
                    &data,
                    no_zeroes,
                    &mut structured,
                    &mut base_allocation,
                )
                .await?;
            match out {
                OptOutcome::Continue => {}
                OptOutcome::Close => return Ok(None),
                OptOutcome::Transmission(s) => return Ok(Some(s)),
            }
        }
        Err(Error::protocol("too many options"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn option<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
        structured: &mut bool,
        base_allocation: &mut bool,
    ) -> Result<OptOutcome> {
        let reply = |reply_type: u32, data: Bytes| OptionReply {
            option,
            reply_type,
            data,
        };
        let err = |reply_type: u32, msg: &str| OptionReply {
            option,
            reply_type,
            data: Bytes::copy_from_slice(msg.as_bytes()),
        };
        let mut out = BytesMut::new();
        let mut outcome = OptOutcome::Continue;
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(data).unwrap_or("\u{fffd}");
                let Some(src) = self.exports.get(name) else {
                    // The protocol has no error reply here: close.
                    return Err(Error::invalid(format!(
                        "unknown export {:?}",
                        frame::sanitize(data)
                    )));
                };
                out.put_u64(src.size());
                out.put_u16(TRANSMISSION_FLAGS);
                if !no_zeroes {
                    out.put_slice(&[0u8; 124]);
                }
                outcome = OptOutcome::Transmission(Session {
                    source: src.clone(),
                    structured: *structured,
                    base_allocation: *base_allocation,
                });
            }
            OPT_ABORT => {
                reply(REP_ACK, Bytes::new()).encode(&mut out);
                outcome = OptOutcome::Close;
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut names: Vec<&String> = self.exports.keys().collect();
                    names.sort();
                    for n in names {
                        reply(REP_SERVER, frame::server_reply_data(n)).encode(&mut out);
                    }
                    reply(REP_ACK, Bytes::new()).encode(&mut out);
                } else {
                    err(REP_ERR_INVALID, "NBD_OPT_LIST takes no data").encode(&mut out);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    *structured = true;
                    reply(REP_ACK, Bytes::new()).encode(&mut out);
                } else {
                    err(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data").encode(&mut out);
                }
            }
            OPT_INFO | OPT_GO => match frame::parse_go_data(data) {
                Err(e) => err(REP_ERR_INVALID, &format!("{e:?}")).encode(&mut out),
                Ok((name, _infos)) => match self.exports.get(&name) {
                    None => err(REP_ERR_UNKNOWN, "no such export").encode(&mut out),
                    Some(src) => {
                        reply(
                            REP_INFO,
                            frame::info_export_data(src.size(), TRANSMISSION_FLAGS),
                        )
                        .encode(&mut out);
                        let pref = src.preferred_block_size().clamp(1, MAX_REQUEST);
                        reply(REP_INFO, frame::info_block_size_data(1, pref, MAX_REQUEST))
                            .encode(&mut out);
                        reply(REP_ACK, Bytes::new()).encode(&mut out);
                        if option == OPT_GO {
                            outcome = OptOutcome::Transmission(Session {
                                source: src.clone(),
                                structured: *structured,
                                base_allocation: *base_allocation,
                            });
                        }
                    }
                },
            },
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                match frame::parse_meta_context_data(data) {
                    Err(e) => err(REP_ERR_INVALID, &format!("{e:?}")).encode(&mut out),
                    Ok(_) if option == OPT_SET_META_CONTEXT && !*structured => err(
                        REP_ERR_INVALID,
                        "negotiate structured replies before meta contexts",
                    )
                    .encode(&mut out),
                    Ok((name, queries)) if self.exports.contains_key(&name) => {
                        let list = option == OPT_LIST_META_CONTEXT;
                        let wanted = queries
                            .iter()
                            .any(|q| q == CONTEXT_BASE_ALLOCATION || (list && (q == "base:")))
                            || (list && queries.is_empty());
                        if option == OPT_SET_META_CONTEXT {
                            *base_allocation = wanted;
                        }
                        if wanted {
                            reply(
                                REP_META_CONTEXT,
                                frame::meta_context_reply_data(
                                    if list { 0 } else { BASE_ALLOCATION_ID },
                                    CONTEXT_BASE_ALLOCATION,
                                ),
                            )
                            .encode(&mut out);
                        }
                        reply(REP_ACK, Bytes::new()).encode(&mut out);
                    }
                    Ok(_) => err(REP_ERR_UNKNOWN, "no such export").encode(&mut out),
                }
            }
            OPT_STARTTLS => err(REP_ERR_POLICY, "TLS is not offered").encode(&mut out),
            _ => err(REP_ERR_UNSUP, "option not supported").encode(&mut out),
        }
        write_all(wr, &out).await?;
        Ok(outcome)
    }

    async fn transmission<R, W>(&self, mut rd: R, mut wr: W, s: Session) -> Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(self.options.max_in_flight.max(1) * 2);
        let write_timeout = self.options.write_timeout;
        let writer = tokio::spawn(async move {
            while let Some(parts) = rx.recv().await {
                let w = async {
                    for p in &parts {
                        wr.write_all(p).await?;
                    }
                    wr.flush().await
                };
                match tokio::time::timeout(write_timeout, w).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(Error::io("writing an NBD reply", e)),
                    Err(_) => return Err(Error::new(ErrorKind::Timeout, "client stopped reading")),
                }
            }
            let _ = wr.shutdown().await;
            Ok(())
        });
        let sem = Arc::new(Semaphore::new(self.options.max_in_flight.max(1)));
        let s = Arc::new(s);
        let result = loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            if let Err(e) = rd.read_exact(&mut hdr).await {
                break Err(closed("request header", e));
            }
            let req = match Request::decode(&hdr) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            if req.command == CMD_DISC {
                break Ok(());
            }
            if req.command == CMD_WRITE {
                // Read and drop the payload, then refuse.
                if req.length > MAX_REQUEST {
                    break Err(Error::protocol("write payload too large"));
                }
                let mut sink = vec![0u8; req.length as usize];
                if let Err(e) = rd.read_exact(&mut sink).await {
                    break Err(closed("write payload", e));
                }
            }
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break Ok(());
            };
            let tx = tx.clone();
            let s = s.clone();
            tokio::spawn(async move {
                let parts = answer(&s, req).await;
                let _ = tx.send(parts).await;
                drop(permit);
            });
        };
        // Let in-flight requests finish (DISC: the spec says complete them), then close.
        let _ = sem
            .acquire_many(self.options.max_in_flight.max(1) as u32)
            .await;
        drop(tx);
        let w = writer.await;
        match (result, w) {
            (Err(e), _) => {
                if e.kind() == ErrorKind::Closed {
                    Ok(()) // client went away
                } else {
                    Err(e)
                }
            }
            (Ok(()), Ok(r)) => r,
            (Ok(()), Err(_)) => Ok(()),
        }
    }
}

fn closed(what: &str, e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Closed, format!("reading {what}"), e)
}

async fn write_all<W: AsyncWrite + Unpin>(wr: &mut W, b: &[u8]) -> Result<()> {
    wr.write_all(b)
        .await
        .map_err(|e| Error::io("writing to the NBD client", e))?;
    wr.flush()
        .await
        .map_err(|e| Error::io("writing to the NBD client", e))
}

fn error_reply(s: &Session, cookie: u64, code: u32, msg: &str) -> Vec<Bytes> {
    let mut b = BytesMut::new();
    if s.structured {
        let mut m = msg.to_string();
        m.truncate(1024);
        Reply::Chunk(Chunk {
            flags: REPLY_FLAG_DONE,
            cookie,
            payload: ChunkPayload::Error { code, message: m },
        })
        .encode(&mut b);
    } else {
        Reply::Simple {
            cookie,
            error: code,
        }
        .encode(&mut b);
    }
    vec![b.freeze()]
}

fn ok_reply(s: &Session, cookie: u64) -> Vec<Bytes> {
    let mut b = BytesMut::new();
    if s.structured {
        Reply::Chunk(Chunk {
            flags: REPLY_FLAG_DONE,
            cookie,
            payload: ChunkPayload::None,
        })
        .encode(&mut b);
    } else {
        Reply::Simple { cookie, error: 0 }.encode(&mut b);
    }
    vec![b.freeze()]
}

fn in_range(size: u64, offset: u64, len: u32) -> bool {
    len > 0
        && offset
            .checked_add(u64::from(len))
            .is_some_and(|e| e <= size)
}

/// The reply messages for one request.
async fn answer(s: &Session, req: Request) -> Vec<Bytes> {
    let cookie = req.cookie;
    let size = s.source.size();
    match req.command {
        CMD_READ => {
            if !in_range(size, req.offset, req.length) || req.length > MAX_REQUEST {
                return error_reply(s, cookie, EINVAL, "read outside the export or too large");
            }
            let src = s.source.clone();
            let (off, len) = (req.offset, req.length);
            let pieces = match tokio::task::spawn_blocking(move || src.read(off, len)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(offset = off, len, error = %e, "NBD read failed");
                    return error_reply(s, cookie, EIO, &e.to_string());
                }
                Err(_) => return error_reply(s, cookie, EIO, "read worker failed"),
            };
            let total: u64 = pieces.iter().map(Piece::len).sum();
            if total != u64::from(len) || pieces.iter().any(Piece::is_empty) {
                return error_reply(s, cookie, EIO, "internal error: source returned a bad read");
            }
            read_reply(s, cookie, off, len, pieces)
        }
        CMD_BLOCK_STATUS => {
            if !s.structured || !s.base_allocation {
                return error_reply(s, cookie, EINVAL, "no metadata context negotiated");
            }
            if !in_range(size, req.offset, req.length) {
                return error_reply(s, cookie, EINVAL, "range outside the export");
            }
            let ext = match s.source.extents(req.offset, req.length) {
                Ok(e) => e,
                Err(e) => return error_reply(s, cookie, EIO, &e.to_string()),
            };
            let mut descriptors: Vec<Descriptor> = ext
                .into_iter()
                .filter(|(l, _)| *l > 0)
                .map(|(length, zero)| Descriptor {
                    length,
                    flags: if zero {
                        crate::extent::BlockStatus::STATE_HOLE
                            | crate::extent::BlockStatus::STATE_ZERO
                    } else {
                        0
                    },
                })
                .collect();
            if descriptors.is_empty() {
                return error_reply(s, cookie, EIO, "no extents");
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                descriptors.truncate(1);
            }
            let mut b = BytesMut::new();
            Reply::Chunk(Chunk {
                flags: REPLY_FLAG_DONE,
                cookie,
                payload: ChunkPayload::BlockStatus {
                    context_id: BASE_ALLOCATION_ID,
                    descriptors,
                },
            })
            .encode(&mut b);
            vec![b.freeze()]
        }
        CMD_FLUSH => ok_reply(s, cookie),
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
            error_reply(s, cookie, EPERM, "the export is read-only")
        }
        _ => error_reply(s, cookie, EINVAL, "command not supported"),
    }
}

fn read_reply(s: &Session, cookie: u64, off: u64, len: u32, pieces: Vec<Piece>) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(pieces.len() * 2);
    if !s.structured {
        let mut b = BytesMut::new();
        Reply::Simple { cookie, error: 0 }.encode(&mut b);
        parts.push(b.freeze());
        for p in pieces {
            match p {
                Piece::Data(d) => parts.push(d),
                Piece::Zero(n) => parts.push(Bytes::from(vec![0u8; n as usize])),
            }
        }
        let _ = len;
        return parts;
    }
    let n = pieces.len();
    let mut pos = off;
    for (i, p) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let mut b = BytesMut::new();
        match p {
            Piece::Data(d) => {
                let l = d.len() as u32;
                frame::encode_data_chunk_header(&mut b, flags, cookie, pos, l);
                parts.push(b.freeze());
                parts.push(d);
                pos += u64::from(l);
            }
            Piece::Zero(l) => {
                Reply::Chunk(Chunk {
                    flags,
                    cookie,
                    payload: ChunkPayload::OffsetHole {
                        offset: pos,
                        length: l,
                    },
                })
                .encode(&mut b);
                parts.push(b.freeze());
                pos += u64::from(l);
            }
        }
    }
    parts
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
mod tests {
    use super::*;
    use crate::nbd::{Client, ConnectOptions, NbdAddr};

    fn sample() -> Vec<u8> {
        let mut v = vec![0u8; 4 << 20];
        for (i, b) in v[..300_000].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        v[(3 << 20) + 5] = 9;
        v
    }

    async fn start(data: Vec<u8>) -> (tempfile::TempDir, PathBuf, watch::Sender<bool>) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sock");
        let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
        exports.insert("vda".into(), Arc::new(MemorySource::new(data, 65536)));
        let server = Arc::new(Server::new(exports, ServerOptions::default()));
        let l = Server::bind_unix(&path).expect("bind");
        let (tx, rx) = watch::channel(false);
        tokio::spawn(server.serve(l, Some(path.clone()), rx));
        (dir, path, tx)
    }

    #[tokio::test]
    async fn own_client_reads_and_block_status() {
        let data = sample();
        let (_d, path, stop) = start(data.clone()).await;
        let c = Client::connect(
            &NbdAddr::Unix(path.clone()),
            ConnectOptions {
                export: "vda".into(),
                meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
                ..ConnectOptions::default()
            },
        )
        .await
        .expect("connect");
        assert_eq!(c.size(), data.len() as u64);
        assert!(c.is_read_only());
        // Many concurrent reads across data and holes.
        let mut reads = Vec::new();
        for i in 0..64u64 {
            let c = c.clone();
            reads.push(tokio::spawn(async move {
                let off = i * 65_000;
                (off, c.read(off, 70_000).await)
            }));
        }
        for r in reads {
            let (off, got) = r.await.expect("join");
            let got = got.expect("read");
            assert_eq!(&got[..], &data[off as usize..off as usize + 70_000]);
        }
        let all = c.read(0, data.len() as u32).await.expect("read all");
        assert_eq!(&all[..], &data[..]);
        let bs = c
            .block_status(CONTEXT_BASE_ALLOCATION, 0, data.len() as u64)
            .await
            .expect("bs");
        let ranges = crate::extent::data_ranges(&bs);
        let v: Vec<(u64, u64)> = ranges.iter().collect();
        assert_eq!(v, vec![(0, 327_680), (3 << 20, (3 << 20) + 65536)]);
        // Writes are refused; the connection stays usable.
        let e = c.write(0, b"x").await.expect_err("read-only");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::InvalidArgument
                    | ErrorKind::ServerError { code: 1 }
                    | ErrorKind::Unsupported
            ),
            "{e:?}"
        );
        // Out of range.
        assert!(c.read(data.len() as u64 - 1, 2).await.is_err());
        assert_eq!(&c.read(5, 5).await.expect("still up")[..], &data[5..10]);
        c.disconnect().await.expect("disc");
        // Unknown export.
        let e = Client::connect(
            &NbdAddr::Unix(path),
            ConnectOptions {
                export: "nope".into(),
                ..ConnectOptions::default()
            },
        )
        .await;
        assert!(e.is_err());
        let _ = stop.send(true);
    }

    /// Hostile bytes: the server answers or disconnects, never panics, and keeps serving.
    #[tokio::test]
    async fn malformed_input_does_not_kill_the_server() {
        let data = sample();
        let (_d, path, stop) = start(data.clone()).await;
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0, 0, 0],
            vec![0, 0, 0, 3, 1, 2, 3],
            {
                let mut v = vec![0, 0, 0, 3];
                v.extend_from_slice(&IHAVEOPT.to_be_bytes());
                v.extend_from_slice(&OPT_GO.to_be_bytes());
                v.extend_from_slice(&u32::MAX.to_be_bytes());
                v
            },
            {
                let mut v = vec![0, 0, 0, 3];
                let mut b = BytesMut::new();
                frame::encode_option(&mut b, OPT_GO, &[0, 0, 0, 9, 1]).expect("enc");
                frame::encode_option(&mut b, OPT_SET_META_CONTEXT, &[0xff; 12]).expect("enc");
                frame::encode_option(&mut b, 99, &[1, 2]).expect("enc");
                frame::encode_option(
                    &mut b,
                    OPT_GO,
                    &frame::option_go_data("vda", &[]).expect("go"),
                )
                .expect("enc");
                v.extend_from_slice(&b);
                // Transmission: a huge write, a bad magic.
                let mut r = BytesMut::new();
                Request {
                    flags: 0,
                    command: CMD_READ,
                    cookie: 1,
                    offset: u64::MAX - 2,
                    length: 100,
                }
                .encode(&mut r);
                Request {
                    flags: 0,
                    command: 77,
                    cookie: 2,
                    offset: 0,
                    length: 0,
                }
                .encode(&mut r);
                Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: 3,
                    offset: 0,
                    length: u32::MAX,
                }
                .encode(&mut r);
                v.extend_from_slice(&r);
                v
            },
        ];
        for g in garbage {
            let mut s = tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect");
            let _ = s.write_all(&g).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        }
        let c = Client::connect(
            &NbdAddr::Unix(path),
            ConnectOptions {
                export: "vda".into(),
                ..ConnectOptions::default()
            },
        )
        .await
        .expect("server still serves");
        assert_eq!(&c.read(0, 10).await.expect("read")[..], &data[..10]);
        let _ = stop.send(true);
    }
}
