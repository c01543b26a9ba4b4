//! The agent client: typed calls over a [`Transport`], each with a timeout.

use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::protocol::{
    decode_reply, encode_request, Command, FreezeStatus, GuestExec, GuestExecStatus,
    GuestExecStatusReply, GuestFsfreezeFreeze, GuestFsfreezeFreezeList, GuestFsfreezeStatus,
    GuestFsfreezeThaw, GuestInfo, GuestInfoReply, GuestPing,
};

/// Carries one QGA request to the agent and returns its reply.
///
/// Implementations: [`crate::UnixSocketTransport`] (the agent's socket, directly); the `lifeboat`
/// binary's libvirt transport (`virDomainQemuAgentCommand`, which does its own resync). A
/// transport must give up after `timeout` with [`ErrorKind::Timeout`], and report "no agent" as
/// [`ErrorKind::NotResponding`].
pub trait Transport: Send + Sync {
    /// Sends `request_json` (one JSON object, no trailing newline) and returns the reply JSON
    /// (`{"return":…}` or `{"error":…}`).
    fn execute(&self, request_json: &str, timeout: Duration) -> Result<String>;
}

impl<T: Transport + ?Sized> Transport for &T {
    fn execute(&self, request_json: &str, timeout: Duration) -> Result<String> {
        (**self).execute(request_json, timeout)
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn execute(&self, request_json: &str, timeout: Duration) -> Result<String> {
        (**self).execute(request_json, timeout)
    }
}

/// Outcome of [`Agent::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error.
    pub stderr: Vec<u8>,
    /// The agent truncated stdout or stderr.
    pub truncated: bool,
}

impl ExecResult {
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A guest agent client over transport `T`.
///
/// Every call has a timeout: the command's [`Command::TIMEOUT`] (ping 5 s, freeze 60 s, thaw
/// 30 s, exec 10 s, …) multiplied by [`Agent::with_timeout_scale`], or an explicit one with
/// [`Agent::call_timeout`].
#[derive(Debug)]
pub struct Agent<T: Transport> {
    transport: T,
    scale: f64,
}

impl<T: Transport> Agent<T> {
    /// A client with the default timeouts.
    pub fn new(transport: T) -> Self {
        Agent {
            transport,
            scale: 1.0,
        }
    }

    /// Multiplies every default timeout by `scale` (e.g. 3.0 for slow emulated guests).
    pub fn with_timeout_scale(mut self, scale: f64) -> Self {
        if scale.is_finite() && scale > 0.0 {
            self.scale = scale;
        }
        self
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Default timeout of `C`, scaled.
    pub fn timeout_for<C: Command>(&self) -> Duration {
        C::TIMEOUT.mul_f64(self.scale)
    }

    /// Sends `cmd` with its default timeout and decodes the reply.
    pub fn call<C: Command>(&self, cmd: &C) -> Result<C::Ok> {
        self.call_timeout(cmd, self.timeout_for::<C>())
    }

    /// Sends `cmd` with `timeout` and decodes the reply.
    pub fn call_timeout<C: Command>(&self, cmd: &C, timeout: Duration) -> Result<C::Ok> {
        let req = encode_request(cmd)?;
        let reply = self
            .transport
            .execute(&req, timeout)
            .map_err(|e| e.context_prefix(C::NAME))?;
        decode_reply::<C>(&reply)
    }

    /// `guest-ping`.
    pub fn ping(&self) -> Result<()> {
        self.call(&GuestPing).map(|_| ())
    }

    /// `guest-info`.
    pub fn info(&self) -> Result<GuestInfoReply> {
        self.call(&GuestInfo)
    }

    /// Freezes the guest's filesystems: all of them (`guest-fsfreeze-freeze`) or the listed
    /// mount points (`guest-fsfreeze-freeze-list`). Returns how many were frozen.
    ///
    /// On a timeout the guest may still be freezing: callers should thaw.
    pub fn freeze(&self, mountpoints: Option<&[String]>) -> Result<u32> {
        match mountpoints {
            None => self.call(&GuestFsfreezeFreeze),
            Some(m) => self.call(&GuestFsfreezeFreezeList {
                mountpoints: Some(m.to_vec()),
            }),
        }
    }

    /// `guest-fsfreeze-thaw`; returns how many filesystems were thawed.
    pub fn thaw(&self) -> Result<u32> {
        self.call(&GuestFsfreezeThaw)
    }

    /// `guest-fsfreeze-status`.
    pub fn freeze_status(&self) -> Result<FreezeStatus> {
        self.call(&GuestFsfreezeStatus)
    }

    /// Runs `path args…` in the guest with output captured and waits up to `timeout` for it to
    /// exit (polling `guest-exec-status`). On timeout the process keeps running in the guest.
    pub fn exec<S: AsRef<str>>(
        &self,
        path: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<ExecResult> {
        self.exec_request(&GuestExec::new(path, args), timeout)
    }

    /// Like [`Agent::exec`] with a full [`GuestExec`] request (environment, stdin).
    pub fn exec_request(&self, req: &GuestExec, timeout: Duration) -> Result<ExecResult> {
        let deadline = Instant::now() + timeout;
        let pid = self.call(req)?.pid;
        let mut poll = Duration::from_millis(20);
        loop {
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let per_call = self
                .timeout_for::<GuestExecStatus>()
                .min(remaining.max(poll));
            let st: GuestExecStatusReply = self.call_timeout(&GuestExecStatus { pid }, per_call)?;
            if st.exited {
                return Ok(ExecResult {
                    exit_code: st.exit_code,
                    signal: st.signal,
                    stdout: st.stdout()?,
                    stderr: st.stderr()?,
                    truncated: st.out_truncated || st.err_truncated,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "guest-exec {}: pid {pid} still running after {timeout:?}",
                        req.path
                    ),
                ));
            }
            thread::sleep(poll.min(deadline.saturating_duration_since(Instant::now())));
            poll = (poll * 2).min(Duration::from_millis(250));
        }
    }
}
