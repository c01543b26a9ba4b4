//! The transmission phase: reading requests, serving them concurrently and encoding the replies.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use super::{closed, Piece, Server, Session, BASE_ALLOCATION_ID, MAX_REQUEST};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::frame::{self, Chunk, ChunkPayload, Descriptor, Reply, Request};
use crate::nbd::proto::*;

impl Server {
    pub(super) async fn transmission<R, W>(&self, mut rd: R, mut wr: W, s: Session) -> Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(self.options.max_in_flight.max(1) * 2);
        let write_timeout = self.options.write_timeout;
        let writer = tokio::spawn(async move {
            while let Some(parts) = rx.recv().await {
                let w = async {
                    for p in &parts {
                        wr.write_all(p).await?;
                    }
                    wr.flush().await
                };
                match tokio::time::timeout(write_timeout, w).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(Error::io("writing an NBD reply", e)),
                    Err(_) => return Err(Error::new(ErrorKind::Timeout, "client stopped reading")),
                }
            }
            let _ = wr.shutdown().await;
            Ok(())
        });
        let sem = Arc::new(Semaphore::new(self.options.max_in_flight.max(1)));
        let s = Arc::new(s);
        let result = loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            if let Err(e) = rd.read_exact(&mut hdr).await {
                break Err(closed("request header", e));
            }
            let req = match Request::decode(&hdr) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            if req.command == CMD_DISC {
                break Ok(());
            }
            if req.command == CMD_WRITE {
                // Read and drop the payload, then refuse.
                if req.length > MAX_REQUEST {
                    break Err(Error::protocol("write payload too large"));
                }
                let mut sink = vec![0u8; req.length as usize];
                if let Err(e) = rd.read_exact(&mut sink).await {
                    break Err(closed("write payload", e));
                }
            }
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break Ok(());
            };
            let tx = tx.clone();
            let s = s.clone();
            tokio::spawn(async move {
                let parts = answer(&s, req).await;
                let _ = tx.send(parts).await;
                drop(permit);
            });
        };
        // Let in-flight requests finish (DISC: the spec says complete them), then close.
        let _ = sem
            .acquire_many(self.options.max_in_flight.max(1) as u32)
            .await;
        drop(tx);
        let w = writer.await;
        match (result, w) {
            (Err(e), _) => {
                if e.kind() == ErrorKind::Closed {
                    Ok(()) // client went away
                } else {
                    Err(e)
                }
            }
            (Ok(()), Ok(r)) => r,
            (Ok(()), Err(_)) => Ok(()),
        }
    }
}

fn error_reply(s: &Session, cookie: u64, code: u32, msg: &str) -> Vec<Bytes> {
    let mut b = BytesMut::new();
    if s.structured {
        let mut m = msg.to_string();
        m.truncate(1024);
        Reply::Chunk(Chunk {
            flags: REPLY_FLAG_DONE,
            cookie,
            payload: ChunkPayload::Error { code, message: m },
        })
        .encode(&mut b);
    } else {
        Reply::Simple {
            cookie,
            error: code,
        }
        .encode(&mut b);
    }
    vec![b.freeze()]
}

fn ok_reply(s: &Session, cookie: u64) -> Vec<Bytes> {
    let mut b = BytesMut::new();
    if s.structured {
        Reply::Chunk(Chunk {
            flags: REPLY_FLAG_DONE,
            cookie,
            payload: ChunkPayload::None,
        })
        .encode(&mut b);
    } else {
        Reply::Simple { cookie, error: 0 }.encode(&mut b);
    }
    vec![b.freeze()]
}

fn in_range(size: u64, offset: u64, len: u32) -> bool {
    len > 0
        && offset
            .checked_add(u64::from(len))
            .is_some_and(|e| e <= size)
}

/// The reply messages for one request.
async fn answer(s: &Session, req: Request) -> Vec<Bytes> {
    let cookie = req.cookie;
    let size = s.source.size();
    match req.command {
        CMD_READ => {
            if !in_range(size, req.offset, req.length) || req.length > MAX_REQUEST {
                return error_reply(s, cookie, EINVAL, "read outside the export or too large");
            }
            let src = s.source.clone();
            let (off, len) = (req.offset, req.length);
            let pieces = match tokio::task::spawn_blocking(move || src.read(off, len)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(offset = off, len, error = %e, "NBD read failed");
                    return error_reply(s, cookie, EIO, &e.to_string());
                }
                Err(_) => return error_reply(s, cookie, EIO, "read worker failed"),
            };
            let total: u64 = pieces.iter().map(Piece::len).sum();
            if total != u64::from(len) || pieces.iter().any(Piece::is_empty) {
                return error_reply(s, cookie, EIO, "internal error: source returned a bad read");
            }
            read_reply(s, cookie, off, len, pieces)
        }
        CMD_BLOCK_STATUS => {
            if !s.structured || !s.base_allocation {
                return error_reply(s, cookie, EINVAL, "no metadata context negotiated");
            }
            if !in_range(size, req.offset, req.length) {
                return error_reply(s, cookie, EINVAL, "range outside the export");
            }
            // A source may block to answer (a repository loads index pages): off the async
            // threads, like reads.
            let src = s.source.clone();
            let (off, len) = (req.offset, req.length);
            let ext = match tokio::task::spawn_blocking(move || src.extents(off, len)).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => return error_reply(s, cookie, EIO, &e.to_string()),
                Err(_) => return error_reply(s, cookie, EIO, "block-status worker failed"),
            };
            let mut descriptors: Vec<Descriptor> = ext
                .into_iter()
                .filter(|(l, _)| *l > 0)
                .map(|(length, zero)| Descriptor {
                    length,
                    flags: if zero {
                        crate::extent::BlockStatus::STATE_HOLE
                            | crate::extent::BlockStatus::STATE_ZERO
                    } else {
                        0
                    },
                })
                .collect();
            if descriptors.is_empty() {
                return error_reply(s, cookie, EIO, "no extents");
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                descriptors.truncate(1);
            }
            let mut b = BytesMut::new();
            Reply::Chunk(Chunk {
                flags: REPLY_FLAG_DONE,
                cookie,
                payload: ChunkPayload::BlockStatus {
                    context_id: BASE_ALLOCATION_ID,
                    descriptors,
                },
            })
            .encode(&mut b);
            vec![b.freeze()]
        }
        CMD_FLUSH => ok_reply(s, cookie),
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
            error_reply(s, cookie, EPERM, "the export is read-only")
        }
        _ => error_reply(s, cookie, EINVAL, "command not supported"),
    }
}

fn read_reply(s: &Session, cookie: u64, off: u64, len: u32, pieces: Vec<Piece>) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(pieces.len() * 2);
    if !s.structured {
        let mut b = BytesMut::new();
        Reply::Simple { cookie, error: 0 }.encode(&mut b);
        parts.push(b.freeze());
        for p in pieces {
            match p {
                Piece::Data(d) => parts.push(d),
                Piece::Zero(n) => parts.push(Bytes::from(vec![0u8; n as usize])),
            }
        }
        let _ = len;
        return parts;
    }
    let n = pieces.len();
    let mut pos = off;
    for (i, p) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let mut b = BytesMut::new();
        match p {
            Piece::Data(d) => {
                let l = d.len() as u32;
                frame::encode_data_chunk_header(&mut b, flags, cookie, pos, l);
                parts.push(b.freeze());
                parts.push(d);
                pos += u64::from(l);
            }
            Piece::Zero(l) => {
                Reply::Chunk(Chunk {
                    flags,
                    cookie,
                    payload: ChunkPayload::OffsetHole {
                        offset: pos,
                        length: l,
                    },
                })
                .encode(&mut b);
                parts.push(b.freeze());
                pos += u64::from(l);
            }
        }
    }
    parts
}
