//! Transmission requests (`NBD_CMD_*` headers): encoded by the client, decoded by the server.

use bytes::{Buf, BufMut, BytesMut};

use super::FrameError;
use crate::error::Result;
use crate::nbd::proto::*;

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
