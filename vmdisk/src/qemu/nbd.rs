//! [`QemuNbd`]: a `qemu-nbd` process serving an image on a private unix socket.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::NbdAddr;

use super::{os, run, spawn_error, tail, STDERR_TAIL};

/// How to run [`QemuNbd`].
#[derive(Debug, Clone)]
pub struct QemuNbdOptions {
    /// Image to serve.
    pub image: PathBuf,
    /// Image format (always passed: no probing).
    pub format: String,
    /// Serve read-only (`--read-only`).
    pub read_only: bool,
    /// Persistent bitmap to expose as `qemu:dirty-bitmap:NAME` (`--bitmap`).
    pub bitmap: Option<String>,
    /// Directory for the private unix socket.
    pub socket_dir: PathBuf,
    /// Simultaneous connections allowed (`--shared`, default 8).
    pub shared: u32,
    /// Keep serving after the last client disconnects (`--persistent`, default false:
    /// qemu-nbd then exits once its last client leaves).
    pub persistent: bool,
    /// `--cache=` mode (e.g. `none`, `writeback`), qemu's default if `None`.
    pub cache: Option<String>,
    /// `--discard=` mode (`ignore`, `unmap`).
    pub discard: Option<String>,
    /// `--detect-zeroes=` mode (`off`, `on`, `unmap`).
    pub detect_zeroes: Option<String>,
    /// How long to wait for the socket to appear.
    pub startup_timeout: Duration,
    /// How long [`QemuNbd::stop`] waits after SIGTERM before killing.
    pub stop_timeout: Duration,
}

impl Default for QemuNbdOptions {
    /// No image (set `image` and `format`), read-only, no bitmap, socket in the system
    /// temporary directory, 8 connections, not persistent, qemu's cache/discard/zero
    /// defaults, 10 s startup and 5 s stop timeouts.
    fn default() -> Self {
        QemuNbdOptions {
            image: PathBuf::new(),
            format: "raw".to_owned(),
            read_only: true,
            bitmap: None,
            socket_dir: std::env::temp_dir(),
            shared: 8,
            persistent: false,
            cache: None,
            discard: None,
            detect_zeroes: None,
            startup_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
        }
    }
}

impl QemuNbdOptions {
    /// Read-only export of `image` in `format`, socket in `socket_dir`, defaults elsewhere.
    pub fn new(image: impl Into<PathBuf>, format: &str, socket_dir: impl Into<PathBuf>) -> Self {
        QemuNbdOptions {
            image: image.into(),
            format: format.to_owned(),
            socket_dir: socket_dir.into(),
            ..QemuNbdOptions::default()
        }
    }
}

/// glibc malloc settings for qemu-nbd: it allocates a buffer per request, and with glibc's
/// defaults a freed 1 MiB buffer goes back to the kernel (munmap, or a heap trim), so the next
/// request page-faults fresh zeroed pages in. Serving allocations below 32 MiB from the heap and
/// keeping up to 64 MiB of free heap avoids that: reading a 512 MiB mixed disk in 1 MiB requests
/// took qemu-nbd ≈ 80 000 page faults and ≈ 340 ms CPU, ≈ 14 000 and ≈ 230 ms with these.
/// Ignored by a qemu-nbd not linked against glibc.
const QEMU_NBD_MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864";

/// A running `qemu-nbd` serving one image (export name "") on a private unix socket.
///
/// Dropping it without [`QemuNbd::stop`] kills the process (SIGKILL via
/// `kill_on_drop`) and removes the socket.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    pid_file: PathBuf,
    stderr: Arc<Mutex<String>>,
    stop_timeout: Duration,
}

static SOCKET_COUNTER: AtomicU64 = AtomicU64::new(0);

fn stderr_tail(buf: &Arc<Mutex<String>>) -> String {
    tail(&buf.lock().unwrap_or_else(|p| p.into_inner()))
}

impl QemuNbd {
    /// Starts `qemu-nbd` and waits until it listens. A failure (image locked by a running
    /// VM, bad bitmap name, ...) is an [`ErrorKind::Process`] error with qemu-nbd's stderr.
    pub async fn start(opts: QemuNbdOptions) -> Result<QemuNbd> {
        if opts.image.as_os_str().is_empty() || opts.format.is_empty() {
            return Err(Error::invalid("QemuNbdOptions needs an image and a format"));
        }
        let n = SOCKET_COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("qemu-nbd-{}-{n}", std::process::id());
        let socket = opts.socket_dir.join(format!("{base}.sock"));
        let pid_file = opts.socket_dir.join(format!("{base}.pid"));
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&pid_file);
        let mut args: Vec<OsString> = vec![
            "--socket".into(),
            socket.clone().into(),
            "--format".into(),
            opts.format.clone().into(),
            "--shared".into(),
            opts.shared.max(1).to_string().into(),
            "--pid-file".into(),
            pid_file.clone().into(),
        ];
        if opts.read_only {
            args.push("--read-only".into());
        }
        if opts.persistent {
            args.push("--persistent".into());
        }
        if let Some(b) = &opts.bitmap {
            args.push("--bitmap".into());
            args.push(b.into());
        }
        for (flag, v) in [
            ("--cache", &opts.cache),
            ("--discard", &opts.discard),
            ("--detect-zeroes", &opts.detect_zeroes),
        ] {
            if let Some(v) = v {
                args.push(format!("{flag}={v}").into());
            }
        }
        args.push(opts.image.clone().into());
        let tunables = match std::env::var("GLIBC_TUNABLES") {
            Ok(t) if !t.is_empty() => format!("{t}:{QEMU_NBD_MALLOC_TUNABLES}"),
            _ => QEMU_NBD_MALLOC_TUNABLES.to_owned(),
        };
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .env("GLIBC_TUNABLES", tunables)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error("qemu-nbd", e))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let buf = stderr.clone();
            tokio::spawn(async move {
                let mut chunk = [0u8; 1024];
                while let Ok(n) = err.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    b.push_str(&String::from_utf8_lossy(chunk.get(..n).unwrap_or_default()));
                    if b.len() > 4 * STDERR_TAIL {
                        let cut = b.len() - STDERR_TAIL;
                        let cut = (cut..b.len()).find(|i| b.is_char_boundary(*i)).unwrap_or(0);
                        b.drain(..cut);
                    }
                }
            });
        }
        let mut nbd = QemuNbd {
            child,
            socket,
            pid_file,
            stderr,
            stop_timeout: opts.stop_timeout,
        };
        // qemu-nbd writes its pid file after the socket listens, so both existing means
        // ready. Probing with a connection would make a non-persistent qemu-nbd exit.
        let deadline = Instant::now() + opts.startup_timeout;
        loop {
            if let Ok(Some(status)) = nbd.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(50)).await; // let stderr drain
                return Err(Error::new(
                    ErrorKind::Process,
                    format!(
                        "qemu-nbd for {} exited during startup ({status}): {}",
                        opts.image.display(),
                        stderr_tail(&nbd.stderr)
                    ),
                ));
            }
            if nbd.socket.exists() && nbd.pid_file.exists() {
                return Ok(nbd);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "qemu-nbd for {} did not listen within {:?}: {}",
                        opts.image.display(),
                        opts.startup_timeout,
                        stderr_tail(&nbd.stderr)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The socket address to give [`crate::Client::connect`].
    pub fn addr(&self) -> NbdAddr {
        NbdAddr::Unix(self.socket.clone())
    }

    /// The export name: qemu-nbd serves its one image as "".
    pub fn export_name(&self) -> &str {
        ""
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What qemu-nbd has printed on stderr so far (tail).
    pub fn stderr(&self) -> String {
        stderr_tail(&self.stderr)
    }

    /// Stops qemu-nbd: SIGTERM (sent by running `kill -TERM PID`, to avoid `unsafe`),
    /// waits up to the stop timeout, then SIGKILL. Removes the socket.
    pub async fn stop(mut self) -> Result<()> {
        let res = self.stop_inner().await;
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
        res
    }

    async fn stop_inner(&mut self) -> Result<()> {
        if self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            let _ = run(
                "kill",
                &os(&[&"-TERM", &pid.to_string()]),
                Duration::from_secs(5),
            )
            .await;
        }
        match tokio::time::timeout(self.stop_timeout, self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::io("waiting for qemu-nbd", e)),
            Err(_) => {
                tracing::warn!("qemu-nbd ignored SIGTERM; killing it");
                let _ = self.child.start_kill();
                match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        "qemu-nbd did not die after SIGKILL",
                    )),
                }
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
