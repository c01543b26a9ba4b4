//! The thaw guard: a process outside the agent that thaws the guest if the agent dies (even by
//! `kill -9`) while the guest is frozen, or when the freeze lasts longer than a hard limit.
//!
//! The agent starts `lifeboat __thaw-guard --connect URI --domain NAME --timeout S` in its own
//! process group (so a terminal's Ctrl-C does not reach it) with a pipe on its stdin, early in a
//! backup run ([`EarlyGuard`]: the guard's start and libvirt connection overlap the agent's own
//! libvirt lookups). The guard connects to libvirt, prints `ready`, then waits, *unarmed*:
//! - the line `armed` (sent by the agent right before it freezes) → armed: the freeze limit
//!   starts now;
//! - the line `released` → exit 0, nothing done (armed or not);
//! - EOF on stdin without `released` (the agent died: the kernel closed the pipe) → thaw if
//!   armed; unarmed, exit without touching the guest (the agent never froze it, and a thaw could
//!   end somebody else's freeze);
//! - armed, no word for `timeout` seconds (the freeze exceeded the hard limit) → thaw.
//!
//! After a thaw of its own the guard prints `thawed: <why>`; [`ThawGuard::release`] returns that
//! line so the run can report that the freeze limit fired.
//!
//! A thaw of a guest that is not frozen is harmless.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::Hypervisor;

/// Default hard limit on a freeze.
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(60);

/// How long the agent waits for the guard to report `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running guard process (agent side).
pub struct ThawGuard {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The guard's stdout lines after `ready`.
    lines: mpsc::Receiver<String>,
}

impl ThawGuard {
    /// Start the guard for `domain` and wait until it is connected to libvirt (unarmed: see
    /// [`ThawGuard::arm`]).
    pub fn spawn(uri: &str, domain: &str, limit: Duration) -> Result<ThawGuard> {
        let exe = std::env::current_exe().ctx(ErrorKind::Other, || {
            "cannot find the lifeboat binary".into()
        })?;
        let mut child = Command::new(exe)
            .args([
                "__thaw-guard",
                "--connect",
                uri,
                "--domain",
                domain,
                "--timeout",
            ])
            .arg(limit.as_secs().max(1).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .ctx(ErrorKind::Other, || "cannot start the thaw guard".into())?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Some(out) = stdout else {
                return;
            };
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else {
                    return;
                };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let ready = rx.recv_timeout(READY_TIMEOUT);
        let mut guard = ThawGuard {
            child,
            stdin,
            lines: rx,
        };
        match ready {
            Ok(l) if l.trim() == "ready" => Ok(guard),
            other => {
                guard.kill();
                Err(Error::new(
                    ErrorKind::Source,
                    format!("the thaw guard did not become ready ({other:?}); not freezing"),
                ))
            }
        }
    }

    /// The guard's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest is about to be frozen: from now on the guard thaws it if the agent dies, and
    /// when the freeze lasts longer than the limit.
    pub fn arm(&mut self) -> Result<()> {
        let alive = matches!(self.child.try_wait(), Ok(None));
        let sent = self
            .stdin
            .as_mut()
            .is_some_and(|s| s.write_all(b"armed\n").and_then(|()| s.flush()).is_ok());
        if alive && sent {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Source,
                "the thaw guard is gone before the freeze; not freezing",
            ))
        }
    }

    /// The guest is thawed: tell the guard to exit without acting. Returns the guard's report
    /// (`thawed: <why>`) when it had already thawed the guest on its own (freeze limit).
    pub fn release(mut self) -> Option<String> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"released\n");
            let _ = s.flush();
        }
        self.reap();
        // The guard has exited (or is about to): its stdout ends, and with it the channel.
        loop {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(l) if l.starts_with("thawed") => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn reap(&mut self) {
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        // Not released: closing the pipe makes the guard thaw, then exit.
        if self.stdin.take().is_some() {
            self.reap();
        }
    }
}

/// A guard being started in the background, early in a run, so that its start overlaps the
/// run's libvirt lookups; [`EarlyGuard::take`] waits for it. Dropped unused (the run did not
/// freeze), its guard exits without acting.
pub struct EarlyGuard(Option<std::thread::JoinHandle<Result<ThawGuard>>>);

impl EarlyGuard {
    /// Starts the guard for `domain` on a background thread.
    pub fn start(uri: &str, domain: &str, limit: Duration) -> EarlyGuard {
        let (uri, domain) = (uri.to_string(), domain.to_string());
        let h = std::thread::Builder::new()
            .name("lifeboat-guard-start".into())
            .spawn(move || ThawGuard::spawn(&uri, &domain, limit));
        EarlyGuard(h.ok())
    }

    /// A placeholder that starts nothing (no freeze is planned).
    pub fn none() -> EarlyGuard {
        EarlyGuard(None)
    }

    /// The started guard (blocks until it is ready), or why it did not start; `None` when
    /// nothing was started or it was already taken.
    pub fn take(&mut self) -> Option<Result<ThawGuard>> {
        let h = self.0.take()?;
        Some(h.join().unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Other,
                "the thread starting the thaw guard panicked",
            ))
        }))
    }
}

impl Drop for EarlyGuard {
    fn drop(&mut self) {
        // Unarmed: closing its pipe (dropping it) makes the guard exit without acting.
        drop(self.take());
    }
}

/// The guard process itself (`lifeboat __thaw-guard`). Blocks.
pub fn run(uri: &str, domain: &str, limit: Duration) -> Result<()> {
    let hv = Hypervisor::connect(uri).ctx(ErrorKind::Source, || "thaw guard: connect".into())?;
    let dom = hv
        .domain(domain)
        .ctx(ErrorKind::Source, || "thaw guard: look up domain".into())?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    // Unarmed: the agent has not frozen anything yet.
    loop {
        match rx.recv() {
            Ok(Some(l)) if l.trim() == "armed" => break,
            Ok(Some(l)) if l.trim() == "released" => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return Ok(()),
        }
    }
    let deadline = std::time::Instant::now() + limit;
    let why = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(l)) if l.trim() == "released" => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                break "the agent went away without releasing the freeze".to_string()
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break format!(
                    "the freeze exceeded its hard limit of {} s (--freeze-limit)",
                    limit.as_secs()
                )
            }
        }
    };
    eprintln!("lifeboat thaw guard: {why}: thawing domain {domain}");
    let mut last = None;
    for _ in 0..10 {
        match dom.fs_thaw(&[]) {
            Ok(n) => {
                eprintln!("lifeboat thaw guard: thawed {n} filesystem(s) of {domain}");
                println!("thawed: {why}");
                let _ = std::io::stdout().flush();
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(Error::with_source(
        ErrorKind::Source,
        format!("thaw guard: could not thaw domain {domain}"),
        last.map_or_else(
            || {
                Box::new(Error::new(ErrorKind::Other, "unknown"))
                    as Box<dyn std::error::Error + Send + Sync>
            },
            |e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
        ),
    ))
}
