//! `qemu-img` and `qemu-nbd` helpers (external processes).
//!
//! Every process runs with a timeout and `kill_on_drop(true)`; a failure is an
//! [`ErrorKind::Process`] error whose context ends with the tail of the tool's stderr.
//! A missing tool is reported the same way, naming `scripts/install-deps.sh`.
//!
//! `img.rs`: `qemu-img` (image info, create, bitmaps, convert); `nbd.rs`: a `qemu-nbd` export
//! ([`QemuNbd`]). This file holds what both run their tools with.

mod img;
mod nbd;

pub use img::{
    bitmap_add, bitmap_remove, convert_into, create_image, create_image_unchecked_backing,
    image_info, image_info_as, BitmapInfo, ConvertOptions, ImageInfo,
};
pub use nbd::{QemuNbd, QemuNbdOptions};

use std::ffi::{OsStr, OsString};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, ErrorKind, Result};

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
