//! `qemu-img` and `qemu-nbd` helpers (external processes).
//!
//! Every process runs with a timeout and `kill_on_drop(true)`; a failure is an
//! [`ErrorKind::Process`] error whose context ends with the tail of the tool's stderr.
//! A missing tool is reported the same way, naming `scripts/install-deps.sh`.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::NbdAddr;

/// Timeout of one `qemu-img` invocation.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(120);
const STDERR_TAIL: usize = 2048;

fn tail(s: &str) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(STDERR_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

fn spawn_error(tool: &str, e: std::io::Error) -> Error {
    let hint = if e.kind() == std::io::ErrorKind::NotFound {
        " (not installed? run scripts/install-deps.sh)"
    } else {
        ""
    };
    Error::with_source(ErrorKind::Process, format!("cannot run {tool}{hint}"), e)
}

/// Runs `tool args...` to completion within `timeout`; returns stdout.
async fn run(tool: &str, args: &[OsString], timeout: Duration) -> Result<Vec<u8>> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| spawn_error(tool, e))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| Error::io(format!("waiting for {tool}"), e))?,
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("{tool} did not finish within {timeout:?}"),
            ))
        }
    };
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Process,
            format!(
                "{tool} {} failed ({}): {}",
                args.first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default(),
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr))
            ),
        ));
    }
    Ok(out.stdout)
}

fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// A persistent dirty bitmap stored in a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes tracked per bit.
    pub granularity: u64,
    /// qemu's flags: `auto` (enabled), `in-use` (open by a running process or not
    /// cleanly closed), `inconsistent` (must not be trusted).
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// True if the bitmap is enabled (records writes).
    pub fn is_enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }

    /// True if qemu marked the bitmap inconsistent: its content is meaningless.
    pub fn is_inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "inconsistent")
    }
}

/// The parts of `qemu-img info --output=json` Lifeboat uses, plus the raw JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// Format name (`qcow2`, `raw`, ...).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host, if known.
    pub actual_size: Option<u64>,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// qcow2 compat level (`0.10`, `1.1`).
    pub compat: Option<String>,
    /// Backing file as recorded in the image.
    pub backing_file: Option<String>,
    /// Persistent bitmaps (qcow2).
    pub bitmaps: Vec<BitmapInfo>,
    /// The whole JSON document.
    pub raw: Value,
}

fn parse_image_info(raw: Value) -> Result<ImageInfo> {
    let bad = |what: &str| Error::protocol(format!("qemu-img info JSON lacks {what}"));
    let format = raw
        .get("format")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("format"))?
        .to_owned();
    let virtual_size = raw
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("virtual-size"))?;
    let data = raw.get("format-specific").and_then(|f| f.get("data"));
    let mut bitmaps = Vec::new();
    if let Some(list) = data
        .and_then(|d| d.get("bitmaps"))
        .and_then(Value::as_array)
    {
        for b in list {
            bitmaps.push(BitmapInfo {
                name: b
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("bitmap name"))?
                    .to_owned(),
                granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                flags: b
                    .get("flags")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    Ok(ImageInfo {
        format,
        virtual_size,
        actual_size: raw.get("actual-size").and_then(Value::as_u64),
        cluster_size: raw.get("cluster-size").and_then(Value::as_u64),
        compat: data
            .and_then(|d| d.get("compat"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        backing_file: raw
            .get("backing-filename")
            .and_then(Value::as_str)
            .map(str::to_owned),
        bitmaps,
        raw,
    })
}

/// `qemu-img info --output=json --force-share PATH`.
///
/// Caveat: without a format qemu-img *probes* it from the content, so a raw image whose
/// guest wrote a qcow2 header would be misread. Use [`image_info_as`] with the format
/// recorded in the domain XML for guest-controlled images. `--force-share` allows
/// reading an image a running VM holds locked; the answer may then be slightly stale.
pub async fn image_info(path: &Path) -> Result<ImageInfo> {
    image_info_as(path, None).await
}

/// [`image_info`] with an explicit format (`-f FORMAT`), which disables probing.
pub async fn image_info_as(path: &Path, format: Option<&str>) -> Result<ImageInfo> {
    let mut args = os(&[&"info", &"--output=json", &"--force-share"]);
    if let Some(f) = format {
        args.extend(os(&[&"-f", &f]));
    }
    args.push(path.as_os_str().to_owned());
    let out = run("qemu-img", &args, QEMU_IMG_TIMEOUT).await?;
    let raw: Value = serde_json::from_slice(&out).map_err(|e| {
        Error::with_source(ErrorKind::Protocol, "qemu-img info printed invalid JSON", e)
    })?;
    parse_image_info(raw)
}

/// `qemu-img create -f FORMAT [-o k=v,...] PATH SIZE`.
pub async fn create_image(
    path: &Path,
    format: &str,
    size: u64,
    options: &[(String, String)],
) -> Result<()> {
    create_image_impl(path, format, size, options, false).await
}

/// Like [`create_image`], but with `-u`: a `backing_file` option is written into the header
/// without opening the backing file (no connection to an NBD backing, nothing probed). The
/// caller passes the size and `backing_fmt` and vouches for the backing.
pub async fn create_image_unchecked_backing(
    path: &Path,
    format: &str,
    size: u64,
    options: &[(String, String)],
) -> Result<()> {
    create_image_impl(path, format, size, options, true).await
}

async fn create_image_impl(
    path: &Path,
    format: &str,
    size: u64,
    options: &[(String, String)],
    unchecked_backing: bool,
) -> Result<()> {
    let mut args = os(&[&"create", &"-q", &"-f", &format]);
    if unchecked_backing {
        args.push("-u".into());
    }
    if !options.is_empty() {
        if let Some((k, _)) = options.iter().find(|(k, _)| k.contains([',', '='])) {
            return Err(Error::invalid(format!("bad qemu-img option name {k:?}")));
        }
        // qemu option syntax escapes a literal comma in a value by doubling it.
        let o: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
            .collect();
        args.extend(os(&[&"-o", &o.join(",")]));
    }
    args.push(path.as_os_str().to_owned());
    args.push(size.to_string().into());
    run("qemu-img", &args, QEMU_IMG_TIMEOUT).await.map(|_| ())
}

/// `qemu-img bitmap --add --enable PATH NAME` (qcow2 only).
pub async fn bitmap_add(path: &Path, name: &str) -> Result<()> {
    let args = os(&[&"bitmap", &"--add", &"--enable", &path, &name]);
    run("qemu-img", &args, QEMU_IMG_TIMEOUT).await.map(|_| ())
}

/// `qemu-img bitmap --remove PATH NAME` (qcow2 only).
pub async fn bitmap_remove(path: &Path, name: &str) -> Result<()> {
    let args = os(&[&"bitmap", &"--remove", &path, &name]);
    run("qemu-img", &args, QEMU_IMG_TIMEOUT).await.map(|_| ())
}

/// How [`convert_into`] copies an image.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Source image: a path or a URI such as `nbd+unix:///EXPORT?socket=PATH`.
    pub source: String,
    /// Source format (always passed: no probing of guest data).
    pub source_format: String,
    /// Target image, already created (`qemu-img convert -n`) and reading as zeros.
    pub target: PathBuf,
    /// Target format.
    pub target_format: String,
    /// Target cache mode (`-t`, e.g. `none` for O_DIRECT), qemu-img's default if `None`.
    pub target_cache: Option<String>,
    /// Parallel coroutines (`-m`, 1–16).
    pub coroutines: u32,
    /// Time allowed for the whole copy.
    pub timeout: Duration,
}

/// `qemu-img convert -q -n --target-is-zero -W -m N [-t CACHE] -f SRC_FMT -O DST_FMT SRC DST`:
/// copies `source` into the freshly created `target` (whose creation options are kept), with
/// out-of-order writes, skipping what the source's block status reports as holes or zeros and
/// data blocks that hold only zeros (the target is declared zero-initialised).
pub async fn convert_into(opts: &ConvertOptions) -> Result<()> {
    let coroutines = opts.coroutines.clamp(1, 16).to_string();
    let mut args = os(&[
        &"convert",
        &"-q",
        &"-n",
        &"--target-is-zero",
        &"-W",
        &"-m",
        &coroutines,
    ]);
    if let Some(c) = &opts.target_cache {
        args.extend(os(&[&"-t", c]));
    }
    args.extend(os(&[
        &"-f",
        &opts.source_format,
        &"-O",
        &opts.target_format,
        &opts.source,
        &opts.target,
    ]));
    run("qemu-img", &args, opts.timeout).await.map(|_| ())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info() {
        let raw: Value = serde_json::json!({
            "virtual-size": 16777216, "filename": "a.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 417792,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}]}},
            "dirty-flag": false
        });
        let i = parse_image_info(raw).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 16 << 20);
        assert_eq!(i.cluster_size, Some(65536));
        assert_eq!(i.compat.as_deref(), Some("1.1"));
        assert_eq!(i.bitmaps.len(), 1);
        assert!(i.bitmaps[0].is_enabled());
        assert!(parse_image_info(serde_json::json!({"format": "raw"})).is_err());
    }
}
