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
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let mut guard = ThawGuard { child, stdin };
        match rx.recv_timeout(READY_TIMEOUT) {
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

    /// The guest is thawed: tell the guard to exit without acting.
    pub fn release(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"released\n");
            let _ = s.flush();
        }
        self.reap();
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
                break "the agent went away without releasing the freeze"
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break "the freeze exceeded its hard limit",
        }
    };
    eprintln!("lifeboat thaw guard: {why}: thawing domain {domain}");
    let mut last = None;
    for _ in 0..10 {
        match dom.fs_thaw(&[]) {
            Ok(n) => {
                eprintln!("lifeboat thaw guard: thawed {n} filesystem(s) of {domain}");
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
