//! Tests of the local backend.

use super::direct::{DIRECT_ALIGN, DIRECT_MIN_LEN};
use super::*;
use std::sync::{Arc, Barrier};

/// Every way a put can make its file: each test runs with all of them.
const MODES: [u8; 3] = [LINK_EMPTY_PATH, LINK_PROC_FD, NAMED_TEMP];

fn backend(root: impl Into<PathBuf>, mode: u8) -> LocalBackend {
    let b = LocalBackend::new(root);
    b.write_mode.store(mode, Ordering::Relaxed);
    b
}

#[test]
fn all_modes() {
    for mode in MODES {
        put_get_list_delete(mode);
        chunk_dir_entries_synced_at_flush(mode);
        concurrent_puts_of_same_key(mode);
    }
}

/// A flush syncs every pending directory (here in parallel: 40 chunk directories); one that
/// cannot be synced fails the flush and keeps its level and the levels above it pending, so
/// that the next flush syncs them.
#[test]
fn failed_flush_keeps_what_is_not_known_durable() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path());
    for i in 0..40u8 {
        let key = format!("chunks/{i:02x}/{i:02x}00");
        assert!(b.put_if_absent(&key, &[i]).unwrap());
    }
    let chunks = dir.path().join("chunks");
    assert_eq!(b.unsynced_dirs.lock().unwrap().len(), 42); // 40 + chunks/ + the root
                                                           // A directory that vanished before the flush cannot be synced.
    fs::remove_file(chunks.join("07/0700")).unwrap();
    fs::remove_dir(chunks.join("07")).unwrap();
    let e = b.flush().unwrap_err();
    assert!(e.to_string().contains("chunks/07"), "{e}");
    let pending = b.unsynced_dirs.lock().unwrap().clone();
    assert_eq!(pending.len(), 42, "{pending:?}");
    assert!(pending.contains(&chunks) && pending.contains(dir.path()));
    fs::create_dir(chunks.join("07")).unwrap();
    b.flush().unwrap();
    assert!(b.unsynced_dirs.lock().unwrap().is_empty());
    for i in (0..40u8).filter(|i| *i != 7) {
        assert_eq!(b.get(&format!("chunks/{i:02x}/{i:02x}00")).unwrap(), [i]);
    }
}

/// This machine's filesystems (ext4, tmpfs) support O_TMPFILE, and the tests run as a user
/// who may or may not link with AT_EMPTY_PATH: the anonymous path must stay in use.
#[test]
fn anonymous_files_used_where_supported() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path());
    assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
    assert_ne!(b.write_mode.load(Ordering::Relaxed), NAMED_TEMP);
    assert!(!dir.path().join(TMP_DIR).exists());
}

/// Chunk objects around the alignment and size limits of direct writes read back exactly;
/// on ext4 or xfs (which take `O_DIRECT`) the backend keeps writing direct.
#[test]
fn direct_writes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path());
    let sizes = [
        0,
        1,
        DIRECT_ALIGN - 1,
        DIRECT_ALIGN,
        DIRECT_MIN_LEN - 1,
        DIRECT_MIN_LEN,
        DIRECT_MIN_LEN + 1,
        (1 << 20) + 123,
        3 << 20,
    ];
    for (n, len) in sizes.into_iter().enumerate() {
        // A pattern that differs in every block, so a misplaced block shows.
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        for key in [
            format!("chunks/{n:02x}/{n:02x}ff"),
            format!("snapshots/s{n}"),
        ] {
            assert!(b.put_if_absent(&key, &data).unwrap(), "{key}");
            assert_eq!(b.get(&key).unwrap(), data, "{key}, {len} bytes");
        }
    }
    let fs_type = rustix::fs::statfs(dir.path()).unwrap().f_type;
    // EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC
    if [0xEF53, 0x5846_5342].contains(&(fs_type as i64)) {
        assert!(
            b.writes_direct(),
            "direct I/O given up on fs type {fs_type:#x}"
        );
    }
}

#[test]
fn head_of_an_object_and_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path());
    assert!(b.put_if_absent("chunks/ab/abcd", b"hello world").unwrap());
    assert_eq!(
        b.get_head("chunks/ab/abcd", 5).unwrap(),
        (b"hello".to_vec(), 11)
    );
    assert_eq!(
        b.get_head("chunks/ab/abcd", 100).unwrap(),
        (b"hello world".to_vec(), 11)
    );
    let e = b.get_head("chunks/ab/abce", 5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

fn put_get_list_delete(mode: u8) {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path().join("repo"), mode);
    assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
    // The path under test was really taken (AT_EMPTY_PATH may be refused to non-root).
    let used = b.write_mode.load(Ordering::Relaxed);
    assert!(
        used == mode || (mode == LINK_EMPTY_PATH && used == LINK_PROC_FD),
        "{mode} -> {used}"
    );
    assert!(!b.put_if_absent("chunks/ab/abcd", b"two").unwrap());
    assert_eq!(b.get("chunks/ab/abcd").unwrap(), b"one");
    assert!(b.put_if_absent("config", b"c").unwrap());
    assert!(b.put_if_absent("snapshots/ff", b"s").unwrap());
    assert!(b.exists("config").unwrap());
    assert!(!b.exists("nope").unwrap());
    assert_eq!(b.get("nope").unwrap_err().kind(), ErrorKind::NotFound);
    let mut all = b.list("").unwrap();
    all.sort();
    assert_eq!(all, ["chunks/ab/abcd", "config", "snapshots/ff"]);
    assert_eq!(b.list("chunks/").unwrap(), ["chunks/ab/abcd"]);
    assert_eq!(b.list("chunks/ab/ab").unwrap(), ["chunks/ab/abcd"]);
    assert_eq!(b.list("snap").unwrap(), ["snapshots/ff"]);
    assert!(b.list("keys/").unwrap().is_empty());
    let meta = fs::metadata(dir.path().join("repo/chunks/ab/abcd")).unwrap();
    assert!(meta.permissions().readonly());
    b.delete("chunks/ab/abcd").unwrap();
    b.delete("chunks/ab/abcd").unwrap();
    assert!(!b.exists("chunks/ab/abcd").unwrap());
    assert!(b.get("../x").is_err());
    assert!(b.put_if_absent("/abs", b"").is_err());
    assert!(b.put_if_absent("tmp/x", b"").is_err());
}

fn chunk_dir_entries_synced_at_flush(mode: u8) {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), mode);
    assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
    assert!(b.put_if_absent("snapshots/ff", b"s").unwrap());
    let pending = b.unsynced_dirs.lock().unwrap().clone();
    assert!(
        pending.contains(&dir.path().join("chunks/ab")),
        "{pending:?}"
    );
    assert!(
        !pending.contains(&dir.path().join("snapshots")),
        "{pending:?}"
    );
    b.flush().unwrap();
    assert!(b.unsynced_dirs.lock().unwrap().is_empty());
    assert_eq!(b.get("chunks/ab/abcd").unwrap(), b"one");
}

fn concurrent_puts_of_same_key(mode: u8) {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(backend(dir.path(), mode));
    for round in 0..20 {
        let key = format!("chunks/00/k{round}");
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2u8)
            .map(|t| {
                let (b, barrier, key) = (b.clone(), barrier.clone(), key.clone());
                std::thread::spawn(move || {
                    let data = vec![t; 100_000];
                    barrier.wait();
                    (t, b.put_if_absent(&key, &data).unwrap())
                })
            })
            .collect();
        let results: Vec<(u8, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<u8> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert_eq!(b.get(&key).unwrap(), vec![winners[0]; 100_000]);
    }
    let tmp: Vec<_> = fs::read_dir(dir.path().join(TMP_DIR))
        .map(Iterator::collect)
        .unwrap_or_default();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}
