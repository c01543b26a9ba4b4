//! A hostile in-test NBD server: malformed replies must give errors, never panics or hangs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmdisk::nbd::frame::{Chunk, ChunkPayload, Descriptor, OptionReply, Reply, Request};
use vmdisk::nbd::proto::*;
use vmdisk::{Client, ConnectOptions, ErrorKind, NbdAddr};

const SIZE: u64 = 1 << 20;

/// What the server does with one request.
enum Action {
    Send(Vec<u8>),
    SendAndClose(Vec<u8>),
    Silent,
}

#[derive(Clone, Copy)]
enum Greeting {
    Good,
    BadMagic,
    RefuseContext,
}

async fn opt_reply(s: &mut UnixStream, option: u32, reply_type: u32, data: Vec<u8>) {
    let mut b = BytesMut::new();
    OptionReply {
        option,
        reply_type,
        data: Bytes::from(data),
    }
    .encode(&mut b);
    let _ = s.write_all(&b).await;
}

async fn serve_one(
    mut s: UnixStream,
    greeting: Greeting,
    respond: Arc<dyn Fn(Request) -> Action + Send + Sync>,
) {
    let mut hello = BytesMut::new();
    hello.put_u64(NBDMAGIC);
    hello.put_u64(if matches!(greeting, Greeting::BadMagic) {
        0x1234
    } else {
        IHAVEOPT
    });
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if s.write_all(&hello).await.is_err() {
        return;
    }
    let mut cflags = [0u8; 4];
    if s.read_exact(&mut cflags).await.is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        let mut data = vec![0u8; len];
        if s.read_exact(&mut data).await.is_err() {
            return;
        }
        match opt {
            OPT_STRUCTURED_REPLY => opt_reply(&mut s, opt, REP_ACK, vec![]).await,
            OPT_SET_META_CONTEXT => {
                if !matches!(greeting, Greeting::RefuseContext) {
                    let mut d = 1u32.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    opt_reply(&mut s, opt, REP_META_CONTEXT, d).await;
                }
                opt_reply(&mut s, opt, REP_ACK, vec![]).await;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
                opt_reply(&mut s, opt, REP_INFO, d).await;
                opt_reply(&mut s, opt, REP_ACK, vec![]).await;
                break;
            }
            _ => opt_reply(&mut s, opt, REP_ERR_UNSUP, vec![]).await,
        }
    }
    loop {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let Ok(req) = Request::decode(&h) else { return };
        if req.command == CMD_WRITE {
            let mut d = vec![0u8; req.length as usize];
            if s.read_exact(&mut d).await.is_err() {
                return;
            }
        }
        if req.command == CMD_DISC {
            return;
        }
        match respond(req) {
            Action::Send(b) => {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
            Action::SendAndClose(b) => {
                let _ = s.write_all(&b).await;
                return;
            }
            Action::Silent => {}
        }
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn server(
    greeting: Greeting,
    respond: impl Fn(Request) -> Action + Send + Sync + 'static,
) -> Server {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("hostile.sock");
    let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind: {e}"));
    let respond: Arc<dyn Fn(Request) -> Action + Send + Sync> = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_one(s, greeting, respond.clone()));
        }
    });
    Server { _dir: dir, path }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_owned()],
        timeout: Duration::from_millis(500),
        ..ConnectOptions::default()
    }
}

fn chunk(cookie: u64, flags: u16, payload: ChunkPayload) -> Vec<u8> {
    let mut b = BytesMut::new();
    Reply::Chunk(Chunk {
        flags,
        cookie,
        payload,
    })
    .encode(&mut b);
    b.to_vec()
}

/// Connects, issues a read of 4 KiB at 0 and returns its error kind; the whole exchange
/// must finish within 5 s.
async fn read_error(
    respond: impl Fn(Request) -> Action + Send + Sync + 'static,
) -> (ErrorKind, Client) {
    let srv = server(Greeting::Good, respond);
    let fut = async {
        let c = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
            .await
            .unwrap_or_else(|e| panic!("connect: {e:?}"));
        let e = match c.read(0, 4096).await {
            Ok(_) => panic!("hostile reply accepted"),
            Err(e) => e.kind(),
        };
        (e, c)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("client hung on a hostile server"))
}

#[tokio::test]
async fn wrong_reply_magic_is_protocol_error() {
    let (k, c) = read_error(|_| {
        Action::Send(vec![
            0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ])
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
    // The connection is broken afterwards.
    assert_eq!(
        c.read(0, 1).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
}

#[tokio::test]
async fn oversize_chunk_length_is_protocol_error() {
    let (k, _) = read_error(|r| {
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_OFFSET_DATA);
        b.put_u64(r.cookie);
        b.put_u32(0xffff_fff0);
        Action::Send(b.to_vec())
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
}

#[tokio::test]
async fn data_chunk_outside_request_is_protocol_error() {
    let (k, _) = read_error(|r| {
        Action::Send(chunk(
            r.cookie,
            REPLY_FLAG_DONE,
            ChunkPayload::OffsetData {
                offset: r.offset + 4000,
                data: Bytes::from(vec![1u8; 200]),
            },
        ))
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
}

#[tokio::test]
async fn incomplete_coverage_is_protocol_error() {
    let (k, _) = read_error(|r| {
        Action::Send(chunk(
            r.cookie,
            REPLY_FLAG_DONE,
            ChunkPayload::OffsetHole {
                offset: r.offset,
                length: 100,
            },
        ))
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
}

#[tokio::test]
async fn successful_simple_reply_to_read_is_protocol_error() {
    let (k, _) = read_error(|r| {
        let mut b = BytesMut::new();
        Reply::Simple {
            cookie: r.cookie,
            error: 0,
        }
        .encode(&mut b);
        Action::Send(b.to_vec())
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
}

#[tokio::test]
async fn reply_for_unknown_cookie_is_protocol_error() {
    let (k, _) = read_error(|r| {
        Action::Send(chunk(
            r.cookie ^ 0xffff,
            REPLY_FLAG_DONE,
            ChunkPayload::None,
        ))
    })
    .await;
    assert_eq!(k, ErrorKind::Protocol);
}

#[tokio::test]
async fn truncated_stream_is_closed() {
    let (k, _) = read_error(|r| {
        let mut b = chunk(
            r.cookie,
            REPLY_FLAG_DONE,
            ChunkPayload::OffsetData {
                offset: r.offset,
                data: Bytes::from(vec![7u8; 4096]),
            },
        );
        b.truncate(100);
        Action::SendAndClose(b)
    })
    .await;
    assert_eq!(k, ErrorKind::Closed);
}

#[tokio::test]
async fn silent_server_times_out_and_breaks_the_connection() {
    let (k, c) = read_error(|_| Action::Silent).await;
    assert_eq!(k, ErrorKind::Timeout);
    assert_eq!(
        c.read(0, 1).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
}

#[tokio::test]
async fn error_chunk_is_server_error_and_connection_survives() {
    let srv = server(Greeting::Good, |r| {
        if r.offset == 0 {
            Action::Send(chunk(
                r.cookie,
                REPLY_FLAG_DONE,
                ChunkPayload::Error {
                    code: EIO,
                    message: "disk on fire\n".into(),
                },
            ))
        } else {
            Action::Send(chunk(
                r.cookie,
                REPLY_FLAG_DONE,
                ChunkPayload::OffsetHole {
                    offset: r.offset,
                    length: r.length,
                },
            ))
        }
    });
    let c = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let e = c
        .read(0, 512)
        .await
        .err()
        .map(|e| (e.kind(), e.to_string()));
    let (kind, msg) = e.unwrap_or_else(|| panic!("error chunk accepted"));
    assert_eq!(kind, ErrorKind::ServerError { code: EIO });
    assert!(msg.contains("disk on fire?"), "{msg}");
    let data = c
        .read(512, 512)
        .await
        .unwrap_or_else(|e| panic!("read after error: {e:?}"));
    assert_eq!(&data[..], &[0u8; 512][..]);
}

#[tokio::test]
async fn block_status_zero_length_descriptor_is_protocol_error() {
    let srv = server(Greeting::Good, |r| {
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_BLOCK_STATUS);
        b.put_u64(r.cookie);
        b.put_u32(12);
        b.put_u32(1);
        b.put_u32(0);
        b.put_u32(0);
        Action::Send(b.to_vec())
    });
    let c = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let k = tokio::time::timeout(
        Duration::from_secs(5),
        c.block_status(CONTEXT_BASE_ALLOCATION, 0, SIZE),
    )
    .await
    .unwrap_or_else(|_| panic!("hung"))
    .map_err(|e| e.kind());
    assert_eq!(k.err(), Some(ErrorKind::Protocol));
}

#[tokio::test]
async fn block_status_short_answers_are_looped_and_clipped() {
    // Answers 64 KiB at a time; the last descriptor overshoots the request.
    let srv = server(Greeting::Good, |r| {
        let d = vec![Descriptor {
            length: 65536,
            flags: if r.offset < SIZE / 2 { 0 } else { 3 },
        }];
        Action::Send(chunk(
            r.cookie,
            REPLY_FLAG_DONE,
            ChunkPayload::BlockStatus {
                context_id: 1,
                descriptors: d,
            },
        ))
    });
    let c = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let v = c
        .block_status(CONTEXT_BASE_ALLOCATION, 1000, SIZE - 2000)
        .await
        .unwrap_or_else(|e| panic!("block status: {e:?}"));
    assert_eq!(
        v,
        // Requests start at 1000 + k * 64 KiB; the first at or past SIZE / 2 is k = 8.
        vec![
            vmdisk::BlockStatus {
                offset: 1000,
                length: 8 * 65536,
                flags: 0
            },
            vmdisk::BlockStatus {
                offset: 1000 + 8 * 65536,
                length: SIZE - 2000 - 8 * 65536,
                flags: 3
            },
        ]
    );
    c.disconnect()
        .await
        .unwrap_or_else(|e| panic!("disconnect: {e:?}"));
}

#[tokio::test]
async fn bad_greeting_and_refused_context() {
    let srv = server(Greeting::BadMagic, |_| Action::Silent);
    let e = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
        .await
        .err()
        .map(|e| e.kind());
    assert_eq!(e, Some(ErrorKind::Protocol));
    let srv = server(Greeting::RefuseContext, |_| Action::Silent);
    let e = Client::connect(&NbdAddr::Unix(srv.path.clone()), opts())
        .await
        .err()
        .map(|e| (e.kind(), e.to_string()));
    let (k, m) = e.unwrap_or_else(|| panic!("connected without the context"));
    assert_eq!(k, ErrorKind::Unsupported);
    assert!(m.contains("base:allocation"), "{m}");
}

#[tokio::test]
async fn handshake_to_a_mute_server_times_out() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("mute.sock");
    let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let e = Client::connect(&NbdAddr::Unix(path), opts())
        .await
        .err()
        .map(|e| e.kind());
    assert_eq!(e, Some(ErrorKind::Timeout));
}
