//! `qemu-img`: image info, creating images, persistent bitmaps, `convert`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

use super::{os, run, QEMU_IMG_TIMEOUT};

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
