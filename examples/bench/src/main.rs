//! `lifeboat-bench`: measures the machine's ceilings, Lifeboat and (optionally) peer tools on the
//! same mixed disk image, interleaved in one run, and reports ratios. See `docs/BENCHMARKS.md`.
//!
//! Every number printed is measured in this run; a measurement that cannot be made is printed
//! as `not measured: <why>`.

mod cpu;
mod dirty;
mod diskstats;
mod live;
mod offline;
mod proc;
mod report;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use report::Report;

/// Lifeboat benchmark harness.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Virtual size of the mixed test disk (e.g. 512M, 2G).
    #[arg(long)]
    size: Option<String>,
    /// A quick run: 512 MiB disk (unless --size), one round, smaller CPU sample.
    #[arg(long)]
    quick: bool,
    /// Rounds (each measurement keeps its best round); default 3, 1 with --quick.
    #[arg(long)]
    rounds: Option<u32>,
    /// Measure peer tools (restic, borg) that are installed (scripts/install-bench-peers.sh).
    #[arg(long)]
    peers: bool,
    /// Write the results as Markdown into this file (between the bench markers if it has them).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The lifeboat binary (default: build it with `cargo build --release -p lifeboat`).
    #[arg(long)]
    lifeboat: Option<PathBuf>,
    /// Working directory: image cache, repositories, restores.
    #[arg(long, default_value = "/var/tmp/lifeboat-bench")]
    work: PathBuf,
    /// Skip the 1 TiB sparse incremental test.
    #[arg(long)]
    no_sparse: bool,
    /// Skip the 4-disks-in-parallel test.
    #[arg(long)]
    no_parallel: bool,
    /// Size in GiB of the fully allocated disk whose full backup and verify must stay within
    /// the memory target (scripts/bench-allocated-disk.sh: needs root, loop devices and XFS;
    /// installs xfsprogs); 0 skips it. ≈ 1.5 s per GiB here.
    #[arg(long, default_value_t = 64)]
    allocated_gib: u64,
    /// Skip the live libvirt section (a running TCG domain booting the e2e test guest: NBD
    /// read of the pull-mode export, `lifeboat backup` full and incremental with the freeze
    /// window, instant-restore time to running, virtnbdbackup with --peers). It runs by
    /// default when libvirt and the test guest are available.
    #[arg(long)]
    no_live: bool,
    /// Rounds of the live section (each boots fresh domains); default 1.
    #[arg(long, default_value_t = 1)]
    live_rounds: u32,
    /// Only the CPU ceilings and the live libvirt section (no offline rounds, 1 TiB sparse or
    /// parallel tests).
    #[arg(long, conflicts_with = "no_live")]
    only_live: bool,
    /// Chunk size of the benchmark repositories (`lifeboat repo init --chunk-size`, e.g. 256K);
    /// the CPU ceilings are measured on pieces of the same size. Default: the repository
    /// default, 1M.
    #[arg(long, default_value = "1M")]
    chunk_size: String,
    /// Frame size of the benchmark repositories (`lifeboat repo init --frame-size`; 0 for
    /// unframed chunks). The CPU ceilings compress and encrypt pieces of the frame size (of the
    /// chunk size when unframed), as Lifeboat does. Default: the repository default, 64K.
    #[arg(long, default_value = "64K")]
    frame_size: String,
    /// zstd level of the benchmark repositories (`lifeboat repo init --zstd-level`); the CPU
    /// ceilings compress at the same level, and so does borg. Default: the repository
    /// default, 1.
    #[arg(long, default_value_t = repo_format::DEFAULT_ZSTD_LEVEL)]
    zstd_level: i32,
    /// Object cipher of the benchmark repositories (`lifeboat repo init --cipher`); the CPU
    /// ceilings encrypt with the same cipher. Default: `lifeboat repo init`'s default, auto
    /// (AEGIS-256 where the CPU has AES instructions, else XChaCha20-Poly1305).
    #[arg(long, value_enum, default_value = "auto")]
    cipher: CipherArg,
}

/// `--cipher` values (as `lifeboat repo init --cipher`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CipherArg {
    Auto,
    Aegis256,
    Xchacha20poly1305,
}

impl CipherArg {
    fn resolve(self) -> repo_format::Cipher {
        match self {
            CipherArg::Auto => repo_format::Cipher::preferred(),
            CipherArg::Aegis256 => repo_format::Cipher::Aegis256,
            CipherArg::Xchacha20poly1305 => repo_format::Cipher::XChaCha20Poly1305,
        }
    }
}

/// The `lifeboat repo init --cipher` value of `c`, and its name in the report.
fn cipher_names(c: repo_format::Cipher) -> (&'static str, &'static str) {
    match c {
        repo_format::Cipher::Aegis256 => ("aegis256", "AEGIS-256"),
        repo_format::Cipher::XChaCha20Poly1305 => ("xchacha20poly1305", "XChaCha20-Poly1305"),
    }
}

const MIB: u64 = 1 << 20;

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    Ok(n * mul)
}

/// The workspace this harness was built from (its scripts are used).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn build_lifeboat(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building lifeboat (release)...");
    let st = std::process::Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "lifeboat",
            "--bin",
            "lifeboat",
        ])
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !st.success() {
        bail!("cargo build --release -p lifeboat failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/lifeboat"))
}

/// Paths and settings shared by the measurements.
struct Ctx {
    lifeboat: String,
    key: String,
    work: PathBuf,
    scratch: PathBuf,
    /// `--chunk-size` for `lifeboat repo init`.
    chunk_size: String,
    /// `--zstd-level` for `lifeboat repo init`.
    zstd_level: String,
    /// `--frame-size` for `lifeboat repo init`.
    frame_size: String,
    /// `--cipher` for `lifeboat repo init`.
    cipher: &'static str,
    /// The same, for the CPU ceilings.
    cipher_kind: repo_format::Cipher,
    /// Where [`Ctx::discard`] moves trees to; removed with the run directory at the end.
    trash: PathBuf,
}

impl Ctx {
    fn lb(&self, repo: &Path, args: &[&str]) -> Result<proc::Run> {
        self.lb_timeout(repo, args, proc::DEFAULT_TIMEOUT)
    }

    fn lb_timeout(
        &self,
        repo: &Path,
        args: &[&str],
        timeout: std::time::Duration,
    ) -> Result<proc::Run> {
        let r = repo.to_string_lossy();
        let mut argv = vec![
            self.lifeboat.as_str(),
            "--repo",
            &r,
            "--key-file",
            &self.key,
            "--json",
            "--quiet",
        ];
        argv.extend_from_slice(args);
        proc::run_timeout(&argv, &[], &self.scratch, timeout)
    }

    fn init_repo(&self, repo: &Path) -> Result<()> {
        self.discard(repo);
        self.lb(
            repo,
            &[
                "repo",
                "init",
                "--chunk-size",
                &self.chunk_size,
                "--frame-size",
                &self.frame_size,
                "--zstd-level",
                &self.zstd_level,
                "--cipher",
                self.cipher,
            ],
        )
        .map(|_| ())
    }

    /// Moves a repository (thousands of files) out of the way instead of deleting it: on an
    /// ext4 without a journal (this machine's root filesystem) the inode allocator scans past
    /// every inode freed in the last 5-30 s (`recently_deleted`), which made the object
    /// creation of the next backup pay ≈ 10 % of its CPU for the deletion of the previous
    /// round's repository; the ceilings create no files and did not pay it. Everything moved
    /// here is deleted with the run directory when the harness ends.
    fn discard(&self, p: &Path) {
        if std::fs::symlink_metadata(p).is_err() {
            return;
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::create_dir_all(&self.trash);
        if std::fs::rename(p, self.trash.join(n.to_string())).is_err() {
            rm(p);
        }
    }
}

/// "1 MiB", "256 KiB": a chunk size for the report.
fn size_label(b: u64) -> String {
    if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / 1024)
    }
}

fn rm(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
    let _ = std::fs::remove_file(p);
}

/// Removes a file or directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        rm(&self.0);
    }
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", p.display()))
}

fn u64_at(v: &serde_json::Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(|x| x.as_u64()).unwrap_or(0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    proc::install_interrupt_handler()?;
    let root = workspace_root();
    let size = match &args.size {
        Some(s) => parse_size(s)?,
        None if args.quick => 512 * MIB,
        None => 2 << 30,
    };
    let size_mib = size / MIB;
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    for tool in [
        "qemu-img",
        "qemu-nbd",
        "qemu-io",
        "nbdcopy",
        "mkfs.ext4",
        "python3",
    ] {
        if !proc::have(tool) {
            bail!("{tool} is missing: run scripts/install-deps.sh");
        }
    }
    let lifeboat = match &args.lifeboat {
        Some(p) => p.clone(),
        None => build_lifeboat(&root)?,
    };
    let cache = args.work.join("cache");
    let run_dir = args.work.join("run");
    rm(&run_dir);
    std::fs::create_dir_all(&cache)?;
    std::fs::create_dir_all(&run_dir)?;
    // Repositories, disk copies and restores go away also when the run fails.
    let _run_dir_guard = RemoveOnDrop(run_dir.clone());
    let scratch = run_dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;

    // The image, cached by size.
    let image = cache.join(format!("mixed-{size_mib}M.qcow2"));
    if !image.exists() {
        eprintln!("generating {} ...", image.display());
        let tmp = cache.join(format!("mixed-{size_mib}M.qcow2.tmp"));
        rm(&tmp);
        let script = root.join("scripts/make-mixed-image.sh");
        proc::run(
            &[
                &script.to_string_lossy(),
                &tmp.to_string_lossy(),
                &size_mib.to_string(),
                "qcow2",
            ],
            &[],
            &scratch,
        )?;
        std::fs::rename(&tmp, &image)?;
    }
    let raw = cache.join(format!("mixed-{size_mib}M.raw"));
    if !raw.exists() {
        let tmp = cache.join(format!("mixed-{size_mib}M.raw.tmp"));
        proc::run(
            &[
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &image.to_string_lossy(),
                &tmp.to_string_lossy(),
            ],
            &[],
            &scratch,
        )?;
        std::fs::rename(&tmp, &raw)?;
    }
    let key = cache.join("bench.key");
    if !key.exists() {
        proc::run(
            &[
                &lifeboat.to_string_lossy(),
                "repo",
                "generate-key-file",
                &key.to_string_lossy(),
            ],
            &[],
            &scratch,
        )?;
    }
    let chunk_bytes = parse_size(&args.chunk_size)
        .ok()
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| b.is_power_of_two() && *b >= 64 * 1024)
        .with_context(|| {
            format!(
                "--chunk-size {}: not a power of two of at least 64K",
                args.chunk_size
            )
        })?;
    let frame_bytes = parse_size(&args.frame_size)
        .ok()
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| *b == 0 || (b.is_power_of_two() && *b >= 64 * 1024))
        .with_context(|| {
            format!(
                "--frame-size {}: not 0 or a power of two of at least 64K",
                args.frame_size
            )
        })?;
    // Frames apply only when smaller than the chunk (as `lifeboat repo init` decides).
    let frame_bytes = Some(frame_bytes).filter(|f| *f > 0 && *f < chunk_bytes);
    let cipher = args.cipher.resolve();
    let ctx = Ctx {
        lifeboat: lifeboat.to_string_lossy().into_owned(),
        key: key.to_string_lossy().into_owned(),
        work: run_dir.clone(),
        scratch: scratch.clone(),
        chunk_size: args.chunk_size.clone(),
        frame_size: args.frame_size.clone(),
        zstd_level: args.zstd_level.to_string(),
        cipher: cipher_names(cipher).0,
        cipher_kind: cipher,
        trash: run_dir.join("trash"),
    };

    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let zstd_level = args.zstd_level;
    let sample_limit = if args.quick { 64 * MIB } else { 256 * MIB };
    eprintln!("loading a CPU sample of the image's non-zero chunks...");
    let sample = cpu::load_sample(&raw, frame_bytes.unwrap_or(chunk_bytes), sample_limit)?;

    let mut rep = Report::new(size, rounds, threads, sample.bytes());
    rep.zstd_level = zstd_level;
    rep.cipher = cipher_names(cipher).1;
    rep.chunk_label = size_label(chunk_bytes as u64);
    rep.frame_label = frame_bytes.map(|f| size_label(f as u64));
    rep.loads.push(format!("start: {}", proc::loadavg()));
    rep.work_fs = proc::describe_work_fs(&args.work);
    rep.memory_note = proc::memory_note();
    if rep.work_fs.contains("without a journal") {
        eprintln!(
            "note: the work directory is on an ext4 without a journal ({}): new files scan past \
             the inodes freed in the last 1-6 minutes, so a run started soon after deleting many \
             files measures that scan (docs/BENCHMARKS.md, \"What limits\")",
            rep.work_fs
        );
    }
    let have_restic = args.peers && proc::have("restic");
    let have_borg = args.peers && proc::have("borg");

    if args.only_live {
        let c = cpu::measure(&sample, zstd_level, threads, cipher);
        rep.add_cpu(c);
        rep.note(
            "offline rounds, 1 TiB sparse, 4 disks in parallel",
            "not measured: --only-live",
        );
    }
    for round in (1..=rounds).filter(|_| !args.only_live) {
        eprintln!("round {round}/{rounds} (load {})", proc::loadavg());
        offline::one_round(
            &ctx,
            &image,
            size,
            &sample,
            zstd_level,
            threads,
            have_restic,
            have_borg,
            &mut rep,
        )
        .with_context(|| format!("round {round}"))?;
        rep.loads
            .push(format!("after round {round}: {}", proc::loadavg()));
    }

    if args.no_sparse {
        rep.note("1 TiB sparse incremental", "not measured: --no-sparse");
    } else if !args.only_live {
        eprintln!("1 TiB sparse disk, 64 MiB dirty...");
        for _ in 0..rounds {
            offline::sparse_test(&ctx, &mut rep)?;
        }
    }
    if args.allocated_gib == 0 {
        rep.note("fully allocated disk", "not measured: --allocated-gib 0");
    } else if !args.only_live {
        eprintln!("fully allocated {} GiB disk...", args.allocated_gib);
        if let Err(e) = offline::allocated_test(&ctx, args.allocated_gib, &mut rep) {
            rep.note("fully allocated disk", &format!("not measured: {e:#}"));
        }
    }
    if args.no_parallel {
        rep.note("4 disks in parallel", "not measured: --no-parallel");
    } else if !args.only_live {
        eprintln!("4 disks in parallel...");
        offline::parallel_test(&ctx, &image, &mut rep)?;
    }
    let have_vnb = args.peers && proc::have("virtnbdbackup");
    if args.no_live {
        rep.note(
            "live libvirt section (freeze window, instant-restore, virtnbdbackup)",
            "not measured: --no-live",
        );
    } else if let Some(why) = live::unavailable() {
        rep.note(
            "live libvirt section (freeze window, instant-restore, virtnbdbackup)",
            &format!("not measured: {why}"),
        );
    } else {
        let n = args.live_rounds.max(1);
        for round in 1..=n {
            eprintln!("live round {round}/{n} (load {})", proc::loadavg());
            live::round(&ctx, &image, size, have_vnb, &mut rep)
                .with_context(|| format!("live round {round}"))?;
            rep.loads
                .push(format!("after live round {round}: {}", proc::loadavg()));
        }
    }
    if args.peers {
        if !have_restic {
            rep.note(
                "restic",
                "not measured: restic is not installed (scripts/install-bench-peers.sh)",
            );
        }
        if !have_borg {
            rep.note(
                "borg",
                "not measured: borg is not installed (scripts/install-bench-peers.sh)",
            );
        }
        if !have_vnb {
            rep.note(
                "virtnbdbackup",
                "not measured: virtnbdbackup is not installed (scripts/install-bench-peers.sh)",
            );
        }
    } else {
        rep.note("peers", "not measured: run with --peers");
    }
    rep.loads.push(format!("end: {}", proc::loadavg()));

    let md = rep.render();
    println!("{md}");
    if let Some(out) = &args.out {
        report::write_out(out, &md)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
