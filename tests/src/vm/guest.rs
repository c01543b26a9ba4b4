//! Driving a [`TestVm`]'s guest: start, agent, exec, files, freeze status, shutdown, state.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_quiesce::protocol::GuestExec as GuestExecRequest;

use crate::cmd::{virsh, virsh_timeout, wait_until};

use super::{tail, ExecOutput, TestVm};

impl TestVm {
    /// `virsh start`.
    pub fn start(&self) -> Result<()> {
        if let Ok(mut s) = self.started.lock() {
            *s = Some(Instant::now());
        }
        virsh(&self.uri, &["start", &self.name])?;
        Ok(())
    }

    /// Waits until `guest-ping` answers; returns the time since [`TestVm::start`] (or since
    /// this call, if not started through this object). On timeout the error holds the tail of
    /// the console log.
    pub fn wait_agent(&self, timeout: Duration) -> Result<Duration> {
        let t0 = self
            .started
            .lock()
            .ok()
            .and_then(|s| *s)
            .unwrap_or_else(Instant::now);
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last = match self
                .agent
                .call_timeout(&guest_quiesce::protocol::GuestPing, Duration::from_secs(2))
            {
                Ok(_) => return Ok(t0.elapsed()),
                Err(e) => e.to_string(),
            };
            if remaining.is_zero() {
                bail!(
                    "{}: guest agent did not answer within {timeout:?} (last error: {last}); console:\n{}",
                    self.name,
                    tail(&self.console_log(), 30)
                );
            }
            if !self.is_running()? {
                bail!(
                    "{}: domain stopped while waiting for the agent; console:\n{}",
                    self.name,
                    tail(&self.console_log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs `/bin/sh -c cmd` in the guest (guest-exec with captured output), waiting up to
    /// 120 s.
    pub fn exec(&self, cmd: &str) -> Result<ExecOutput> {
        self.exec_timeout(cmd, Duration::from_secs(120))
    }

    /// Like [`TestVm::exec`] with a timeout.
    pub fn exec_timeout(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec_request(&GuestExecRequest::new("/bin/sh", &["-c", cmd]), timeout)
            .with_context(|| format!("{}: exec {cmd:?}", self.name))
    }

    fn exec_request(&self, req: &GuestExecRequest, timeout: Duration) -> Result<ExecOutput> {
        let r = self.agent.exec_request(req, timeout)?;
        Ok(ExecOutput {
            exit: r.exit_code.or(r.signal.map(|s| 128 + s)).unwrap_or(-1),
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// Like [`TestVm::exec`] but fails unless the exit code is 0; returns stdout.
    pub fn exec_ok(&self, cmd: &str) -> Result<String> {
        let out = self.exec(cmd)?;
        if out.exit != 0 {
            bail!(
                "{}: {cmd:?} exited {}: {}{}",
                self.name,
                out.exit,
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Writes `data` to `path` in the guest (guest-exec `cat` with stdin; in 64 KiB pieces,
    /// since one virsh argument is limited to 128 KiB).
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let mut first = true;
        let mut chunks: Vec<&[u8]> = data.chunks(64 << 10).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let script = if first {
                "cat > \"$1\""
            } else {
                "cat >> \"$1\""
            };
            first = false;
            let req =
                GuestExecRequest::new("/bin/sh", &["-c", script, "sh", path]).with_input(chunk);
            let out = self
                .exec_request(&req, Duration::from_secs(120))
                .with_context(|| format!("{}: writing {path}", self.name))?;
            if out.exit != 0 {
                bail!(
                    "{}: writing {path}: exit {}: {}",
                    self.name,
                    out.exit,
                    out.stderr
                );
            }
        }
        Ok(())
    }

    /// Reads `path` in the guest (guest-exec `cat`; the agent caps output at 16 MiB).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let req = GuestExecRequest::new("/bin/cat", &[path]);
        let r = self
            .agent
            .exec_request(&req, Duration::from_secs(120))
            .with_context(|| format!("{}: reading {path}", self.name))?;
        if !r.success() || r.truncated {
            bail!(
                "{}: cat {path}: exit {:?}{}: {}",
                self.name,
                r.exit_code,
                if r.truncated { " (truncated)" } else { "" },
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(r.stdout)
    }

    /// `guest-fsfreeze-status`: `"thawed"` or `"frozen"`.
    pub fn fsfreeze_status(&self) -> Result<String> {
        Ok(self.agent.freeze_status()?.as_str().to_owned())
    }

    /// Clean shutdown through the agent (`virsh shutdown --mode agent`: the guest unmounts its
    /// data disks and powers off); waits until the domain is shut off.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        virsh(&self.uri, &["shutdown", "--mode", "agent", &self.name])?;
        wait_until(timeout, Duration::from_millis(200), || {
            Ok((!self.is_running()?).then_some(()))
        })
        .with_context(|| format!("{}: not shut off after {timeout:?}", self.name))
    }

    /// `virsh destroy` (no error when already off).
    pub fn destroy(&self) -> Result<()> {
        if self.is_running()? {
            virsh(&self.uri, &["destroy", &self.name])?;
        }
        Ok(())
    }

    /// True unless the domain is shut off.
    pub fn is_running(&self) -> Result<bool> {
        let st = virsh_timeout(
            &self.uri,
            &["domstate", &self.name],
            Duration::from_secs(30),
        )?;
        Ok(st.trim() != "shut off")
    }

    /// `virsh domstate`.
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&self.uri, &["domstate", &self.name])?
            .trim()
            .to_owned())
    }
}
