//! The live backup job, in one place:
//!
//! prepare (caller) → pre-freeze hook → arm thaw guard → freeze → begin job (+ new checkpoint)
//! → thaw → release guard → post-thaw hook → transfer → job still alive? → commit → end job →
//! prune old checkpoints → cleanup.
//!
//! The hypervisor is reached through [`VmHost`] (implemented over libvirt in
//! [`super::host::LibvirtHost`], and by a fault-injecting fake in the tests below); the data path
//! through [`Transfer`]. Guarantees, tested with failures injected at every step:
//! - a freeze attempt is always followed by a thaw (also when the freeze itself failed: it may
//!   have frozen some filesystems), and the thaw guard is released only after that thaw;
//! - a started job is always ended (aborted) — after the commit on success, at once on failure;
//! - nothing is committed after a failed step; the checkpoint a failed run created is deleted;
//! - the post-thaw hook runs whenever the pre-freeze hook ran.
//!
//! Cleanup is owned by [`Cleanup`], whose `Drop` does the (blocking) undo: on an error it is
//! dropped on a blocking thread; when the command's future is dropped (SIGINT/SIGTERM) it runs
//! where the future is dropped. Host calls on the normal path run via `spawn_blocking`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use repo_format::SnapshotId;

use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::BackupSpec;

/// Quiescing policy (`--quiesce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiescePolicy {
    /// Freeze when the guest agent responds; otherwise warn and go on crash-consistent.
    Auto,
    /// Fail before starting the job unless the guest can be frozen.
    Required,
    /// Never freeze.
    Off,
}

/// What the hypervisor must do for a live backup. Every method blocks.
pub trait VmHost: Send + Sync + 'static {
    /// Run a command in the guest (pre-freeze / post-thaw hooks) through `sh -c`; error unless
    /// it exits 0.
    fn guest_exec(&self, cmd: &str) -> Result<()>;
    /// Start the out-of-process thaw guard (see `vm::guard`) before freezing.
    fn arm_guard(&self) -> Result<()>;
    /// Tell the guard the guest is thawed; it exits without doing anything. Returns the guard's
    /// report when it had already thawed the guest on its own (the freeze limit fired).
    fn release_guard(&self) -> Option<String>;
    /// Freeze guest filesystems (all when `mountpoints` is empty); returns how many.
    fn freeze(&self, mountpoints: &[String]) -> Result<u32>;
    /// Thaw all guest filesystems.
    fn thaw(&self) -> Result<u32>;
    /// `guest-fsfreeze-status` ("frozen" / "thawed").
    fn freeze_status(&self) -> Result<String>;
    /// Start the pull-mode backup job (creating `spec.new_checkpoint` atomically).
    fn begin_backup(&self, spec: &BackupSpec) -> Result<()>;
    /// Check, after the transfer and before the commit, that the job this run began is still
    /// active and libvirt still answers: an error when the connection to libvirtd was lost (e.g.
    /// libvirtd restarted) or the job ended. Nothing is committed after such an error.
    fn job_alive(&self) -> Result<()>;
    /// End (abort) the backup job: NBD server stopped, scratch files removed.
    fn end_job(&self) -> Result<()>;
    /// The full XML of a checkpoint.
    fn checkpoint_xml(&self, name: &str) -> Result<String>;
    /// Delete a checkpoint and its bitmaps.
    fn delete_checkpoint(&self, name: &str) -> Result<()>;
}

/// The data path: read the exports, then commit the snapshot.
#[allow(async_fn_in_trait)]
pub trait Transfer {
    /// Read every disk into the repository (indexes stored, no snapshot yet).
    async fn transfer(&mut self) -> Result<()>;
    /// Commit the snapshot with the job's facts; after this the new checkpoint is a valid base.
    async fn commit(&mut self, facts: &JobFacts) -> Result<SnapshotId>;
}

/// How to run the job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Quiescing policy.
    pub quiesce: QuiescePolicy,
    /// Mount points to freeze (all when empty).
    pub mountpoints: Vec<String>,
    /// In-guest command before the freeze.
    pub pre_freeze: Option<String>,
    /// In-guest command after the thaw.
    pub post_thaw: Option<String>,
    /// Checkpoints to delete after the commit (our older ones).
    pub prune: Vec<String>,
    /// Test hook: sleep this long between job start and thaw (guest frozen).
    pub pause_while_frozen: Option<Duration>,
    /// Test hook (`LIFEBOAT_TEST_PAUSE_AFTER_BEGIN`): sleep this long after the thaw, before
    /// the transfer.
    pub pause_after_begin: Option<Duration>,
    /// Host-side step run inside the frozen window, right before the backup job begins (e.g.
    /// `lifeboat protect`'s rollback point, a snapshot that must match the backup). It also
    /// runs when the guest could not be frozen. A failure fails the job before it begins.
    pub during_freeze: Option<FreezeHook>,
}

/// A blocking host-side step for [`JobOptions::during_freeze`].
#[derive(Clone)]
pub struct FreezeHook(pub Arc<dyn Fn() -> Result<()> + Send + Sync>);

impl std::fmt::Debug for FreezeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FreezeHook")
    }
}

/// Facts about the job, stored with the snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFacts {
    /// `"application-consistent"` or `"crash-consistent: <why>"`.
    pub quiesce: String,
    /// Freeze start → job started → thaw done; `None` when not frozen.
    pub freeze_window: Option<Duration>,
    /// `guest-fsfreeze-status` right after the job started (while frozen).
    pub freeze_status_at_begin: Option<String>,
    /// The new checkpoint's name and XML (read back from libvirt after creation).
    pub checkpoint: Option<(String, String)>,
    /// Warnings worth printing.
    pub warnings: Vec<String>,
}

/// What a successful job produced.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The committed snapshot.
    pub snapshot: SnapshotId,
    /// Facts stored with it.
    pub facts: JobFacts,
    /// How long each step took, in order (for the report: where the backup window went).
    pub steps: StepTimes,
}

/// Wall-clock time of each step of a run, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct StepTimes(pub Vec<(&'static str, Duration)>);

impl StepTimes {
    /// Records that `step` ran from `since` until now, and returns now (the next step's start).
    pub fn mark(&mut self, step: &'static str, since: Instant) -> Instant {
        let now = Instant::now();
        self.0.push((step, now.saturating_duration_since(since)));
        now
    }
}

/// Undo state: whatever is set here is undone by `Drop`.
pub struct Cleanup<H: VmHost> {
    host: Arc<H>,
    post_thaw: Option<String>,
    guard_armed: bool,
    frozen: bool,
    job_active: bool,
    new_checkpoint: Option<String>,
    committed: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl<H: VmHost> Cleanup<H> {
    fn new(host: Arc<H>) -> Self {
        Cleanup {
            host,
            post_thaw: None,
            guard_armed: false,
            frozen: false,
            job_active: false,
            new_checkpoint: None,
            committed: false,
            log: Arc::default(),
        }
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        if let Ok(mut l) = self.log.lock() {
            l.push(msg);
        }
    }

    /// Thaw (if frozen), then release the guard (if armed).
    fn thaw_now(&mut self) -> Option<Error> {
        let mut err = None;
        if self.frozen {
            match self.host.thaw() {
                Ok(_) => self.frozen = false,
                Err(e) => {
                    // Leave the guard armed: it thaws when we go away or at its deadline.
                    self.warn(format!("thaw failed: {e}"));
                    err = Some(e);
                }
            }
        }
        if self.guard_armed && !self.frozen {
            if let Some(r) = self.host.release_guard() {
                self.warn(guard_fired(&r));
            }
            self.guard_armed = false;
        }
        err
    }

    fn run_post_thaw(&mut self) -> Option<Error> {
        let cmd = self.post_thaw.take()?;
        self.host.guest_exec(&cmd).err().inspect(|e| {
            self.warn(format!("post-thaw command failed: {e}"));
        })
    }
}

impl<H: VmHost> Drop for Cleanup<H> {
    fn drop(&mut self) {
        let _ = self.thaw_now();
        if self.guard_armed {
            // Thaw failed: the guard keeps trying until its deadline, or when our pipe closes.
            self.guard_armed = false;
        }
        let _ = self.run_post_thaw();
        if self.job_active {
            match self.host.end_job() {
                Ok(()) => self.job_active = false,
                Err(e) => self.warn(format!("could not end the backup job: {e}")),
            }
        }
        if !self.committed {
            if let Some(cp) = self.new_checkpoint.take() {
                if let Err(e) = self.host.delete_checkpoint(&cp) {
                    self.warn(format!(
                        "could not delete checkpoint {cp} of the failed run: {e}"
                    ));
                }
            }
        }
    }
}

async fn call<H: VmHost, T: Send + 'static>(
    host: &Arc<H>,
    f: impl FnOnce(&H) -> Result<T> + Send + 'static,
) -> Result<T> {
    let h = host.clone();
    tokio::task::spawn_blocking(move || f(&h))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "a libvirt worker thread failed", e))?
}

/// Run the live backup job. `spec.new_checkpoint` is the checkpoint to create.
pub async fn run<H: VmHost, T: Transfer>(
    host: Arc<H>,
    opts: &JobOptions,
    spec: BackupSpec,
    transfer: &mut T,
) -> Result<JobReport> {
    let mut g = Cleanup::new(host.clone());
    let result = steps(&mut g, opts, spec, transfer).await;
    if result.is_err() {
        // Undo now, off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(g)).await;
    } else {
        drop(g);
    }
    result
}

async fn steps<H: VmHost, T: Transfer>(
    g: &mut Cleanup<H>,
    opts: &JobOptions,
    spec: BackupSpec,
    transfer: &mut T,
) -> Result<JobReport> {
    let host = g.host.clone();
    let mut facts = JobFacts::default();
    let mut times = StepTimes::default();
    let mut t = Instant::now();

    // Quiesce: is there an agent to freeze with, and are the guest's filesystems thawed? Its
    // freeze status answers both (the agent serves `guest-fsfreeze-status` even while frozen).
    // Filesystems somebody else froze (an admin's `virsh domfsfreeze`, another tool's snapshot)
    // are left as found: the agent would refuse our freeze, and the thaw that follows a failed
    // freeze would end the other party's freeze under them.
    let mut quiesce = match opts.quiesce {
        QuiescePolicy::Off => Err("--quiesce off".to_string()),
        _ => match call(&host, |h| h.freeze_status()).await {
            Ok(s) if s == "thawed" => Ok(()),
            Ok(s) => {
                let why = format!(
                    "the guest's filesystems were already frozen (status '{s}') by someone \
                     else; Lifeboat leaves them as found (neither freezes nor thaws them)"
                );
                if opts.quiesce == QuiescePolicy::Required {
                    return Err(Error::new(
                        ErrorKind::Source,
                        format!("--quiesce required: {why}; no job was started"),
                    ));
                }
                g.warn(format!("{why}: the backup is crash-consistent"));
                Err(why)
            }
            Err(e) if opts.quiesce == QuiescePolicy::Required => {
                return Err(Error::with_source(
                    ErrorKind::Source,
                    "--quiesce required: the guest agent does not respond; no job was started",
                    e,
                ));
            }
            Err(e) => {
                g.warn(format!(
                    "guest agent not responding ({e}): the backup will be crash-consistent"
                ));
                Err(format!("guest agent not responding: {e}"))
            }
        },
    };
    if opts.quiesce != QuiescePolicy::Off {
        t = times.mark("guest agent freeze status", t);
    }

    if quiesce.is_ok() {
        if let Some(cmd) = opts.pre_freeze.clone() {
            // From here on the post-thaw command runs whatever happens.
            g.post_thaw = opts.post_thaw.clone();
            call(&host, move |h| h.guest_exec(&cmd))
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Source, "the pre-freeze command failed", e)
                })?;
            t = times.mark("pre-freeze command", t);
        } else {
            g.post_thaw = opts.post_thaw.clone();
        }
        call(&host, |h| h.arm_guard()).await?;
        g.guard_armed = true;
        t = times.mark("thaw guard started", t);
    }

    let freeze_start = Instant::now();
    if quiesce.is_ok() {
        // A failed or timed-out freeze may have frozen some filesystems: thaw regardless.
        g.frozen = true;
        let mp = opts.mountpoints.clone();
        if let Err(e) = call(&host, move |h| h.freeze(&mp)).await {
            if let Some(te) = call_thaw(g).await {
                return Err(Error::with_source(
                    ErrorKind::Source,
                    "freeze failed and the thaw after it failed too",
                    te,
                ));
            }
            if opts.quiesce == QuiescePolicy::Required {
                return Err(Error::with_source(
                    ErrorKind::Source,
                    "--quiesce required: freezing the guest filesystems failed",
                    e,
                ));
            }
            g.warn(format!(
                "freezing failed ({e}): the backup will be crash-consistent"
            ));
            quiesce = Err(format!("freeze failed: {e}"));
        }
        t = times.mark("freeze", t);
    }

    if let Some(hook) = opts.during_freeze.clone() {
        tokio::task::spawn_blocking(move || (hook.0)())
            .await
            .map_err(|e| {
                Error::with_source(ErrorKind::Other, "a libvirt worker thread failed", e)
            })??;
    }
    let new_cp = spec.new_checkpoint.as_ref().map(|c| c.name.clone());
    call(&host, move |h| h.begin_backup(&spec)).await?;
    g.job_active = true;
    g.new_checkpoint = new_cp.clone();
    t = times.mark("backup job start (with checkpoint)", t);

    if g.frozen {
        facts.freeze_status_at_begin = call(&host, |h| h.freeze_status()).await.ok();
        t = times.mark("freeze status", t);
        if facts.freeze_status_at_begin.as_deref() == Some("thawed") && quiesce.is_ok() {
            // Thawed before the job's point in time (the freeze limit fired during the freeze
            // or the job start): the data is not known to be quiesced.
            let why = "the guest was no longer frozen when the backup job began (freeze limit \
                       reached?)";
            if opts.quiesce == QuiescePolicy::Required {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!("--quiesce required: {why}; nothing was committed"),
                ));
            }
            g.warn(format!("{why}: the backup is crash-consistent"));
            quiesce = Err(why.to_string());
        }
        if let Some(d) = opts.pause_while_frozen {
            tokio::time::sleep(d).await;
        }
        if let Some(e) = call_thaw(g).await {
            return Err(Error::with_source(
                ErrorKind::Source,
                "thawing the guest failed (the thaw guard will retry)",
                e,
            ));
        }
        facts.freeze_window = Some(freeze_start.elapsed());
        t = times.mark("thaw", t);
    }
    if g.post_thaw.is_some() {
        if let Some(e) = call_post_thaw(g).await {
            facts
                .warnings
                .push(format!("post-thaw command failed: {e}"));
        }
        t = times.mark("post-thaw command", t);
    }
    facts.quiesce = match &quiesce {
        Ok(()) => "application-consistent".to_string(),
        Err(why) => format!("crash-consistent: {why}"),
    };

    if let Some(cp) = &new_cp {
        let name = cp.clone();
        let xml = call(&host, move |h| h.checkpoint_xml(&name)).await?;
        facts.checkpoint = Some((cp.clone(), xml));
        t = times.mark("checkpoint XML", t);
    }

    if let Some(d) = opts.pause_after_begin {
        tracing::warn!("test hook: pausing {d:?} before the transfer");
        tokio::time::sleep(d).await;
        t = Instant::now();
    }
    transfer.transfer().await?;
    t = times.mark("transfer", t);
    call(&host, |h| h.job_alive()).await?;
    t = times.mark("job still alive", t);
    if let Ok(l) = g.log.lock() {
        facts.warnings.extend(l.iter().cloned());
    }
    let snapshot = transfer.commit(&facts).await?;
    g.committed = true;
    t = times.mark("commit", t);

    // Commit, then end the job at once.
    match call(&host, |h| h.end_job()).await {
        Ok(()) => g.job_active = false,
        Err(e) => facts
            .warnings
            .push(format!("could not end the backup job: {e}")),
    }
    t = times.mark("end job", t);
    for cp in opts.prune.iter().filter(|c| Some(*c) != new_cp.as_ref()) {
        let name = cp.clone();
        if let Err(e) = call(&host, move |h| h.delete_checkpoint(&name)).await {
            facts
                .warnings
                .push(format!("could not delete old checkpoint {cp}: {e}"));
        }
    }
    if !opts.prune.is_empty() {
        times.mark("prune old checkpoints", t);
    }
    Ok(JobReport {
        snapshot,
        facts,
        steps: times,
    })
}

async fn call_thaw<H: VmHost>(g: &mut Cleanup<H>) -> Option<Error> {
    if g.frozen {
        match call(&g.host, |h| h.thaw()).await {
            Ok(_) => g.frozen = false,
            // Leave the guard armed: it thaws when we go away or at its deadline.
            Err(e) => return Some(e),
        }
    }
    if g.guard_armed {
        if let Ok(Some(r)) = call(&g.host, |h| Ok(h.release_guard())).await {
            g.warn(guard_fired(&r));
        }
        g.guard_armed = false;
    }
    None
}

/// The warning when the thaw guard thawed the guest on its own (`report`: its `thawed: …` line).
fn guard_fired(report: &str) -> String {
    format!(
        "the freeze limit fired: the thaw guard thawed the guest before the agent did: {}",
        report.trim_start_matches("thawed:").trim()
    )
}

async fn call_post_thaw<H: VmHost>(g: &mut Cleanup<H>) -> Option<Error> {
    let cmd = g.post_thaw.take()?;
    call(&g.host, move |h| h.guest_exec(&cmd)).await.err()
}

#[cfg(test)]
mod tests;
