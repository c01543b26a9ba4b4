//! Client side of the handshake: option requests the client sends (`NBD_OPT_*` data) and
//! the option replies (`NBD_REP_*`) it reads, with `NBD_INFO_*` and meta context payloads.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{FrameError, MAX_OPTION_REPLY_PAYLOAD};
use crate::error::{Error, Result};
use crate::nbd::proto::*;

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
