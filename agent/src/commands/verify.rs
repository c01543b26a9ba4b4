//! `lifeboat verify [--read-data] [SNAPSHOT...]`
//!
//! Without `--read-data`: every manifest and index is read and authenticated, and every chunk they
//! reference must exist. With `--read-data`: every referenced chunk is also read, decrypted,
//! decompressed and re-hashed. All problems are reported (not just the first), with the snapshots
//! they affect; any problem gives exit code 6.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use repo_format::{
    ChunkBuffers, ChunkId, DiskEntry, DiskIndex, IndexId, IndexPage, Repository, SnapshotId,
};
use serde_json::json;

use super::{emit, human_bytes, mb_per_s};
use crate::cli::{GlobalOpts, VerifyArgs};
use crate::error::{repo_err, Error, ErrorKind, Result};
use crate::pipeline::concurrency;
use crate::pipeline::progress::Progress;
use crate::repo::{self, blocking};

/// The stored pages of disk `d`'s index (their object ids, in order; a whole index is one
/// page), running `f` on each one not in `seen` yet, loaded, then added to `seen`.
fn for_each_page(
    r: &Repository,
    d: &DiskEntry,
    seen: &mut HashSet<IndexId>,
    mut f: impl FnMut(IndexId, &DiskIndex),
) -> repo_format::Result<Vec<IndexId>> {
    let index = r.open_index(&d.index, d.virtual_size, d.chunk_size)?;
    let mut pages = Vec::new();
    for k in 0..index.page_count() {
        let Some(IndexPage::Object(pid)) = index.page(k) else {
            continue;
        };
        pages.push(pid);
        if !seen.contains(&pid) {
            let page = r.load_index_page(&index, k)?;
            f(pid, &page);
            seen.insert(pid);
        }
    }
    Ok(pages)
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `check` on every chunk of `ids`, on `workers` threads that take the chunks in turn,
/// each with its own state `S` reused from one chunk to the next. Returns the chunks `check`
/// found a problem with, and why; stops early once `stop` is set.
fn check_each<S: Default>(
    ids: &[ChunkId],
    workers: usize,
    stop: &AtomicBool,
    check: impl Fn(&ChunkId, &mut S) -> Option<String> + Sync,
) -> Vec<(ChunkId, String)> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, ids.len().max(1)) {
            s.spawn(|| {
                let mut state = S::default();
                while !stop.load(Ordering::Relaxed) {
                    let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    if let Some(why) = check(id, &mut state) {
                        failed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((*id, why));
                    }
                }
            });
        }
    });
    failed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Loads and checks every chunk of `ids` on `workers` threads, each reading, decrypting and
/// decompressing in its own reused buffers (no allocation or first-touch page faults per
/// chunk). Returns the chunks that failed, with why; stops early once `stop` is set.
fn check_chunks(
    repo: &Repository,
    ids: &[ChunkId],
    workers: usize,
    stop: &AtomicBool,
    bytes_checked: &AtomicU64,
    progress: &Progress,
) -> Vec<(ChunkId, String)> {
    check_each(ids, workers, stop, |id, bufs: &mut ChunkBuffers| {
        let why = match repo.load_chunk_into(id, bufs) {
            Ok(data) => {
                bytes_checked.fetch_add(data.len() as u64, Ordering::Relaxed);
                None
            }
            Err(e) => Some(crate::error::format_chain(&e)),
        };
        progress.add(1);
        why
    })
}

/// Reads the header of every chunk in `ids` (on `workers` threads) and returns those that are
/// delta objects whose base is not in `existing`, or whose header cannot be read.
fn check_bases(
    repo: &Repository,
    ids: &[ChunkId],
    existing: &HashSet<ChunkId>,
    workers: usize,
) -> Vec<(ChunkId, String)> {
    check_each(
        ids,
        workers,
        &AtomicBool::new(false),
        |id, _: &mut ()| match repo.chunk_base(id) {
            Ok(Some(base)) if !existing.contains(&base) => {
                Some(format!("its base object (chunk {base}) is missing"))
            }
            Ok(_) => None,
            Err(e) => Some(crate::error::format_chain(&e)),
        },
    )
}

/// `lifeboat verify`
pub async fn run(global: &GlobalOpts, args: VerifyArgs) -> Result<()> {
    let start = Instant::now();
    let repo = repo::open_async(global).await?;

    let ids: Vec<SnapshotId> = if args.snapshots.is_empty() {
        let r = repo.clone();
        blocking(move || {
            r.list_snapshot_ids()
                .map_err(|e| repo_err(e, "cannot list snapshots"))
        })
        .await?
    } else {
        let mut v = Vec::new();
        for s in &args.snapshots {
            v.push(super::restore::resolve(&repo, s).await?.0);
        }
        v
    };

    // Phase 1: manifests and indexes, a page at a time (a page or index that several snapshots
    // share is read once): the referenced chunks, and the disks whose index could be read.
    let r = repo.clone();
    let ids2 = ids.clone();
    let (problems, disks, referenced) = blocking(move || {
        let mut problems: Vec<String> = Vec::new();
        let mut disks: Vec<(SnapshotId, DiskEntry)> = Vec::new();
        let mut referenced: BTreeSet<ChunkId> = BTreeSet::new();
        let mut seen: HashSet<IndexId> = HashSet::new();
        for id in &ids2 {
            let m = match r.load_snapshot(id) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("snapshot {id}: {}", crate::error::format_chain(&e)));
                    continue;
                }
            };
            for d in m.disks {
                let add = |_, page: &DiskIndex| {
                    referenced.extend(page.stored().iter().map(|&(_, c)| c));
                };
                match for_each_page(&r, &d, &mut seen, add) {
                    Ok(_) => disks.push((*id, d)),
                    Err(e) => problems.push(format!(
                        "snapshot {id} disk {}: index {}: {}",
                        d.name,
                        d.index,
                        crate::error::format_chain(&e)
                    )),
                }
            }
        }
        Ok((problems, disks, referenced))
    })
    .await?;
    let mut problems = problems;

    // Phase 2: existence.
    let r = repo.clone();
    let existing: Arc<HashSet<ChunkId>> = Arc::new(
        blocking(move || {
            r.list_chunks()
                .map(|v| v.into_iter().collect())
                .map_err(|e| repo_err(e, "cannot list chunks"))
        })
        .await?,
    );
    let mut bad: BTreeMap<ChunkId, String> = BTreeMap::new();
    for id in &referenced {
        if !existing.contains(id) {
            bad.insert(*id, "missing".to_string());
        }
    }
    // A delta chunk object (FORMAT.md 1.6b) opens only with its base: each stored chunk's
    // header says whether it has one (nothing is read in a repository without delta objects).
    // With --read-data, opening each chunk below reads its base anyway.
    if !args.read_data {
        let present: Vec<ChunkId> = referenced
            .iter()
            .filter(|id| existing.contains(id))
            .copied()
            .collect();
        let (r, ex) = (repo.clone(), existing.clone());
        let broken = blocking(move || Ok(check_bases(&r, &present, &ex, concurrency()))).await?;
        bad.extend(broken);
    }

    // Phase 3: read everything.
    let bytes_checked = Arc::new(AtomicU64::new(0));
    if args.read_data {
        let to_read: Vec<ChunkId> = referenced
            .iter()
            .filter(|id| !bad.contains_key(id))
            .copied()
            .collect();
        let progress = Progress::new(
            !global.quiet && !global.json,
            to_read.len() as u64,
            "chunks",
        );
        // A fixed set of worker threads, each with its own buffers, takes the chunks in turn:
        // no task or thread hand-off per chunk and no buffer allocated per thread the blocking
        // pool happens to start. Dropping this future (Ctrl-C) stops them at the next chunk.
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let (r, checked, stop_flag) = (repo.clone(), bytes_checked.clone(), stop.0.clone());
        let p = progress.clone();
        let failed = blocking(move || {
            Ok(check_chunks(
                &r,
                &to_read,
                concurrency(),
                &stop_flag,
                &checked,
                &p,
            ))
        })
        .await?;
        drop(stop);
        bad.extend(failed);
        progress.finish();
    }

    // Attribute bad chunks to snapshots (a shared page counted once, its count reused).
    let mut affected: BTreeMap<String, usize> = BTreeMap::new();
    let disk_count = disks.len();
    if !bad.is_empty() {
        let (r, bad2) = (repo.clone(), bad.clone());
        let (counts, failed) = blocking(move || {
            let mut memo: HashMap<IndexId, usize> = HashMap::new();
            let mut seen = HashSet::new();
            let (mut counts, mut failed) = (Vec::new(), Vec::new());
            for (snap, d) in &disks {
                let count = |pid, page: &DiskIndex| {
                    let n = page.stored().iter().filter(|(_, c)| bad2.contains_key(c));
                    memo.insert(pid, n.count());
                };
                let r = for_each_page(&r, d, &mut seen, count).map(|pages| {
                    pages
                        .iter()
                        .map(|p| memo.get(p).copied().unwrap_or(0))
                        .sum()
                });
                match r {
                    Ok(0) => {}
                    Ok(n) => counts.push((format!("{snap} disk {}", d.name), n)),
                    Err(e) => failed.push(format!(
                        "snapshot {snap} disk {}: index {}: {}",
                        d.name,
                        d.index,
                        crate::error::format_chain(&e)
                    )),
                }
            }
            Ok((counts, failed))
        })
        .await?;
        for (k, n) in counts {
            *affected.entry(k).or_default() += n;
        }
        problems.extend(failed);
    }
    for (id, why) in &bad {
        problems.push(format!("chunk {id}: {why}"));
    }

    let secs = start.elapsed().as_secs_f64();
    let checked = bytes_checked.load(Ordering::Relaxed);
    let json = json!({
        "snapshots": ids.len(),
        "indexes": disk_count,
        "chunks_referenced": referenced.len(),
        "chunks_stored": existing.len(),
        "read_data": args.read_data,
        "bytes_checked": checked,
        "seconds": secs,
        "problems": problems,
        "affected": affected,
        "ok": problems.is_empty(),
    });
    let mut text = format!(
        "checked {} snapshots, {} disk indexes, {} referenced chunks ({} stored)",
        ids.len(),
        disk_count,
        referenced.len(),
        existing.len()
    );
    if args.read_data {
        text.push_str(&format!(
            "; read {} in {:.1} s ({:.0} MB/s)",
            human_bytes(checked),
            secs,
            mb_per_s(checked, secs)
        ));
    }
    if problems.is_empty() {
        text.push_str("\nno problems found");
        emit(global, &json, &text);
        Ok(())
    } else {
        for p in &problems {
            text.push_str(&format!("\nPROBLEM: {p}"));
        }
        for (s, n) in &affected {
            text.push_str(&format!("\nAFFECTED: snapshot {s} ({n} bad chunks)"));
        }
        emit(global, &json, &text);
        Err(Error::new(
            ErrorKind::Corrupt,
            format!("verify found {} problem(s)", problems.len()),
        ))
    }
}
