//! The request methods of [`Client`]: read, block status, write, write zeroes, flush and disconnect.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::oneshot;

use super::conn::{lock, Collector, Pending, Value, WireMsg};
use super::{Client, MAX_STATUS_REQUEST};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::BlockStatus;
use crate::nbd::frame::{BlockStatusCollector, EmptyCollector, ReadAssembler, Request};
use crate::nbd::proto::*;

impl Client {
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
