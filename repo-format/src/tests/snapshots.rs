//! Snapshot commit, listing and reference resolution, including interrupted backups.

use std::sync::Arc;

use super::{backup, chunk_data, init, mem_repo, time, CHUNK};
use crate::backend::{FaultyBackend, MemoryBackend};
use crate::*;

#[test]
fn missing_objects_are_not_found() {
    let (_, repo) = mem_repo(true);
    let id = ChunkId::from_bytes([1; 32]);
    assert_eq!(
        repo.load_chunk(&id).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        repo.load_snapshot(&SnapshotId::from_bytes([1; 32]))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    // A manifest referencing an index that was never stored cannot be committed.
    let mut m = Manifest::new("x", SnapshotKind::Image, "h", time("2024-01-01T00:00:00Z"));
    m.disks.push(DiskEntry {
        name: "vda".into(),
        virtual_size: 0,
        format: "raw".into(),
        chunk_size: CHUNK,
        index: IndexId::from_bytes([2; 32]),
        source: None,
        qemu_img_info: None,
        create_options: Default::default(),
        backup_mode: BackupMode::Full,
        bytes_read: 0,
        bytes_new: 0,
        chunks_new: 0,
        cbt: None,
    });
    assert_eq!(
        repo.commit_snapshot(&m).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(repo.list_snapshots().unwrap().is_empty());
}

#[test]
fn interrupted_backup_is_not_listed() {
    let mem = Arc::new(MemoryBackend::new());
    let faulty = Arc::new(FaultyBackend::new(mem.clone()));
    let repo = init(faulty.clone(), true);
    // Chunks and index written, manifest never written.
    let sealed = repo.try_seal_chunk(&chunk_data(4)).unwrap();
    repo.store_chunk(&sealed).unwrap();
    let mut index = DiskIndex::new_sparse(CHUNK, u64::from(CHUNK)).unwrap();
    index.set(0, Some(sealed.id)).unwrap();
    repo.store_index(&index).unwrap();
    assert!(repo.list_snapshots().unwrap().is_empty());

    // Storage fails in the middle of a backup (after 1 of its 3 puts): nothing is listed.
    faulty.fail_puts_after(1);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backup(&repo, "web", "2024-05-01T10:00:00Z", 7)
    }));
    assert!(result.is_err());
    assert!(repo.list_snapshots().unwrap().is_empty());
    // A retry after the fault succeeds, reusing what was already uploaded.
    faulty.allow_puts();
    let id = backup(&repo, "web", "2024-05-01T10:00:00Z", 7);
    assert_eq!(repo.list_snapshots().unwrap()[0].0, id);
}

#[test]
fn list_snapshots_sorted_by_time() {
    let (_, repo) = mem_repo(false);
    let c = backup(&repo, "web", "2024-05-03T00:00:00Z", 1);
    let a = backup(&repo, "db", "2024-05-01T00:00:00Z", 2);
    let b = backup(&repo, "web", "2024-05-02T00:00:00Z", 3);
    let ids: Vec<SnapshotId> = repo
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(ids, [a, b, c]);
}

#[test]
fn resolve_references() {
    let (mem, repo) = mem_repo(true);
    let w1 = backup(&repo, "web", "2024-05-01T10:00:00Z", 1);
    let w2 = backup(&repo, "web", "2024-05-02T10:00:00Z", 2);
    let d1 = backup(&repo, "db", "2024-05-03T10:00:00Z", 3);

    assert_eq!(repo.resolve("web@latest").unwrap(), w2);
    assert_eq!(repo.resolve("db@latest").unwrap(), d1);
    assert_eq!(repo.resolve("web@2024-05-01T12:00:00Z").unwrap(), w1);
    assert_eq!(repo.resolve("web@2024-05-02T10:00:00Z").unwrap(), w2);
    assert_eq!(repo.resolve("web@2024-05-02T12:00:00+02:00").unwrap(), w2);
    assert_eq!(repo.resolve("web@2024-05-02T11:59:00+02:00").unwrap(), w1);
    assert_eq!(repo.resolve("web@2024-05-01").unwrap(), w1);
    assert_eq!(repo.resolve("web@2024-05-02").unwrap(), w2);
    assert_eq!(
        repo.resolve("web@2024-05-01T09:00:00").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        repo.resolve("web@2024-04-30").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        repo.resolve("nope@latest").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        repo.resolve("web@yesterday").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        repo.resolve("@latest").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    assert_eq!(repo.resolve(&w1.to_hex()).unwrap(), w1);
    assert_eq!(repo.resolve(&w1.to_hex()[..12]).unwrap(), w1);
    assert_eq!(repo.resolve(&d1.to_hex()[..12].to_uppercase()).unwrap(), d1);
    assert_eq!(
        repo.resolve("abc").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        repo.resolve("xyz12").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Two ids sharing a prefix (planted names: prefix resolution does not read manifests).
    mem.overwrite(
        &format!("snapshots/{}", "abcd0".repeat(13)[..64].to_owned()),
        vec![],
    );
    mem.overwrite(
        &format!("snapshots/{}", "abcd1".repeat(13)[..64].to_owned()),
        vec![],
    );
    assert_eq!(
        repo.resolve("abcd").unwrap_err().kind(),
        ErrorKind::Ambiguous
    );
    assert_eq!(
        repo.resolve("ABCD0").unwrap().to_hex(),
        "abcd0".repeat(13)[..64]
    );
    let absent = if w1.to_hex().starts_with("0000") {
        "ffff"
    } else {
        "0000"
    };
    if !w2.to_hex().starts_with(absent) && !d1.to_hex().starts_with(absent) {
        assert_eq!(
            repo.resolve(absent).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
}

/// The index of a fully allocated disk with more chunks than fit in the metadata limit of
/// small objects (64 MiB: ≈ 2 M entries of 33 bytes, ≈ 128 GiB at 64 KiB chunks, ≈ 2 TiB at
/// 1 MiB) is stored and loaded back: in pages, and whole as earlier versions stored it (the
/// limit of a whole index follows its disk's chunk count).
#[test]
fn the_index_of_a_large_fully_allocated_disk_loads_back() {
    let (_, repo) = mem_repo(true);
    let n: u64 = 2_100_000;
    let size = n * u64::from(CHUNK);
    let updates = (0..n)
        .map(|i| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&i.to_le_bytes());
            b[8..16].copy_from_slice(&(!i).to_le_bytes());
            (i, Some(ChunkId::from_bytes(b)))
        })
        .collect();
    let index = DiskIndex::new_sparse(CHUNK, size)
        .unwrap()
        .with_updates(updates)
        .unwrap();
    let whole = index.encode().unwrap();
    assert!(whole.len() > 64 << 20);
    // Stored in pages (this version), and whole (as earlier versions wrote it).
    let paged = repo.store_index(&index).unwrap();
    let whole = repo.store_index_plain(&whole).unwrap();
    assert_ne!(paged, whole);
    for id in [paged, whole] {
        let back = repo.load_index(&id, size, CHUNK).unwrap();
        assert_eq!(back, index);
        // Loaded as the index of another disk: corrupt, whatever the shape.
        for (other_size, other_chunk) in [(size - 1, CHUNK), (size, 2 * CHUNK), (size / 2, CHUNK)] {
            let e = repo.load_index(&id, other_size, other_chunk).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        }
    }
}
