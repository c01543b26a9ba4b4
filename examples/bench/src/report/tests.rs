//! Tests of the report's rendering.

use super::*;

fn live_report(freeze: Vec<(&'static str, Option<f64>)>) -> String {
    let mut r = Report::new(1 << 30, 1, 2, 0);
    r.allocated = 1 << 29;
    r.add("live.lb.full", Best::time(4.0, Some(70 * 1024), 0));
    r.add("live.lb.incr", Best::time(1.0, Some(60 * 1024), 0));
    r.add("live.vnb.full", Best::time(8.0, Some(140 * 1024), 0));
    r.add("live.vnb.incr", Best::time(0.5, Some(50 * 1024), 0));
    r.add_live(LiveFacts {
        freeze_ms: freeze,
        quiesce: vec!["application-consistent".into()],
        ..LiveFacts::default()
    });
    let mut s = String::new();
    r.render_live(&mut s, 0);
    s
}

fn row<'a>(s: &'a str, start: &str) -> &'a str {
    s.lines().find(|l| l.starts_with(start)).unwrap_or_default()
}

/// An offline report whose ceilings' work (0.5 CPU-s of nbdcopy + 1.4 of sealing for
/// 1300 MB) takes ≥ 0.95 s on 2 cores: the bound is 1368 / min(4333, 1764) MB/s = 0.78×.
fn offline_report(nbd_cpu: Option<f64>) -> String {
    let mut r = Report::new(2 << 30, 1, 2, 0);
    r.allocated = 1_300_000_000;
    r.verify_bytes = 1_300_000_000;
    let with_cpu = |secs: f64, cpu: Option<f64>| Best {
        cpu_secs: cpu,
        ..Best::time(secs, Some(60 * 1024), 0)
    };
    r.add("ceil.nbdcopy", with_cpu(0.3, nbd_cpu));
    r.add("lb.full", with_cpu(1.2, Some(2.1)));
    r.add("lb.verify", with_cpu(0.4, Some(0.8)));
    r.add("restic.full", with_cpu(6.0, None));
    r.add_cpu(Ceilings {
        seal_n: 1764.0,
        seal_cpu_per_mb: 1.4 / 1300.0,
        open_cpu_per_mb: 0.7 / 1300.0,
        ..Ceilings::default()
    });
    r.render()
}

#[test]
fn full_backup_bound_is_the_ceilings_work_over_the_cores() {
    let s = offline_report(Some(0.5));
    let b = row(&s, "Full-backup bound on this machine");
    assert!(
        b.contains("(1.90 CPU-s") && b.contains("at least 0.95 s") && b.contains("0.78×"),
        "{b}"
    );
    assert!(b.contains("out of reach"), "{b}");
    let full = row(&s, "| full backup vs nbdcopy");
    assert!(full.contains("| 2.10 | 1.90 | 0.90× |"), "{full}");
    let restic = row(&s, "| restic 0.x `backup --stdin`, full");
    assert!(
        restic.contains("Lifeboat 5.0× faster") && restic.contains("| met |"),
        "{restic}"
    );
    // Without nbdcopy's CPU time there is no bound to state.
    assert!(!offline_report(None).contains("Full-backup bound"));
}

#[test]
fn freeze_window_verdict_takes_the_worst_backup() {
    let s = live_report(vec![("full", Some(150.0)), ("incremental", Some(999.0))]);
    let r = row(&s, "| freeze window");
    assert!(r.contains("| 0.999 |") && r.contains("| met |"), "{r}");
    let s = live_report(vec![("full", Some(150.0)), ("incremental", Some(1000.0))]);
    assert!(row(&s, "| freeze window").contains("**missed**"));
    // A backup that did not freeze cannot meet the target.
    let s = live_report(vec![("full", Some(150.0)), ("incremental", None)]);
    let r = row(&s, "| freeze window");
    assert!(
        r.contains("incremental: no freeze") && r.contains("**missed**"),
        "{r}"
    );
}

#[test]
fn virtnbdbackup_ratios_are_against_the_same_kind_of_lifeboat_run() {
    let s = live_report(vec![("full", Some(100.0))]);
    let full = row(&s, "| virtnbdbackup full");
    assert!(
        full.contains("Lifeboat 2.0× faster") && full.contains("**missed**"),
        "{full}"
    );
    let incr = row(&s, "| virtnbdbackup incremental");
    assert!(incr.contains("Lifeboat 2.0× slower"), "{incr}");
}
