//! Transmission replies: simple and structured reply frames ([`check_reply`] then
//! [`parse_reply`]) and the chunk types the server encodes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{sanitize, FrameError, MAX_REPLY_PAYLOAD};
use crate::error::Result;
use crate::nbd::proto::*;

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
