//! Connection machinery: per-request collectors, the pending-request map, the shared state and the reader and writer tasks.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::handshake::ExportInfo;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::BlockStatus;
use crate::nbd::frame::{self, BlockStatusCollector, ChunkPayload, EmptyCollector, FrameError};
use crate::nbd::frame::{ReadAssembler, Reply};

pub(super) enum Collector {
    Read(ReadAssembler),
    Status(BlockStatusCollector),
    Empty(EmptyCollector),
}

pub(super) enum Value {
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

pub(super) struct Pending {
    pub(super) collector: Collector,
    pub(super) tx: oneshot::Sender<Result<Value>>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

pub(super) enum WireMsg {
    Data(Bytes),
    Disconnect(Bytes, oneshot::Sender<()>),
}

pub(super) struct Shared {
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    pub(super) broken: Mutex<Option<String>>,
    pub(super) tasks: Mutex<Vec<AbortHandle>>,
    pub(super) sem: Arc<Semaphore>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (maps and options) stays consistent for our purposes.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn closed_error(&self) -> Option<Error> {
        lock(&self.broken)
            .as_ref()
            .map(|m| Error::new(ErrorKind::Closed, format!("NBD connection is closed: {m}")))
    }

    /// Marks the connection broken, fails every pending request with `kind`, stops tasks.
    pub(super) fn break_all(&self, kind: ErrorKind, msg: &str) {
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

pub(super) struct Inner {
    pub(super) info: ExportInfo,
    pub(super) contexts: Vec<(String, u32)>,
    pub(super) timeout: Duration,
    pub(super) max_in_flight: usize,
    pub(super) next_cookie: AtomicU64,
    pub(super) tx: mpsc::UnboundedSender<WireMsg>,
    pub(super) shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

// ========================================================================= tasks

pub(super) async fn reader_loop<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>) {
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

pub(super) async fn writer_loop<W: AsyncWrite + Unpin>(
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
