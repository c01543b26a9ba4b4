//! Host-side checks of ext4 disk images (no mounting): `e2fsck -fn` and `debugfs cat`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{run, run_output};

/// Format of a disk image per `qemu-img info` (`raw`, `qcow2`, …).
pub fn image_format(image: &Path) -> Result<String> {
    let out = run(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(image),
        Duration::from_secs(30),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing qemu-img info")?;
    v["format"]
        .as_str()
        .map(str::to_owned)
        .context("qemu-img info: no format")
}

/// A raw view of `image`: the image itself when raw, else a raw copy in a temp dir (held by the
/// returned guard).
fn raw_view(image: &Path) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if !image.exists() {
        bail!("{}: no such image", image.display());
    }
    if image_format(image)? == "raw" {
        return Ok((image.to_owned(), None));
    }
    let tmp = tempfile::Builder::new()
        .prefix("lifeboat-e2e-raw")
        .tempdir_in("/var/tmp")
        .context("creating temp dir")?;
    let raw = tmp.path().join("disk.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(image)
            .arg(&raw),
        Duration::from_secs(300),
    )?;
    Ok((raw, Some(tmp)))
}

/// Runs `e2fsck -fn` on `image` (raw or qcow2; not in use by a running guest). Errors with
/// e2fsck's output when the filesystem is not clean.
pub fn check_ext4(image: &Path) -> Result<()> {
    let (raw, _tmp) = raw_view(image)?;
    let out = run_output(
        Command::new("e2fsck").arg("-fn").arg(&raw),
        Duration::from_secs(300),
    )?;
    if !out.status.success() {
        bail!(
            "e2fsck -fn {} ({}): filesystem not clean ({}):\n{}{}",
            image.display(),
            raw.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Reads `path` (absolute, inside the filesystem) from the ext4 filesystem in `image` with
/// `debugfs -R "cat PATH"`. The journal is not replayed: use on cleanly unmounted images.
pub fn read_file_from_ext4(image: &Path, path: &str) -> Result<Vec<u8>> {
    if !path.starts_with('/') || path.contains('"') || path.contains('\n') {
        bail!("read_file_from_ext4: unsupported path {path:?}");
    }
    let (raw, _tmp) = raw_view(image)?;
    // `stat` first: debugfs reports a missing file on stderr with exit status 0.
    let st = run_output(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat \"{path}\""))
            .arg(&raw),
        Duration::from_secs(60),
    )?;
    let stderr = String::from_utf8_lossy(&st.stderr);
    if !st.status.success()
        || stderr
            .lines()
            .any(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
    {
        bail!(
            "debugfs stat {path} in {}: {}",
            image.display(),
            stderr.trim()
        );
    }
    let out = run_output(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat \"{path}\""))
            .arg(&raw),
        Duration::from_secs(120),
    )?;
    if !out.status.success() {
        bail!(
            "debugfs cat {path} in {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
