//! Server side of the handshake: option request headers and data the server decodes, and the
//! reply payloads it encodes (`NBD_INFO_*`, meta contexts, data chunk headers).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::FrameError;
use crate::error::Result;
use crate::nbd::proto::*;

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

/// Parses the data of `NBD_OPT_GO` / `NBD_OPT_INFO` (see [`option_go_data`](super::option_go_data)): export name
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
/// [`option_meta_context_data`](super::option_meta_context_data)): export name and queries.
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
