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

/// Distinct chunk ids one pass of verify holds (a sorted set of those referenced and a hash set
/// of those stored in the pass's part of the id space: ≈ 85 bytes per id, ≈ 45 MiB): a
/// repository with more is verified in several passes, each over a part of the id space.
const IDS_PER_PASS: u64 = 512 << 10;

/// Passes for `entries` chunk entries (an upper bound on the distinct chunks): a power of two,
/// 1 to 256 (a pass takes the ids whose first byte falls in its range).
fn passes_for(entries: u64) -> usize {
    let n = entries.div_ceil(IDS_PER_PASS).clamp(1, 256);
    usize::try_from(n.next_power_of_two()).unwrap_or(256)
}

/// The first bytes of the chunk ids of pass `pass` of `passes` (a power of two ≤ 256).
fn pass_bytes(pass: usize, passes: usize) -> std::ops::RangeInclusive<u8> {
    let width = 256 / passes.clamp(1, 256);
    let start = pass * width;
    let end = start + width - 1;
    u8::try_from(start).unwrap_or(u8::MAX)..=u8::try_from(end).unwrap_or(u8::MAX)
}

/// The distinct chunks the indexes of `disks` reference whose id starts with a byte in `range`.
fn referenced_in(
    r: &Repository,
    disks: &[(SnapshotId, DiskEntry)],
    range: &std::ops::RangeInclusive<u8>,
) -> repo_format::Result<BTreeSet<ChunkId>> {
    let mut out = BTreeSet::new();
    let mut seen = HashSet::new();
    for (_, d) in disks {
        let add = |_, page: &DiskIndex| {
            let ids = page.stored().iter().map(|&(_, c)| c);
            out.extend(ids.filter(|c| range.contains(&c.as_bytes()[0])));
        };
        for_each_page(r, d, &mut seen, add)?;
    }
    Ok(out)
}

/// What one pass found.
struct Pass {
    /// Chunk objects stored in the pass's part of the id space.
    stored: usize,
    /// Referenced chunks that are missing, or whose object (or delta base) does not check.
    bad: BTreeMap<ChunkId, String>,
}

/// Phases 2 and 3 for the `referenced` chunks, whose ids start with a byte in `range`: they
/// must exist (listed), a delta's base too; with `read_data`, each is read and checked
/// (progress shown when `show.0`, labelled `show.1`).
async fn check_pass(
    repo: &Arc<Repository>,
    referenced: &BTreeSet<ChunkId>,
    range: std::ops::RangeInclusive<u8>,
    read_data: bool,
    show: (bool, &str),
    bytes_checked: &Arc<AtomicU64>,
) -> Result<Pass> {
    // Phase 2: existence.
    let r = repo.clone();
    let existing: Arc<HashSet<ChunkId>> = Arc::new(
        blocking(move || {
            r.list_chunks_in(range)
                .map(|v| v.into_iter().collect())
                .map_err(|e| repo_err(e, "cannot list chunks"))
        })
        .await?,
    );
    let mut bad: BTreeMap<ChunkId, String> = BTreeMap::new();
    for id in referenced {
        if !existing.contains(id) {
            bad.insert(*id, "missing".to_string());
        }
    }
    // A delta chunk object (FORMAT.md 1.6b) opens only with its base: each stored chunk's
    // header says whether it has one (nothing is read in a repository without delta objects).
    // With --read-data, opening each chunk below reads its base anyway.
    if !read_data {
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
    if read_data {
        let to_read: Vec<ChunkId> = referenced
            .iter()
            .filter(|id| !bad.contains_key(id))
            .copied()
            .collect();
        let progress = Progress::new(show.0, to_read.len() as u64, show.1);
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
    Ok(Pass {
        stored: existing.len(),
        bad,
    })
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
/// delta objects whose base is neither in `existing` nor stored, or whose header cannot be
/// read.
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
            // `existing` holds one pass's part of the id space: a base outside it is looked up.
            Ok(Some(base))
                if !existing.contains(&base) && !repo.has_chunk(&base).unwrap_or(false) =>
            {
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
    // share is read once): the disks whose index could be read, how many chunk entries their
    // pages hold (at least the distinct chunks they reference), and those chunks while they
    // fit in one pass.
    let r = repo.clone();
    let ids2 = ids.clone();
    let (problems, disks, entries, first_pass) = blocking(move || {
        let mut problems: Vec<String> = Vec::new();
        let mut disks: Vec<(SnapshotId, DiskEntry)> = Vec::new();
        let mut referenced: Option<BTreeSet<ChunkId>> = Some(BTreeSet::new());
        let mut entries: u64 = 0;
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
                    entries += page.stored().len() as u64;
                    if let Some(set) = referenced.as_mut() {
                        set.extend(page.stored().iter().map(|&(_, c)| c));
                        if set.len() as u64 > IDS_PER_PASS {
                            referenced = None;
                        }
                    }
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
        Ok((problems, disks, entries, referenced))
    })
    .await?;
    let mut problems = problems;

    // Phases 2 and 3, in as many passes over the chunk ids as memory needs (by their first
    // byte; each pass after a first one that did not fit reads the indexes again).
    let passes = if first_pass.is_some() {
        1
    } else {
        passes_for(entries)
    };
    let mut first_pass = first_pass;
    let disks = Arc::new(disks);
    let mut bad: BTreeMap<ChunkId, String> = BTreeMap::new();
    let (mut chunks_referenced, mut chunks_stored) = (0usize, 0usize);
    let bytes_checked = Arc::new(AtomicU64::new(0));
    for pass in 0..passes {
        let range = pass_bytes(pass, passes);
        let referenced = match first_pass.take() {
            Some(set) => set,
            None => {
                let (r, d, range) = (repo.clone(), disks.clone(), range.clone());
                blocking(move || {
                    referenced_in(&r, &d, &range)
                        .map_err(|e| repo_err(e, "cannot read the indexes again"))
                })
                .await?
            }
        };
        let label = if passes == 1 {
            "chunks".to_string()
        } else {
            format!("chunks, pass {}/{passes}", pass + 1)
        };
        let show = !global.quiet && !global.json;
        let checked = check_pass(
            &repo,
            &referenced,
            range,
            args.read_data,
            (show, &label),
            &bytes_checked,
        )
        .await?;
        chunks_referenced += referenced.len();
        chunks_stored += checked.stored;
        bad.extend(checked.bad);
    }
    let disks = Arc::unwrap_or_clone(disks);

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
        "chunks_referenced": chunks_referenced,
        "chunks_stored": chunks_stored,
        "passes": passes,
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
        chunks_referenced,
        chunks_stored
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use repo_format::{Encryption, InitOptions, MemoryBackend};

    #[test]
    fn the_passes_cover_every_first_byte_once() {
        for passes in [1, 2, 4, 16, 128, 256] {
            let mut seen = [0u8; 256];
            for p in 0..passes {
                for b in pass_bytes(p, passes) {
                    seen[usize::from(b)] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{passes} passes: {seen:?}");
        }
        assert_eq!(passes_for(0), 1);
        assert_eq!(passes_for(IDS_PER_PASS), 1);
        assert_eq!(passes_for(IDS_PER_PASS + 1), 2);
        assert_eq!(passes_for(5 * IDS_PER_PASS), 8);
        assert_eq!(passes_for(u64::MAX), 256);
    }

    fn disk(index: IndexId, size: u64, chunk_size: u32) -> DiskEntry {
        super::super::test_disk_entry("vda", "raw", index, size, chunk_size)
    }

    /// Verifying in 1, 4 or 16 passes over the id space finds the same chunks, the same missing
    /// ones and the same stored ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pass_count_finds_the_same() {
        let mem = Arc::new(MemoryBackend::new());
        let mut opts = InitOptions::new(Encryption::None);
        opts.chunk_size = 64 << 10;
        let repo = Arc::new(Repository::init(mem.clone(), opts).unwrap());
        let cs = repo.chunk_size();
        // 200 distinct chunks, two disks sharing half of them; 3 then removed, 1 unreferenced.
        let mut ids = Vec::new();
        for i in 0..201u32 {
            let data = vec![(i % 251) as u8 + 1; cs as usize - i as usize];
            let sealed = repo.seal_chunk(&data);
            repo.store_chunk(&sealed).unwrap();
            ids.push(sealed.id);
        }
        let size = 150 * u64::from(cs);
        let mut disks = Vec::new();
        for (n, range) in [(0usize, 0..150usize), (1, 50..200)] {
            let mut index = DiskIndex::new_sparse(cs, size).unwrap();
            for (e, i) in range.enumerate() {
                index.set(e as u64, Some(ids[i])).unwrap();
            }
            let id = repo.store_index(&index).unwrap();
            disks.push((SnapshotId::from_bytes([n as u8; 32]), disk(id, size, cs)));
        }
        for gone in [3, 60, 170] {
            let h = ids[gone].to_hex();
            assert!(mem.remove(&format!("chunks/{}/{h}", &h[..2])).is_some());
        }
        let mut results = Vec::new();
        for passes in [1, 4, 16] {
            let (mut referenced, mut stored, mut bad) = (0, 0, BTreeMap::new());
            for p in 0..passes {
                let range = pass_bytes(p, passes);
                let refs = referenced_in(&repo, &disks, &range).unwrap();
                let checked = check_pass(
                    &repo,
                    &refs,
                    range,
                    true,
                    (false, "chunks"),
                    &Arc::new(AtomicU64::new(0)),
                )
                .await
                .unwrap();
                referenced += refs.len();
                stored += checked.stored;
                bad.extend(checked.bad);
            }
            results.push((referenced, stored, bad));
        }
        let missing: BTreeMap<ChunkId, String> = [3, 60, 170]
            .into_iter()
            .map(|i| (ids[i], "missing".to_string()))
            .collect();
        assert_eq!(results[0], (200, 198, missing));
        assert_eq!(results[1], results[0]);
        assert_eq!(results[2], results[0]);
    }
}
