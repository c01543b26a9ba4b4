//! Backing up one disk from an NBD export into the repository.
//!
//! Which chunks are read:
//! - full: every chunk that overlaps an allocated, non-zero extent (`base:allocation`); the rest of
//!   the disk is recorded as zero without reading it;
//! - incremental: only chunks that overlap a dirty extent of the change-tracking bitmap; inside
//!   those, only allocated non-zero extents are read. Every other chunk keeps the parent snapshot's
//!   entry. A dirty chunk that is now entirely unallocated becomes a zero entry (discarded data).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use repo_format::{ChunkId, DiskIndex, IndexId, IndexPages, Repository, SealedChunk};
use vmdisk::extent::{self, BlockStatus, RangeSet};
use vmdisk::nbd::Client;

use super::limit::Limits;
use super::progress::Progress;
use super::{chunk_range, concurrency, is_zero};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};

/// The allocation meta context every export offers.
pub const ALLOCATION_CONTEXT: &str = "base:allocation";

/// How a disk is to be read.
pub enum Mode {
    /// Read every allocated chunk.
    Full,
    /// Read only chunks marked dirty in `context`; reuse `parent` for the rest.
    Incremental {
        /// The dirty-bitmap meta context, e.g. `qemu:dirty-bitmap:backup-vda`.
        context: String,
        /// The parent snapshot's index of this disk (same size and chunk size), opened.
        parent: Arc<IndexPages>,
    },
}

/// What a disk backup did.
#[derive(Debug, Clone)]
pub struct DiskBackupStats {
    /// The disk's index, stored (its pages and root, or its one object).
    pub index: IndexId,
    /// Virtual size of the disk in bytes.
    pub disk_size: u64,
    /// Bytes requested from the NBD server.
    pub bytes_read: u64,
    /// Bytes of sealed (compressed, encrypted) new chunk objects written.
    pub bytes_new: u64,
    /// New chunk objects written.
    pub chunks_new: u64,
    /// Chunks that went through hashing (read from the export).
    pub chunks_processed: u64,
    /// Allocated bytes according to `base:allocation`.
    pub allocated_bytes: u64,
    /// Bytes the change-tracking bitmap marks dirty (incremental only).
    pub dirty_bytes: Option<u64>,
    /// Wall-clock time of the transfer.
    pub elapsed: Duration,
}

/// Block-status requests cover at most this many bytes, each reply turned into ranges at once:
/// memory follows the ranges kept (16 bytes each), not every extent (24 bytes each in the
/// replies, and a fragmented disk has millions).
const MAP_WINDOW: u64 = 4 << 30;

/// The ranges `select` picks from the block status of bytes `[start, end)` of the disk in
/// metadata context `context`, asked for in windows of `window` bytes.
async fn map_ranges(
    client: &Client,
    context: &str,
    select: fn(&[BlockStatus]) -> RangeSet,
    (start, end): (u64, u64),
    window: u64,
) -> vmdisk::Result<RangeSet> {
    let end = end.min(client.size());
    let mut out = RangeSet::default();
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(window.max(1));
        let statuses = client.block_status(context, offset, len).await?;
        for (s, e) in select(&statuses).iter() {
            // A reply may describe bytes past the request: keep the window's.
            let (s, e) = (s.max(offset), e.min(offset + len));
            if s < e {
                out.insert(s, e);
            }
        }
        offset += len;
    }
    Ok(out)
}

/// Counters shared by a disk's chunk tasks.
#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_new: AtomicU64,
    chunks_new: AtomicU64,
    chunks_processed: AtomicU64,
}

/// Back up the disk exported by `clients` (one or more connections to the same export), within
/// `limits` (read rate, chunks sealed at once), and store its index.
///
/// The disk is done a page of its index at a time ([`repo_format::PAGE_ENTRIES`] chunks, 64 GiB
/// at 1 MiB chunks): the page's block status is read, its chunks are read and stored, and the
/// page is written (an incremental leaves a page without dirty blocks as its parent's, without
/// reading it). Memory holds one page's maps and entries, whatever the disk's size.
pub async fn backup_disk(
    repo: Arc<Repository>,
    clients: &[Client],
    mode: Mode,
    progress: &Progress,
    limits: &Limits,
) -> Result<DiskBackupStats> {
    let start = Instant::now();
    let first = clients
        .first()
        .ok_or_else(|| Error::new(ErrorKind::Other, "no NBD connection to read from"))?;
    let size = first.size();
    let chunk_size = u64::from(repo.chunk_size());

    let (context, parent) = match &mode {
        Mode::Full => (None, None),
        Mode::Incremental { context, parent } => {
            if u64::from(parent.chunk_size()) != chunk_size || parent.disk_size() != size {
                return Err(Error::new(
                    ErrorKind::Other,
                    "the parent snapshot's index does not match this disk's size or chunk size",
                ));
            }
            (Some(context.as_str()), Some(parent.clone()))
        }
    };
    let mut writer = repo
        .index_writer(repo.chunk_size(), size, parent)
        .map_err(|e| repo_err(e, format!("disk of {size} bytes is too large")))?;

    let counters = Arc::new(Counters::default());
    let mut allocated_bytes = 0;
    let mut dirty_bytes = context.map(|_| 0);
    for k in 0..writer.page_count() {
        let (first_entry, entries) = writer.page_span(k);
        let window = (
            first_entry * chunk_size,
            ((first_entry + entries) * chunk_size).min(size),
        );
        let data = map_ranges(
            first,
            ALLOCATION_CONTEXT,
            extent::data_ranges,
            window,
            MAP_WINDOW,
        )
        .await
        .ctx(ErrorKind::Source, || {
            "cannot read the allocation map of the disk export".to_string()
        })?;
        allocated_bytes += data.total_len();
        // Which chunks to read: the allocated ones, or in an incremental the dirty ones.
        let dirty = match context {
            None => None,
            Some(context) => {
                let dirty = map_ranges(first, context, extent::dirty_ranges, window, MAP_WINDOW)
                    .await
                    .ctx(ErrorKind::Source, || {
                        format!("cannot read the dirty bitmap '{context}' of the disk export")
                    })?;
                *dirty_bytes.get_or_insert(0) += dirty.total_len();
                Some(dirty)
            }
        };
        let data = Arc::new(data);
        let to_visit = dirty.as_ref().unwrap_or(&data);
        let mut updates = Vec::new();
        if !to_visit.is_empty() {
            // The parent's entries of this page (all zero in a full backup).
            let (mut w, r) = (writer, repo.clone());
            let (w, base) = blocking(move || {
                let base = w
                    .base_page(&r)
                    .map_err(|e| repo_err(e, "cannot load the previous snapshot's index"))?;
                Ok((w, base))
            })
            .await?;
            writer = w;
            let page = Page {
                repo: &repo,
                clients,
                size,
                first_entry,
                base: &base,
                data: data.clone(),
                to_visit,
                dirty: dirty.as_ref(),
                counters: &counters,
            };
            updates = page.back_up(progress, limits).await?;
        }
        let (mut w, r) = (writer, repo.clone());
        writer = blocking(move || {
            w.write_page(&r, updates)
                .map_err(|e| repo_err(e, "cannot store the disk's index"))?;
            Ok(w)
        })
        .await?;
    }
    let r = repo.clone();
    let index = blocking(move || {
        writer
            .finish(&r)
            .map_err(|e| repo_err(e, "cannot store the disk's index"))
    })
    .await?;

    Ok(DiskBackupStats {
        index,
        disk_size: size,
        bytes_read: counters.bytes_read.load(Ordering::Relaxed),
        bytes_new: counters.bytes_new.load(Ordering::Relaxed),
        chunks_new: counters.chunks_new.load(Ordering::Relaxed),
        chunks_processed: counters.chunks_processed.load(Ordering::Relaxed),
        allocated_bytes,
        dirty_bytes,
        elapsed: start.elapsed(),
    })
}

/// One page of a disk backup: its chunks to read and the parent's entries of it.
struct Page<'a> {
    repo: &'a Arc<Repository>,
    clients: &'a [Client],
    size: u64,
    /// The page's first entry (chunk number on the disk).
    first_entry: u64,
    /// The parent's entries of the page (numbered from the page's first), or zero.
    base: &'a Arc<DiskIndex>,
    /// Allocated, non-zero ranges of the page's bytes.
    data: Arc<RangeSet>,
    /// The ranges whose chunks are read.
    to_visit: &'a RangeSet,
    /// In an incremental, the dirty ranges.
    dirty: Option<&'a RangeSet>,
    counters: &'a Arc<Counters>,
}

impl Page<'_> {
    /// Reads, stores and returns the entries of the page's chunks to visit ((chunk number on
    /// the disk, `None` when all zero)).
    async fn back_up(
        &self,
        progress: &Progress,
        limits: &Limits,
    ) -> Result<Vec<(u64, Option<ChunkId>)>> {
        let repo = self.repo;
        let size = self.size;
        let chunk_size = u64::from(repo.chunk_size());
        // In an incremental, a dirty chunk whose parent is a framed object is read and sealed
        // frame by frame: only the frames that hold a dirty block (see `frame_update`).
        let frame_size = repo.frame_size().map(u64::from);
        let dirty = self.dirty;

        // Two bounds: at most `concurrency()` chunks are being read, hashed and sealed (the CPU
        // stage), and the stream keeps twice that many in flight, so that while the CPU stage
        // is full up to as many more sit in their object write + fsync (the store stage):
        // chunks waiting for the device do not hold the CPU stage's places.
        let cpu_stage = Arc::new(tokio::sync::Semaphore::new(concurrency()));
        let mut results =
            futures::stream::iter(self.to_visit.chunks_touched(chunk_size).enumerate())
                .map(|(n, idx)| {
                    let client = self.clients[n % self.clients.len()].clone();
                    let repo = repo.clone();
                    let data = self.data.clone();
                    let counters = self.counters.clone();
                    let progress = progress.clone();
                    let cpu_stage = cpu_stage.clone();
                    let limits = limits.clone();
                    let parent = self.base.get(idx - self.first_entry);
                    async move {
                        let (start, end) = chunk_range(idx, chunk_size, size);
                        let permit = cpu_stage.acquire_owned().await.map_err(|e| {
                            Error::with_source(ErrorKind::Other, "pipeline closed", e)
                        })?;
                        let reader = Reader {
                            client: &client,
                            data: &data,
                            bytes_read: &counters.bytes_read,
                            limits: &limits,
                        };
                        let framed = match (parent, dirty, frame_size) {
                            (Some(pid), Some(dirty), Some(fs)) if end - start == chunk_size => {
                                frame_update(&repo, &reader, dirty, pid, start, chunk_size, fs)
                                    .await?
                            }
                            _ => None,
                        };
                        let r2 = repo.clone();
                        let stage = match framed {
                            Some((sealed, all_zero)) => {
                                blocking(move || {
                                    if all_zero {
                                        return Ok(Stage::Done(None));
                                    }
                                    let id = sealed.id;
                                    if parent == Some(id) {
                                        return Ok(Stage::Done(Some(id)));
                                    }
                                    seal_new(&r2, &id, || Ok(sealed))
                                })
                                .await?
                            }
                            None => {
                                let buf = reader.read(start, end).await?;
                                let _place = limits.sealing_place().await;
                                blocking(move || {
                                    let Some(buf) = buf.filter(|b| !is_zero(b)) else {
                                        return Ok(Stage::Done(None));
                                    };
                                    let hash = r2.hash_chunk(&buf);
                                    let id = hash.id;
                                    if parent == Some(id) {
                                        return Ok(Stage::Done(Some(id)));
                                    }
                                    seal_new(&r2, &id, || {
                                        r2.try_seal_hashed(&hash, &buf).map_err(|e| {
                                            repo_err(e, format!("cannot seal chunk {id}"))
                                        })
                                    })
                                })
                                .await?
                            }
                        };
                        drop(permit);
                        let entry = match stage {
                            Stage::Done(entry) => entry,
                            Stage::Store(sealed) => {
                                let id = sealed.id;
                                let written = blocking(move || {
                                    repo.store_chunk(&sealed)
                                        .map(|w| w.then_some(sealed.bytes.len() as u64))
                                        .map_err(|e| {
                                            repo_err(e, format!("cannot store chunk {id}"))
                                        })
                                })
                                .await?;
                                if let Some(len) = written {
                                    counters.bytes_new.fetch_add(len, Ordering::Relaxed);
                                    counters.chunks_new.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(id)
                            }
                        };
                        counters.chunks_processed.fetch_add(1, Ordering::Relaxed);
                        progress.add(end - start);
                        Ok::<_, Error>((idx, entry))
                    }
                })
                .buffer_unordered(concurrency() * 2);

        // Only the chunks read change; every other entry keeps the base's (parent's, or zero).
        let mut updates = Vec::new();
        while let Some(done) = results.next().await {
            updates.push(done?);
        }
        Ok(updates)
    }
}

/// Runs blocking repository work (hashing, sealing, object I/O) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
}

/// Where a chunk is after the CPU stage.
enum Stage {
    /// Nothing to store: the chunk's entry (`None`: all zero).
    Done(Option<ChunkId>),
    /// A chunk the repository does not have yet, sealed, to be stored.
    Store(SealedChunk),
}

/// The chunk `id` to store (sealed by `seal`) unless the repository has it already.
fn seal_new(
    repo: &Repository,
    id: &ChunkId,
    seal: impl FnOnce() -> Result<SealedChunk>,
) -> Result<Stage> {
    let known = repo
        .has_chunk(id)
        .map_err(|e| repo_err(e, format!("cannot check for chunk {id}")))?;
    if known {
        return Ok(Stage::Done(Some(*id)));
    }
    seal().map(Stage::Store)
}

/// Reads byte ranges of the disk: only their allocated, non-zero extents go over NBD, each
/// request paced by the read limit.
struct Reader<'a> {
    client: &'a Client,
    data: &'a RangeSet,
    bytes_read: &'a AtomicU64,
    limits: &'a Limits,
}

impl Reader<'_> {
    /// The bytes `[start, end)` of the disk, or `None` when none of them is allocated. A range
    /// read in one piece is the NBD reply buffer itself (no copy); otherwise the pieces are placed
    /// into a zeroed buffer (the gaps are unallocated or zero).
    async fn read(&self, start: u64, end: u64) -> Result<Option<bytes::Bytes>> {
        let len = usize::try_from(end - start).unwrap_or(0);
        let mut wanted = RangeSet::default();
        wanted.insert(start, end);
        let pieces = self.data.intersect(&wanted);
        let mut read = Vec::new();
        for (s, e) in pieces.iter() {
            let n = u32::try_from(e - s)
                .map_err(|_| Error::new(ErrorKind::Other, "chunk piece larger than 4 GiB"))?;
            self.limits.before_read(u64::from(n)).await;
            let bytes = self.client.read(s, n).await.ctx(ErrorKind::Source, || {
                format!("cannot read {n} bytes at offset {s} from the disk export")
            })?;
            if bytes.len() != n as usize {
                return Err(Error::new(
                    ErrorKind::Source,
                    "the NBD server returned a wrong amount of data",
                ));
            }
            self.bytes_read.fetch_add(u64::from(n), Ordering::Relaxed);
            read.push((s, bytes));
        }
        match read.as_slice() {
            [] => Ok(None),
            [(s, bytes)] if *s == start && bytes.len() == len => Ok(Some(bytes.clone())),
            _ => {
                let mut buf = vec![0u8; len];
                for (s, bytes) in &read {
                    let off = usize::try_from(s - start).unwrap_or(0);
                    let dst = buf.get_mut(off..off + bytes.len()).ok_or_else(|| {
                        Error::new(ErrorKind::Source, "the NBD server returned too much data")
                    })?;
                    dst.copy_from_slice(bytes);
                }
                Ok(Some(bytes::Bytes::from(buf)))
            }
        }
    }
}

/// An incremental's dirty chunk at `start` (a whole chunk) whose parent entry is `parent`: when
/// the parent is a framed object and not every frame holds a dirty block, reads only the dirty
/// frames and seals the new chunk from them and the parent's other frames (still sealed).
/// Returns the new chunk and whether it is all zero; `None` when the chunk is to be read whole.
async fn frame_update(
    repo: &Arc<Repository>,
    reader: &Reader<'_>,
    dirty: &RangeSet,
    parent: ChunkId,
    start: u64,
    chunk_size: u64,
    frame_size: u64,
) -> Result<Option<(SealedChunk, bool)>> {
    let mut chunk = RangeSet::default();
    chunk.insert(start, start + chunk_size);
    let touched: Vec<u64> = dirty
        .intersect(&chunk)
        .chunks_touched(frame_size)
        .map(|f| f - start / frame_size)
        .collect();
    if touched.is_empty() || touched.len() as u64 >= chunk_size / frame_size {
        return Ok(None);
    }
    let touched: Vec<usize> = touched
        .into_iter()
        .map(|f| usize::try_from(f).unwrap_or(usize::MAX))
        .collect();
    let r = repo.clone();
    let wanted = touched.clone();
    let frames = blocking(move || Ok(r.load_chunk_frames(&parent, &wanted))).await?;
    let frames = match frames {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        // A parent that cannot be read (missing, damaged) must not fail the backup: the chunk
        // is read whole instead, which does not depend on it. `verify` reports the parent.
        Err(e) => {
            tracing::warn!(
                chunk = %parent,
                error = %crate::error::format_chain(&e),
                "cannot read the previous version of a chunk; reading it whole"
            );
            return Ok(None);
        }
    };
    let fs = usize::try_from(frame_size).unwrap_or(0);
    let mut changed = Vec::with_capacity(touched.len());
    for f in touched {
        let s = start + f as u64 * frame_size;
        let buf = match reader.read(s, s + frame_size).await? {
            Some(b) => b,
            None => bytes::Bytes::from(vec![0u8; fs]),
        };
        changed.push((f, buf));
    }
    let r = repo.clone();
    let _place = reader.limits.sealing_place().await;
    blocking(move || {
        let refs: Vec<(usize, &[u8])> = changed.iter().map(|(f, b)| (*f, &b[..])).collect();
        r.seal_chunk_update(&frames, &refs)
            .map_err(|e| repo_err(e, format!("cannot seal the new version of chunk {parent}")))
    })
    .await
    .map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{map_ranges, ALLOCATION_CONTEXT};
    use std::collections::HashMap;
    use std::sync::Arc;
    use vmdisk::extent;
    use vmdisk::nbd::{
        BlockSource, Client, ConnectOptions, MemorySource, NbdAddr, Server, ServerOptions,
    };

    /// The map read in windows of any size (aligned or not to the extents) is the map read in
    /// one piece.
    #[tokio::test]
    async fn the_map_read_in_windows_is_the_whole_map() {
        let block = 64 << 10;
        let mut data = vec![0u8; 8 << 20];
        for (i, b) in data.chunks_mut(block).enumerate() {
            if i % 2 == 0 || (40..60).contains(&i) {
                b[i % 7] = 1;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
        exports.insert("vda".into(), Arc::new(MemorySource::new(data, 64 << 10)));
        let server = Arc::new(Server::new(exports, ServerOptions::default()));
        let listener = Server::bind_unix(&path).unwrap();
        let (_stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(server.serve(listener, Some(path.clone()), rx));
        let client = Client::connect(
            &NbdAddr::Unix(path),
            ConnectOptions {
                export: "vda".into(),
                meta_contexts: vec![ALLOCATION_CONTEXT.into()],
                ..ConnectOptions::default()
            },
        )
        .await
        .unwrap();
        let whole = extent::data_ranges(
            &client
                .block_status(ALLOCATION_CONTEXT, 0, client.size())
                .await
                .unwrap(),
        );
        assert!(whole.iter().count() > 40, "{whole:?}");
        let all = (0, client.size());
        for window in [4096, 64 << 10, (1 << 20) + 4096, 3 << 20, 8 << 20, 1 << 40] {
            let got = map_ranges(
                &client,
                ALLOCATION_CONTEXT,
                extent::data_ranges,
                all,
                window,
            )
            .await
            .unwrap();
            assert_eq!(got, whole, "window {window}");
        }
        // A part of the disk (a page of the index) is the whole map's ranges cut to it.
        let part = (3 << 20, 5 << 20);
        let mut cut = vmdisk::extent::RangeSet::default();
        cut.insert(part.0, part.1);
        let got = map_ranges(
            &client,
            ALLOCATION_CONTEXT,
            extent::data_ranges,
            part,
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(got, whole.intersect(&cut));
    }
}
