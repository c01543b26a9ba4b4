//! [`RepoSource`]: a snapshot disk as a [`BlockSource`] for the NBD server (instant restore).
//!
//! Reads map to chunks through the disk index; zero entries are holes (and `base:allocation`
//! holes, so QEMU skips them); stored chunks are loaded, authenticated, decompressed and
//! re-hashed by [`Repository::load_chunk`] on the calling (blocking-pool) thread and kept in a
//! small LRU cache, since QEMU reads a chunk in many small pieces. A chunk that fails its checks
//! is an error for that read (the client gets `EIO`) and is counted in
//! [`RepoSource::failures`], so the caller can fail loudly.
//!
//! **Lazy index** ([`RepoSource::lazy`]): a whole disk index (up to 64 Ki chunks, or written by
//! an earlier version) is O(disk size) to fetch, decrypt, decode and check, so instant restore
//! does not wait for it before the VM starts. The export's size and block size come from the
//! manifest; the index is opened by [`RepoSource::load_index`] (called once in the background)
//! and every read or block-status request that arrives earlier waits for that to finish. An
//! index that fails to load or does not match the manifest makes every read fail (counted in the
//! failures).
//!
//! **Pages**: the pages of a paged index are loaded when a request first touches them and the
//! last [`PAGE_CACHE`] of them are kept, so memory does not follow the disk's size. A page that
//! fails to load fails the request (counted in the failures).
//!
//! **Test hook**: `LIFEBOAT_TEST_SERVE_CHUNK_DELAY_MS=N` makes every chunk load of a
//! `RepoSource` (i.e. only what the NBD server reads from the repository, not backup/restore)
//! sleep N ms first; the e2e tests use it to slow an instant restore's move down
//! deterministically. Not for production use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use repo_format::{ChunkId, DiskIndex, IndexId, IndexPages, Repository};
use vmdisk::nbd::{BlockSource, Piece};

/// Environment variable of the chunk-load delay test hook (see the module docs).
pub const TEST_CHUNK_DELAY_ENV: &str = "LIFEBOAT_TEST_SERVE_CHUNK_DELAY_MS";

/// Index pages kept by a [`RepoSource`] (each at most 2.6 MiB decoded).
pub const PAGE_CACHE: usize = 4;

/// A snapshot disk served from the repository.
pub struct RepoSource {
    repo: Arc<Repository>,
    index: OnceLock<std::result::Result<Arc<IndexPages>, String>>,
    /// For a lazy source: what to load (index id, disk name).
    pending: Option<(IndexId, String)>,
    size: u64,
    chunk_size: u32,
    cache: Mutex<Lru<Bytes>>,
    pages: Mutex<Lru<Arc<DiskIndex>>>,
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
    chunk_delay: Option<Duration>,
}

struct Lru<V> {
    cap: usize,
    map: HashMap<u64, V>,
    order: VecDeque<u64>,
}

impl<V: Clone> Lru<V> {
    fn new(cap: usize) -> Self {
        Lru {
            cap: cap.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, k: u64) -> Option<V> {
        let v = self.map.get(&k).cloned()?;
        if let Some(p) = self.order.iter().position(|x| *x == k) {
            self.order.remove(p);
        }
        self.order.push_back(k);
        Some(v)
    }

    fn put(&mut self, k: u64, v: V) {
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
    /// Serve `index` from `repo`, caching up to `cache_chunks` chunks.
    pub fn new(repo: Arc<Repository>, index: Arc<IndexPages>, cache_chunks: usize) -> Self {
        let (size, chunk_size) = (index.disk_size(), index.chunk_size());
        let cell = OnceLock::new();
        let _ = cell.set(Ok(index));
        Self::build(repo, cell, None, size, chunk_size, cache_chunks)
    }

    /// Serve disk `entry` of a snapshot without loading its index yet: size and chunk size
    /// come from the manifest entry; call [`RepoSource::load_index`] (blocking) to load it.
    pub fn lazy(
        repo: Arc<Repository>,
        entry: &repo_format::DiskEntry,
        cache_chunks: usize,
    ) -> Self {
        Self::build(
            repo,
            OnceLock::new(),
            Some((entry.index, entry.name.clone())),
            entry.virtual_size,
            entry.chunk_size,
            cache_chunks,
        )
    }

    fn build(
        repo: Arc<Repository>,
        index: OnceLock<std::result::Result<Arc<IndexPages>, String>>,
        pending: Option<(IndexId, String)>,
        size: u64,
        chunk_size: u32,
        cache_chunks: usize,
    ) -> Self {
        let chunk_delay = super::test_delay(TEST_CHUNK_DELAY_ENV);
        RepoSource {
            repo,
            index,
            pending,
            size,
            chunk_size,
            cache: Mutex::new(Lru::new(cache_chunks)),
            pages: Mutex::new(Lru::new(PAGE_CACHE)),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            chunk_delay,
        }
    }

    /// Opens the index (once; blocking; concurrent callers wait for the first): a whole index
    /// is loaded, a paged one's root. A failure is counted once and makes every later read fail
    /// with the same message.
    pub fn load_index(&self) -> std::result::Result<Arc<IndexPages>, String> {
        let mut first_failure = false;
        let r = self
            .index
            .get_or_init(|| {
                let r = self.load_index_uncached();
                first_failure = r.is_err();
                r
            })
            .clone();
        if let (true, Err(e)) = (first_failure, &r) {
            let _ = self.fail(e.clone());
        }
        r
    }

    /// Whether the index is loaded (or failed to load).
    pub fn index_state(&self) -> Option<std::result::Result<(), String>> {
        self.index
            .get()
            .map(|r| r.as_ref().map(|_| ()).map_err(Clone::clone))
    }

    fn load_index_uncached(&self) -> std::result::Result<Arc<IndexPages>, String> {
        let Some((id, name)) = &self.pending else {
            return Err("no index".into());
        };
        // `open_index` refuses an index of another size or chunk size than the entry's.
        let index = self
            .repo
            .open_index(id, self.size, self.chunk_size)
            .map_err(|e| format!("cannot load the index of disk '{name}': {e}"))?;
        Ok(Arc::new(index))
    }

    fn index(&self) -> vmdisk::Result<Arc<IndexPages>> {
        self.load_index()
            .map_err(|e| vmdisk::Error::new(vmdisk::ErrorKind::Io, e))
    }

    /// The chunk stored for entry `i` of the disk (`None`: zero), from its page of the index.
    fn entry(&self, index: &IndexPages, i: u64) -> vmdisk::Result<Option<ChunkId>> {
        let k = i / index.page_entries();
        let (first, _) = index.page_span(k);
        let cached = self.pages.lock().ok().and_then(|mut c| c.get(k));
        let page = match cached {
            Some(p) => p,
            None => {
                let p = self.repo.load_index_page(index, k).map_err(|e| {
                    self.fail(format!("cannot load page {k} of index {}: {e}", index.id()))
                })?;
                if let Ok(mut c) = self.pages.lock() {
                    c.put(k, p.clone());
                }
                p
            }
        };
        Ok(page.get(i - first))
    }

    /// How many reads failed (corrupt or missing chunks), and the last reason.
    pub fn failures(&self) -> (u64, Option<String>) {
        let last = self.last_failure.lock().ok().and_then(|l| l.clone());
        (self.failures.load(Ordering::Relaxed), last)
    }

    /// The data of entry `i` of the disk, chunk `id` of `index` (cached).
    fn chunk(&self, index: &IndexPages, i: u64, id: ChunkId) -> vmdisk::Result<Bytes> {
        if let Some(b) = self.cache.lock().ok().and_then(|mut c| c.get(i)) {
            return Ok(b);
        }
        let cs = u64::from(index.chunk_size());
        let expected = (index.disk_size() - i * cs).min(cs);
        if let Some(d) = self.chunk_delay {
            std::thread::sleep(d);
        }
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
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> vmdisk::Result<Vec<Piece>> {
        let index = self.index()?;
        let cs = u64::from(index.chunk_size());
        let end = offset + u64::from(len);
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let chunk_end = ((i + 1) * cs).min(end);
            let n = (chunk_end - pos) as u32;
            if let Some(id) = self.entry(&index, i)? {
                let data = self.chunk(&index, i, id)?;
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
        // Waits for a lazy index still loading (only right after the start), and may load a
        // page of the index (the server calls this on its blocking pool).
        let index = self.index()?;
        let cs = u64::from(index.chunk_size());
        let end = offset + u64::from(len);
        let mut out: Vec<(u32, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let chunk_end = ((i + 1) * cs).min(end);
            let n = (chunk_end - pos) as u32;
            let zero = self.entry(&index, i)?.is_none();
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
        self.chunk_size.clamp(4096, 1 << 16)
    }
}
