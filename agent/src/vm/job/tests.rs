//! Tests of the backup job sequence against a recording fake host.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::libvirt::{BackupDisk, CheckpointSpec};

/// A fake hypervisor that records calls and fails the step named in `fail`.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    fail: Option<&'static str>,
    no_agent: bool,
    /// Somebody else froze the guest before the run (its first status query says "frozen").
    frozen_before: bool,
    /// `guest-fsfreeze-status` after the job began (default "frozen").
    status: Option<&'static str>,
    /// What the guard reports on release (it thawed on its own).
    guard_report: Option<&'static str>,
}

impl Fake {
    fn step(&self, name: &str) -> Result<()> {
        self.calls.lock().unwrap().push(name.to_string());
        if self.fail == Some(name) {
            Err(Error::new(ErrorKind::Source, format!("injected: {name}")))
        } else {
            Ok(())
        }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl VmHost for Fake {
    fn guest_exec(&self, cmd: &str) -> Result<()> {
        self.step(cmd)
    }
    fn arm_guard(&self) -> Result<()> {
        self.step("arm")
    }
    fn release_guard(&self) -> Option<String> {
        let _ = self.step("release");
        self.guard_report.map(String::from)
    }
    fn freeze(&self, _: &[String]) -> Result<u32> {
        self.step("freeze").map(|_| 1)
    }
    fn thaw(&self) -> Result<u32> {
        self.step("thaw").map(|_| 1)
    }
    /// Before any freeze the query is the run's first agent call ("probe": is there an agent,
    /// is the guest thawed?); after it, the check that the freeze held ("status").
    fn freeze_status(&self) -> Result<String> {
        if pos(&self.calls(), "freeze").is_none() {
            if self.no_agent {
                self.calls.lock().unwrap().push("probe".into());
                return Err(Error::new(ErrorKind::Source, "no agent"));
            }
            let before = if self.frozen_before {
                "frozen"
            } else {
                "thawed"
            };
            return self.step("probe").map(|_| before.into());
        }
        self.step("status")
            .map(|_| self.status.unwrap_or("frozen").into())
    }
    fn begin_backup(&self, _: &BackupSpec) -> Result<()> {
        self.step("begin")
    }
    fn job_alive(&self) -> Result<()> {
        self.step("alive")
    }
    fn end_job(&self) -> Result<()> {
        self.step("end")
    }
    fn checkpoint_xml(&self, _: &str) -> Result<String> {
        self.step("cpxml").map(|_| "<domaincheckpoint/>".into())
    }
    fn delete_checkpoint(&self, name: &str) -> Result<()> {
        self.step(&format!("delete {name}"))
    }
}

#[derive(Default)]
struct FakeTransfer {
    fail: Option<&'static str>,
    committed: bool,
}

impl Transfer for FakeTransfer {
    async fn transfer(&mut self) -> Result<()> {
        if self.fail == Some("transfer") {
            return Err(Error::new(ErrorKind::Source, "injected: transfer"));
        }
        Ok(())
    }
    async fn commit(&mut self, facts: &JobFacts) -> Result<SnapshotId> {
        assert!(facts.checkpoint.is_some());
        if self.fail == Some("commit") {
            return Err(Error::new(ErrorKind::Other, "injected: commit"));
        }
        self.committed = true;
        Ok(SnapshotId::from_bytes([7; 32]))
    }
}

fn spec() -> BackupSpec {
    BackupSpec {
        socket: "/run/lifeboat/x/nbd.sock".into(),
        disks: vec![BackupDisk {
            target: "vda".into(),
            scratch: "/var/lib/lifeboat/scratch/x/vda".into(),
            full: false,
        }],
        incremental_from: None,
        new_checkpoint: Some(CheckpointSpec {
            name: "lifeboat-new".into(),
            description: None,
            disks: vec!["vda".into()],
        }),
    }
}

fn opts(q: QuiescePolicy) -> JobOptions {
    JobOptions {
        quiesce: q,
        mountpoints: vec![],
        pre_freeze: Some("pre".into()),
        post_thaw: Some("post".into()),
        prune: vec!["lifeboat-old".into()],
        pause_while_frozen: None,
        pause_after_begin: None,
        during_freeze: None,
    }
}

async fn go(
    fake: Fake,
    tfail: Option<&'static str>,
    q: QuiescePolicy,
) -> (bool, Vec<String>, bool) {
    let host = Arc::new(fake);
    let mut t = FakeTransfer {
        fail: tfail,
        committed: false,
    };
    let r = run(host.clone(), &opts(q), spec(), &mut t).await;
    (r.is_ok(), host.calls(), t.committed)
}

fn pos(calls: &[String], s: &str) -> Option<usize> {
    calls.iter().position(|c| c == s)
}

#[tokio::test(flavor = "multi_thread")]
async fn success_order() {
    let (ok, calls, committed) = go(Fake::default(), None, QuiescePolicy::Auto).await;
    assert!(ok && committed);
    assert_eq!(
        calls,
        [
            "probe",
            "pre",
            "arm",
            "freeze",
            "begin",
            "status",
            "thaw",
            "release",
            "post",
            "cpxml",
            "alive",
            "end",
            "delete lifeboat-old"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_agent_auto_goes_crash_consistent_required_fails_early() {
    let f = Fake {
        no_agent: true,
        ..Fake::default()
    };
    let (ok, calls, _) = go(f, None, QuiescePolicy::Auto).await;
    assert!(ok);
    assert!(pos(&calls, "freeze").is_none() && pos(&calls, "begin").is_some());
    let f = Fake {
        no_agent: true,
        ..Fake::default()
    };
    let (ok, calls, _) = go(f, None, QuiescePolicy::Required).await;
    assert!(!ok);
    assert_eq!(calls, ["probe"]);
}

/// Frozen by somebody else before the run: never frozen, thawed, guarded or hooked by it;
/// `auto` backs up crash-consistent saying why, `required` fails before any job.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_freeze_is_left_alone() {
    let f = || Fake {
        frozen_before: true,
        ..Fake::default()
    };
    let host = Arc::new(f());
    let mut t = FakeTransfer::default();
    let r = run(host.clone(), &opts(QuiescePolicy::Auto), spec(), &mut t)
        .await
        .unwrap();
    assert!(t.committed);
    let calls = host.calls();
    for never in ["pre", "arm", "freeze", "status", "thaw", "release", "post"] {
        assert!(pos(&calls, never).is_none(), "{never}: {calls:?}");
    }
    assert!(pos(&calls, "begin").is_some() && pos(&calls, "end").is_some());
    assert!(
        r.facts.quiesce.starts_with("crash-consistent: ")
            && r.facts.quiesce.contains("already frozen"),
        "{}",
        r.facts.quiesce
    );
    assert!(r.facts.freeze_window.is_none());
    assert!(r
        .facts
        .warnings
        .iter()
        .any(|w| w.contains("already frozen")));
    let (ok, calls, committed) = go(f(), None, QuiescePolicy::Required).await;
    assert!(!ok && !committed);
    assert_eq!(calls, ["probe"]);
}

/// Inject a failure at every step: thaw follows freeze, the guard is released after the
/// thaw, post-thaw runs once pre-freeze ran, a started job is ended, nothing committed,
/// the failed run's checkpoint deleted.
#[tokio::test(flavor = "multi_thread")]
async fn failure_at_every_step_cleans_up() {
    let host_steps = [
        "probe", "pre", "arm", "freeze", "begin", "status", "thaw", "post", "cpxml", "alive",
    ];
    let mut cases: Vec<(Option<&'static str>, Option<&'static str>)> =
        host_steps.iter().map(|s| (Some(*s), None)).collect();
    cases.push((None, Some("transfer")));
    cases.push((None, Some("commit")));
    for q in [QuiescePolicy::Auto, QuiescePolicy::Required] {
        for (hfail, tfail) in &cases {
            let f = Fake {
                fail: *hfail,
                ..Fake::default()
            };
            let (ok, calls, committed) = go(f, *tfail, q).await;
            let what = format!("{q:?} {hfail:?} {tfail:?}: {calls:?}");
            if let Some(fz) = pos(&calls, "freeze") {
                let th = calls.iter().rposition(|c| c == "thaw");
                assert!(th.is_some_and(|t| t > fz), "no thaw after freeze: {what}");
                if *hfail != Some("thaw") {
                    let rel = pos(&calls, "release");
                    assert!(rel.is_some_and(|r| r > th.unwrap()), "{what}");
                }
            }
            if pos(&calls, "pre").is_some() {
                assert!(pos(&calls, "post").is_some(), "post-thaw missing: {what}");
            }
            if let Some(b) = pos(&calls, "begin") {
                if *hfail != Some("begin") {
                    let e = pos(&calls, "end");
                    assert!(e.is_some_and(|e| e > b), "job not ended: {what}");
                }
            }
            let soft = matches!(*hfail, Some("status") | Some("post"))
                || (q == QuiescePolicy::Auto && matches!(*hfail, Some("probe") | Some("freeze")));
            if soft {
                assert!(ok && committed, "{what}");
            } else {
                assert!(!ok && !committed, "{what}");
                if pos(&calls, "begin").is_some() && *hfail != Some("begin") {
                    assert!(pos(&calls, "delete lifeboat-new").is_some(), "{what}");
                }
                assert!(pos(&calls, "delete lifeboat-old").is_none(), "{what}");
            }
        }
    }
}

/// The guard thawed on its own after the job began: still application-consistent, with a
/// warning naming the freeze limit.
#[tokio::test(flavor = "multi_thread")]
async fn guard_thaw_after_begin_is_reported() {
    let host = Arc::new(Fake {
        guard_report: Some("thawed: the freeze exceeded its hard limit of 3 s"),
        ..Fake::default()
    });
    let mut t = FakeTransfer::default();
    let r = run(host, &opts(QuiescePolicy::Auto), spec(), &mut t)
        .await
        .unwrap();
    assert_eq!(r.facts.quiesce, "application-consistent");
    assert!(
        r.facts
            .warnings
            .iter()
            .any(|w| w.contains("freeze limit fired") && w.contains("hard limit of 3 s")),
        "{:?}",
        r.facts.warnings
    );
}

/// Thawed before the job began (status "thawed" right after it): crash-consistent with a
/// reason under `auto`; a failure, nothing committed, under `required`.
#[tokio::test(flavor = "multi_thread")]
async fn thawed_at_begin_is_not_application_consistent() {
    let f = || Fake {
        status: Some("thawed"),
        ..Fake::default()
    };
    let host = Arc::new(f());
    let mut t = FakeTransfer::default();
    let r = run(host, &opts(QuiescePolicy::Auto), spec(), &mut t)
        .await
        .unwrap();
    assert!(
        r.facts
            .quiesce
            .starts_with("crash-consistent: the guest was no longer frozen"),
        "{}",
        r.facts.quiesce
    );
    let (ok, calls, committed) = go(f(), None, QuiescePolicy::Required).await;
    assert!(!ok && !committed, "{calls:?}");
    assert!(pos(&calls, "end").is_some() && pos(&calls, "delete lifeboat-new").is_some());
    assert!(pos(&calls, "thaw").is_some() && pos(&calls, "post").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn cancellation_runs_cleanup() {
    let host = Arc::new(Fake::default());
    let mut o = opts(QuiescePolicy::Auto);
    o.pause_after_begin = Some(Duration::from_secs(30));
    let mut t = FakeTransfer::default();
    let h2 = host.clone();
    let fut = run(h2, &o, spec(), &mut t);
    let r = tokio::time::timeout(Duration::from_millis(500), fut).await;
    assert!(r.is_err());
    let calls = host.calls();
    assert!(pos(&calls, "end").is_some(), "{calls:?}");
    assert!(pos(&calls, "delete lifeboat-new").is_some(), "{calls:?}");
    assert!(pos(&calls, "thaw").is_some_and(|t| t > pos(&calls, "freeze").unwrap()));
}
