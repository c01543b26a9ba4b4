//! Per-request reassembly on the client: the collectors that check each reply chunk against
//! the request it answers ([`ReadAssembler`], [`BlockStatusCollector`], [`EmptyCollector`]).

use bytes::{Bytes, BytesMut};

use super::reply::ChunkPayload;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{BlockStatus, RangeSet};
use crate::nbd::proto::*;

fn server_error(code: u32, message: &str, what: &str) -> Error {
    let name = match code {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    };
    let msg = if message.is_empty() {
        format!("{what}: server error {code} ({name})")
    } else {
        format!("{what}: server error {code} ({name}): {message}")
    };
    Error::new(ErrorKind::ServerError { code }, msg)
}

/// Records the first error chunk of a reply.
#[derive(Debug, Default)]
struct ErrorSlot(Option<(u32, String)>);

impl ErrorSlot {
    fn set(&mut self, code: u32, message: String) {
        if self.0.is_none() {
            self.0 = Some((code, message));
        }
    }
}

fn check_in(offset: u64, len: u64, start: u64, count: u64, what: &str) -> Result<()> {
    let end = start
        .checked_add(count)
        .ok_or_else(|| Error::protocol("chunk offset overflows"))?;
    if start < offset || end > offset + len {
        return Err(Error::protocol(format!(
            "{what} [{start}, {end}) lies outside the request [{offset}, {})",
            offset + len
        )));
    }
    Ok(())
}

/// Reassembles the structured reply to one `NBD_CMD_READ`: data chunks are copied into
/// place, holes are zero-filled, overlap and out-of-range chunks are rejected, and
/// [`ReadAssembler::finish`] insists on full coverage.
#[derive(Debug)]
pub struct ReadAssembler {
    offset: u64,
    len: u32,
    buf: Option<BytesMut>,
    whole: Option<Bytes>,
    covered: RangeSet,
    error: ErrorSlot,
}

impl ReadAssembler {
    /// For a read of `len` bytes at `offset`.
    pub fn new(offset: u64, len: u32) -> Self {
        ReadAssembler {
            offset,
            len,
            buf: None,
            whole: None,
            covered: RangeSet::new(),
            error: ErrorSlot::default(),
        }
    }

    fn claim(&mut self, start: u64, count: u64, what: &str) -> Result<usize> {
        check_in(self.offset, self.len as u64, start, count, what)?;
        if self.covered.overlaps(start, start + count) {
            return Err(Error::protocol(format!(
                "{what} at {start} overlaps an earlier chunk"
            )));
        }
        self.covered.insert(start, start + count);
        Ok((start - self.offset) as usize)
    }

    fn buffer(&mut self) -> &mut BytesMut {
        let len = self.len as usize;
        let whole = self.whole.take();
        self.buf.get_or_insert_with(|| {
            let mut b = BytesMut::zeroed(len);
            if let Some(w) = whole {
                // A previous chunk covered everything; overlap checks make this unreachable,
                // but copying keeps the assembler correct regardless.
                let n = w.len().min(len);
                b[..n].copy_from_slice(&w[..n]);
            }
            b
        })
    }

    /// Accepts one chunk of the reply.
    pub fn feed(&mut self, payload: ChunkPayload) -> Result<()> {
        match payload {
            ChunkPayload::None => Ok(()),
            ChunkPayload::OffsetData { offset, data } => {
                let at = self.claim(offset, data.len() as u64, "data chunk")?;
                if at == 0 && data.len() == self.len as usize && self.buf.is_none() {
                    self.whole = Some(data);
                } else {
                    let b = self.buffer();
                    b[at..at + data.len()].copy_from_slice(&data);
                }
                Ok(())
            }
            ChunkPayload::OffsetHole { offset, length } => {
                // The buffer starts zeroed, so a hole needs no copying.
                self.claim(offset, length as u64, "hole chunk")?;
                Ok(())
            }
            ChunkPayload::BlockStatus { .. } => {
                Err(Error::protocol("block status chunk in reply to a read"))
            }
            ChunkPayload::Error { code, message } => {
                self.error.set(code, message);
                Ok(())
            }
            ChunkPayload::ErrorOffset {
                code,
                message,
                offset,
            } => {
                check_in(self.offset, self.len as u64, offset, 1, "error offset")?;
                self.error
                    .set(code, format!("at offset {offset}: {message}"));
                Ok(())
            }
        }
    }

    /// The data, once the final chunk was fed.
    pub fn finish(mut self) -> Result<Bytes> {
        let what = format!("read of {} bytes at {}", self.len, self.offset);
        if let Some((code, msg)) = self.error.0.take() {
            return Err(server_error(code, &msg, &what));
        }
        let end = self.offset + self.len as u64;
        if self.len > 0 && !self.covered.contains_range(self.offset, end) {
            return Err(Error::protocol(format!(
                "{what}: the server claimed success but covered only {} bytes",
                self.covered.total_len()
            )));
        }
        if let Some(w) = self.whole.take() {
            return Ok(w);
        }
        Ok(self
            .buf
            .take()
            .map(BytesMut::freeze)
            .unwrap_or_else(|| Bytes::from(vec![0u8; self.len as usize])))
    }
}

/// Collects the reply to one `NBD_CMD_BLOCK_STATUS` for one wanted context.
#[derive(Debug)]
pub struct BlockStatusCollector {
    offset: u64,
    len: u32,
    want: u32,
    known: Vec<u32>,
    seen: Vec<u32>,
    extents: Option<Vec<BlockStatus>>,
    error: ErrorSlot,
}

impl BlockStatusCollector {
    /// For a request of `len` bytes at `offset`; `want` is the context id whose
    /// descriptors are returned, `known` all ids granted in the handshake.
    pub fn new(offset: u64, len: u32, want: u32, known: Vec<u32>) -> Self {
        BlockStatusCollector {
            offset,
            len,
            want,
            known,
            seen: Vec::new(),
            extents: None,
            error: ErrorSlot::default(),
        }
    }

    /// Accepts one chunk of the reply.
    pub fn feed(&mut self, payload: ChunkPayload) -> Result<()> {
        match payload {
            ChunkPayload::None => Ok(()),
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => {
                if !self.known.contains(&context_id) {
                    return Err(Error::protocol(format!(
                        "block status for unknown context id {context_id}"
                    )));
                }
                if self.seen.contains(&context_id) {
                    return Err(Error::protocol(format!(
                        "two block status chunks for context id {context_id}"
                    )));
                }
                self.seen.push(context_id);
                if context_id != self.want {
                    return Ok(());
                }
                let end = self.offset + self.len as u64;
                let mut cur = self.offset;
                let mut out = Vec::with_capacity(descriptors.len());
                for d in descriptors {
                    if cur >= end {
                        return Err(Error::protocol(format!(
                            "block status descriptor starts at {cur}, beyond the request end {end}"
                        )));
                    }
                    // The last descriptor may extend past the request; clip it.
                    let length = (d.length as u64).min(end - cur);
                    out.push(BlockStatus {
                        offset: cur,
                        length,
                        flags: d.flags,
                    });
                    cur += length;
                }
                self.extents = Some(out);
                Ok(())
            }
            ChunkPayload::OffsetData { .. } | ChunkPayload::OffsetHole { .. } => Err(
                Error::protocol("read data chunk in reply to a block status request"),
            ),
            ChunkPayload::Error { code, message } => {
                self.error.set(code, message);
                Ok(())
            }
            ChunkPayload::ErrorOffset {
                code,
                message,
                offset,
            } => {
                check_in(self.offset, self.len as u64, offset, 1, "error offset")?;
                self.error
                    .set(code, format!("at offset {offset}: {message}"));
                Ok(())
            }
        }
    }

    /// The (clipped, non-empty) descriptors of the wanted context.
    pub fn finish(mut self) -> Result<Vec<BlockStatus>> {
        let what = format!("block status of {} bytes at {}", self.len, self.offset);
        if let Some((code, msg)) = self.error.0.take() {
            return Err(server_error(code, &msg, &what));
        }
        match self.extents.take() {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(Error::protocol(format!(
                "{what}: no descriptors for the requested context"
            ))),
        }
    }
}

/// Collects the reply to a command without reply data (write, flush, write zeroes).
#[derive(Debug)]
pub struct EmptyCollector {
    offset: u64,
    len: u32,
    error: ErrorSlot,
}

impl EmptyCollector {
    /// For a request covering `len` bytes at `offset` (0, 0 for flush).
    pub fn new(offset: u64, len: u32) -> Self {
        EmptyCollector {
            offset,
            len,
            error: ErrorSlot::default(),
        }
    }

    /// Accepts one chunk of the reply.
    pub fn feed(&mut self, payload: ChunkPayload) -> Result<()> {
        match payload {
            ChunkPayload::None => Ok(()),
            ChunkPayload::Error { code, message } => {
                self.error.set(code, message);
                Ok(())
            }
            ChunkPayload::ErrorOffset {
                code,
                message,
                offset,
            } => {
                check_in(
                    self.offset,
                    (self.len as u64).max(1),
                    offset,
                    1,
                    "error offset",
                )?;
                self.error
                    .set(code, format!("at offset {offset}: {message}"));
                Ok(())
            }
            _ => Err(Error::protocol(
                "data or block status chunk in reply to a command without reply data",
            )),
        }
    }

    /// Success unless an error chunk arrived.
    pub fn finish(mut self) -> Result<()> {
        match self.error.0.take() {
            Some((code, msg)) => Err(server_error(
                code,
                &msg,
                &format!("request of {} bytes at {}", self.len, self.offset),
            )),
            None => Ok(()),
        }
    }
}

/// The error for a simple reply carrying a non-zero error value.
pub fn simple_reply_error(code: u32, what: &str) -> Error {
    server_error(code, "", what)
}
