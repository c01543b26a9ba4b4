//! Best-of-N bookkeeping and the Markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::cpu::Ceilings;
use crate::proc;

mod cpu_work;
mod live;
mod peers;

/// The best (fastest) round of one measurement, with the largest peak RSS seen in any round.
#[derive(Debug, Clone, Copy)]
pub struct Best {
    /// Seconds (minimum over rounds).
    pub secs: f64,
    /// Peak RSS in KiB (maximum over rounds).
    pub rss_kib: Option<u64>,
    /// Repository size in bytes after the run (0 if not applicable).
    pub repo_bytes: u64,
    /// CPU seconds, user + system, children included (minimum over rounds).
    pub cpu_secs: Option<f64>,
    /// Rounds measured.
    pub n: u32,
}

impl Best {
    /// One round's result.
    pub fn time(secs: f64, rss_kib: Option<u64>, repo_bytes: u64) -> Best {
        Best {
            secs,
            rss_kib,
            repo_bytes,
            cpu_secs: None,
            n: 1,
        }
    }

    /// One round's result of a finished command.
    pub fn of(r: &crate::proc::Run, repo_bytes: u64) -> Best {
        Best {
            cpu_secs: r.cpu_secs,
            ..Best::time(r.secs, r.max_rss_kib, repo_bytes)
        }
    }
}

/// What the live section observed besides timed runs (all rounds together).
#[derive(Debug, Clone, Default)]
pub struct LiveFacts {
    /// Seconds from `virsh start` to a responding guest agent, per booted domain.
    pub boot_secs: Vec<f64>,
    /// Seconds the guest took to write the dirty data.
    pub dirty_write_secs: Vec<f64>,
    /// Freeze windows Lifeboat reported (`freeze_window_ms`), per backup ("full" /
    /// "incremental"); `None` when it did not freeze.
    pub freeze_ms: Vec<(&'static str, Option<f64>)>,
    /// Lifeboat's `quiesce` report of each backup.
    pub quiesce: Vec<String>,
    /// Dirty bytes of Lifeboat's live incremental (from the bitmap).
    pub dirty: u64,
    /// Bytes Lifeboat's live incremental read (whole chunks holding a dirty block).
    pub incr_read: u64,
    /// Seconds of the live incremental's disk transfer (its report's per-disk `seconds`).
    pub incr_disk_secs: Vec<f64>,
    /// `running_after_seconds` instant-restore reported.
    pub ir_reported_running: Vec<f64>,
    /// The step times (`steps_ms` of `lifeboat backup --json`) of the fastest live incremental,
    /// with its wall time.
    pub incr_steps: Option<(f64, Vec<(String, f64)>)>,
    /// The work directory's device during each live full backup and each NBD ceiling run
    /// (`/proc/diskstats`), with the run's wall time.
    pub full_device: Vec<(f64, crate::diskstats::DeviceUse)>,
    /// The same during each `nbdcopy` of the live export.
    pub ceiling_device: Vec<(f64, crate::diskstats::DeviceUse)>,
    /// That device, e.g. "`vda`, which also holds the domains' disks".
    pub device: Option<String>,
}

/// Everything measured in a run.
pub struct Report {
    size: u64,
    rounds: u32,
    threads: usize,
    sample_bytes: u64,
    /// Allocated non-zero bytes of the image (from Lifeboat's allocation scan).
    pub allocated: u64,
    /// Dirty bytes of the incremental (from the bitmap).
    pub dirty: u64,
    /// Bytes verify read and checked.
    pub verify_bytes: u64,
    /// Dirty bytes of the 1 TiB test.
    pub sparse_dirty: u64,
    /// (wall seconds, peak RSS KiB of each process) of the 4-disk run.
    pub parallel: Option<(f64, Vec<u64>)>,
    /// Size in GiB of the fully allocated disk (0: not measured).
    pub allocated_gib: u64,
    /// Load averages along the run.
    pub loads: Vec<String>,
    /// The repositories' chunk size, e.g. "1 MiB".
    pub chunk_label: String,
    /// "64 KiB" when chunks are sealed in frames of that size, `None` when unframed.
    pub frame_label: Option<String>,
    /// zstd level of the repositories, the CPU ceilings and borg.
    pub zstd_level: i32,
    /// The repositories' object cipher (its name).
    pub cipher: &'static str,
    /// The filesystem of the working directory, from [`proc::describe_work_fs`].
    pub work_fs: String,
    /// What this machine does with freed memory, from [`proc::memory_note`].
    pub memory_note: Option<String>,
    live: Option<LiveFacts>,
    results: BTreeMap<String, Best>,
    cpu: Option<Ceilings>,
    notes: Vec<(String, String)>,
}

fn mb(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn size_h(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// "Lifeboat 2.0× faster" for a peer/Lifeboat time ratio `r` (or "… slower" below 1).
fn speedup(r: f64) -> String {
    if r >= 1.0 || r <= 0.0 || !r.is_finite() {
        format!("Lifeboat {r:.1}× faster")
    } else {
        format!("Lifeboat {:.1}× slower", 1.0 / r)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

impl Report {
    /// An empty report.
    pub fn new(size: u64, rounds: u32, threads: usize, sample_bytes: u64) -> Report {
        Report {
            size,
            rounds,
            threads,
            sample_bytes,
            allocated: 0,
            dirty: 0,
            verify_bytes: 0,
            sparse_dirty: 0,
            parallel: None,
            allocated_gib: 0,
            loads: Vec::new(),
            chunk_label: "1 MiB".into(),
            frame_label: Some("64 KiB".into()),
            zstd_level: repo_format::DEFAULT_ZSTD_LEVEL,
            cipher: "XChaCha20-Poly1305",
            work_fs: "?".into(),
            memory_note: None,
            live: None,
            results: BTreeMap::new(),
            cpu: None,
            notes: Vec::new(),
        }
    }

    /// Records one round of `name`.
    pub fn add(&mut self, name: &str, b: Best) {
        self.results
            .entry(name.to_string())
            .and_modify(|old| {
                old.rss_kib = old.rss_kib.max(b.rss_kib);
                old.cpu_secs = match (old.cpu_secs, b.cpu_secs) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
                old.n += 1;
                if b.secs < old.secs {
                    old.secs = b.secs;
                    old.repo_bytes = b.repo_bytes;
                }
            })
            .or_insert(b);
    }

    /// Records one round of CPU ceilings (keeps the best of each).
    pub fn add_cpu(&mut self, c: Ceilings) {
        let best = match self.cpu {
            None => c,
            Some(o) => Ceilings {
                blake3_1: o.blake3_1.max(c.blake3_1),
                blake3_n: o.blake3_n.max(c.blake3_n),
                zstd_1: o.zstd_1.max(c.zstd_1),
                aead_1: o.aead_1.max(c.aead_1),
                seal_n: o.seal_n.max(c.seal_n),
                open_n: o.open_n.max(c.open_n),
                compress_ratio: c.compress_ratio,
                seal_cpu_per_mb: o.seal_cpu_per_mb.min(c.seal_cpu_per_mb),
                open_cpu_per_mb: o.open_cpu_per_mb.min(c.open_cpu_per_mb),
            },
        };
        self.cpu = Some(best);
    }

    /// Records one round of the live section's facts.
    pub fn add_live(&mut self, f: LiveFacts) {
        let l = self.live.get_or_insert_with(LiveFacts::default);
        l.boot_secs.extend(f.boot_secs);
        l.dirty_write_secs.extend(f.dirty_write_secs);
        l.freeze_ms.extend(f.freeze_ms);
        l.quiesce.extend(f.quiesce);
        l.dirty = l.dirty.max(f.dirty);
        l.incr_read = l.incr_read.max(f.incr_read);
        l.incr_disk_secs.extend(f.incr_disk_secs);
        l.ir_reported_running.extend(f.ir_reported_running);
        l.full_device.extend(f.full_device);
        l.ceiling_device.extend(f.ceiling_device);
        l.device = l.device.take().or(f.device);
        if let Some((secs, steps)) = f.incr_steps {
            if l.incr_steps.as_ref().is_none_or(|(best, _)| secs < *best) {
                l.incr_steps = Some((secs, steps));
            }
        }
    }

    /// A measurement that was not made, and why.
    pub fn note(&mut self, what: &str, why: &str) {
        self.notes.push((what.to_string(), why.to_string()));
    }

    fn get(&self, k: &str) -> Option<Best> {
        self.results.get(k).copied()
    }

    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let now = jiff::Timestamp::now();
        let cpu_model =
            proc::capture(&["sh", "-c", "lscpu | sed -n 's/^Model name: *//p' | head -1"]);
        let mem = proc::capture(&[
            "sh",
            "-c",
            "awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo",
        ]);
        let kernel = proc::capture(&["uname", "-r"]);
        let disk = &self.work_fs;
        let a = self.allocated;
        let v = self.size;
        let _ = writeln!(s, "### Run of {}", now.strftime("%Y-%m-%d %H:%M UTC"));
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "- Machine: {cpu_model}, {} cores, {mem} RAM, kernel {kernel}; work directory on {disk}{}",
            self.threads,
            self.memory_note
                .as_ref()
                .map(|m| format!("; {m}"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "- Load average (1/5/15 min): {}", self.loads.join("; "));
        // With `--only-live` no offline round ran: no offline incremental, no rounds to count.
        let offline = self.get("lb.full").is_some();
        let _ = writeln!(
            s,
            "- Disk: mixed qcow2 (scripts/make-mixed-image.sh), {} virtual, {} allocated non-zero{}",
            size_h(v),
            size_h(a),
            if offline {
                format!(
                    "; incremental after {} dirtied in 64 KiB writes spread over the disk",
                    size_h(self.dirty)
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "- {}; image in the page cache for every reader (the repository too, before restore \
             and verify: Lifeboat writes chunk objects with direct I/O); repository \
             encrypted with {} (key file), {} chunks{}, zstd level {}. Durability: Lifeboat fsyncs what it \
             writes (objects, restored image); `qemu-img convert` is followed by `sync FILE`; \
             nbdcopy writes nothing. MB/s = 10^6 bytes/s.",
            if offline {
                format!("Best of {} interleaved round(s)", self.rounds)
            } else {
                "No offline rounds (`--only-live`)".to_string()
            },
            self.cipher,
            self.chunk_label,
            match &self.frame_label {
                Some(f) => format!(" sealed in {f} frames"),
                None => " (unframed)".into(),
            },
            self.zstd_level
        );
        let _ = writeln!(s);

        // Ceilings.
        let _ = writeln!(s, "| ceiling | MB/s |");
        let _ = writeln!(s, "| --- | --- |");
        let nbd = self.get("ceil.nbdcopy");
        if let Some(b) = nbd {
            let _ = writeln!(
                s,
                "| NBD read, `nbdcopy` (qemu-nbd export) → null: {:.2} s | {:.0} allocated ({:.0} virtual) |",
                b.secs,
                mb(a, b.secs),
                mb(v, b.secs)
            );
        }
        // (Not with `--only-live`: the offline runs it compares did not happen.)
        if let (Some(c), true) = (self.cpu, self.get("lb.full").is_some()) {
            let _ = writeln!(
                s,
                "| keyed BLAKE3, 1 core / all {} cores | {:.0} / {:.0} |",
                self.threads, c.blake3_1, c.blake3_n
            );
            let _ = writeln!(
                s,
                "| zstd level {}, 1 core (sample compresses to {:.0} %) | {:.0} |",
                self.zstd_level,
                c.compress_ratio * 100.0,
                c.zstd_1
            );
            let _ = writeln!(s, "| {} encrypt, 1 core | {:.0} |", self.cipher, c.aead_1);
            let _ = writeln!(
                s,
                "| hash + compress + encrypt, all cores (backup CPU ceiling) | {:.0} |",
                c.seal_n
            );
            let _ = writeln!(
                s,
                "| decrypt + decompress + hash, all cores (verify ceiling) | {:.0} |",
                c.open_n
            );
            let _ = writeln!(
                s,
                "| (CPU ceilings measured in-process on {} of the image's non-zero {} pieces) | |",
                size_h(self.sample_bytes),
                self.frame_label.as_ref().unwrap_or(&self.chunk_label)
            );
        }
        for fmt in ["qcow2", "raw"] {
            if let Some(b) = self.get(&format!("ceil.convert.{fmt}")) {
                let _ = writeln!(
                    s,
                    "| `qemu-img convert -O {fmt}` + fsync: {:.2} s | {:.0} allocated ({:.0} virtual) |",
                    b.secs,
                    mb(a, b.secs),
                    mb(v, b.secs)
                );
            }
        }
        let _ = writeln!(s);

        // Lifeboat.
        let _ = writeln!(
            s,
            "| Lifeboat | best s | MB/s virtual | MB/s allocated | ratio | target | | peak RSS MiB | repo |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut max_rss = 0u64;
        let mut row = |s: &mut String,
                       name: &str,
                       b: Best,
                       bytes_alloc: u64,
                       ratio: String,
                       target: &str,
                       ok: Option<bool>| {
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
            let _ = writeln!(
                s,
                "| {name} | {:.2} | {:.0} | {:.0} | {ratio} | {target} | {} | {} | {} |",
                b.secs,
                mb(v, b.secs),
                mb(bytes_alloc, b.secs),
                ok.map_or("", verdict),
                mib(b.rss_kib),
                if b.repo_bytes > 0 {
                    size_h(b.repo_bytes)
                } else {
                    String::new()
                }
            );
        };
        if let Some(b) = self.get("lb.full") {
            let (ratio, ok) = match (nbd, self.cpu) {
                (Some(n), Some(c)) => {
                    let nbd_rate = mb(a, n.secs);
                    let ceil = nbd_rate.min(c.seal_n);
                    let r = mb(a, b.secs) / ceil;
                    (
                        format!("{r:.2}× min(NBD {nbd_rate:.0}, CPU {:.0})", c.seal_n),
                        Some(r >= 0.8),
                    )
                }
                _ => ("n/a".into(), None),
            };
            row(&mut s, "full backup", b, a, ratio, "≥ 0.8×", ok);
        }
        if let Some(b) = self.get("lb.incr") {
            let full = self.get("lb.full").map(|f| f.secs).unwrap_or(0.0);
            row(
                &mut s,
                &format!("incremental, {} dirty", size_h(self.dirty)),
                b,
                self.dirty,
                format!("{:.0} % of full time", b.secs / full.max(1e-9) * 100.0),
                "∝ dirty",
                None,
            );
        }
        for fmt in ["qcow2", "raw"] {
            if let (Some(b), Some(c)) = (
                self.get(&format!("lb.restore.{fmt}")),
                self.get(&format!("ceil.convert.{fmt}")),
            ) {
                let r = c.secs / b.secs;
                row(
                    &mut s,
                    &format!("restore → {fmt}"),
                    b,
                    a,
                    format!("{r:.2}× qemu-img convert"),
                    "≥ 0.8×",
                    Some(r >= 0.8),
                );
            }
        }
        if let Some(b) = self.get("lb.verify") {
            let (ratio, ok) = match self.cpu {
                Some(c) => {
                    let r = mb(self.verify_bytes, b.secs) / c.open_n;
                    (
                        format!(
                            "{r:.2}× CPU {:.0} ({} checked)",
                            c.open_n,
                            size_h(self.verify_bytes)
                        ),
                        Some(r >= 0.8),
                    )
                }
                None => ("n/a".into(), None),
            };
            row(
                &mut s,
                "verify --read-data",
                b,
                self.verify_bytes,
                ratio,
                "≥ 0.8×",
                ok,
            );
        }
        if let Some(b) = self.get("lb.sparse.full") {
            let _ = writeln!(
                s,
                "| 1 TiB sparse qcow2 (64 MiB data): full | {:.2} | {:.0} | | | | | {} | {} |",
                b.secs,
                mb(1 << 40, b.secs),
                mib(b.rss_kib),
                size_h(b.repo_bytes)
            );
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
        }
        if let Some(b) = self.get("lb.sparse.incr") {
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
            let _ = writeln!(
                s,
                "| 1 TiB sparse: incremental, {} dirty (wall time of the whole command) | {:.2} | {:.0} | | | < 5 s | {} | {} | {} |",
                size_h(self.sparse_dirty),
                b.secs,
                mb(1 << 40, b.secs),
                verdict(b.secs < 5.0),
                mib(b.rss_kib),
                size_h(b.repo_bytes)
            );
        }
        for (key, what) in [
            ("lb.alloc.full", "full backup"),
            ("lb.alloc.verify", "verify"),
        ] {
            let Some(b) = self.get(key) else { continue };
            let gib = self.allocated_gib;
            let rss_ok = b.rss_kib.is_some_and(|r| r <= 256 * 1024);
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
            let _ = writeln!(
                s,
                "| fully allocated {gib} GiB disk in 64 KiB chunks ({:.1} M chunks, every one stored; scripts/bench-allocated-disk.sh): {what} | {:.2} | {} | | | ≤ 256 MiB | {} | {} | |",
                gib as f64 / 64.0,
                b.secs,
                // verify reads the 16 distinct chunks only: no disk rate.
                if key == "lb.alloc.full" { format!("{:.0}", mb(gib << 30, b.secs)) } else { String::new() },
                verdict(rss_ok),
                mib(b.rss_kib),
            );
        }
        if let Some((secs, rss)) = &self.parallel {
            let m = rss.iter().copied().max().unwrap_or(0);
            let sum: u64 = rss.iter().sum();
            let _ = writeln!(
                s,
                "| 4 full backups in parallel (4 processes) | {secs:.2} | {:.0} | {:.0} | | each ≤ 256 MiB | {} | max {:.0}, sum {:.0} | |",
                mb(4 * v, *secs),
                mb(4 * a, *secs),
                verdict(m <= 256 * 1024),
                m as f64 / 1024.0,
                sum as f64 / 1024.0
            );
        }
        let _ = writeln!(
            s,
            "| peak RSS of every single Lifeboat run | | | | | ≤ 256 MiB | {} | {:.0} | |",
            verdict(max_rss <= 256 * 1024),
            max_rss as f64 / 1024.0
        );
        let _ = writeln!(s);

        self.render_cpu_work(&mut s);

        self.render_live(&mut s, max_rss);

        self.render_peers(&mut s);
        for (what, why) in &self.notes {
            let _ = writeln!(s, "- {what}: {why}");
        }
        s
    }
}

const BEGIN: &str = "<!-- bench:begin (written by lifeboat-bench --out) -->";
const END: &str = "<!-- bench:end -->";

/// Writes `md` into `path`: between the markers if the file has them, else as a new file.
pub fn write_out(path: &Path, md: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{BEGIN}\n{md}{}", &old[..b], &old[e..])
        }
        _ => format!("# Benchmarks\n\n{BEGIN}\n{md}{END}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests;
