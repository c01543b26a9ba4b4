//! Chunk and snapshot round trips over each backend, cipher and thread.

use std::sync::Arc;

use super::{backup, chunk_data, flip, init, mem_repo, options, password, restore, CHEAP, CHUNK};
use crate::backend::{Backend, LocalBackend, MemoryBackend};
use crate::*;

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
