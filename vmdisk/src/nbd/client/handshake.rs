//! The client side of the NBD handshake: option requests and replies, and the negotiated export info.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ConnectOptions, DEFAULT_MAX_BLOCK_SIZE, MAX_OPTION_REPLIES};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::frame::{self, FrameError, Info, OptionReply};
use crate::nbd::proto::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct ExportInfo {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) min_block: u32,
    pub(super) preferred_block: u32,
    pub(super) max_block: u32,
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

pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
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
