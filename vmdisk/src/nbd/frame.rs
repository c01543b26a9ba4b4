//! NBD message framing: pure encoders and decoders, no I/O.
//!
//! Decoding follows mini-redis: [`check_reply`] / [`check_option_reply`] look at a byte
//! buffer and return the length of the next complete message (or
//! [`FrameError::Incomplete`]); [`parse_reply`] / [`parse_option_reply`] then decode exactly
//! that many bytes. Everything a server sends is validated here or in the per-request
//! collectors ([`ReadAssembler`], [`BlockStatusCollector`], [`EmptyCollector`]), which
//! check chunks against the request they answer. No function panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::proto::*;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{BlockStatus, RangeSet};

/// Largest structured reply payload accepted: a 32 MiB read chunk plus its offset, with
/// room to spare. Bigger lengths are treated as hostile rather than buffered.
pub const MAX_REPLY_PAYLOAD: u32 = 33 * 1024 * 1024;
/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_REPLY_PAYLOAD: u32 = 64 * 1024;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// More bytes are needed; `needed` is the total frame length when already known.
    Incomplete {
        /// Total length of the frame, if the header was complete enough to tell.
        needed: Option<usize>,
    },
    /// The bytes can never form a valid message.
    Invalid(String),
}

impl FrameError {
    fn invalid(msg: impl Into<String>) -> Self {
        FrameError::Invalid(msg.into())
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Incomplete { .. } => Error::protocol("truncated NBD message"),
            FrameError::Invalid(m) => Error::protocol(m),
        }
    }
}

/// Turns server-supplied bytes into a printable, bounded string.
pub fn sanitize(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STRING_LEN)]);
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(512)
        .collect()
}

// ===================================================================== handshake

/// Encodes a client option: `IHAVEOPT`, option (u32), data length (u32), data.
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| Error::invalid("option data too long"))?;
    buf.put_u64(IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(len);
    buf.put_slice(data);
    Ok(())
}

fn put_string32(buf: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > MAX_STRING_LEN || s.contains('\0') {
        return Err(Error::invalid(format!(
            "string of {} bytes is too long or contains NUL",
            s.len()
        )));
    }
    buf.put_u32(s.len() as u32);
    buf.put_slice(s.as_bytes());
    Ok(())
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: name length (u32), name, number of info
/// requests (u16), info types (u16 each).
pub fn option_go_data(export: &str, info_requests: &[u16]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    put_string32(&mut v, export)?;
    let n = u16::try_from(info_requests.len()).map_err(|_| Error::invalid("too many infos"))?;
    v.put_u16(n);
    for i in info_requests {
        v.put_u16(*i);
    }
    Ok(v)
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`: name length (u32),
/// name, number of queries (u32), then each query as length (u32) + string.
pub fn option_meta_context_data(export: &str, queries: &[String]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    put_string32(&mut v, export)?;
    let n = u32::try_from(queries.len()).map_err(|_| Error::invalid("too many queries"))?;
    v.put_u32(n);
    for q in queries {
        put_string32(&mut v, q)?;
    }
    Ok(v)
}

/// One option reply: magic (u64), option (u32), reply type (u32), length (u32), data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option this replies to.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Reply data.
    pub data: Bytes,
}

impl OptionReply {
    /// True if the reply type has the error bit set.
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }

    /// Encodes the reply (used by tests and test servers).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(OPT_REPLY_MAGIC);
        buf.put_u32(self.option);
        buf.put_u32(self.reply_type);
        buf.put_u32(self.data.len() as u32);
        buf.put_slice(&self.data);
    }
}

/// Length of the complete option reply at the start of `buf`.
pub fn check_option_reply(buf: &[u8]) -> Result<usize, FrameError> {
    let mut b = buf;
    if b.len() >= 8 && b.get_u64() != OPT_REPLY_MAGIC {
        return Err(FrameError::invalid("bad option reply magic"));
    }
    if buf.len() < OPT_REPLY_HEADER_LEN {
        return Err(FrameError::Incomplete { needed: None });
    }
    let mut h = &buf[16..20];
    let len = h.get_u32();
    if len > MAX_OPTION_REPLY_PAYLOAD {
        return Err(FrameError::invalid(format!(
            "option reply of {len} bytes exceeds the limit"
        )));
    }
    let total = OPT_REPLY_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            needed: Some(total),
        });
    }
    Ok(total)
}

/// Decodes a frame whose length [`check_option_reply`] returned.
pub fn parse_option_reply(mut frame: Bytes) -> Result<OptionReply, FrameError> {
    let n = check_option_reply(&frame)?;
    if n != frame.len() {
        return Err(FrameError::invalid("option reply frame length mismatch"));
    }
    frame.advance(8);
    let option = frame.get_u32();
    let reply_type = frame.get_u32();
    frame.advance(4);
    Ok(OptionReply {
        option,
        reply_type,
        data: frame,
    })
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size (u64) and transmission flags (u16).
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size (u32 each).
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// Any other info type (ignored, as the spec requires).
    Other(u16),
}

/// Parses the data of an `NBD_REP_INFO` reply.
pub fn parse_info(data: &[u8]) -> Result<Info, FrameError> {
    let mut b = data;
    if b.len() < 2 {
        return Err(FrameError::invalid("NBD_REP_INFO shorter than 2 bytes"));
    }
    match b.get_u16() {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(FrameError::invalid(format!(
                    "NBD_INFO_EXPORT length {} != 12",
                    data.len()
                )));
            }
            Ok(Info::Export {
                size: b.get_u64(),
                flags: b.get_u16(),
            })
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(FrameError::invalid(format!(
                    "NBD_INFO_BLOCK_SIZE length {} != 14",
                    data.len()
                )));
            }
            let (min, preferred, max) = (b.get_u32(), b.get_u32(), b.get_u32());
            if min == 0 || !min.is_power_of_two() || max < min || preferred < min {
                return Err(FrameError::invalid(format!(
                    "inconsistent block sizes min {min} preferred {preferred} max {max}"
                )));
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// Parses the data of an `NBD_REP_META_CONTEXT` reply: context id (u32) and name.
pub fn parse_meta_context(data: &[u8]) -> Result<(u32, String), FrameError> {
    let mut b = data;
    if b.len() < 5 || b.len() > 4 + MAX_STRING_LEN {
        return Err(FrameError::invalid("NBD_REP_META_CONTEXT of bad length"));
    }
    let id = b.get_u32();
    let name = std::str::from_utf8(b)
        .map_err(|_| FrameError::invalid("meta context name is not UTF-8"))?;
    Ok((id, name.to_owned()))
}

// ================================================================== transmission

/// A request header (the data of `NBD_CMD_WRITE` follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Opaque value echoed in the reply (the spec's "handle").
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Appends the 28-byte header.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
    }

    /// Decodes a 28-byte header (for servers and tests).
    pub fn decode(buf: &[u8]) -> Result<Request, FrameError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Err(FrameError::Incomplete {
                needed: Some(REQUEST_HEADER_LEN),
            });
        }
        let mut b = buf;
        if b.get_u32() != REQUEST_MAGIC {
            return Err(FrameError::invalid("bad request magic"));
        }
        Ok(Request {
            flags: b.get_u16(),
            command: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }
}

/// A block status descriptor as sent: length (u32, non-zero) and status flags (u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Extent length.
    pub length: u32,
    /// Status flags.
    pub flags: u32,
}

/// Payload of a structured reply chunk, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// `NBD_REPLY_TYPE_NONE`: empty, only valid with `NBD_REPLY_FLAG_DONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: offset (u64) then at least one data byte.
    OffsetData {
        /// Absolute offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: offset (u64), non-zero size (u32) reading as zeroes.
    OffsetHole {
        /// Absolute offset.
        offset: u64,
        /// Hole size.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id (u32) then one or more descriptors.
    BlockStatus {
        /// Metadata context id from the handshake.
        context_id: u32,
        /// Consecutive descriptors starting at the request offset.
        descriptors: Vec<Descriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR` or an unknown type with bit 15 set: error (u32, non-zero),
    /// message length (u16), message.
    Error {
        /// NBD error value.
        code: u32,
        /// Message, sanitised.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: as `Error`, then the offset (u64).
    ErrorOffset {
        /// NBD error value.
        code: u32,
        /// Message, sanitised.
        message: String,
        /// Offset the error applies to.
        offset: u64,
    },
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Typed payload.
    pub payload: ChunkPayload,
}

impl Chunk {
    /// True if this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// A transmission-phase reply message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply: magic (u32), error (u32), cookie (u64); never carries data here,
    /// because structured replies are always negotiated.
    Simple {
        /// Cookie of the request answered.
        cookie: u64,
        /// NBD error value, 0 for success.
        error: u32,
    },
    /// A structured reply chunk.
    Chunk(Chunk),
}

impl Reply {
    /// The cookie this message answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Chunk(c) => c.cookie,
        }
    }

    /// Encodes the message (for tests and test servers).
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Reply::Simple { cookie, error } => {
                buf.put_u32(SIMPLE_REPLY_MAGIC);
                buf.put_u32(*error);
                buf.put_u64(*cookie);
            }
            Reply::Chunk(c) => {
                let mut p = BytesMut::new();
                let ty = match &c.payload {
                    ChunkPayload::None => REPLY_TYPE_NONE,
                    ChunkPayload::OffsetData { offset, data } => {
                        p.put_u64(*offset);
                        p.put_slice(data);
                        REPLY_TYPE_OFFSET_DATA
                    }
                    ChunkPayload::OffsetHole { offset, length } => {
                        p.put_u64(*offset);
                        p.put_u32(*length);
                        REPLY_TYPE_OFFSET_HOLE
                    }
                    ChunkPayload::BlockStatus {
                        context_id,
                        descriptors,
                    } => {
                        p.put_u32(*context_id);
                        for d in descriptors {
                            p.put_u32(d.length);
                            p.put_u32(d.flags);
                        }
                        REPLY_TYPE_BLOCK_STATUS
                    }
                    ChunkPayload::Error { code, message } => {
                        p.put_u32(*code);
                        p.put_u16(message.len() as u16);
                        p.put_slice(message.as_bytes());
                        REPLY_TYPE_ERROR
                    }
                    ChunkPayload::ErrorOffset {
                        code,
                        message,
                        offset,
                    } => {
                        p.put_u32(*code);
                        p.put_u16(message.len() as u16);
                        p.put_slice(message.as_bytes());
                        p.put_u64(*offset);
                        REPLY_TYPE_ERROR_OFFSET
                    }
                };
                buf.put_u32(STRUCTURED_REPLY_MAGIC);
                buf.put_u16(c.flags);
                buf.put_u16(ty);
                buf.put_u64(c.cookie);
                buf.put_u32(p.len() as u32);
                buf.put_slice(&p);
            }
        }
    }
}

/// Length of the complete reply message at the start of `buf`, or why there is none.
pub fn check_reply(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Incomplete { needed: None });
    }
    let mut b = buf;
    match b.get_u32() {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_LEN {
                Err(FrameError::Incomplete {
                    needed: Some(SIMPLE_REPLY_LEN),
                })
            } else {
                Ok(SIMPLE_REPLY_LEN)
            }
        }
        STRUCTURED_REPLY_MAGIC => {
            if buf.len() < CHUNK_HEADER_LEN {
                return Err(FrameError::Incomplete { needed: None });
            }
            let mut h = &buf[16..20];
            let len = h.get_u32();
            if len > MAX_REPLY_PAYLOAD {
                return Err(FrameError::invalid(format!(
                    "structured reply payload of {len} bytes exceeds the limit"
                )));
            }
            let total = CHUNK_HEADER_LEN + len as usize;
            if buf.len() < total {
                Err(FrameError::Incomplete {
                    needed: Some(total),
                })
            } else {
                Ok(total)
            }
        }
        m => Err(FrameError::invalid(format!("bad reply magic {m:#010x}"))),
    }
}

fn parse_error_fields(
    p: &mut Bytes,
    ty: u16,
    fixed_tail: usize,
) -> Result<(u32, String), FrameError> {
    if p.len() < 6 + fixed_tail {
        return Err(FrameError::invalid(format!(
            "error chunk type {ty:#x} too short"
        )));
    }
    let code = p.get_u32();
    let mlen = p.get_u16() as usize;
    if mlen > p.len() - fixed_tail {
        return Err(FrameError::invalid("error message longer than the chunk"));
    }
    if code == 0 {
        return Err(FrameError::invalid("error chunk with error value 0"));
    }
    let message = sanitize(&p[..mlen]);
    p.advance(mlen);
    Ok((code, message))
}

/// Decodes a frame whose length [`check_reply`] returned.
pub fn parse_reply(frame: Bytes) -> Result<Reply, FrameError> {
    let n = check_reply(&frame)?;
    if n != frame.len() {
        return Err(FrameError::invalid("reply frame length mismatch"));
    }
    let mut b = frame;
    if b.get_u32() == SIMPLE_REPLY_MAGIC {
        let error = b.get_u32();
        let cookie = b.get_u64();
        return Ok(Reply::Simple { cookie, error });
    }
    let flags = b.get_u16();
    let ty = b.get_u16();
    let cookie = b.get_u64();
    let len = b.get_u32() as usize;
    let mut p = b; // exactly `len` bytes remain
    debug_assert_eq!(p.len(), len);
    let payload = match ty {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(FrameError::invalid("NBD_REPLY_TYPE_NONE with a payload"));
            }
            if flags & REPLY_FLAG_DONE == 0 {
                return Err(FrameError::invalid("NBD_REPLY_TYPE_NONE without DONE flag"));
            }
            ChunkPayload::None
        }
        REPLY_TYPE_OFFSET_DATA => {
            if len < 9 {
                return Err(FrameError::invalid(
                    "OFFSET_DATA chunk shorter than 9 bytes",
                ));
            }
            let offset = p.get_u64();
            ChunkPayload::OffsetData { offset, data: p }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if len != 12 {
                return Err(FrameError::invalid("OFFSET_HOLE chunk length is not 12"));
            }
            let offset = p.get_u64();
            let length = p.get_u32();
            if length == 0 {
                return Err(FrameError::invalid("OFFSET_HOLE of size 0"));
            }
            ChunkPayload::OffsetHole { offset, length }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if len < 12 || (len - 4) % 8 != 0 {
                return Err(FrameError::invalid(format!(
                    "BLOCK_STATUS chunk of bad length {len}"
                )));
            }
            let context_id = p.get_u32();
            let mut descriptors = Vec::with_capacity((len - 4) / 8);
            while p.remaining() >= 8 {
                let length = p.get_u32();
                let flags = p.get_u32();
                if length == 0 {
                    return Err(FrameError::invalid("block status descriptor of length 0"));
                }
                descriptors.push(Descriptor { length, flags });
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            }
        }
        REPLY_TYPE_ERROR_OFFSET => {
            let (code, message) = parse_error_fields(&mut p, ty, 8)?;
            if p.len() != 8 {
                return Err(FrameError::invalid(
                    "ERROR_OFFSET chunk length does not match its message",
                ));
            }
            let offset = p.get_u64();
            ChunkPayload::ErrorOffset {
                code,
                message,
                offset,
            }
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            // NBD_REPLY_TYPE_ERROR, or an unknown error type: the reply is errored.
            let (code, message) = parse_error_fields(&mut p, ty, 0)?;
            ChunkPayload::Error { code, message }
        }
        t => {
            return Err(FrameError::invalid(format!(
                "unknown structured reply type {t}"
            )))
        }
    };
    Ok(Reply::Chunk(Chunk {
        flags,
        cookie,
        payload,
    }))
}

// ====================================================== per-request reassembly

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

// ================================================================== server side

/// Length of an option request header: `IHAVEOPT` (u64), option (u32), data length (u32).
pub const OPTION_HEADER_LEN: usize = 16;

/// Largest option request data a server accepts (export names and meta context queries
/// fit easily; anything bigger is treated as hostile).
pub const MAX_OPTION_REQUEST_DATA: u32 = 64 * 1024;

/// Decodes an option request header: returns (option, data length).
pub fn parse_option_header(buf: &[u8]) -> Result<(u32, u32), FrameError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Err(FrameError::Incomplete {
            needed: Some(OPTION_HEADER_LEN),
        });
    }
    let mut b = buf;
    if b.get_u64() != IHAVEOPT {
        return Err(FrameError::invalid("bad option request magic"));
    }
    let option = b.get_u32();
    let len = b.get_u32();
    if len > MAX_OPTION_REQUEST_DATA {
        return Err(FrameError::invalid(format!(
            "option data of {len} bytes exceeds the limit"
        )));
    }
    Ok((option, len))
}

fn get_string32(b: &mut &[u8], what: &str) -> Result<String, FrameError> {
    if b.len() < 4 {
        return Err(FrameError::invalid(format!("{what}: truncated length")));
    }
    let n = b.get_u32() as usize;
    if n > MAX_STRING_LEN || n > b.len() {
        return Err(FrameError::invalid(format!("{what}: bad length {n}")));
    }
    let s = std::str::from_utf8(&b[..n])
        .map_err(|_| FrameError::invalid(format!("{what}: not UTF-8")))?
        .to_owned();
    b.advance(n);
    Ok(s)
}

/// Parses the data of `NBD_OPT_GO` / `NBD_OPT_INFO` (see [`option_go_data`]): export name
/// and the info types requested. Trailing bytes are invalid.
pub fn parse_go_data(data: &[u8]) -> Result<(String, Vec<u16>), FrameError> {
    let mut b = data;
    let name = get_string32(&mut b, "export name")?;
    if b.len() < 2 {
        return Err(FrameError::invalid("info request count truncated"));
    }
    let n = b.get_u16() as usize;
    if b.len() != n * 2 {
        return Err(FrameError::invalid(
            "info request list has the wrong length",
        ));
    }
    let infos = (0..n).map(|_| b.get_u16()).collect();
    Ok((name, infos))
}

/// Parses the data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT` (see
/// [`option_meta_context_data`]): export name and queries.
pub fn parse_meta_context_data(data: &[u8]) -> Result<(String, Vec<String>), FrameError> {
    let mut b = data;
    let name = get_string32(&mut b, "export name")?;
    if b.len() < 4 {
        return Err(FrameError::invalid("query count truncated"));
    }
    let n = b.get_u32() as usize;
    // Each query needs at least its 4-byte length.
    if n > b.len() / 4 {
        return Err(FrameError::invalid("more queries than data"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(get_string32(&mut b, "meta context query")?);
    }
    if !b.is_empty() {
        return Err(FrameError::invalid("trailing bytes after the queries"));
    }
    Ok((name, queries))
}

/// Data of an `NBD_INFO_EXPORT` reply: type, size (u64), transmission flags (u16).
pub fn info_export_data(size: u64, flags: u16) -> Bytes {
    let mut v = BytesMut::with_capacity(12);
    v.put_u16(INFO_EXPORT);
    v.put_u64(size);
    v.put_u16(flags);
    v.freeze()
}

/// Data of an `NBD_INFO_BLOCK_SIZE` reply.
pub fn info_block_size_data(min: u32, preferred: u32, max: u32) -> Bytes {
    let mut v = BytesMut::with_capacity(14);
    v.put_u16(INFO_BLOCK_SIZE);
    v.put_u32(min);
    v.put_u32(preferred);
    v.put_u32(max);
    v.freeze()
}

/// Data of an `NBD_REP_META_CONTEXT` reply: context id and name.
pub fn meta_context_reply_data(id: u32, name: &str) -> Bytes {
    let mut v = BytesMut::with_capacity(4 + name.len());
    v.put_u32(id);
    v.put_slice(name.as_bytes());
    v.freeze()
}

/// Data of an `NBD_REP_SERVER` reply (for `NBD_OPT_LIST`): name length and name.
pub fn server_reply_data(name: &str) -> Bytes {
    let mut v = BytesMut::with_capacity(4 + name.len());
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.freeze()
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk whose `data_len` data bytes are sent
/// right after it (so large reads are not copied): chunk header + offset.
pub fn encode_data_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(REPLY_TYPE_OFFSET_DATA);
    buf.put_u64(cookie);
    buf.put_u32(data_len.saturating_add(8));
    buf.put_u64(offset);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) {
        let mut buf = bytes;
        while let Ok(n) = check_reply(buf) {
            let _ = parse_reply(Bytes::copy_from_slice(&buf[..n]));
            buf = &buf[n..];
        }
        let _ = check_option_reply(bytes)
            .map(|n| parse_option_reply(Bytes::copy_from_slice(&bytes[..n])));
        let _ = parse_info(bytes);
        let _ = parse_meta_context(bytes);
        let _ = Request::decode(bytes);
    }

    fn payload_strategy() -> impl Strategy<Value = ChunkPayload> {
        prop_oneof![
            Just(ChunkPayload::None),
            (any::<u64>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(offset, d)| {
                ChunkPayload::OffsetData {
                    offset,
                    data: Bytes::from(d),
                }
            }),
            (any::<u64>(), 1..u32::MAX)
                .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
            (
                any::<u32>(),
                prop::collection::vec((1..u32::MAX, any::<u32>()), 1..8)
            )
                .prop_map(|(context_id, d)| {
                    ChunkPayload::BlockStatus {
                        context_id,
                        descriptors: d
                            .into_iter()
                            .map(|(length, flags)| Descriptor { length, flags })
                            .collect(),
                    }
                }),
            (1..u32::MAX, "[a-z ]{0,20}")
                .prop_map(|(code, message)| ChunkPayload::Error { code, message }),
            (1..u32::MAX, "[a-z ]{0,20}", any::<u64>()).prop_map(|(code, message, offset)| {
                ChunkPayload::ErrorOffset {
                    code,
                    message,
                    offset,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            decode_all(&bytes);
        }

        #[test]
        fn corrupted_valid_frames_never_panic(p in payload_strategy(), flip in any::<(usize, u8)>()) {
            let mut buf = BytesMut::new();
            Reply::Chunk(Chunk { flags: 1, cookie: 7, payload: p }).encode(&mut buf);
            let i = flip.0 % buf.len();
            buf[i] ^= flip.1;
            decode_all(&buf);
        }

        #[test]
        fn reply_round_trip(p in payload_strategy(), cookie in any::<u64>(), done in any::<bool>()) {
            let flags = if done || p == ChunkPayload::None { REPLY_FLAG_DONE } else { 0 };
            let r = Reply::Chunk(Chunk { flags, cookie, payload: p });
            let mut buf = BytesMut::new();
            r.encode(&mut buf);
            prop_assert_eq!(check_reply(&buf), Ok(buf.len()));
            for cut in 0..buf.len() {
                let is_incomplete = matches!(check_reply(&buf[..cut]), Err(FrameError::Incomplete { .. }));
                prop_assert!(is_incomplete);
            }
            prop_assert_eq!(parse_reply(buf.freeze()), Ok(r));
        }

        #[test]
        fn simple_and_request_round_trip(cookie in any::<u64>(), error in any::<u32>(), off in any::<u64>(), len in any::<u32>(), flags in any::<u16>(), cmd in any::<u16>()) {
            let r = Reply::Simple { cookie, error };
            let mut buf = BytesMut::new();
            r.encode(&mut buf);
            prop_assert_eq!(parse_reply(buf.freeze()), Ok(r));
            let q = Request { flags, command: cmd, cookie, offset: off, length: len };
            let mut buf = BytesMut::new();
            q.encode(&mut buf);
            prop_assert_eq!(buf.len(), REQUEST_HEADER_LEN);
            prop_assert_eq!(Request::decode(&buf), Ok(q));
        }

        #[test]
        fn option_reply_round_trip(option in any::<u32>(), ty in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
            let r = OptionReply { option, reply_type: ty, data: Bytes::from(data) };
            let mut buf = BytesMut::new();
            r.encode(&mut buf);
            prop_assert_eq!(check_option_reply(&buf), Ok(buf.len()));
            prop_assert_eq!(parse_option_reply(buf.freeze()), Ok(r));
        }

        #[test]
        fn read_assembler_never_panics(chunks in prop::collection::vec(payload_strategy(), 0..6), off in 0u64..100, len in 0u32..100) {
            let mut a = ReadAssembler::new(off, len);
            let mut b = BlockStatusCollector::new(off, len, 1, vec![1, 2]);
            let mut e = EmptyCollector::new(off, len);
            for c in chunks {
                let _ = a.feed(c.clone());
                let _ = b.feed(c.clone());
                let _ = e.feed(c);
            }
            let _ = a.finish();
            let _ = b.finish();
            let _ = e.finish();
        }
    }

    #[test]
    fn rejects_hostile_chunks() {
        let hdr = |ty: u16, flags: u16, payload: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u32(STRUCTURED_REPLY_MAGIC);
            b.put_u16(flags);
            b.put_u16(ty);
            b.put_u64(1);
            b.put_u32(payload.len() as u32);
            b.put_slice(payload);
            b.freeze()
        };
        // Zero-length descriptor.
        let mut p = vec![0, 0, 0, 1];
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        assert!(matches!(
            parse_reply(hdr(REPLY_TYPE_BLOCK_STATUS, 1, &p)),
            Err(FrameError::Invalid(_))
        ));
        // NONE without DONE, NONE with payload.
        assert!(parse_reply(hdr(REPLY_TYPE_NONE, 0, &[])).is_err());
        assert!(parse_reply(hdr(REPLY_TYPE_NONE, 1, &[0])).is_err());
        // Hole of size 0 and bad length.
        assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_HOLE, 1, &[0; 12])).is_err());
        assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_HOLE, 1, &[0; 11])).is_err());
        // Data chunk with no data.
        assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_DATA, 1, &[0; 8])).is_err());
        // Error message longer than the chunk.
        assert!(parse_reply(hdr(REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5, 0, 9, b'x'])).is_err());
        // Unknown non-error type.
        assert!(parse_reply(hdr(3, 1, &[])).is_err());
        // Unknown error type is an error chunk.
        assert!(matches!(
            parse_reply(hdr(REPLY_TYPE_FLAG_ERROR + 77, 1, &[0, 0, 0, 5, 0, 0])),
            Ok(Reply::Chunk(Chunk {
                payload: ChunkPayload::Error { code: 5, .. },
                ..
            }))
        ));
        // Oversize length fails fast, without waiting for the payload.
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(1);
        b.put_u16(REPLY_TYPE_OFFSET_DATA);
        b.put_u64(1);
        b.put_u32(u32::MAX);
        assert!(matches!(check_reply(&b), Err(FrameError::Invalid(_))));
        // Wrong magic fails after 4 bytes.
        assert!(matches!(
            check_reply(&[1, 2, 3, 4]),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn read_assembly() {
        let mut a = ReadAssembler::new(100, 10);
        a.feed(ChunkPayload::OffsetHole {
            offset: 104,
            length: 6,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        a.feed(ChunkPayload::OffsetData {
            offset: 100,
            data: Bytes::from_static(b"abcd"),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            &a.finish().unwrap_or_else(|e| panic!("{e}"))[..],
            b"abcd\0\0\0\0\0\0"
        );
        // Outside, overlap, incomplete.
        let mut a = ReadAssembler::new(100, 10);
        assert!(a
            .feed(ChunkPayload::OffsetData {
                offset: 99,
                data: Bytes::from_static(b"ab")
            })
            .is_err());
        assert!(a
            .feed(ChunkPayload::OffsetData {
                offset: 109,
                data: Bytes::from_static(b"ab")
            })
            .is_err());
        assert!(a
            .feed(ChunkPayload::OffsetHole {
                offset: u64::MAX,
                length: 5
            })
            .is_err());
        a.feed(ChunkPayload::OffsetHole {
            offset: 100,
            length: 5,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(a
            .feed(ChunkPayload::OffsetHole {
                offset: 104,
                length: 2
            })
            .is_err());
        assert_eq!(a.finish().map_err(|e| e.kind()), Err(ErrorKind::Protocol));
        // Server error wins.
        let mut a = ReadAssembler::new(0, 4);
        a.feed(ChunkPayload::Error {
            code: 5,
            message: "bad".into(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.finish().map_err(|e| e.kind()),
            Err(ErrorKind::ServerError { code: 5 })
        );
    }

    #[test]
    fn block_status_collection() {
        let bs = |id, d: &[(u32, u32)]| ChunkPayload::BlockStatus {
            context_id: id,
            descriptors: d
                .iter()
                .map(|&(length, flags)| Descriptor { length, flags })
                .collect(),
        };
        let mut c = BlockStatusCollector::new(10, 100, 2, vec![1, 2]);
        c.feed(bs(1, &[(5, 0)])).unwrap_or_else(|e| panic!("{e}"));
        c.feed(bs(2, &[(50, 3), (1000, 0)]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.feed(bs(2, &[(1, 0)])).is_err(), "duplicate context");
        let v = c.finish().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v,
            vec![
                BlockStatus {
                    offset: 10,
                    length: 50,
                    flags: 3
                },
                BlockStatus {
                    offset: 60,
                    length: 50,
                    flags: 0
                },
            ]
        );
        let mut c = BlockStatusCollector::new(0, 10, 1, vec![1]);
        assert!(
            c.feed(bs(1, &[(10, 0), (5, 0)])).is_err(),
            "descriptor beyond end"
        );
        assert!(c.feed(bs(9, &[(1, 0)])).is_err(), "unknown id");
        let c = BlockStatusCollector::new(0, 10, 1, vec![1]);
        assert_eq!(c.finish().map_err(|e| e.kind()), Err(ErrorKind::Protocol));
    }

    #[test]
    fn server_side_option_parsing() {
        let d = option_go_data("vda", &[INFO_BLOCK_SIZE]).expect("go");
        assert_eq!(
            parse_go_data(&d),
            Ok(("vda".to_string(), vec![INFO_BLOCK_SIZE]))
        );
        assert!(parse_go_data(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_go_data(&long).is_err());
        assert!(parse_go_data(&[0, 0, 0xff, 0xff]).is_err());
        let q = vec!["base:allocation".to_string(), "qemu:x".to_string()];
        let d = option_meta_context_data("", &q).expect("meta");
        assert_eq!(parse_meta_context_data(&d), Ok((String::new(), q)));
        assert!(parse_meta_context_data(&d[..d.len() - 2]).is_err());
        // A huge query count must not allocate.
        assert!(parse_meta_context_data(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut h = BytesMut::new();
        encode_option(&mut h, OPT_GO, &[1, 2, 3]).expect("enc");
        assert_eq!(parse_option_header(&h), Ok((OPT_GO, 3)));
        assert!(parse_option_header(&h[..10]).is_err());
        h[0] = 0;
        assert!(parse_option_header(&h).is_err());
        assert_eq!(
            parse_info(&info_block_size_data(1, 4096, 1 << 25)),
            Ok(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25
            })
        );
        assert_eq!(
            parse_info(&info_export_data(7, 3)),
            Ok(Info::Export { size: 7, flags: 3 })
        );
        assert_eq!(
            parse_meta_context(&meta_context_reply_data(1, "base:allocation")),
            Ok((1, "base:allocation".to_string()))
        );
        let mut b = BytesMut::new();
        encode_data_chunk_header(&mut b, REPLY_FLAG_DONE, 9, 4096, 3);
        b.put_slice(b"abc");
        let n = check_reply(&b).expect("complete");
        let r = parse_reply(b.split_to(n).freeze()).expect("parse");
        assert_eq!(
            r,
            Reply::Chunk(Chunk {
                flags: REPLY_FLAG_DONE,
                cookie: 9,
                payload: ChunkPayload::OffsetData {
                    offset: 4096,
                    data: Bytes::from_static(b"abc")
                }
            })
        );
    }

    proptest! {
        #[test]
        fn server_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_go_data(&bytes);
            let _ = parse_meta_context_data(&bytes);
            let _ = parse_option_header(&bytes);
        }
    }
}
