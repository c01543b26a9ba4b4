//! Tests of the server against the crate's own client, and against hostile bytes.

use super::*;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nbd::frame::{self, Request};
use crate::nbd::{Client, ConnectOptions, NbdAddr};

fn sample() -> Vec<u8> {
    let mut v = vec![0u8; 4 << 20];
    for (i, b) in v[..300_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    v[(3 << 20) + 5] = 9;
    v
}

async fn start(data: Vec<u8>) -> (tempfile::TempDir, PathBuf, watch::Sender<bool>) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
    exports.insert("vda".into(), Arc::new(MemorySource::new(data, 65536)));
    let server = Arc::new(Server::new(exports, ServerOptions::default()));
    let l = Server::bind_unix(&path).expect("bind");
    let (tx, rx) = watch::channel(false);
    tokio::spawn(server.serve(l, Some(path.clone()), rx));
    (dir, path, tx)
}

#[tokio::test]
async fn own_client_reads_and_block_status() {
    let data = sample();
    let (_d, path, stop) = start(data.clone()).await;
    let c = Client::connect(
        &NbdAddr::Unix(path.clone()),
        ConnectOptions {
            export: "vda".into(),
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("connect");
    assert_eq!(c.size(), data.len() as u64);
    assert!(c.is_read_only());
    // Many concurrent reads across data and holes.
    let mut reads = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        reads.push(tokio::spawn(async move {
            let off = i * 65_000;
            (off, c.read(off, 70_000).await)
        }));
    }
    for r in reads {
        let (off, got) = r.await.expect("join");
        let got = got.expect("read");
        assert_eq!(&got[..], &data[off as usize..off as usize + 70_000]);
    }
    let all = c.read(0, data.len() as u32).await.expect("read all");
    assert_eq!(&all[..], &data[..]);
    let bs = c
        .block_status(CONTEXT_BASE_ALLOCATION, 0, data.len() as u64)
        .await
        .expect("bs");
    let ranges = crate::extent::data_ranges(&bs);
    let v: Vec<(u64, u64)> = ranges.iter().collect();
    assert_eq!(v, vec![(0, 327_680), (3 << 20, (3 << 20) + 65536)]);
    // Writes are refused; the connection stays usable.
    let e = c.write(0, b"x").await.expect_err("read-only");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::InvalidArgument
                | ErrorKind::ServerError { code: 1 }
                | ErrorKind::Unsupported
        ),
        "{e:?}"
    );
    // Out of range.
    assert!(c.read(data.len() as u64 - 1, 2).await.is_err());
    assert_eq!(&c.read(5, 5).await.expect("still up")[..], &data[5..10]);
    c.disconnect().await.expect("disc");
    // Unknown export.
    let e = Client::connect(
        &NbdAddr::Unix(path),
        ConnectOptions {
            export: "nope".into(),
            ..ConnectOptions::default()
        },
    )
    .await;
    assert!(e.is_err());
    let _ = stop.send(true);
}

/// Hostile bytes: the server answers or disconnects, never panics, and keeps serving.
#[tokio::test]
async fn malformed_input_does_not_kill_the_server() {
    let data = sample();
    let (_d, path, stop) = start(data.clone()).await;
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0, 0],
        vec![0, 0, 0, 3, 1, 2, 3],
        {
            let mut v = vec![0, 0, 0, 3];
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&OPT_GO.to_be_bytes());
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v
        },
        {
            let mut v = vec![0, 0, 0, 3];
            let mut b = BytesMut::new();
            frame::encode_option(&mut b, OPT_GO, &[0, 0, 0, 9, 1]).expect("enc");
            frame::encode_option(&mut b, OPT_SET_META_CONTEXT, &[0xff; 12]).expect("enc");
            frame::encode_option(&mut b, 99, &[1, 2]).expect("enc");
            frame::encode_option(
                &mut b,
                OPT_GO,
                &frame::option_go_data("vda", &[]).expect("go"),
            )
            .expect("enc");
            v.extend_from_slice(&b);
            // Transmission: a huge write, a bad magic.
            let mut r = BytesMut::new();
            Request {
                flags: 0,
                command: CMD_READ,
                cookie: 1,
                offset: u64::MAX - 2,
                length: 100,
            }
            .encode(&mut r);
            Request {
                flags: 0,
                command: 77,
                cookie: 2,
                offset: 0,
                length: 0,
            }
            .encode(&mut r);
            Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: 3,
                offset: 0,
                length: u32::MAX,
            }
            .encode(&mut r);
            v.extend_from_slice(&r);
            v
        },
    ];
    for g in garbage {
        let mut s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let _ = s.write_all(&g).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    let c = Client::connect(
        &NbdAddr::Unix(path),
        ConnectOptions {
            export: "vda".into(),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("server still serves");
    assert_eq!(&c.read(0, 10).await.expect("read")[..], &data[..10]);
    let _ = stop.send(true);
}
