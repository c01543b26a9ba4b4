//! [`VmHost`] over libvirt: the guest agent through `virDomainQemuAgentCommand` (typed commands
//! and timeouts from `guest-quiesce`), the job through [`Dom`], the thaw guard as a process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_quiesce::{Agent, FreezeStatus, Transport};

use super::guard::{EarlyGuard, ThawGuard};
use super::job::VmHost;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::{self, BackupSpec, Dom};

/// QGA transport over libvirt's agent channel.
pub struct LibvirtTransport<'a>(pub &'a Dom);

impl Transport for LibvirtTransport<'_> {
    fn execute(&self, request_json: &str, timeout: Duration) -> guest_quiesce::Result<String> {
        let secs = u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX);
        self.0.agent_command(request_json, secs).map_err(|e| {
            let kind = match e.kind() {
                libvirt::ErrorKind::NoAgent => guest_quiesce::ErrorKind::NotResponding,
                _ => guest_quiesce::ErrorKind::Io,
            };
            guest_quiesce::Error::with_source(kind, "libvirt agent command", e)
        })
    }
}

/// Slow (TCG) guests: scale the default QGA timeouts.
const AGENT_TIMEOUT_SCALE: f64 = 2.0;

/// How long the clean-up after a lost connection waits for libvirtd to come back (a restart
/// takes a few seconds).
const RECONNECT_WAIT: Duration = Duration::from_secs(20);

/// The real host.
pub struct LibvirtHost {
    dom: Mutex<Dom>,
    uri: String,
    name: String,
    freeze_limit: Duration,
    /// A guard started early (see [`EarlyGuard`]), armed at [`VmHost::arm_guard`].
    early_guard: Mutex<EarlyGuard>,
    guard: Mutex<Option<ThawGuard>>,
    gave_up: AtomicBool,
}

impl LibvirtHost {
    /// A host for `dom` reached at `uri` (the guard connects on its own). `early_guard`: the
    /// thaw guard already being started for this domain, if any (else it starts when armed).
    pub fn new(dom: Dom, uri: &str, freeze_limit: Duration, early_guard: EarlyGuard) -> Self {
        LibvirtHost {
            name: dom.name().to_string(),
            dom: Mutex::new(dom),
            uri: uri.to_string(),
            freeze_limit,
            early_guard: Mutex::new(early_guard),
            guard: Mutex::new(None),
            gave_up: AtomicBool::new(false),
        }
    }

    fn with_dom<T>(&self, f: impl FnOnce(&Dom) -> Result<T>) -> Result<T> {
        let d = self
            .dom
            .lock()
            .map_err(|_| Error::new(ErrorKind::Other, "libvirt handle lock poisoned"))?;
        f(&d)
    }

    /// Runs `f` on the domain; when it fails because the connection to libvirtd is gone (e.g.
    /// libvirtd restarted), connects again once and retries. For idempotent clean-up calls only.
    fn with_dom_reconnecting<T>(&self, f: impl Fn(&Dom) -> Result<T>) -> Result<T> {
        let mut d = self
            .dom
            .lock()
            .map_err(|_| Error::new(ErrorKind::Other, "libvirt handle lock poisoned"))?;
        match f(&d) {
            Err(e) if connection_lost(&e) => {
                tracing::warn!("lost the connection to libvirtd ({e}); connecting again");
                *d = self.reconnect()?;
                f(&d)
            }
            r => r,
        }
    }

    /// A fresh handle on a new connection. libvirtd may be restarting: waits up to
    /// [`RECONNECT_WAIT`] for it, once per run (after one failure, later calls try only once).
    fn reconnect(&self) -> Result<Dom> {
        let wait = if self.gave_up.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            RECONNECT_WAIT
        };
        let start = Instant::now();
        loop {
            match libvirt::Hypervisor::connect(&self.uri).and_then(|hv| hv.domain(&self.name)) {
                Ok(d) => return Ok(d),
                Err(e) if e.kind() == libvirt::ErrorKind::Connect && start.elapsed() < wait => {
                    tracing::debug!("libvirtd not back yet: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    self.gave_up.store(true, Ordering::Relaxed);
                    return Err(Error::with_source(
                        ErrorKind::Source,
                        format!(
                            "lost the connection to libvirtd and cannot connect again at {}",
                            self.uri
                        ),
                        e,
                    ));
                }
            }
        }
    }

    fn agent_call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Agent<LibvirtTransport<'_>>) -> guest_quiesce::Result<T>,
    ) -> Result<T> {
        self.with_dom(|d| {
            let agent = Agent::new(LibvirtTransport(d)).with_timeout_scale(AGENT_TIMEOUT_SCALE);
            f(&agent).ctx(ErrorKind::Source, || {
                format!("{what} (domain {})", self.name)
            })
        })
    }
}

impl VmHost for LibvirtHost {
    fn guest_exec(&self, cmd: &str) -> Result<()> {
        let r = self.agent_call("guest command", |a| {
            a.exec("/bin/sh", &["-c", cmd], Duration::from_secs(300))
        })?;
        if r.success() {
            Ok(())
        } else {
            let how = match (r.exit_code, r.signal) {
                (_, Some(sig)) => format!("killed by signal {sig}"),
                (Some(code), None) => format!("exit status {code}"),
                (None, None) => "no exit status".to_string(),
            };
            Err(Error::new(
                ErrorKind::Source,
                format!(
                    "guest command {cmd:?} failed ({how}): {}",
                    String::from_utf8_lossy(&r.stderr).trim()
                ),
            ))
        }
    }

    fn arm_guard(&self) -> Result<()> {
        let early = self.early_guard.lock().ok().and_then(|mut e| e.take());
        let mut g = match early {
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "the early thaw guard did not start; starting another");
                ThawGuard::spawn(&self.uri, &self.name, self.freeze_limit)?
            }
            None => ThawGuard::spawn(&self.uri, &self.name, self.freeze_limit)?,
        };
        g.arm()?;
        tracing::debug!(pid = g.pid(), "thaw guard armed");
        if let Ok(mut slot) = self.guard.lock() {
            *slot = Some(g);
        }
        Ok(())
    }

    fn release_guard(&self) -> Option<String> {
        self.guard
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .and_then(|g| g.release())
    }

    fn freeze(&self, mountpoints: &[String]) -> Result<u32> {
        let mp = (!mountpoints.is_empty()).then_some(mountpoints);
        self.agent_call("freeze guest filesystems", |a| a.freeze(mp))
    }

    fn thaw(&self) -> Result<u32> {
        self.agent_call("thaw guest filesystems", |a| a.thaw())
    }

    fn freeze_status(&self) -> Result<String> {
        self.agent_call("guest-fsfreeze-status", |a| a.freeze_status())
            .map(|s: FreezeStatus| s.as_str().to_string())
    }

    fn begin_backup(&self, spec: &BackupSpec) -> Result<()> {
        self.with_dom(|d| {
            d.backup_begin(spec)
                .ctx(ErrorKind::Source, || "cannot start the backup job".into())
        })
    }

    fn job_alive(&self) -> Result<()> {
        self.with_dom(|d| match d.active_job() {
            Ok(Some(libvirt::JobKind::Backup)) => Ok(()),
            Ok(_) => Err(Error::new(
                ErrorKind::Source,
                format!(
                    "the backup job of domain {} ended before the transfer was done (domain \
                     stopped or job aborted); nothing was committed",
                    self.name
                ),
            )),
            Err(e) if e.kind() == libvirt::ErrorKind::Connect => Err(Error::with_source(
                ErrorKind::Source,
                format!(
                    "lost the connection to libvirtd during the backup of domain {} (libvirtd \
                     restarted or stopped?): the job's state cannot be confirmed, nothing was \
                     committed",
                    self.name
                ),
                e,
            )),
            Err(e) => Err(Error::with_source(
                ErrorKind::Source,
                "cannot confirm that the backup job is still active; nothing was committed",
                e,
            )),
        })
    }

    fn end_job(&self) -> Result<()> {
        self.with_dom_reconnecting(|d| match d.abort_job() {
            Ok(()) => Ok(()),
            // Already gone (domain stopped): nothing to end.
            Err(e)
                if matches!(
                    e.kind(),
                    libvirt::ErrorKind::NoJob | libvirt::ErrorKind::NotRunning
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::with_source(
                ErrorKind::Source,
                "cannot end the backup job",
                e,
            )),
        })
    }

    fn checkpoint_xml(&self, name: &str) -> Result<String> {
        self.with_dom(|d| {
            d.checkpoint_xml(name).ctx(ErrorKind::Source, || {
                format!("cannot read checkpoint {name}")
            })
        })
    }

    fn delete_checkpoint(&self, name: &str) -> Result<()> {
        self.with_dom_reconnecting(|d| super::checkpoints::delete(d, name))
    }
}

/// Does `e` (from this crate's error chain) come from a lost libvirt connection?
fn connection_lost(e: &Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if x.downcast_ref::<libvirt::LibvirtError>()
            .is_some_and(|l| l.kind() == libvirt::ErrorKind::Connect)
        {
            return true;
        }
        cur = x.source();
    }
    false
}
