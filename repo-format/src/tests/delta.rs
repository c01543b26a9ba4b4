//! Framed repositories: delta chunks, their base objects and head-only parent reads.

use std::sync::Arc;

use super::{chunk_data, options, CHUNK};
use crate::backend::{Backend, MemoryBackend};
use crate::*;

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
