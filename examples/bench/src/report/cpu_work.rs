//! The CPU-work table of the report (CPU seconds against the ceilings' for the same bytes) and
//! the full-backup bound that follows from it.

use std::fmt::Write as _;

use super::*;

impl Report {
    /// The CPU-work table and the full-backup bound, or nothing with `--only-live`.
    pub(super) fn render_cpu_work(&self, s: &mut String) {
        // CPU work: less sensitive to the load of a shared machine than wall time.
        // (Not with `--only-live`: the offline runs it compares did not happen.)
        if let (Some(c), true) = (self.cpu, self.get("lb.full").is_some()) {
            let _ = writeln!(
                s,
                "| CPU work (user + system s, children such as qemu-nbd included) | Lifeboat | ceiling's work | efficiency |"
            );
            let _ = writeln!(s, "| --- | --- | --- | --- |");
            let cpu = |k: &str| self.get(k).and_then(|b| b.cpu_secs);
            let amb = self.allocated as f64 / 1e6;
            let mut rows: Vec<(String, Option<f64>, Option<f64>)> = vec![(
                "full backup vs nbdcopy + hash/compress/encrypt of the allocated bytes".into(),
                cpu("lb.full"),
                self.full_backup_ceiling_work(c),
            )];
            for fmt in ["qcow2", "raw"] {
                rows.push((
                    format!("restore → {fmt} vs qemu-img convert + decrypt/decompress/hash"),
                    cpu(&format!("lb.restore.{fmt}")),
                    cpu(&format!("ceil.convert.{fmt}")).map(|n| n + amb * c.open_cpu_per_mb),
                ));
            }
            rows.push((
                "verify --read-data vs decrypt/decompress/hash of the bytes checked".into(),
                cpu("lb.verify"),
                Some(self.verify_bytes as f64 / 1e6 * c.open_cpu_per_mb),
            ));
            for (name, lb, ceil) in rows {
                match (lb, ceil) {
                    (Some(l), Some(c)) => {
                        let _ =
                            writeln!(s, "| {name} | {l:.2} | {c:.2} | {:.2}× |", c / l.max(1e-9));
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            "| {name} | not measured: no CPU time (needs /usr/bin/time) | | |"
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                "\nEfficiency = the ceiling's CPU seconds for the same bytes / Lifeboat's (1.0 = no \
                 CPU spent beyond the unavoidable work). CPU times have 10 ms resolution.\n"
            );
            if let Some(line) = self.full_backup_bound(c) {
                let _ = writeln!(s, "{line}\n");
            }
        }
    }

    /// What the full-backup target allows on this machine: the two ceilings are each measured
    /// alone, but a backup does both works (NBD transfer and hash + compress + encrypt) on the
    /// same cores, so even with no CPU spent beyond them it cannot take less than their CPU
    /// seconds divided by the cores.
    fn full_backup_bound(&self, c: Ceilings) -> Option<String> {
        let nbd = self.get("ceil.nbdcopy")?;
        let work = self.full_backup_ceiling_work(c)?;
        let cores = self.threads.max(1) as f64;
        let fastest = work / cores;
        let ceil = mb(self.allocated, nbd.secs).min(c.seal_n);
        let bound = mb(self.allocated, fastest) / ceil;
        Some(format!(
            "Full-backup bound on this machine: the ceilings' own CPU work for these bytes \
             ({work:.2} CPU-s: nbdcopy + hash/compress/encrypt) on {cores:.0} cores takes at \
             least {fastest:.2} s, i.e. at most {bound:.2}× min(NBD, CPU) with nothing spent \
             beyond it{}.",
            if bound < 0.8 {
                " — the ≥ 0.8× target is out of reach here by the ceilings' own work"
            } else {
                ""
            }
        ))
    }

    /// The ceilings' CPU seconds for a full backup's bytes: nbdcopy's (qemu-nbd and its
    /// client) plus hash + compress + encrypt of the allocated bytes.
    fn full_backup_ceiling_work(&self, c: Ceilings) -> Option<f64> {
        let nbd = self.get("ceil.nbdcopy")?.cpu_secs?;
        Some(nbd + self.allocated as f64 / 1e6 * c.seal_cpu_per_mb)
    }
}
