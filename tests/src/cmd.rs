//! Running external tools with a timeout.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Directory of the project's scripts (`scripts/` at the workspace root).
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts"))
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr; kills it after `timeout`.
/// A missing program is an error naming `scripts/install-deps.sh`.
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{desc}: program not found; run scripts/install-deps.sh (as root) to install the test dependencies"
        ),
        Err(e) => return Err(e).with_context(|| format!("spawning {desc}")),
    };
    let mut out = child.stdout.take().context("stdout pipe")?;
    let mut err = child.stderr.take().context("stderr pipe")?;
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for {desc}"))?
        {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc}: timed out after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run_output`] but fails (with stderr in the message) unless the exit status is 0;
/// returns stdout as text.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = describe(cmd);
    let out = run_output(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {}", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.len() > 80 {
            s.push_str(&format!(" {}…", a.chars().take(80).collect::<String>()));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// `virsh -c URI ARGS…` with a 60 s timeout; returns stdout.
pub fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    virsh_timeout(uri, args, Duration::from_secs(60))
}

/// `virsh -c URI ARGS…` with `timeout`; returns stdout.
pub fn virsh_timeout(uri: &str, args: &[&str], timeout: Duration) -> Result<String> {
    run(Command::new("virsh").arg("-c").arg(uri).args(args), timeout)
}

/// Polls `f` every `poll` until it returns `Ok(Some(v))` (→ `Ok(v)`) or `timeout` passes
/// (→ error). An `Err` from `f` aborts the wait.
pub fn wait_until<T>(
    timeout: Duration,
    poll: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        thread::sleep(poll);
    }
}
