//! Chunk size by measurement: for chunk sizes 64 KiB … 4 MiB, on real data,
//! (a) incremental amplification: bytes a backup must read and store for a change pattern, given a
//!     dirty bitmap of 64 KiB granularity (QEMU's default), for
//!     - a synthetic file-system update pattern (4 KiB metadata writes in block-group headers and a
//!       journal, 4 KiB – 1 MiB file writes, log-uniform) over the mixed image, and
//!     - a real ext4 change: a file system made by `mke2fs -d` from /usr/share/doc, then changed
//!       with `debugfs -w` (packages "upgraded" = files removed and rewritten, new files, deletions),
//!       diffed against the original at 64 KiB like a dirty bitmap;
//! (b) dedup and compression on the mixed image (`scripts/make-mixed-image.sh`);
//! (c) objects per GiB and per-object cost: local backend puts (temp + fsync + link) timed for
//!     64 MiB of incompressible objects, and S3 request cost.
//!
//! Run (release, takes a minute or two):
//!     cargo run --release -p lifeboat --example chunk_size -- [SIZE_MIB (default 512)] [WORKDIR]
//! Needs the tools of scripts/install-deps.sh (mkfs.ext4, debugfs, python3, qemu-img).
//! Objects are sealed exactly as the repository seals them (zstd level 3 + XChaCha20-Poly1305),
//! so "stored" is real object bytes.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use repo_format::{
    Backend, Encryption, InitOptions, KeyFile, LocalBackend, MemoryBackend, Repository, Secret,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 * KIB;
const SIZES: [u64; 7] = [
    64 * KIB,
    128 * KIB,
    256 * KIB,
    512 * KIB,
    MIB,
    2 * MIB,
    4 * MIB,
];

/// A small deterministic PRNG (xorshift64*), so runs are reproducible without extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Log-uniform in [lo, hi], multiple of 4 KiB.
    fn log_size(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (l + u * (h - l)).exp() as u64;
        (v / 4096).max(1) * 4096
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {} (tools: scripts/install-deps.sh)",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn repo(chunk_size: u64) -> Result<Repository> {
    let key = KeyFile::try_generate()?;
    Ok(Repository::init(
        Arc::new(MemoryBackend::new()),
        InitOptions {
            encryption: Encryption::Encrypted {
                secret: Secret::KeyFile(key),
                kdf: repo_format::KdfParams::default(),
            },
            chunk_size: u32::try_from(chunk_size)?,
            zstd_level: repo_format::DEFAULT_ZSTD_LEVEL,
            // Unframed: this measures whole-chunk objects at each chunk size.
            frame_size: None,
            cipher: repo_format::Cipher::XChaCha20Poly1305,
        },
    )?)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Dedup/compression of one image at one chunk size; returns the set of chunk ids stored.
struct DedupStats {
    nonzero_chunks: u64,
    unique_chunks: u64,
    nonzero_bytes: u64,
    unique_bytes: u64,
    stored_bytes: u64,
}

fn dedup(repo: &Repository, img: &[u8], cs: u64) -> (DedupStats, HashSet<[u8; 32]>) {
    let mut seen = HashSet::new();
    let mut s = DedupStats {
        nonzero_chunks: 0,
        unique_chunks: 0,
        nonzero_bytes: 0,
        unique_bytes: 0,
        stored_bytes: 0,
    };
    for c in img.chunks(cs as usize) {
        if is_zero(c) {
            continue;
        }
        s.nonzero_chunks += 1;
        s.nonzero_bytes += c.len() as u64;
        let id = repo.chunk_id(c);
        if seen.insert(*id.as_bytes()) {
            s.unique_chunks += 1;
            s.unique_bytes += c.len() as u64;
            s.stored_bytes += repo.seal_chunk(c).bytes.len() as u64;
        }
    }
    (s, seen)
}

/// What an incremental backup of `new` (parent `old`, whose chunk ids are `known`) reads and
/// stores at chunk size `cs`, given the dirty 64 KiB blocks.
fn incremental(
    repo: &Repository,
    new: &[u8],
    dirty: &BTreeSet<u64>,
    known: &HashSet<[u8; 32]>,
    cs: u64,
) -> (u64, u64, u64) {
    let chunks: BTreeSet<u64> = dirty.iter().map(|b| b * GRAIN / cs).collect();
    let (mut read, mut stored, mut objects) = (0, 0, 0);
    for c in &chunks {
        let start = (c * cs) as usize;
        let end = (start + cs as usize).min(new.len());
        let data = &new[start..end];
        // The backup reads allocated, non-zero extents of a dirty chunk: count non-zero grains.
        read += data
            .chunks(GRAIN as usize)
            .filter(|g| !is_zero(g))
            .map(|g| g.len() as u64)
            .sum::<u64>();
        if !is_zero(data) && !known.contains(repo.chunk_id(data).as_bytes()) {
            stored += repo.seal_chunk(data).bytes.len() as u64;
            objects += 1;
        }
    }
    (read, stored, objects)
}

/// The 64 KiB blocks that differ between two images (what a dirty bitmap would mark, at least).
fn diff_grains(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    a.chunks(GRAIN as usize)
        .zip(b.chunks(GRAIN as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Synthetic file-system updates over the file-system half of the mixed image.
fn synthetic_changes(img: &mut [u8], fs_len: u64, seed: u64) -> (BTreeSet<u64>, u64) {
    let mut rng = Rng(seed);
    let mut dirty = BTreeSet::new();
    let mut written = 0;
    let groups = (fs_len / (128 * MIB)).max(1);
    let journal = fs_len / 2;
    let mut journal_pos = 0;
    let mut write = |img: &mut [u8], off: u64, len: u64, rng: &mut Rng| {
        let len = len.min(fs_len - off);
        // Content: bytes copied from elsewhere in the file system (realistic compressibility).
        let src = rng.below(fs_len - len);
        img.copy_within(src as usize..(src + len) as usize, off as usize);
        for g in off / GRAIN..(off + len).div_ceil(GRAIN) {
            dirty.insert(g);
        }
        len
    };
    for _ in 0..600 {
        let kind = rng.below(100);
        if kind < 30 {
            // Metadata: bitmaps / inode tables near a block group's start, 4 KiB.
            let g = rng.below(groups);
            let off = (g * 128 * MIB + rng.below(2 * MIB)) / 4096 * 4096;
            written += write(img, off, 4096, &mut rng);
        } else if kind < 45 {
            // Journal: sequential appends of 4–64 KiB in a 16 MiB ring.
            let len = rng.log_size(4 * KIB, 64 * KIB);
            let off = journal + journal_pos % (16 * MIB);
            journal_pos += len;
            written += write(img, off, len, &mut rng);
        } else {
            // File data: 4 KiB – 1 MiB anywhere in the file system.
            let len = rng.log_size(4 * KIB, MIB);
            let off = rng.below(fs_len - len) / 4096 * 4096;
            written += write(img, off, len, &mut rng);
        }
    }
    (dirty, written)
}

/// A real ext4 change: mke2fs -d a tree of /usr/share/doc, then debugfs -w changes.
fn ext4_change(work: &Path, fs_mib: u64) -> Result<(Vec<u8>, Vec<u8>, String)> {
    let tree = work.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    // About 55% of the file system: packages' docs in sorted order.
    let budget = fs_mib * MIB * 55 / 100;
    let mut used = 0;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pkgs: Vec<PathBuf> = std::fs::read_dir("/usr/share/doc")?
        .flatten()
        .map(|e| e.path())
        .collect();
    pkgs.sort();
    'outer: for p in pkgs {
        let mut stack = vec![p];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut ents: Vec<_> = rd.flatten().collect();
            ents.sort_by_key(|e| e.path());
            for e in ents {
                let ft = e.file_type()?;
                let path = e.path();
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() {
                    let n = e.metadata()?.len();
                    if used + n > budget {
                        break 'outer;
                    }
                    let rel = path.strip_prefix("/usr/share/doc")?;
                    let dst = tree.join(rel);
                    std::fs::create_dir_all(dst.parent().unwrap())?;
                    std::fs::copy(&path, &dst)?;
                    used += n;
                    files.push(rel.to_path_buf());
                }
            }
        }
    }
    let fs1 = work.join("fs1.img");
    let _ = std::fs::remove_file(&fs1);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&fs1)
        .arg(format!("{fs_mib}M")))?;
    let fs2 = work.join("fs2.img");
    std::fs::copy(&fs1, &fs2)?;

    // Changes: 2% of files "upgraded" (removed and written anew with a slightly different
    // content, as a package manager does), 1% deleted, 40 new files (logs, binaries) of 4 KiB–1 MiB.
    let mut rng = Rng(42);
    let mut cmds = String::new();
    let mut changed = 0u64;
    let newdir = work.join("new");
    let _ = std::fs::remove_dir_all(&newdir);
    std::fs::create_dir_all(&newdir)?;
    let n = files.len() as u64;
    for i in 0..n / 50 {
        let f = &files[rng.below(n) as usize];
        let mut data = std::fs::read(tree.join(f))?;
        data.extend_from_slice(format!("\nupgraded {i}\n").as_bytes());
        let local = newdir.join(format!("u{i}"));
        std::fs::write(&local, &data)?;
        changed += data.len() as u64;
        cmds.push_str(&format!(
            "rm /{0}\nwrite {1} /{0}\n",
            f.display(),
            local.display()
        ));
    }
    for _ in 0..n / 100 {
        let f = &files[rng.below(n) as usize];
        cmds.push_str(&format!("rm /{}\n", f.display()));
    }
    let bins: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/bin")?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    };
    cmds.push_str("mkdir /newfiles\n");
    for i in 0..40 {
        let len = rng.log_size(4 * KIB, MIB) as usize;
        let mut data = Vec::new();
        while data.len() < len && !bins.is_empty() {
            data.extend(std::fs::read(&bins[rng.below(bins.len() as u64) as usize])?);
        }
        data.truncate(len);
        let local = newdir.join(format!("n{i}"));
        std::fs::write(&local, &data)?;
        changed += len as u64;
        cmds.push_str(&format!("write {} /newfiles/n{i}\n", local.display()));
    }
    let cmdfile = work.join("debugfs.cmds");
    std::fs::write(&cmdfile, &cmds)?;
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmdfile)
        .arg(&fs2))?;
    let a = std::fs::read(&fs1)?;
    let b = std::fs::read(&fs2)?;
    let what = format!(
        "{} files ({} MiB) in a {fs_mib} MiB ext4; {} upgraded, {} deleted, 40 new; {:.1} MiB of file data written",
        files.len(),
        used / MIB,
        n / 50,
        n / 100,
        changed as f64 / MIB as f64
    );
    Ok((a, b, what))
}

/// Time local-backend puts of 64 MiB of incompressible objects of size `cs`.
fn local_put_cost(dir: &Path, cs: u64) -> Result<(f64, f64)> {
    let root = dir.join(format!("local-{cs}"));
    let _ = std::fs::remove_dir_all(&root);
    let backend = LocalBackend::new(&root);
    let mut rng = Rng(cs);
    let count = (64 * MIB / cs).max(8);
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|_| (0..cs / 8).flat_map(|_| rng.next().to_le_bytes()).collect())
        .collect();
    let start = Instant::now();
    for (i, b) in bodies.iter().enumerate() {
        // Distinct, well-spread names (multiplication by an odd constant is a bijection).
        let h = format!(
            "{:064x}",
            (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
        );
        backend.put_if_absent(&format!("chunks/{}/{}", &h[..2], h), b)?;
    }
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&root)?;
    Ok((
        secs * 1000.0 / count as f64,
        (count * cs) as f64 / 1e6 / secs,
    ))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let work = match args.get(2) {
        Some(p) => PathBuf::from(p),
        None => std::env::temp_dir().join("lifeboat-chunk-size"),
    };
    std::fs::create_dir_all(&work)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();

    let base_path = work.join(format!("mixed-{size_mib}.raw"));
    if !base_path.exists() {
        run(Command::new(root.join("scripts/make-mixed-image.sh"))
            .arg(&base_path)
            .arg(size_mib.to_string())
            .arg("raw"))?;
    }
    let base = std::fs::read(&base_path)?;
    let fs_len = (size_mib / 2) * MIB;
    let mut synth = base.clone();
    let (synth_dirty, synth_written) = synthetic_changes(&mut synth, fs_len, 7);
    let (fs1, fs2, ext4_what) = ext4_change(&work, 256)?;
    let ext4_dirty = diff_grains(&fs1, &fs2);

    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    println!("mixed image: {size_mib} MiB raw (scripts/make-mixed-image.sh, seed 1)");
    println!(
        "synthetic: 600 writes, {:.1} MiB written, {:.1} MiB dirty at 64 KiB",
        synth_written as f64 / MIB as f64,
        (synth_dirty.len() as u64 * GRAIN) as f64 / MIB as f64
    );
    println!(
        "ext4: {ext4_what}; {:.1} MiB differ at 64 KiB",
        (ext4_dirty.len() as u64 * GRAIN) as f64 / MIB as f64
    );
    println!();

    // Every chunk size in its own thread.
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = SIZES
            .iter()
            .map(|&cs| {
                let (base, synth, fs1, fs2) = (&base, &synth, &fs1, &fs2);
                let (synth_dirty, ext4_dirty) = (&synth_dirty, &ext4_dirty);
                s.spawn(move || -> Result<String> {
                    let repo = repo(cs)?;
                    let (d, known) = dedup(&repo, base, cs);
                    let (sr, ss, so) = incremental(&repo, synth, synth_dirty, &known, cs);
                    let (_, known_fs) = dedup(&repo, fs1, cs);
                    let (er, es, eo) = incremental(&repo, fs2, ext4_dirty, &known_fs, cs);
                    let sd = synth_dirty.len() as u64 * GRAIN;
                    let ed = ext4_dirty.len() as u64 * GRAIN;
                    Ok(format!(
                        "| {:>5} KiB | {:>5.2} | {:>5.2} | {:>6} | {:>6.1} / {:>6.1} ({:>4.1}×, {:>4.1}×) | {:>5} | {:>6.1} / {:>6.1} ({:>4.1}×, {:>4.1}×) | {:>4} |",
                        cs / KIB,
                        d.nonzero_bytes as f64 / d.unique_bytes as f64,
                        d.unique_bytes as f64 / d.stored_bytes as f64,
                        d.unique_chunks,
                        sr as f64 / MIB as f64,
                        ss as f64 / MIB as f64,
                        sr as f64 / sd as f64,
                        ss as f64 / sd as f64,
                        so,
                        er as f64 / MIB as f64,
                        es as f64 / MIB as f64,
                        er as f64 / ed as f64,
                        es as f64 / ed as f64,
                        eo,
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("| chunk | dedup | zstd | objects | synthetic: read / stored MiB (× dirty) | objs | ext4: read / stored MiB (× dirty) | objs |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        println!("{}", r?);
    }
    println!();
    println!("| chunk | objects per GiB | local put: ms/object | local put: MB/s | S3 PUT $ per GiB written (at $0.005/1000) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for &cs in &SIZES {
        let (ms, mbs) = local_put_cost(&work, cs)?;
        let per_gib = (1 << 30) / cs;
        println!(
            "| {:>5} KiB | {per_gib:>6} | {ms:>6.2} | {mbs:>6.0} | {:.4} |",
            cs / KIB,
            per_gib as f64 * 0.005 / 1000.0
        );
    }
    Ok(())
}
