//! Integration tests against real qemu-img / qemu-io / qemu-nbd, with nbdinfo as the
//! oracle for block status. Missing tools fail the test (never skip).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use vmdisk::nbd::proto::CONTEXT_BASE_ALLOCATION;
use vmdisk::qemu::{self, QemuNbd, QemuNbdOptions};
use vmdisk::{BlockStatus, Client, ConnectOptions, ErrorKind};

const MIB: u64 = 1 << 20;

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/install-deps.sh"
    );
}

fn sh(tool: &str, args: &[&str]) -> Vec<u8> {
    need(tool);
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"));
    args.push(p);
    sh("qemu-io", &args);
}

/// A 64 MiB qcow2 with data, zero writes over holes and data, a discard, unaligned data.
async fn make_qcow2(dir: &Path, bitmap: Option<&str>) -> PathBuf {
    need("qemu-img");
    let img = dir.join("disk.qcow2");
    qemu::create_image(&img, "qcow2", 64 * MIB, &[])
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    if let Some(b) = bitmap {
        qemu::bitmap_add(&img, b)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
    }
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0xaa 1M 64k",
            "write -P 0xbb 5M 1M",
            "write -z 8M 128k",
            "write -P 0xcc 10M 256k",
            "write -z 10M 64k",
            "discard 5M 512k",
            "write -P 0x11 20000 3000",
            "write -P 0x22 63M 1M",
        ],
    );
    img
}

/// A 48 MiB sparse raw file with a few data runs.
fn make_raw(dir: &Path) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let img = dir.join("disk.raw");
    let mut f = std::fs::File::create(&img).unwrap_or_else(|e| panic!("{e}"));
    f.set_len(48 * MIB).unwrap_or_else(|e| panic!("{e}"));
    for (off, len, byte) in [
        (0u64, 4096usize, 1u8),
        (3 * MIB, 2 * MIB as usize, 2),
        (40 * MIB, 1000, 3),
    ] {
        f.seek(SeekFrom::Start(off))
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&vec![byte; len])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    img
}

async fn serve(
    img: &Path,
    fmt: &str,
    dir: &Path,
    bitmap: Option<&str>,
    read_only: bool,
) -> QemuNbd {
    need("qemu-nbd");
    let mut o = QemuNbdOptions::new(img, fmt, dir);
    o.persistent = true;
    o.read_only = read_only;
    o.bitmap = bitmap.map(str::to_owned);
    QemuNbd::start(o)
        .await
        .unwrap_or_else(|e| panic!("qemu-nbd: {e:?}"))
}

fn connect_opts(contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(20),
        ..ConnectOptions::default()
    }
}

fn merge(v: impl IntoIterator<Item = BlockStatus>) -> Vec<BlockStatus> {
    let mut out: Vec<BlockStatus> = Vec::new();
    for e in v {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.end() == e.offset => l.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

/// `nbdinfo --map[=CONTEXT] --json` for the server's socket, merged.
fn nbdinfo_map(nbd: &QemuNbd, context: &str) -> Vec<BlockStatus> {
    let vmdisk::NbdAddr::Unix(sock) = nbd.addr() else {
        panic!("unix socket expected")
    };
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = sh("nbdinfo", &[&format!("--map={context}"), "--json", &uri]);
    let v: serde_json::Value =
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}"));
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo output is not an array"));
    merge(arr.iter().map(|e| BlockStatus {
        offset: e["offset"].as_u64().unwrap_or(u64::MAX),
        length: e["length"].as_u64().unwrap_or(u64::MAX),
        flags: e["type"].as_u64().unwrap_or(u64::MAX) as u32,
    }))
}

async fn compare_map(
    img: &Path,
    fmt: &str,
    dir: &Path,
    bitmap: Option<&str>,
    context: &str,
) -> Vec<BlockStatus> {
    let nbd = serve(img, fmt, dir, bitmap, true).await;
    let c = Client::connect(&nbd.addr(), connect_opts(&[context]))
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let ours = merge(
        c.block_status(context, 0, c.size())
            .await
            .unwrap_or_else(|e| panic!("{e:?}")),
    );
    c.disconnect().await.unwrap_or_else(|e| panic!("{e:?}"));
    let oracle = nbdinfo_map(&nbd, context);
    assert_eq!(
        ours,
        oracle,
        "{context} map differs from nbdinfo for {}",
        img.display()
    );
    nbd.stop().await.unwrap_or_else(|e| panic!("{e:?}"));
    ours
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_map_matches_nbdinfo_qcow2_and_raw() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = make_qcow2(dir.path(), None).await;
    let map = compare_map(&q, "qcow2", dir.path(), None, CONTEXT_BASE_ALLOCATION).await;
    assert!(map.len() > 5, "expected a fragmented map: {map:?}");
    let data = vmdisk::extent::data_ranges(&map);
    assert!(data.contains_range(MIB, MIB + 65536));
    assert!(
        !data.overlaps(8 * MIB, 8 * MIB + 131072),
        "zero write must not be data"
    );
    let r = make_raw(dir.path());
    compare_map(&r, "raw", dir.path(), None, CONTEXT_BASE_ALLOCATION).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = make_qcow2(dir.path(), Some("b0")).await;
    let info = qemu::image_info(&q)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 64 * MIB);
    assert_eq!(info.bitmaps.len(), 1);
    assert!(info.bitmaps[0].is_enabled() && !info.bitmaps[0].is_inconsistent());
    let ctx = "qemu:dirty-bitmap:b0";
    let map = compare_map(&q, "qcow2", dir.path(), Some("b0"), ctx).await;
    let dirty = vmdisk::extent::dirty_ranges(&map);
    for (s, l) in [(MIB, 65536), (5 * MIB, MIB), (63 * MIB, MIB), (20000, 3000)] {
        assert!(
            dirty.contains_range(s, s + l),
            "write at {s} not dirty: {dirty:?}"
        );
    }
    assert!(!dirty.overlaps(30 * MIB, 60 * MIB));
    qemu::bitmap_remove(&q, "b0")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let info = qemu::image_info(&q)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(info.bitmaps.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_equal_image_content() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = make_qcow2(dir.path(), None).await;
    let raw = dir.path().join("flat.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap_or_default(),
            raw.to_str().unwrap_or_default(),
        ],
    );
    let expect = std::fs::read(&raw).unwrap_or_else(|e| panic!("{e}"));
    let nbd = serve(&q, "qcow2", dir.path(), None, true).await;
    let c = Client::connect(&nbd.addr(), connect_opts(&[]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.size(), expect.len() as u64);
    assert!(c.is_read_only());
    // 64 concurrent 1 MiB reads on one connection.
    let mut results = futures::stream::iter(0..64u64)
        .map(|i| {
            let c = c.clone();
            async move { (i, c.read(i * MIB, MIB as u32).await) }
        })
        .buffer_unordered(32);
    let mut n = 0;
    while let Some((i, r)) = results.next().await {
        let got = r.unwrap_or_else(|e| panic!("read {i}: {e:?}"));
        let at = (i * MIB) as usize;
        assert!(
            got[..] == expect[at..at + MIB as usize],
            "chunk {i} differs"
        );
        n += 1;
    }
    assert_eq!(n, 64);
    drop(results);
    // Unaligned small read, and one read larger than max_block_size (split).
    let got = c
        .read(19_999, 3002)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(&got[..], &expect[19_999..23_001]);
    let got = c
        .read(0, c.size() as u32)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(got[..] == expect[..], "whole-disk read differs");
    // Out of range is the caller's mistake.
    let e = c.read(c.size() - 1, 2).await.err().map(|e| e.kind());
    assert_eq!(e, Some(ErrorKind::InvalidArgument));
    // Writes on a read-only export are refused locally.
    assert_eq!(
        c.write(0, b"x").await.err().map(|e| e.kind()),
        Some(ErrorKind::Unsupported)
    );
    c.disconnect().await.unwrap_or_else(|e| panic!("{e:?}"));
    nbd.stop().await.unwrap_or_else(|e| panic!("{e:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_writable_export_match_reference() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = dir.path().join("w.qcow2");
    qemu::create_image(
        &img,
        "qcow2",
        40 * MIB,
        &[("cluster_size".into(), "65536".into())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    let mut reference = vec![0u8; 40 * MIB as usize];
    let nbd = serve(&img, "qcow2", dir.path(), None, false).await;
    let c = Client::connect(&nbd.addr(), connect_opts(&[CONTEXT_BASE_ALLOCATION]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!c.is_read_only());
    let writes: Vec<(u64, Vec<u8>)> = (0..20u64)
        .map(|i| {
            (
                i * 700_001 % (15 * MIB),
                (0..(1000 + i * 5000)).map(|b| (b * 7 + i) as u8).collect(),
            )
        })
        .collect();
    futures::future::try_join_all(writes.iter().map(|(o, d)| c.write(*o, d)))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    // Overlapping concurrent writes land in no defined order; writing them again
    // sequentially defines the final content.
    for (o, d) in &writes {
        c.write(*o, d).await.unwrap_or_else(|e| panic!("{e:?}"));
        reference[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    // A write larger than max_block_size is split.
    let big: Vec<u8> = (0..(c.max_block_size() as usize + 12345))
        .map(|i| (i % 251) as u8)
        .collect();
    let big_at = 40 * MIB as usize - big.len();
    c.write(big_at as u64, &big)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    reference[big_at..].copy_from_slice(&big);
    c.write_zeroes(2 * MIB, 300_000)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    reference[2 * MIB as usize..2 * MIB as usize + 300_000].fill(0);
    c.flush().await.unwrap_or_else(|e| panic!("{e:?}"));
    let back = c
        .read(0, 40 * MIB as u32)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(back[..] == reference[..], "read-back differs");
    c.disconnect().await.unwrap_or_else(|e| panic!("{e:?}"));
    nbd.stop().await.unwrap_or_else(|e| panic!("{e:?}"));
    let refpath = dir.path().join("ref.raw");
    std::fs::write(&refpath, &reference).unwrap_or_else(|e| panic!("{e}"));
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap_or_default(),
            refpath.to_str().unwrap_or_default(),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = make_qcow2(dir.path(), None).await;
    // Unknown bitmap: qemu-nbd refuses to start; the error carries its stderr.
    need("qemu-nbd");
    let mut o = QemuNbdOptions::new(&q, "qcow2", dir.path());
    o.bitmap = Some("nope".into());
    let e = QemuNbd::start(o)
        .await
        .err()
        .unwrap_or_else(|| panic!("started with a missing bitmap"));
    assert_eq!(e.kind(), ErrorKind::Process);
    assert!(e.to_string().contains("nope"), "{e}");
    // A context the server does not have.
    let nbd = serve(&q, "qcow2", dir.path(), None, true).await;
    let e = Client::connect(&nbd.addr(), connect_opts(&["qemu:dirty-bitmap:missing"]))
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::Unsupported));
    // Several connections to a read-only export.
    let cs = Client::connect_many(&nbd.addr(), connect_opts(&[CONTEXT_BASE_ALLOCATION]), 3)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    for c in &cs {
        let m = c
            .block_status(CONTEXT_BASE_ALLOCATION, 0, c.size())
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.iter().map(|e| e.length).sum::<u64>(), c.size());
    }
    for c in cs {
        c.disconnect().await.unwrap_or_else(|e| panic!("{e:?}"));
    }
    let e = Client::connect(&nbd.addr(), connect_opts(&[]))
        .await
        .map(|_| ())
        .err();
    assert!(e.is_none(), "{e:?}");
    nbd.stop().await.unwrap_or_else(|e| panic!("{e:?}"));
    // A missing image file.
    let e = qemu::image_info(&dir.path().join("absent.qcow2"))
        .await
        .err()
        .map(|e| e.kind());
    assert_eq!(e, Some(ErrorKind::Process));
}

/// qemu-nbd runs with malloc tunables that let it reuse its request buffers: reading 48 MiB in
/// 1 MiB requests one at a time costs it far fewer page faults than one per page read (measured:
/// ≈ 3 100 with the tunables, ≈ 12 400 with glibc's defaults).
#[tokio::test]
async fn qemu_nbd_reuses_request_buffers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("full.raw");
    std::fs::write(&img, vec![0x5au8; 48 * MIB as usize]).expect("image");
    let srv = serve(&img, "raw", dir.path(), None, true).await;
    let pid = srv.pid().expect("qemu-nbd pid");
    let minflt = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the parenthesised command name; minflt is field 10 overall.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        rest.split(' ')
            .nth(7)
            .and_then(|f| f.parse::<u64>().ok())
            .expect("minflt")
    };
    let c = Client::connect(&srv.addr(), connect_opts(&[]))
        .await
        .expect("connect");
    // Warm up: the first requests allocate the buffers.
    for i in 0..4u64 {
        c.read(i * MIB, MIB as u32).await.expect("read");
    }
    let before = minflt();
    for i in 0..48u64 {
        let b = c.read(i * MIB, MIB as u32).await.expect("read");
        assert!(b.iter().all(|&x| x == 0x5a));
    }
    let faults = minflt() - before;
    let pages = 48 * MIB / 4096;
    assert!(
        faults < pages / 2,
        "{faults} page faults for {pages} pages read"
    );
    c.disconnect().await.expect("disconnect");
    srv.stop().await.expect("stop");
}
