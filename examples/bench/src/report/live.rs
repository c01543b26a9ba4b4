//! The live libvirt section of the report.

use std::fmt::Write as _;

use super::*;

impl Report {
    /// The live libvirt section: a table, or nothing when it did not run.
    pub(super) fn render_live(&self, s: &mut String, offline_max_rss: u64) {
        let Some(f) = &self.live else {
            return;
        };
        let a = self.allocated;
        let v = self.size;
        let minmax = |xs: &[f64]| -> String {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(0.0, f64::max);
            if xs.is_empty() {
                "n/a".into()
            } else if (hi - lo).abs() < 0.005 {
                format!("{lo:.2} s")
            } else {
                format!("{lo:.2}–{hi:.2} s")
            }
        };
        let _ = writeln!(
            s,
            "Live libvirt path: a running TCG domain (`type='qemu'`, 1 vCPU, 384 MiB) booting the \
             e2e test guest (Debian kernel, busybox + qemu-ga initramfs; up in {} from `virsh start` \
             to a responding agent), with a copy of the same mixed qcow2 as `vda` (the guest \
             mounts its ext4). The incrementals run after the guest rewrote {} of `vda` \
             (random 64 KiB pieces spread over the disk, `dd` through guest-exec, {}). Each tool \
             runs on its own fresh domain and disk copy (its own checkpoint chain); the NBD \
             ceiling is measured on each domain before its backups.",
            minmax(&f.boot_secs),
            size_h(self.size / 100),
            minmax(&f.dirty_write_secs),
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| live domain | best s | MB/s virtual | MB/s allocated | ratio | target | | peak RSS MiB | output |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let nbd = self.get("live.nbdcopy");
        if let Some(b) = nbd {
            let _ = writeln!(
                s,
                "| ceiling: NBD read of libvirt's pull-mode export (`virsh backup-begin`, unix socket), `nbdcopy` → null: | {:.2} | {:.0} | {:.0} | | | | {} | |",
                b.secs,
                mb(v, b.secs),
                mb(a, b.secs),
                mib(b.rss_kib)
            );
        }
        let mut max_rss = offline_max_rss;
        let full = self.get("live.lb.full");
        if let Some(b) = full {
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
            let ratio = match (nbd, self.cpu) {
                (Some(n), Some(c)) => {
                    let nbd_rate = mb(a, n.secs);
                    format!(
                        "{:.2}× min(live NBD {nbd_rate:.0}, CPU {:.0})",
                        mb(a, b.secs) / nbd_rate.min(c.seal_n),
                        c.seal_n
                    )
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "| `lifeboat backup` full | {:.2} | {:.0} | {:.0} | {ratio} | | | {} | {} |",
                b.secs,
                mb(v, b.secs),
                mb(a, b.secs),
                mib(b.rss_kib),
                size_h(b.repo_bytes)
            );
        }
        let incr = self.get("live.lb.incr");
        if let Some(b) = incr {
            max_rss = max_rss.max(b.rss_kib.unwrap_or(0));
            let _ = writeln!(
                s,
                "| `lifeboat backup` incremental, {} dirty (read {}: the allocated data of the {} holding a dirty block; disk transfer {} of the command's time) | {:.2} | {:.0} | {:.0} | {:.0} % of full time | ∝ dirty | | {} | {} |",
                size_h(f.dirty),
                size_h(f.incr_read),
                match &self.frame_label {
                    Some(fr) => format!("{fr} frames"),
                    None => format!("{} chunks", self.chunk_label),
                },
                minmax(&f.incr_disk_secs),
                b.secs,
                mb(v, b.secs),
                mb(f.dirty, b.secs),
                b.secs / full.map_or(f64::NAN, |x| x.secs) * 100.0,
                mib(b.rss_kib),
                size_h(b.repo_bytes)
            );
        }
        if !f.freeze_ms.is_empty() {
            let all: Vec<String> = f
                .freeze_ms
                .iter()
                .map(|(k, ms)| match ms {
                    Some(ms) => format!("{k} {ms:.0} ms"),
                    None => format!("{k}: no freeze"),
                })
                .collect();
            let worst = f
                .freeze_ms
                .iter()
                .map(|(_, ms)| ms.unwrap_or(f64::INFINITY))
                .fold(0.0, f64::max);
            let mut q = f.quiesce.clone();
            q.sort();
            q.dedup();
            let _ = writeln!(
                s,
                "| freeze window (freeze → job started → thawed, as `lifeboat backup --json` reports it; {}) | {} | | | {} | < 1 s | {} | | |",
                q.join("; "),
                if worst.is_finite() {
                    format!("{:.3}", worst / 1000.0)
                } else {
                    "n/a".into()
                },
                all.join(", "),
                verdict(worst < 1000.0)
            );
        }
        for (kind, lbk) in [("full", full), ("incr", incr)] {
            if let Some(p) = self.get(&format!("live.vnb.{kind}")) {
                let (ratio, ok) = match lbk {
                    Some(l) => {
                        let r = p.secs / l.secs;
                        (speedup(r), verdict(r >= 3.0))
                    }
                    None => (String::new(), ""),
                };
                let bytes = if kind == "full" { a } else { f.dirty };
                let _ = writeln!(
                    s,
                    "| virtnbdbackup {} (raw stream, no compression or encryption){} | {:.2} | {:.0} | {:.0} | {ratio} | ≥ 3× | {ok} | {} | {} |",
                    if kind == "full" { "full" } else { "incremental" },
                    if kind == "full" { String::new() } else { format!(", {} rewritten", size_h(self.size / 100)) },
                    p.secs,
                    mb(v, p.secs),
                    mb(bytes, p.secs),
                    mib(p.rss_kib),
                    size_h(p.repo_bytes)
                );
            }
        }
        if let Some(b) = self.get("live.ir.running") {
            let _ = writeln!(
                s,
                "| `lifeboat instant-restore` of the incremental snapshot: command start → new domain running (polled every 50 ms; the command's own `running_after_seconds`: {}) | {:.2} | | | | | | | |",
                minmax(&f.ir_reported_running),
                b.secs
            );
        }
        if let Some(b) = self.get("live.ir.agent") {
            let _ = writeln!(
                s,
                "| instant-restore: command start → the restored guest's agent answers (guest boot included) | {:.2} | | | | | | | |",
                b.secs
            );
        }
        if let Some(b) = self.get("live.ir.moved") {
            let _ = writeln!(
                s,
                "| instant-restore: command start → all data moved into local qcow2 (command exits; its peak RSS is mostly its chunk cache, `--cache-chunks`, default 64 chunks for the whole VM) | {:.2} | {:.0} | {:.0} | | | | {} | |",
                b.secs,
                mb(v, b.secs),
                mb(a, b.secs),
                mib(b.rss_kib)
            );
        }
        let _ = writeln!(
            s,
            "| peak RSS of every single Lifeboat run, live backups included (instant-restore: see its row) | | | | | ≤ 256 MiB | {} | {:.0} | |",
            verdict(max_rss <= 256 * 1024),
            max_rss as f64 / 1024.0
        );
        let _ = writeln!(s);
        self.render_live_device(s, f);
        if let Some((secs, steps)) = &f.incr_steps {
            let listed: f64 = steps.iter().map(|(_, ms)| ms).sum();
            let parts: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms:.0}")).collect();
            let _ = writeln!(
                s,
                "Where the fastest live incremental's {:.0} ms went (ms, its `steps_ms`): {}; \
                 the other {:.0} ms are process start, opening the repository and exit.",
                secs * 1000.0,
                parts.join(", "),
                (secs * 1000.0 - listed).max(0.0)
            );
            let _ = writeln!(s);
        }
    }

    /// What the work directory's device did during the fastest live full backup and the
    /// fastest `nbdcopy` of the live export.
    fn render_live_device(&self, s: &mut String, f: &LiveFacts) {
        let fastest = |v: &[(f64, crate::diskstats::DeviceUse)]| {
            v.iter().min_by(|x, y| x.0.total_cmp(&y.0)).map(|&(_, u)| u)
        };
        let Some(full) = fastest(&f.full_device) else {
            return;
        };
        let ceiling = fastest(&f.ceiling_device)
            .map(|c| {
                format!(
                    "; during the fastest `nbdcopy` of the live export: {} read, {} written, busy {:.0} % of its {:.2} s",
                    size_h(c.read),
                    size_h(c.written),
                    c.busy * 100.0,
                    c.secs
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "The repository's block device ({}; `/proc/diskstats` every 50 ms) during the fastest live full backup: {} read, {} written, {} flushes in {:.2} s; busy {:.0} % of the time, {:.2} s of it in 50 ms intervals at ≥ 90 % busy{ceiling}.",
            f.device.as_deref().unwrap_or("?"),
            size_h(full.read),
            size_h(full.written),
            full.flushes,
            full.secs,
            full.busy * 100.0,
            full.saturated_secs,
        );
        let _ = writeln!(s);
    }
}
