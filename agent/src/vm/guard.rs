//! The thaw guard: a process outside the agent that thaws the guest if the agent dies (even by
//! `kill -9`) while the guest is frozen, or when the freeze lasts longer than a hard limit.
//!
//! Before freezing, the agent starts `lifeboat __thaw-guard --connect URI --domain NAME
//! --timeout S` in its own process group (so a terminal's Ctrl-C does not reach it) with a pipe
//! on its stdin. The guard connects to libvirt, prints `ready`, then waits:
//! - the line `released` (sent by the agent after its own thaw) → exit 0, nothing done;
//! - EOF on stdin without `released` (the agent died: the kernel closed the pipe) → thaw;
//! - no word for `timeout` seconds (freeze exceeded the hard limit) → thaw.
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
    /// Start the guard for `domain` and wait until it is connected to libvirt.
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
    let why = loop {
        match rx.recv_timeout(limit) {
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
