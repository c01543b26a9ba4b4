//! The peers' table of the report (restic, borg: the same bytes piped from nbdcopy).

use std::fmt::Write as _;

use super::*;

impl Report {
    /// The peers' table, or nothing when no peer ran.
    pub(super) fn render_peers(&self, s: &mut String) {
        let mut peers = String::new();
        let borg_label = format!("borg `create` from stdin, zstd {}", self.zstd_level);
        for (peer, label) in [
            ("restic", "restic 0.x `backup --stdin`"),
            ("borg", borg_label.as_str()),
        ] {
            for (kind, lb) in [("full", "lb.full"), ("incr", "lb.incr")] {
                if let (Some(p), Some(l)) = (self.get(&format!("{peer}.{kind}")), self.get(lb)) {
                    let r = p.secs / l.secs;
                    let target = if peer == "restic" { Some(2.0) } else { None };
                    let _ = writeln!(
                        peers,
                        "| {label}, {kind} | {:.2} | {:.0} | {} | {} | {} | {} | {} |",
                        p.secs,
                        mb(self.size, p.secs),
                        speedup(r),
                        target.map_or(String::new(), |t| format!("≥ {t}×")),
                        target.map_or("", |t| verdict(r >= t)),
                        mib(p.rss_kib),
                        size_h(p.repo_bytes)
                    );
                }
            }
        }
        if !peers.is_empty() {
            let _ = writeln!(s, "| peer (same bytes, piped from `nbdcopy … -`) | best s | MB/s virtual | vs Lifeboat | target | | peak RSS MiB | repo |");
            let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
            s.push_str(&peers);
            let _ = writeln!(s);
        }
    }
}
