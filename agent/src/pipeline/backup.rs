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
use repo_format::{ChunkId, DiskIndex, Repository};
use vmdisk::extent::{self, RangeSet};
use vmdisk::nbd::Client;

use super::progress::Progress;
use super::{chunk_count, chunk_range, concurrency, is_zero};
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
        /// The parent snapshot's index of this disk (same size and chunk size).
        parent: Arc<DiskIndex>,
    },
}

/// What a disk backup did.
#[derive(Debug, Clone)]
pub struct DiskBackupStats {
    /// The finished index (not yet stored).
    pub index: DiskIndex,
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

/// Map a disk's extents: the ranges that hold data (`base:allocation` minus zero extents).
pub async fn data_ranges(client: &Client) -> Result<RangeSet> {
    let size = client.size();
    if size == 0 {
        return Ok(RangeSet::default());
    }
    let statuses = client
        .block_status(ALLOCATION_CONTEXT, 0, size)
        .await
        .ctx(ErrorKind::Source, || {
            "cannot read the allocation map of the disk export".to_string()
        })?;
    Ok(extent::data_ranges(&statuses))
}

/// Back up the disk exported by `clients` (one or more connections to the same export).
pub async fn backup_disk(
    repo: Arc<Repository>,
    clients: &[Client],
    mode: Mode,
    progress: &Progress,
) -> Result<DiskBackupStats> {
    let start = Instant::now();
    let first = clients
        .first()
        .ok_or_else(|| Error::new(ErrorKind::Other, "no NBD connection to read from"))?;
    let size = first.size();
    let chunk_size = u64::from(repo.chunk_size());
    let n_chunks = chunk_count(size, chunk_size);

    let data = data_ranges(first).await?;
    let allocated_bytes = data.total_len();

    // Which chunks to read, and the index the new entries apply to (all zero for a full).
    let (to_visit, base, dirty_bytes) = match &mode {
        Mode::Full => (
            data.clone(),
            Arc::new(
                DiskIndex::new_sparse(repo.chunk_size(), size)
                    .map_err(|e| repo_err(e, format!("disk of {size} bytes is too large")))?,
            ),
            None,
        ),
        Mode::Incremental { context, parent } => {
            if parent.len() != n_chunks
                || u64::from(parent.chunk_size) != chunk_size
                || parent.disk_size != size
            {
                return Err(Error::new(
                    ErrorKind::Other,
                    "the parent snapshot's index does not match this disk's size or chunk size",
                ));
            }
            let statuses = first
                .block_status(context, 0, size)
                .await
                .ctx(ErrorKind::Source, || {
                    format!("cannot read the dirty bitmap '{context}' of the disk export")
                })?;
            let dirty = extent::dirty_ranges(&statuses);
            let dirty_len = dirty.total_len();
            (dirty, parent.clone(), Some(dirty_len))
        }
    };

    let bytes_read = Arc::new(AtomicU64::new(0));
    let bytes_new = Arc::new(AtomicU64::new(0));
    let chunks_new = Arc::new(AtomicU64::new(0));
    let data = Arc::new(data);
    let chunks_processed = Arc::new(AtomicU64::new(0));

    let mut results = futures::stream::iter(to_visit.chunks_touched(chunk_size).enumerate())
        .map(|(n, idx)| {
            let client = clients[n % clients.len()].clone();
            let repo = repo.clone();
            let data = data.clone();
            let base = base.clone();
            let bytes_read = bytes_read.clone();
            let bytes_new = bytes_new.clone();
            let chunks_new = chunks_new.clone();
            let chunks_processed = chunks_processed.clone();
            let progress = progress.clone();
            async move {
                let (start, end) = chunk_range(idx, chunk_size, size);
                let chunk_len = usize::try_from(end - start).unwrap_or(0);
                let mut pieces = RangeSet::default();
                pieces.insert(start, end);
                let pieces = data.intersect(&pieces);
                let mut read = Vec::new();
                for (s, e) in pieces.iter() {
                    let len = u32::try_from(e - s).map_err(|_| {
                        Error::new(ErrorKind::Other, "chunk piece larger than 4 GiB")
                    })?;
                    let bytes = client.read(s, len).await.ctx(ErrorKind::Source, || {
                        format!("cannot read {len} bytes at offset {s} from the disk export")
                    })?;
                    if bytes.len() != len as usize {
                        return Err(Error::new(
                            ErrorKind::Source,
                            "the NBD server returned a wrong amount of data",
                        ));
                    }
                    bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                    read.push((s, bytes));
                }
                let any = !read.is_empty();
                // The common case, one piece covering the whole chunk, is hashed and sealed
                // straight from the NBD reply buffer; otherwise the pieces are placed into a
                // zeroed chunk buffer (the gaps are unallocated or zero).
                let buf: bytes::Bytes = match read.as_slice() {
                    [(s, bytes)] if *s == start && bytes.len() == chunk_len => bytes.clone(),
                    _ => {
                        let mut buf = vec![0u8; chunk_len];
                        for (s, bytes) in &read {
                            let off = usize::try_from(s - start).unwrap_or(0);
                            let dst = buf.get_mut(off..off + bytes.len()).ok_or_else(|| {
                                Error::new(
                                    ErrorKind::Source,
                                    "the NBD server returned too much data",
                                )
                            })?;
                            dst.copy_from_slice(bytes);
                        }
                        bytes::Bytes::from(buf)
                    }
                };
                drop(read);
                let entry = tokio::task::spawn_blocking(move || -> Result<Option<ChunkId>> {
                    if !any || is_zero(&buf) {
                        return Ok(None);
                    }
                    let id = repo.chunk_id(&buf);
                    if base.get(idx) == Some(id) {
                        return Ok(Some(id));
                    }
                    let known = repo
                        .has_chunk(&id)
                        .map_err(|e| repo_err(e, format!("cannot check for chunk {id}")))?;
                    if !known {
                        let sealed = repo
                            .try_seal_chunk_with_id(&id, &buf)
                            .map_err(|e| repo_err(e, format!("cannot seal chunk {id}")))?;
                        let written = repo
                            .store_chunk(&sealed)
                            .map_err(|e| repo_err(e, format!("cannot store chunk {id}")))?;
                        if written {
                            bytes_new.fetch_add(sealed.bytes.len() as u64, Ordering::Relaxed);
                            chunks_new.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(id))
                })
                .await
                .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))??;
                chunks_processed.fetch_add(1, Ordering::Relaxed);
                progress.add(end - start);
                Ok::<_, Error>((idx, entry))
            }
        })
        .buffer_unordered(concurrency());

    // Only the chunks read change; every other entry keeps the base's (parent's, or zero).
    let mut updates = Vec::new();
    while let Some(done) = results.next().await {
        updates.push(done?);
    }
    drop(results);
    let index = base
        .with_updates(updates)
        .map_err(|e| repo_err(e, "cannot build the disk's index"))?;

    Ok(DiskBackupStats {
        index,
        bytes_read: bytes_read.load(Ordering::Relaxed),
        bytes_new: bytes_new.load(Ordering::Relaxed),
        chunks_new: chunks_new.load(Ordering::Relaxed),
        chunks_processed: chunks_processed.load(Ordering::Relaxed),
        allocated_bytes,
        dirty_bytes,
        elapsed: start.elapsed(),
    })
}
