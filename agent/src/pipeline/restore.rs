//! Restoring one disk from its index into a sparse raw image, or into a qcow2 image laid out by
//! [`vmdisk::qcow2`] whose metadata the caller has written (the stored chunks' data in order
//! after it; other qcow2 parameters are restored by `qemu-img convert` reading the snapshot
//! from Lifeboat's NBD server: see `commands::restore`).
//!
//! Chunks are loaded, authenticated, decompressed and re-hashed in parallel on the blocking pool,
//! each in a reused set of buffers (one set per chunk in flight); each is written at its own
//! offset (order does not matter). The target is fresh (reads as zeros), so zero chunks are
//! never written and, inside a chunk, only the runs of blocks that hold a non-zero byte are:
//! fewer bytes through the kernel, and a sparser result. Writeback of each written range starts at once (`pipeline::writeback`),
//! so the disk works while chunks are still being decoded and dirty pages stay few, and the
//! written pages leave the page cache once written back, so a restore neither evicts the host's
//! page cache nor grows it. The caller
//! writes into a temporary file and renames it only on success.
//!
//! **Test hook**: `LIFEBOAT_TEST_RESTORE_CHUNK_DELAY_MS=N` makes every chunk of a restore sleep
//! N ms before it is loaded; the e2e tests use it to interrupt a restore midway
//! deterministically. Not for production use.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use repo_format::{ChunkBuffers, ChunkId, IndexPages, Repository};

use super::progress::Progress;
use super::writeback::Writeback;
use super::{chunk_range, concurrency};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};

/// Environment variable of the chunk delay test hook (see the module docs).
pub const TEST_CHUNK_DELAY_ENV: &str = "LIFEBOAT_TEST_RESTORE_CHUNK_DELAY_MS";

/// Where restored chunks go.
#[derive(Clone)]
pub enum Sink {
    /// A raw file, already sized to the disk (sparse): each chunk at its guest offset.
    File(Arc<File>),
    /// A qcow2 image laid out by [`vmdisk::qcow2::Layout`] with the index's stored chunks as
    /// its units, sized and with its metadata written: the `r`-th stored chunk at
    /// `data_offset + r * chunk_size` ([`vmdisk::qcow2::Layout::unit_offset`]).
    Qcow2 {
        /// The image.
        file: Arc<File>,
        /// Where the first stored chunk's data starts.
        data_offset: u64,
    },
}

impl Sink {
    /// The file written.
    fn file(&self) -> &Arc<File> {
        match self {
            Sink::File(file) | Sink::Qcow2 { file, .. } => file,
        }
    }

    /// Where in the file the chunk at guest offset `guest` goes, the `rank`-th stored chunk of
    /// the index (chunks of `cs` bytes).
    fn offset(&self, guest: u64, rank: u64, cs: u64) -> u64 {
        match self {
            Sink::File(_) => guest,
            Sink::Qcow2 { data_offset, .. } => data_offset + rank * cs,
        }
    }
}

/// What a disk restore did.
#[derive(Debug, Clone, Copy)]
pub struct DiskRestoreStats {
    /// Bytes of chunk data written.
    pub bytes_written: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

/// The entries of a disk that hold a stored chunk, a bit each (at most 32 MiB, for the 2^28
/// entries of the largest disk): what a qcow2 image's layout is computed from, without holding
/// the disk's index.
#[derive(Debug, Default)]
pub struct StoredEntries {
    words: Vec<u64>,
    count: u64,
}

impl StoredEntries {
    /// Reads every page of `index` once.
    pub async fn load(repo: Arc<Repository>, index: Arc<IndexPages>, disk: &str) -> Result<Self> {
        let disk = disk.to_string();
        tokio::task::spawn_blocking(move || {
            let words = usize::try_from(index.len().div_ceil(64)).unwrap_or(usize::MAX);
            let mut out = StoredEntries {
                words: vec![0; words],
                count: 0,
            };
            for k in 0..index.page_count() {
                let (first, _) = index.page_span(k);
                let page = repo
                    .load_index_page(&index, k)
                    .map_err(|e| repo_err(e, format!("cannot load the index of disk '{disk}'")))?;
                for &(n, _) in page.stored() {
                    out.insert(first + n);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
    }

    fn insert(&mut self, i: u64) {
        let (w, b) = ((i / 64) as usize, i % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Number of stored entries.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The stored entries, ascending.
    pub fn iter(&self) -> StoredIter<'_> {
        StoredIter {
            words: &self.words,
            next_word: 0,
            base: 0,
            bits: 0,
        }
    }
}

/// Iterator over [`StoredEntries`].
#[derive(Debug, Clone)]
pub struct StoredIter<'a> {
    words: &'a [u64],
    next_word: usize,
    base: u64,
    bits: u64,
}

impl Iterator for StoredIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.bits == 0 {
            self.bits = *self.words.get(self.next_word)?;
            self.base = self.next_word as u64 * 64;
            self.next_word += 1;
        }
        let b = u64::from(self.bits.trailing_zeros());
        self.bits &= self.bits - 1;
        Some(self.base + b)
    }
}

/// Decoding buffers for the chunks in flight: a worker takes a set, loads, decrypts and
/// decompresses its chunk in it and puts it back, so there are never more sets than chunks in
/// flight, however many threads the blocking pool has started (it starts more than the tasks it
/// runs at once: 21–28 threads for 8 chunks in flight in a 2 GiB restore, and with a set per
/// thread the peak RSS followed the thread count, 62–125 MiB).
#[derive(Default)]
struct BufferPool(std::sync::Mutex<Vec<ChunkBuffers>>);

impl BufferPool {
    fn with<T>(&self, f: impl FnOnce(&mut ChunkBuffers) -> T) -> T {
        let mut bufs = self.lock().pop().unwrap_or_default();
        let out = f(&mut bufs);
        self.lock().push(bufs);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ChunkBuffers>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Load and verify one chunk into a set of `pool`'s buffers; check it has the length its
/// position requires; run `f` on it.
fn with_checked_chunk<T>(
    repo: &Repository,
    pool: &BufferPool,
    id: &ChunkId,
    expected_len: u64,
    f: impl FnOnce(&[u8]) -> Result<T>,
) -> Result<T> {
    pool.with(|bufs| {
        let data = repo
            .load_chunk_into(id, bufs)
            .map_err(|e| repo_err(e, format!("cannot load chunk {id}")))?;
        if data.len() as u64 != expected_len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "chunk {id} holds {} bytes where the index expects {expected_len}",
                    data.len()
                ),
            ));
        }
        f(data)
    })
}

/// Default granularity at which restored chunks are scanned for all-zero blocks to skip.
pub const ZERO_BLOCK: usize = 64 * 1024;

/// Whether `b` holds only zero bytes (OR-reduction per 4 KiB, vectorised; exits at the first
/// non-zero piece).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// The byte ranges `(start, end)` of `data` made of `block`-sized blocks (the last one may be
/// shorter) that hold a non-zero byte, adjacent blocks merged into one range.
pub fn nonzero_runs(data: &[u8], block: usize) -> Vec<(usize, usize)> {
    let block = block.max(1);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, b) in data.chunks(block).enumerate() {
        if is_zero(b) {
            continue;
        }
        let start = i * block;
        let end = start + b.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Write every stored chunk of `index` into `sink`, a page of the index at a time.
pub async fn restore_disk(
    repo: Arc<Repository>,
    index: Arc<IndexPages>,
    disk: &str,
    sink: Sink,
    zero_block: usize,
    progress: &Progress,
) -> Result<DiskRestoreStats> {
    let start = Instant::now();
    let cs = u64::from(index.chunk_size());
    let size = index.disk_size();
    let written = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(AtomicU64::new(0));
    // Buffered writes to one file serialise on the inode lock in the kernel anyway (ext4, xfs);
    // taking turns here lets waiting workers sleep instead of spinning on that lock
    // (`rwsem_spin_on_owner` was 10 % of a raw restore's CPU profile).
    let write_turn = Arc::new(std::sync::Mutex::new(()));
    let writeback = Arc::new(Writeback::default());
    let buffers = Arc::new(BufferPool::default());
    let delay = super::test_delay(TEST_CHUNK_DELAY_ENV);

    // The rank of a chunk among the disk's stored chunks (where a qcow2 sink places it).
    let mut rank = 0u64;
    for k in 0..index.page_count() {
        let (first, _) = index.page_span(k);
        let (r, i2) = (repo.clone(), index.clone());
        let page = tokio::task::spawn_blocking(move || r.load_index_page(&i2, k))
            .await
            .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
            .map_err(|e| repo_err(e, format!("cannot load the index of disk '{disk}'")))?;
        let work = page
            .stored()
            .iter()
            .copied()
            .zip(rank..)
            .map(|((n, id), rank)| {
                let idx = first + n;
                let repo = repo.clone();
                let sink = sink.clone();
                let written = written.clone();
                let chunks = chunks.clone();
                let progress = progress.clone();
                let write_turn = write_turn.clone();
                let writeback = writeback.clone();
                let buffers = buffers.clone();
                async move {
                    let (guest, end) = chunk_range(idx, cs, size);
                    let len = end - guest;
                    let off = sink.offset(guest, rank, cs);
                    let file = sink.file().clone();
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        if let Some(d) = delay {
                            std::thread::sleep(d);
                        }
                        with_checked_chunk(&repo, &buffers, &id, len, |data| {
                            let runs = nonzero_runs(data, zero_block);
                            if runs.is_empty() {
                                return Ok(());
                            }
                            let _turn = write_turn
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            for &(s, e) in &runs {
                                let at = off + s as u64;
                                let piece = data.get(s..e).unwrap_or_default();
                                file.write_all_at(piece, at).ctx(ErrorKind::Target, || {
                                    format!("cannot write {} bytes at offset {at}", e - s)
                                })?;
                            }
                            drop(_turn);
                            if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
                                writeback.written(
                                    &file,
                                    off + first.0 as u64,
                                    (last.1 - first.0) as u64,
                                );
                            }
                            Ok(())
                        })
                    })
                    .await
                    .map_err(|e| {
                        Error::with_source(ErrorKind::Other, "a worker thread failed", e)
                    })??;
                    written.fetch_add(len, Ordering::Relaxed);
                    chunks.fetch_add(1, Ordering::Relaxed);
                    progress.add(len);
                    Ok::<(), Error>(())
                }
            });
        let mut stream = futures::stream::iter(work).buffer_unordered(concurrency());
        while let Some(r) = stream.next().await {
            r?;
        }
        drop(stream);
        rank += page.stored().len() as u64;
    }

    let file = sink.file().clone();
    tokio::task::spawn_blocking(move || {
        file.sync_all()?;
        writeback.finish(&file);
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
    .ctx(ErrorKind::Target, || {
        "cannot flush the restored image".into()
    })?;

    Ok(DiskRestoreStats {
        bytes_written: written.load(Ordering::Relaxed),
        chunks: chunks.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::{nonzero_runs, BufferPool, StoredEntries};

    #[test]
    fn stored_entries_iterate_ascending_across_words() {
        let mut s = StoredEntries {
            words: vec![0; 4],
            count: 0,
        };
        let want = [0u64, 1, 63, 64, 130, 255];
        for &i in want.iter().rev() {
            s.insert(i);
        }
        s.insert(63);
        s.insert(256); // beyond: ignored
        assert_eq!(s.count(), want.len() as u64);
        assert_eq!(s.iter().collect::<Vec<_>>(), want);
        assert_eq!(s.iter().clone().count(), want.len());
        assert_eq!(StoredEntries::default().iter().next(), None);
    }

    #[test]
    fn buffer_pool_holds_one_set_per_concurrent_user_and_reuses_them() {
        let pool = BufferPool::default();
        let barrier = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| pool.with(|_| barrier.wait()));
            }
        });
        assert_eq!(pool.lock().len(), 3);
        for _ in 0..10 {
            pool.with(|_| ());
        }
        assert_eq!(pool.lock().len(), 3);
    }

    #[test]
    fn nonzero_runs_merge_adjacent_blocks_and_keep_a_short_tail() {
        let mut d = vec![0u8; 10 * 4 + 3];
        assert!(nonzero_runs(&d, 4).is_empty());
        d[5] = 1;
        d[9] = 1;
        d[20] = 1;
        d[41] = 1;
        assert_eq!(nonzero_runs(&d, 4), vec![(4, 12), (20, 24), (40, 43)]);
    }
}
