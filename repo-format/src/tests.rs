//! Repository-level tests: what `Repository` promises, over memory, local and faulty backends.

use std::sync::Arc;

use proptest::prelude::*;

use crate::backend::{Backend, FaultyBackend, LocalBackend, MemoryBackend};
use crate::*;

const CHEAP: KdfParams = KdfParams::new(8, 1, 1);
const CHUNK: u32 = 64 * 1024;

fn password(p: &str) -> Secret {
    Secret::Password(p.to_owned())
}

fn init(backend: Arc<dyn Backend>, encrypted: bool) -> Repository {
    Repository::init(backend, options(encrypted, CHUNK)).unwrap()
}

/// Init options with a cheap KDF, chunks of `chunk` bytes and the default frames.
fn options(encrypted: bool, chunk: u32) -> InitOptions {
    let encryption = if encrypted {
        Encryption::Encrypted {
            secret: password("pw"),
            kdf: CHEAP,
        }
    } else {
        Encryption::None
    };
    let mut opts = InitOptions::new(encryption);
    opts.chunk_size = chunk;
    opts
}

fn mem_repo(encrypted: bool) -> (Arc<MemoryBackend>, Repository) {
    let mem = Arc::new(MemoryBackend::new());
    let repo = init(mem.clone(), encrypted);
    (mem, repo)
}

fn chunk_data(seed: u8) -> Vec<u8> {
    (0..CHUNK as usize)
        .map(|i| (i as u8 / 16).wrapping_mul(seed) ^ seed)
        .collect()
}

fn time(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// Stores one disk of two data chunks and one zero chunk, then commits a snapshot.
fn backup(repo: &Repository, name: &str, at: &str, seed: u8) -> SnapshotId {
    let mut index = DiskIndex::new_sparse(CHUNK, 3 * u64::from(CHUNK) - 100).unwrap();
    for (i, s) in [(0, seed), (2, seed.wrapping_add(1))] {
        let mut data = chunk_data(s);
        if i == 2 {
            data.truncate(CHUNK as usize - 100);
        }
        let sealed = repo.try_seal_chunk(&data).unwrap();
        repo.store_chunk(&sealed).unwrap();
        index.set(i, Some(sealed.id)).unwrap();
    }
    let index_id = repo.store_index(&index).unwrap();
    let mut m = Manifest::new(name, SnapshotKind::Vm, "host", time(at));
    m.disks.push(DiskEntry {
        name: "vda".into(),
        virtual_size: index.disk_size,
        format: "raw".into(),
        chunk_size: CHUNK,
        index: index_id,
        source: None,
        qemu_img_info: None,
        create_options: Default::default(),
        backup_mode: BackupMode::Full,
        bytes_read: 0,
        bytes_new: 0,
        chunks_new: 2,
        cbt: None,
    });
    repo.commit_snapshot(&m).unwrap()
}

/// Reads a snapshot back and rebuilds its disk.
fn restore(repo: &Repository, id: &SnapshotId) -> Vec<u8> {
    let m = repo.load_snapshot(id).unwrap();
    let index = repo.load_index(&m.disks[0].index).unwrap();
    let mut disk = Vec::new();
    for i in 0..index.len() {
        let len = (index.disk_size - i * u64::from(CHUNK)).min(u64::from(CHUNK));
        match &index.get(i) {
            Some(c) => disk.extend(repo.load_chunk(c).unwrap()),
            None => disk.resize(disk.len() + len as usize, 0),
        }
    }
    disk
}

#[test]
fn round_trip_encrypted_and_not() {
    for encrypted in [true, false] {
        let (mem, repo) = mem_repo(encrypted);
        assert_eq!(repo.is_encrypted(), encrypted);
        assert_eq!(repo.chunk_size(), CHUNK);
        let id = backup(&repo, "web", "2024-05-01T10:00:00Z", 3);
        let secret = password("pw");
        let repo = Repository::open(mem.clone(), encrypted.then_some(&secret)).unwrap();
        let disk = restore(&repo, &id);
        assert_eq!(disk.len(), 3 * CHUNK as usize - 100);
        assert_eq!(&disk[..CHUNK as usize], &chunk_data(3)[..]);
        assert!(disk[CHUNK as usize..2 * CHUNK as usize]
            .iter()
            .all(|b| *b == 0));
        assert_eq!(repo.list_chunks().unwrap().len(), 2);
        // Identical data deduplicates: same id, second store is a no-op.
        let sealed = repo.try_seal_chunk(&chunk_data(3)).unwrap();
        assert!(!repo.store_chunk(&sealed).unwrap());
        assert!(repo.has_chunk(&sealed.id).unwrap());
        assert_eq!(repo.chunk_id(&chunk_data(3)), sealed.id);
        // Encrypted ids are keyed: they do not reveal the plain BLAKE3 of the data.
        let plain = ChunkId::from_bytes(*blake3::hash(&chunk_data(3)).as_bytes());
        assert_eq!(sealed.id == plain, !encrypted);
        // Compressible chunk is stored smaller.
        assert!(sealed.bytes.len() < sealed.plain_len);
        // No plaintext in an encrypted repository.
        if encrypted {
            for key in mem.keys() {
                if key.starts_with("snapshots/") {
                    let b = mem.get(&key).unwrap();
                    assert!(!b.windows(3).any(|w| w == b"web"));
                }
            }
        }
    }
}

#[test]
fn local_backend_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(LocalBackend::new(dir.path()));
    let repo = init(backend.clone(), true);
    let id = backup(&repo, "web", "2024-05-01T10:00:00Z", 9);
    let repo = Repository::open(backend, Some(&password("pw"))).unwrap();
    assert_eq!(repo.list_snapshots().unwrap()[0].0, id);
    assert_eq!(&restore(&repo, &id)[..CHUNK as usize], &chunk_data(9)[..]);
    let chunk = repo.list_chunks().unwrap()[0];
    let hex = chunk.to_hex();
    assert!(dir
        .path()
        .join(format!("chunks/{}/{}", &hex[..2], hex))
        .is_file());
}

#[test]
fn load_chunk_into_reuses_buffers_across_chunk_kinds_and_reports_errors() {
    let mut random = vec![0u8; CHUNK as usize];
    crate::crypto::random_bytes(&mut random).unwrap();
    let chunks = [
        chunk_data(3),     // compresses
        random,            // stored uncompressed
        b"short".to_vec(), // small
        chunk_data(5),     // compresses, after a smaller plaintext
        vec![0u8; 1000],   // compresses a lot
    ];
    for encrypted in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()));
        let (mem, _) = mem_repo(encrypted);
        let backends: [Arc<dyn Backend>; 2] = [local.clone(), mem];
        for backend in backends {
            let repo = if Arc::ptr_eq(&backend, &local) {
                init(backend.clone(), encrypted)
            } else {
                Repository::open(backend.clone(), Some(&password("pw"))).unwrap()
            };
            let ids: Vec<ChunkId> = chunks
                .iter()
                .map(|c| {
                    let s = repo.try_seal_chunk(c).unwrap();
                    repo.store_chunk(&s).unwrap();
                    s.id
                })
                .collect();
            let mut bufs = ChunkBuffers::default();
            for _ in 0..2 {
                for (id, c) in ids.iter().zip(&chunks) {
                    assert_eq!(repo.load_chunk_into(id, &mut bufs).unwrap(), &c[..]);
                    assert_eq!(&repo.load_chunk(id).unwrap(), c);
                }
            }
            let missing = ChunkId::from_bytes([0xee; 32]);
            let e = repo.load_chunk_into(&missing, &mut bufs).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound);
            // A chunk stored under another chunk's id: its content does not match.
            let h = ids[0].to_hex();
            let key = format!("chunks/{}/{}", &h[..2], h);
            let other = repo.try_seal_chunk(&chunks[3]).unwrap();
            backend.delete(&key).unwrap();
            backend.put_if_absent(&key, &other.bytes).unwrap();
            let e = repo.load_chunk_into(&ids[0], &mut bufs).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            // The buffers still work after a failure.
            assert_eq!(
                repo.load_chunk_into(&ids[1], &mut bufs).unwrap(),
                &chunks[1][..]
            );
        }
    }
}

#[test]
fn tampering_any_chunk_byte_is_corrupt_through_reused_buffers() {
    for encrypted in [true, false] {
        let f = fixture(encrypted);
        let h = f.chunk.id.to_hex();
        let key = format!("chunks/{}/{}", &h[..2], h);
        let original = f.mem.get(&key).unwrap();
        let mut bufs = ChunkBuffers::default();
        for pos in 0..original.len() {
            f.mem.overwrite(&key, flip(&original, pos, 0x41));
            let e = f.repo.load_chunk_into(&f.chunk.id, &mut bufs).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "pos {pos}");
        }
        for cut in 0..original.len() {
            f.mem.overwrite(&key, original[..cut].to_vec());
            let e = f.repo.load_chunk_into(&f.chunk.id, &mut bufs).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "truncated to {cut}");
        }
        f.mem.overwrite(&key, original.clone());
        f.repo.load_chunk_into(&f.chunk.id, &mut bufs).unwrap();
    }
}

#[test]
fn wrong_or_missing_secret_is_wrong_key() {
    let (mem, _repo) = mem_repo(true);
    let kf = Secret::KeyFile(KeyFile::try_generate().unwrap());
    for secret in [Some(&password("nope")), Some(&kf), None] {
        let e = Repository::open(mem.clone(), secret).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongKey, "{e}");
    }
}

#[test]
fn password_and_key_file_slots_both_open() {
    let (mem, repo) = mem_repo(true);
    let kf = KeyFile::try_generate().unwrap();
    let kf = KeyFile::parse(&kf.to_text()).unwrap();
    let kf_slot = repo
        .add_key(&Secret::KeyFile(kf.clone()), CHEAP, "backup key file")
        .unwrap();
    let id = backup(&repo, "web", "2024-05-01T10:00:00Z", 1);

    let keys = repo.list_keys().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.id == kf_slot
        && k.kind == KeySlotKind::Keyfile
        && k.label == "backup key file"));

    for secret in [password("pw"), Secret::KeyFile(kf.clone())] {
        let r = Repository::open(mem.clone(), Some(&secret)).unwrap();
        assert_eq!(r.id(), repo.id());
        assert_eq!(r.load_snapshot(&id).unwrap().name, "web");
    }

    // Remove the password slot: only the key file opens now; the last slot stays.
    let pw_slot = keys.iter().find(|k| k.id != kf_slot).unwrap().id;
    repo.remove_key(&pw_slot).unwrap();
    assert_eq!(
        Repository::open(mem.clone(), Some(&password("pw")))
            .unwrap_err()
            .kind(),
        ErrorKind::WrongKey
    );
    Repository::open(mem.clone(), Some(&Secret::KeyFile(kf))).unwrap();
    assert_eq!(
        repo.remove_key(&kf_slot).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        repo.remove_key(&pw_slot).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn damaged_key_slot_does_not_lock_out_others() {
    let (mem, repo) = mem_repo(true);
    repo.add_key(&password("second"), CHEAP, "").unwrap();
    let first = mem
        .keys()
        .into_iter()
        .find(|k| k.starts_with("keys/"))
        .unwrap();
    mem.overwrite(&first, b"{garbage".to_vec());
    // Whichever slot was damaged, one of the two passphrases still opens.
    let opened = [password("pw"), password("second")]
        .iter()
        .filter(|s| Repository::open(mem.clone(), Some(s)).is_ok())
        .count();
    assert_eq!(opened, 1);
}

#[test]
fn refused_delete_keeps_key_slot() {
    let mem = Arc::new(MemoryBackend::new());
    let faulty = Arc::new(FaultyBackend::new(mem.clone()));
    let repo = init(faulty.clone(), true);
    let id = repo.add_key(&password("second"), CHEAP, "").unwrap();
    faulty.set_refuse_deletes(true);
    assert_eq!(repo.remove_key(&id).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(repo.list_keys().unwrap().len(), 2);
    Repository::open(mem, Some(&password("second"))).unwrap();
}

#[test]
fn init_and_open_errors() {
    let (mem, _) = mem_repo(false);
    let e = Repository::init(mem.clone(), InitOptions::new(Encryption::None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    let empty = Arc::new(MemoryBackend::new());
    let e = Repository::open(empty.clone(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository);
    empty.overwrite("config", br#"{"version":1,"kdf":"restic"}"#.to_vec());
    let e = Repository::open(empty, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository);

    for bad in [0, 4096, 3 << 16, 32 << 20] {
        let mut opts = InitOptions::new(Encryption::None);
        opts.chunk_size = bad;
        let e = Repository::init(Arc::new(MemoryBackend::new()), opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}

#[test]
fn config_format() {
    let (mem, repo) = mem_repo(true);
    let v: serde_json::Value = serde_json::from_slice(&mem.get("config").unwrap()).unwrap();
    assert_eq!(v["format"], "lifeboat-repo");
    assert_eq!(v["version"], 1);
    let expected = match Cipher::preferred() {
        Cipher::Aegis256 => "aegis256-blake3",
        Cipher::XChaCha20Poly1305 => "xchacha20poly1305-blake3",
    };
    assert_eq!(v["encryption"], expected);
    assert_eq!(v["compression"], "zstd");
    assert_eq!(v["zstd_level"], DEFAULT_ZSTD_LEVEL);
    assert_eq!(v["chunk_size"], CHUNK);
    assert_eq!(v["id"].as_str().unwrap().len(), 32);
    assert_eq!(v["mac"].as_str().unwrap().len(), 64);
    assert_eq!(repo.config().id, v["id"]);

    let (mem, _) = mem_repo(false);
    let v: serde_json::Value = serde_json::from_slice(&mem.get("config").unwrap()).unwrap();
    assert_eq!(v["encryption"], "none");
    assert!(v.get("mac").is_none());
}

#[test]
fn tampered_config_chunk_size_is_corrupt() {
    let (mem, _) = mem_repo(true);
    let mut v: serde_json::Value = serde_json::from_slice(&mem.get("config").unwrap()).unwrap();
    v["chunk_size"] = serde_json::json!(CHUNK * 2);
    mem.overwrite("config", serde_json::to_vec(&v).unwrap());
    let e = Repository::open(mem.clone(), Some(&password("pw"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // Re-formatting (whitespace, key order) is not tampering: the MAC covers canonical JSON.
    v["chunk_size"] = serde_json::json!(CHUNK);
    mem.overwrite("config", serde_json::to_vec(&v).unwrap());
    Repository::open(mem, Some(&password("pw"))).unwrap();
}

#[test]
fn object_swap_is_corrupt() {
    for encrypted in [true, false] {
        let (mem, repo) = mem_repo(encrypted);
        let a = repo.try_seal_chunk(&chunk_data(1)).unwrap();
        let b = repo.try_seal_chunk(&chunk_data(2)).unwrap();
        repo.store_chunk(&a).unwrap();
        repo.store_chunk(&b).unwrap();
        let key_b = mem
            .keys()
            .into_iter()
            .find(|k| k.ends_with(&b.id.to_hex()))
            .unwrap();
        mem.overwrite(&key_b, a.bytes.clone());
        let e = repo.load_chunk(&b.id).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains(&b.id.to_hex()), "{e}");

        // A chunk renamed as an index or a manifest is refused too (kind byte + AAD).
        let id = backup(&repo, "x", "2024-01-01T00:00:00Z", 5);
        let m = repo.load_snapshot(&id).unwrap();
        let snap_key = format!("snapshots/{id}");
        let idx_hex = m.disks[0].index.to_hex();
        let idx_key = format!("indexes/{}/{}", &idx_hex[..2], idx_hex);
        let manifest_bytes = mem.get(&snap_key).unwrap();
        mem.overwrite(&snap_key, mem.get(&idx_key).unwrap());
        mem.overwrite(&idx_key, manifest_bytes);
        assert_eq!(
            repo.load_snapshot(&id).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            repo.load_index(&m.disks[0].index).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            repo.list_snapshots().unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}

#[test]
fn truncated_objects_are_corrupt() {
    for encrypted in [true, false] {
        let (_, repo) = mem_repo(encrypted);
        let data = b"short chunk, compressible compressible compressible".repeat(20);
        let sealed = repo.try_seal_chunk(&data).unwrap();
        for len in 0..sealed.bytes.len() {
            let e = repo
                .open_chunk(&sealed.id, &sealed.bytes[..len])
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "len {len}");
        }
    }
}

#[test]
fn zstd_bomb_is_refused() {
    let (mem, repo) = mem_repo(false);
    // A "chunk" that claims to be 32 MiB of zeros, in a repository of 64 KiB chunks.
    let plain = vec![0u8; 32 << 20];
    let id = ChunkId::from_bytes(*blake3::hash(&plain).as_bytes());
    let mut obj = b"LBOB\x01\x01\x01\x00".to_vec();
    obj.extend(zstd::bulk::compress(&plain, 3).unwrap());
    assert!(obj.len() < 4096);
    let hex = id.to_hex();
    mem.overwrite(&format!("chunks/{}/{}", &hex[..2], hex), obj);
    assert_eq!(repo.load_chunk(&id).unwrap_err().kind(), ErrorKind::Corrupt);
}

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

#[test]
fn errors_display_only_their_context() {
    let (mem, _) = mem_repo(true);
    let e = Repository::open(mem, Some(&password("bad"))).unwrap_err();
    assert!(e.to_string().starts_with("no key slot opens"), "{e}");
    let e = Repository::open(Arc::new(MemoryBackend::new()), None).unwrap_err();
    let source = std::error::Error::source(&e).unwrap();
    assert!(!e.to_string().contains(&source.to_string()));
}

/// Shared fixture for the tampering properties: one repository per mode with one snapshot.
struct Fixture {
    mem: Arc<MemoryBackend>,
    repo: Repository,
    chunk: SealedChunk,
    snapshot: SnapshotId,
    index: IndexId,
}

fn fixture(encrypted: bool) -> Fixture {
    let (mem, repo) = mem_repo(encrypted);
    let data = b"tamper me ".repeat(500);
    let chunk = repo.try_seal_chunk(&data).unwrap();
    repo.store_chunk(&chunk).unwrap();
    let snapshot = backup(&repo, "vm", "2024-05-01T10:00:00Z", 11);
    let index = repo.load_snapshot(&snapshot).unwrap().disks[0].index;
    Fixture {
        mem,
        repo,
        chunk,
        snapshot,
        index,
    }
}

fn flip(bytes: &[u8], pos: usize, xor: u8) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let p = pos % b.len();
    b[p] ^= xor;
    b
}

#[test]
fn tampering_any_chunk_byte_is_corrupt_exhaustive() {
    for encrypted in [true, false] {
        let f = fixture(encrypted);
        for pos in 0..f.chunk.bytes.len() {
            for xor in [0x01, 0x80, 0xff] {
                let e = f
                    .repo
                    .open_chunk(&f.chunk.id, &flip(&f.chunk.bytes, pos, xor))
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corrupt, "pos {pos} xor {xor}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tampering_any_object_byte_is_corrupt(
        encrypted in any::<bool>(),
        which in 0..3usize,
        pos in any::<usize>(),
        xor in 1..=255u8,
    ) {
        let f = fixture(encrypted);
        let key = match which {
            0 => {
                let h = f.chunk.id.to_hex();
                format!("chunks/{}/{}", &h[..2], h)
            }
            1 => {
                let h = f.index.to_hex();
                format!("indexes/{}/{}", &h[..2], h)
            }
            _ => format!("snapshots/{}", f.snapshot),
        };
        let original = f.mem.get(&key).unwrap();
        f.mem.overwrite(&key, flip(&original, pos, xor));
        let kind = match which {
            0 => f.repo.load_chunk(&f.chunk.id).map(drop),
            1 => f.repo.load_index(&f.index).map(drop),
            _ => f.repo.load_snapshot(&f.snapshot).map(drop),
        }
        .unwrap_err()
        .kind();
        prop_assert_eq!(kind, ErrorKind::Corrupt);
    }

    #[test]
    fn tampering_any_config_byte_never_opens_a_different_config(
        pos in any::<usize>(),
        xor in 1..=255u8,
    ) {
        let (mem, repo) = mem_repo(true);
        let original = mem.get("config").unwrap();
        mem.overwrite("config", flip(&original, pos, xor));
        match Repository::open(mem.clone(), Some(&password("pw"))) {
            // Only formatting-neutral changes (whitespace) may still open.
            Ok(r) => prop_assert_eq!(r.config(), repo.config()),
            Err(e) => prop_assert!(matches!(
                e.kind(),
                ErrorKind::Corrupt | ErrorKind::NotARepository | ErrorKind::UnsupportedVersion
            ), "{:?}", e.kind()),
        }
    }

    #[test]
    fn arbitrary_bytes_as_objects_never_panic(
        encrypted in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        header in any::<bool>(),
    ) {
        let f = fixture(encrypted);
        let mut b = bytes;
        if header {
            let mut h = b"LBOB\x01\x01\x00\x00".to_vec();
            h[6] = b.first().copied().unwrap_or(0) & 3;
            h.extend(b);
            b = h;
        }
        prop_assert!(f.repo.open_chunk(&f.chunk.id, &b).is_err());
    }
}

#[test]
fn repository_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Repository>();
    assert_send_sync::<Arc<dyn Backend>>();

    let (_, repo) = mem_repo(true);
    let repo = Arc::new(repo);
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let repo = repo.clone();
            std::thread::spawn(move || {
                let sealed = repo.try_seal_chunk(&chunk_data(t % 2)).unwrap();
                repo.store_chunk(&sealed).unwrap();
                sealed.id
            })
        })
        .collect();
    let ids: Vec<ChunkId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids[0], ids[2]);
    assert_eq!(repo.list_chunks().unwrap().len(), 2);
    for id in ids {
        repo.load_chunk(&id).unwrap();
    }
    backup(&repo, "x", "2024-01-01T00:00:00Z", 1);
    assert_eq!(repo.list_indexes().unwrap().len(), 1);
}

#[test]
fn orphan_key_slot_with_same_password_is_passed_over() {
    // E.g. left behind by the loser of two concurrent `init`s.
    let (mem, repo) = mem_repo(true);
    let (other, _) = mem_repo(true);
    let orphan = other
        .keys()
        .into_iter()
        .find(|k| k.starts_with("keys/"))
        .unwrap();
    mem.overwrite(
        &format!("keys/{}", "0".repeat(64)),
        other.get(&orphan).unwrap(),
    );
    let r = Repository::open(mem.clone(), Some(&password("pw"))).unwrap();
    assert_eq!(r.id(), repo.id());
    let sealed = repo.try_seal_chunk(b"x").unwrap();
    repo.store_chunk(&sealed).unwrap();
    assert_eq!(r.load_chunk(&sealed.id).unwrap(), b"x");
}

#[test]
fn seal_chunk_and_key_file_text_apis() {
    let (_, repo) = mem_repo(true);
    let sealed = repo.seal_chunk(&chunk_data(1));
    assert_eq!(
        repo.open_chunk(&sealed.id, &sealed.bytes).unwrap(),
        chunk_data(1)
    );
    let too_big = vec![1u8; CHUNK as usize + 1];
    assert_eq!(
        repo.try_seal_chunk(&too_big).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let text = KeyFile::generate();
    let kf = KeyFile::parse(&text).unwrap();
    let slot = repo.add_key(&Secret::KeyFile(kf), CHEAP, "").unwrap();
    assert!(repo.list_keys().unwrap().iter().any(|k| k.id == slot));
}

#[test]
fn tampering_any_config_byte_exhaustive() {
    let (mem, repo) = mem_repo(true);
    let original = mem.get("config").unwrap();
    for pos in 0..original.len() {
        for xor in [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
            mem.overwrite("config", flip(&original, pos, xor));
            match Repository::open(mem.clone(), Some(&password("pw"))) {
                Ok(r) => assert_eq!(r.config(), repo.config(), "pos {pos} xor {xor}"),
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::Corrupt
                            | ErrorKind::NotARepository
                            | ErrorKind::UnsupportedVersion
                    ),
                    "pos {pos} xor {xor}: {:?} {e}",
                    e.kind()
                ),
            }
        }
    }
}

/// A framed repository of 256 KiB chunks in 64 KiB frames (version 3: delta objects).
fn framed_repo(encrypted: bool) -> (Arc<MemoryBackend>, Repository) {
    let mem = Arc::new(MemoryBackend::new());
    let mut opts = options(encrypted, 4 * CHUNK);
    opts.frame_size = Some(CHUNK);
    let repo = Repository::init(mem.clone(), opts).unwrap();
    assert_eq!(repo.config().version, magic::CONFIG_VERSION_DELTA);
    (mem, repo)
}

#[test]
fn delta_chunks_load_with_their_base_and_fail_without_it() {
    for encrypted in [false, true] {
        let (mem, repo) = framed_repo(encrypted);
        let mut plain: Vec<u8> = (0..4).flat_map(|s| chunk_data(s + 3)).collect();
        let first = repo.try_seal_chunk(&plain).unwrap();
        assert!(repo.store_chunk(&first).unwrap());
        let parent = repo.load_chunk_frames(&first.id, &[2]).unwrap().unwrap();
        let frame = chunk_data(99);
        plain[2 * CHUNK as usize..3 * CHUNK as usize].copy_from_slice(&frame);
        let (delta, all_zero) = repo.seal_chunk_update(&parent, &[(2, &frame)]).unwrap();
        assert!(!all_zero);
        assert_eq!(delta.id, repo.chunk_id(&plain));
        assert!(delta.bytes.len() < first.bytes.len());
        assert!(repo.store_chunk(&delta).unwrap());
        assert_eq!(repo.load_chunk(&delta.id).unwrap(), plain);
        let mut bufs = ChunkBuffers::default();
        assert_eq!(
            repo.load_chunk_into(&delta.id, &mut bufs).unwrap(),
            &plain[..]
        );
        // The pure open cannot fetch the base: a clear error, not a wrong answer.
        let e = repo.open_chunk(&delta.id, &delta.bytes).unwrap_err();
        assert!(e.to_string().contains("delta object"), "{e}");
        // A second update of the delta keeps the first chunk as its base.
        let parent = repo.load_chunk_frames(&delta.id, &[0]).unwrap().unwrap();
        let frame0 = chunk_data(7);
        plain[..CHUNK as usize].copy_from_slice(&frame0);
        let (second, _) = repo.seal_chunk_update(&parent, &[(0, &frame0)]).unwrap();
        repo.store_chunk(&second).unwrap();
        assert_eq!(repo.load_chunk(&second.id).unwrap(), plain);
        // Three of four frames changed: rewritten whole (the base is read for it).
        let parent = repo.load_chunk_frames(&second.id, &[1]).unwrap().unwrap();
        let frame1 = chunk_data(8);
        plain[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&frame1);
        let (whole, _) = repo.seal_chunk_update(&parent, &[(1, &frame1)]).unwrap();
        assert_eq!(whole.bytes[4], magic::OBJECT_VERSION_FRAMED);
        repo.store_chunk(&whole).unwrap();
        // Without the base, its deltas are corrupt, and the message names the base.
        mem.delete(&format!(
            "chunks/{}/{}",
            &first.id.to_hex()[..2],
            first.id.to_hex()
        ))
        .unwrap();
        assert_eq!(repo.load_chunk(&whole.id).unwrap(), plain);
        for id in [delta.id, second.id] {
            let e = repo.load_chunk(&id).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains("base object"), "{e}");
            let e = repo.load_chunk_into(&id, &mut bufs).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(repo.load_chunk_frames(&id, &[0, 1, 2, 3]).is_err());
            let e = repo.load_chunk_frames(&id, &[0]).unwrap_err();
            assert!(e.to_string().contains("missing"), "{e}");
        }
    }
}

/// A backend that counts the bytes it hands out for chunk objects.
#[derive(Debug, Default)]
struct CountingBackend {
    inner: MemoryBackend,
    chunk_bytes: std::sync::atomic::AtomicU64,
}

impl CountingBackend {
    fn count(&self, key: &str, n: usize) {
        if key.starts_with("chunks/") {
            self.chunk_bytes
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn take(&self) -> u64 {
        self.chunk_bytes
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Backend for CountingBackend {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let v = self.inner.get(key)?;
        self.count(key, v.len());
        Ok(v)
    }
    fn get_head(&self, key: &str, len: usize) -> Result<(Vec<u8>, u64)> {
        let (v, size) = self.inner.get_head(key, len)?;
        self.count(key, v.len());
        Ok((v, size))
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
}

/// An update that becomes a delta object reads only the header and frame table of a framed
/// parent; one that changes more than half the frames, or whose parent is a delta object,
/// reads the parent whole. Every result opens to the right plaintext.
#[test]
fn delta_update_reads_only_the_parents_table() {
    for encrypted in [false, true] {
        let backend = Arc::new(CountingBackend::default());
        let mut opts = options(encrypted, 4 * CHUNK);
        opts.frame_size = Some(CHUNK);
        let repo = Repository::init(backend.clone(), opts).unwrap();
        // Incompressible frames, so that the whole object is far larger than its table.
        let mut x = 0x9e37_79b9u32;
        let mut plain: Vec<u8> = (0..4 * CHUNK as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let first = repo.try_seal_chunk(&plain).unwrap();
        repo.store_chunk(&first).unwrap();
        let table = crate::framed::head_len(encrypted, 4) as u64;
        backend.take();

        let parent = repo.load_chunk_frames(&first.id, &[1, 3]).unwrap().unwrap();
        assert!(backend.take() <= table, "head-only read");
        let (f1, f3) = (chunk_data(41), chunk_data(43));
        plain[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&f1);
        plain[3 * CHUNK as usize..].copy_from_slice(&f3);
        let (delta, _) = repo
            .seal_chunk_update(&parent, &[(1, &f1), (3, &f3)])
            .unwrap();
        assert_eq!(delta.bytes[4], magic::OBJECT_VERSION_DELTA);
        assert_eq!(delta.id, repo.chunk_id(&plain));
        repo.store_chunk(&delta).unwrap();
        assert_eq!(repo.load_chunk(&delta.id).unwrap(), plain);

        // Three of four frames: the update is rewritten whole, from the whole parent.
        backend.take();
        let parent = repo
            .load_chunk_frames(&first.id, &[0, 1, 2])
            .unwrap()
            .unwrap();
        assert!(backend.take() >= first.bytes.len() as u64);
        let mut other = plain.clone();
        let f = [chunk_data(50), chunk_data(51), chunk_data(52)];
        for (i, d) in f.iter().enumerate() {
            other[i * CHUNK as usize..(i + 1) * CHUNK as usize].copy_from_slice(d);
        }
        other[3 * CHUNK as usize..].copy_from_slice(&first_frame(&repo, &first.id, 3));
        let (whole, _) = repo
            .seal_chunk_update(&parent, &[(0, &f[0]), (1, &f[1]), (2, &f[2])])
            .unwrap();
        assert_eq!(whole.bytes[4], magic::OBJECT_VERSION_FRAMED);
        repo.store_chunk(&whole).unwrap();
        assert_eq!(repo.load_chunk(&whole.id).unwrap(), other);

        // A delta parent is read whole (its own frames are copied into the next delta).
        backend.take();
        let parent = repo.load_chunk_frames(&delta.id, &[1]).unwrap().unwrap();
        assert!(backend.take() >= delta.bytes.len() as u64);
        let f1 = chunk_data(60);
        plain[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&f1);
        let (second, _) = repo.seal_chunk_update(&parent, &[(1, &f1)]).unwrap();
        assert_eq!(second.bytes[4], magic::OBJECT_VERSION_DELTA);
        repo.store_chunk(&second).unwrap();
        assert_eq!(repo.load_chunk(&second.id).unwrap(), plain);
    }
}

/// Frame `i` of stored chunk `id`'s plaintext.
fn first_frame(repo: &Repository, id: &ChunkId, i: usize) -> Vec<u8> {
    repo.load_chunk(id).unwrap()[i * CHUNK as usize..(i + 1) * CHUNK as usize].to_vec()
}

/// Every object kind (unframed chunk, framed chunk, delta chunk, index, manifest) round-trips
/// through a reopened repository with either cipher, the config names the cipher, and a
/// changed byte of a framed chunk is corrupt.
#[test]
fn each_cipher_round_trips_every_object_kind() {
    for cipher in [Cipher::XChaCha20Poly1305, Cipher::Aegis256] {
        for frames in [None, Some(CHUNK)] {
            let mem = Arc::new(MemoryBackend::new());
            let mut opts = options(true, 4 * CHUNK);
            opts.cipher = cipher;
            opts.frame_size = frames;
            let repo = Repository::init(mem.clone(), opts).unwrap();
            assert_eq!(repo.config().encryption, cipher.scheme());
            let mut plain: Vec<u8> = (0..4).flat_map(|s| chunk_data(s + 3)).collect();
            let first = repo.try_seal_chunk(&plain).unwrap();
            repo.store_chunk(&first).unwrap();
            let id = backup(&repo, "vm", "2024-05-01T10:00:00Z", 4);
            let secret = password("pw");
            let repo = Repository::open(mem.clone(), Some(&secret)).unwrap();
            assert_eq!(repo.config().encryption, cipher.scheme());
            assert_eq!(repo.load_chunk(&first.id).unwrap(), plain);
            assert_eq!(&restore(&repo, &id)[..CHUNK as usize], &chunk_data(4)[..]);
            if frames.is_some() {
                let parent = repo.load_chunk_frames(&first.id, &[1]).unwrap().unwrap();
                let frame = chunk_data(42);
                plain[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&frame);
                let (delta, _) = repo.seal_chunk_update(&parent, &[(1, &frame)]).unwrap();
                repo.store_chunk(&delta).unwrap();
                assert_eq!(repo.load_chunk(&delta.id).unwrap(), plain);
            }
            for pos in (0..first.bytes.len()).step_by(97) {
                let e = repo
                    .open_chunk(&first.id, &flip(&first.bytes, pos, 0x04))
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{cipher:?} pos {pos}");
            }
        }
    }
}

/// A config naming a cipher this build does not know is refused as unsupported, not misread.
#[test]
fn unknown_cipher_in_config_is_unsupported() {
    let (mem, _) = mem_repo(true);
    let config = String::from_utf8(mem.get("config").unwrap()).unwrap();
    let scheme = Cipher::preferred().scheme();
    let name = serde_json::to_value(scheme).unwrap();
    let changed = config.replace(name.as_str().unwrap(), "rot13-blake3");
    assert_ne!(changed, config);
    mem.overwrite("config", changed.into_bytes());
    let e = Repository::open(mem, Some(&password("pw"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsupportedVersion, "{e}");
}
