//! [`RepoSource`]: a snapshot disk as a [`BlockSource`] for the NBD server (instant restore).
//!
//! Reads map to chunks through the disk index; zero entries are holes (and `base:allocation`
//! holes, so QEMU skips them); stored chunks are loaded, authenticated, decompressed and
//! re-hashed by [`Repository::load_chunk`] on the calling (blocking-pool) thread and kept in a
//! small LRU cache, since QEMU reads a chunk in many small pieces. A chunk that fails its checks
//! is an error for that read (the client gets `EIO`) and is counted in
//! [`RepoSource::failures`], so the caller can fail loudly.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use repo_format::{DiskIndex, Repository};
use vmdisk::nbd::{BlockSource, Piece};

/// A snapshot disk served from the repository.
pub struct RepoSource {
    repo: Arc<Repository>,
    index: Arc<DiskIndex>,
    cache: Mutex<Lru>,
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

struct Lru {
    cap: usize,
    map: HashMap<u64, Bytes>,
    order: VecDeque<u64>,
}

impl Lru {
    fn get(&mut self, k: u64) -> Option<Bytes> {
        let v = self.map.get(&k).cloned()?;
        if let Some(p) = self.order.iter().position(|x| *x == k) {
            self.order.remove(p);
        }
        self.order.push_back(k);
        Some(v)
    }

    fn put(&mut self, k: u64, v: Bytes) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
}

impl RepoSource {
    /// Serve `index` (checked by the caller with `check_index`) from `repo`, caching up to
    /// `cache_chunks` chunks.
    pub fn new(repo: Arc<Repository>, index: Arc<DiskIndex>, cache_chunks: usize) -> Self {
        RepoSource {
            repo,
            index,
            cache: Mutex::new(Lru {
                cap: cache_chunks.max(1),
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        }
    }

    /// How many reads failed (corrupt or missing chunks), and the last reason.
    pub fn failures(&self) -> (u64, Option<String>) {
        let last = self.last_failure.lock().ok().and_then(|l| l.clone());
        (self.failures.load(Ordering::Relaxed), last)
    }

    fn chunk(&self, i: u64) -> vmdisk::Result<Bytes> {
        if let Some(b) = self.cache.lock().ok().and_then(|mut c| c.get(i)) {
            return Ok(b);
        }
        let cs = u64::from(self.index.chunk_size);
        let id = self
            .index
            .entries
            .get(i as usize)
            .copied()
            .flatten()
            .ok_or_else(|| vmdisk::Error::new(vmdisk::ErrorKind::InvalidArgument, "no chunk"))?;
        let expected = (self.index.disk_size - i * cs).min(cs);
        let data = match self.repo.load_chunk(&id) {
            Ok(d) if d.len() as u64 == expected => Bytes::from(d),
            Ok(d) => {
                return Err(self.fail(format!(
                    "chunk {id} holds {} bytes, expected {expected}",
                    d.len()
                )))
            }
            Err(e) => return Err(self.fail(format!("cannot load chunk {id}: {e}"))),
        };
        if let Ok(mut c) = self.cache.lock() {
            c.put(i, data.clone());
        }
        Ok(data)
    }

    fn fail(&self, msg: String) -> vmdisk::Error {
        tracing::error!("{msg}");
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last_failure.lock() {
            *l = Some(msg.clone());
        }
        vmdisk::Error::new(vmdisk::ErrorKind::Io, msg)
    }
}

impl BlockSource for RepoSource {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn read(&self, offset: u64, len: u32) -> vmdisk::Result<Vec<Piece>> {
        let cs = u64::from(self.index.chunk_size);
        let end = offset + u64::from(len);
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let chunk_end = ((i + 1) * cs).min(end);
            let n = (chunk_end - pos) as u32;
            let stored = self
                .index
                .entries
                .get(i as usize)
                .copied()
                .flatten()
                .is_some();
            if stored {
                let data = self.chunk(i)?;
                let from = (pos - i * cs) as usize;
                let slice = data.slice(from..from + n as usize);
                out.push(Piece::Data(slice));
            } else {
                match out.last_mut() {
                    Some(Piece::Zero(z)) => *z += n,
                    _ => out.push(Piece::Zero(n)),
                }
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    fn extents(&self, offset: u64, len: u32) -> vmdisk::Result<Vec<(u32, bool)>> {
        let cs = u64::from(self.index.chunk_size);
        let end = offset + u64::from(len);
        let mut out: Vec<(u32, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let chunk_end = ((i + 1) * cs).min(end);
            let n = (chunk_end - pos) as u32;
            let zero = self
                .index
                .entries
                .get(i as usize)
                .copied()
                .flatten()
                .is_none();
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += n,
                _ => out.push((n, zero)),
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    fn preferred_block_size(&self) -> u32 {
        // QEMU aligns its requests to this; a whole chunk per request is what we serve best,
        // but keep it modest so small guest reads stay small.
        self.index.chunk_size.clamp(4096, 1 << 16)
    }
}
