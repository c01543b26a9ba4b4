//! The server side of the NBD handshake: the greeting, option haggling and the export chosen.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{closed, Server, Session, BASE_ALLOCATION_ID, MAX_REQUEST, TRANSMISSION_FLAGS};
use crate::error::{Error, Result};
use crate::nbd::frame::{self, OptionReply};
use crate::nbd::proto::*;

enum OptOutcome {
    Continue,
    Transmission(Session),
    /// `NBD_OPT_EXPORT_NAME` (no reply framing) or abort: close after the handshake.
    Close,
}

impl Server {
    pub(super) async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>>
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
}

async fn write_all<W: AsyncWrite + Unpin>(wr: &mut W, b: &[u8]) -> Result<()> {
    wr.write_all(b)
        .await
        .map_err(|e| Error::io("writing to the NBD client", e))?;
    wr.flush()
        .await
        .map_err(|e| Error::io("writing to the NBD client", e))
}
