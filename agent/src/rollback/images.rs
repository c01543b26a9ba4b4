//! `qemu-img` for rollback points and the snapshot audit: one call with a timeout, and the
//! persistent bitmaps of an image.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, ErrorKind, Result};

/// Timeout of one qemu-img call.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `qemu-img args...` with a timeout; returns stdout.
pub fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<String> {
    let mut child = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(ErrorKind::Other, || {
            "cannot run qemu-img (not installed? run scripts/install-deps.sh)".into()
        })?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > QEMU_IMG_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::new(
                    ErrorKind::Other,
                    format!("qemu-img did not finish within {QEMU_IMG_TIMEOUT:?}"),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Error::with_source(ErrorKind::Other, "wait for qemu-img", e)),
        }
    }
    let out = child
        .wait_with_output()
        .ctx(ErrorKind::Other, || "read qemu-img output".into())?;
    if !out.status.success() {
        let what: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        return Err(Error::new(
            ErrorKind::Other,
            format!(
                "qemu-img {} failed ({}): {}",
                what.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the persistent bitmaps in a qcow2 image (`qemu-img info -U`).
pub fn bitmaps(image: &Path, format: &str) -> Result<Vec<String>> {
    Ok(bitmap_list(image, format)?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
}

/// Persistent bitmaps of a qcow2 image with their granularity.
pub fn bitmap_list(image: &Path, format: &str) -> Result<Vec<(String, u64)>> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        image.as_os_str(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).ctx(ErrorKind::Other, || {
        "qemu-img info printed invalid JSON".into()
    })?;
    Ok(v.pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    let n = b.get("name").and_then(|n| n.as_str())?;
                    let g = b
                        .get("granularity")
                        .and_then(|g| g.as_u64())
                        .unwrap_or(65536);
                    Some((n.to_owned(), g))
                })
                .collect()
        })
        .unwrap_or_default())
}
