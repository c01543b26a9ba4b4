//! `lifeboat restore SNAPSHOT --to DIR`: every disk (or `--disk`) becomes `DIR/<disk>.<format>`.
//!
//! All disks are first written to hidden temporary files in DIR; only when every disk is complete
//! and flushed are they renamed into place. Any error (corrupt chunk, full disk, Ctrl-C) removes the
//! temporary files, so a failed restore leaves nothing at the target.
//!
//! With `--define` (or `--start`) the VM is then defined on `--connect` from the domain XML stored
//! in the snapshot (see [`crate::relocate`]): the name and the rewritten XML are settled before any
//! data is written, and the domain is defined only after every disk is in place.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo_format::{DiskEntry, IndexPages, Manifest, Repository, SnapshotId};
use serde_json::json;
use vmdisk::nbd::{BlockSource, Piece, Server, ServerOptions};
use vmdisk::qcow2::{Layout, Version};
use vmdisk::qemu::{self, ConvertOptions};

use super::{emit, human_bytes, mb_per_s};
use crate::cli::{GlobalOpts, ImageFormat, RestoreArgs};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::pipeline::chunk_range;
use crate::pipeline::progress::Progress;
use crate::pipeline::restore::{restore_disk, DiskRestoreStats, Sink, StoredEntries, ZERO_BLOCK};
use crate::pipeline::serve::RepoSource;
use crate::repo::{self, blocking};

/// A file that is removed when dropped unless it was persisted (renamed into place).
pub struct PartialFile {
    path: PathBuf,
    keep: bool,
}

impl PartialFile {
    /// Track `path` as partial.
    pub fn new(path: PathBuf) -> Self {
        PartialFile { path, keep: false }
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rename to `to` and stop tracking.
    pub fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Resolve a snapshot reference, mapping "not found" to the snapshot kind.
pub async fn resolve(repo: &Arc<Repository>, reference: &str) -> Result<(SnapshotId, Manifest)> {
    let repo = repo.clone();
    let r = reference.to_string();
    blocking(move || {
        let id = repo.resolve(&r).map_err(|e| match e.kind() {
            repo_format::ErrorKind::NotFound => Error::with_source(
                ErrorKind::SnapshotNotFound,
                format!("no snapshot matches '{r}'"),
                e,
            ),
            repo_format::ErrorKind::Ambiguous => Error::with_source(
                ErrorKind::SnapshotNotFound,
                format!("snapshot reference '{r}' is ambiguous"),
                e,
            ),
            _ => repo_err(e, format!("cannot resolve snapshot reference '{r}'")),
        })?;
        let m = repo
            .load_snapshot(&id)
            .map_err(|e| repo_err(e, format!("cannot load snapshot {id}")))?;
        Ok((id, m))
    })
    .await
}

/// Restore one disk into `partial` (a path that does not exist yet) in `format`.
pub async fn restore_disk_to(
    repo: Arc<Repository>,
    disk: &DiskEntry,
    format: &str,
    partial: &Path,
    progress: &Progress,
) -> Result<DiskRestoreStats> {
    let repo2 = repo.clone();
    let (idx, size, chunk_size) = (disk.index, disk.virtual_size, disk.chunk_size);
    let name = disk.name.clone();
    let index = blocking(move || {
        repo2
            .open_index(&idx, size, chunk_size)
            .map_err(|e| repo_err(e, format!("cannot load the index of disk '{name}'")))
    })
    .await?;
    let index = Arc::new(index);
    match format {
        "raw" => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(partial)
                .ctx(ErrorKind::Target, || {
                    format!("cannot create '{}'", partial.display())
                })?;
            file.set_len(disk.virtual_size).ctx(ErrorKind::Target, || {
                format!("cannot size '{}'", partial.display())
            })?;
            restore_disk(
                repo,
                index,
                &disk.name,
                Sink::File(Arc::new(file)),
                ZERO_BLOCK,
                progress,
            )
            .await
        }
        "qcow2" => {
            let options: Vec<(String, String)> = if disk.format == "qcow2" {
                disk.create_options
                    .iter()
                    .filter(|(k, _)| matches!(k.as_str(), "cluster_size" | "compat"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            if let Some(stats) =
                restore_qcow2_native(&repo, &index, &disk.name, partial, &options, progress).await?
            {
                return Ok(stats);
            }
            qemu::create_image(partial, "qcow2", disk.virtual_size, &options)
                .await
                .ctx(ErrorKind::Target, || {
                    format!("cannot create '{}'", partial.display())
                })?;
            restore_qcow2_by_convert(repo, index, &disk.name, partial, progress).await
        }
        other => Err(Error::new(
            ErrorKind::Usage,
            format!("cannot restore into format '{other}'"),
        )),
    }
}

/// Restores `index` into `partial` (which does not exist yet) as a qcow2 image written by
/// Lifeboat itself: [`vmdisk::qcow2::Layout`] places the stored chunks' data contiguously, in
/// index order, after the metadata, which is written first; then the chunks are written like a
/// raw restore's, only at their place in the image ([`Sink::Qcow2`]). No NBD hop and no
/// `qemu-img` process: the image costs what a raw restore costs. `None` when the image's
/// parameters (`cluster_size`, `compat` in `options`; QEMU's defaults 64 KiB and 1.1 when
/// absent) are not ones the layout writes (a cluster larger than a chunk, say): the caller
/// restores it through `qemu-img convert` instead.
async fn restore_qcow2_native(
    repo: &Arc<Repository>,
    index: &Arc<IndexPages>,
    disk: &str,
    partial: &Path,
    options: &[(String, String)],
    progress: &Progress,
) -> Result<Option<DiskRestoreStats>> {
    let option = |k: &str| {
        options
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(version) = Version::from_compat(option("compat").unwrap_or("1.1")) else {
        return Ok(None);
    };
    let Some(cluster_size) = option("cluster_size").map_or(Some(65536), |v| v.parse().ok()) else {
        return Ok(None);
    };
    // Lay out and write the metadata (a cluster at a time) on the blocking pool.
    let stored = StoredEntries::load(repo.clone(), index.clone(), disk).await?;
    let (size, chunk_size) = (index.disk_size(), u64::from(index.chunk_size()));
    let (path, name) = (partial.to_path_buf(), disk.to_string());
    let created = blocking(move || {
        let units = stored.iter();
        let layout = match Layout::new(version, cluster_size, size, chunk_size, units) {
            Ok(l) => l,
            Err(e) if e.kind() == vmdisk::ErrorKind::Unsupported => {
                tracing::debug!(disk = name, reason = %e, "qcow2 restored through qemu-img convert");
                return Ok(None);
            }
            Err(e) => {
                return Err(Error::with_source(
                    ErrorKind::Corrupt,
                    format!("the index of disk '{name}' does not describe a disk"),
                    e,
                ))
            }
        };
        let write = || -> std::io::Result<File> {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            file.set_len(layout.file_len())?;
            for (off, bytes) in layout.metadata() {
                file.write_all_at(&bytes, off)?;
            }
            Ok(file)
        };
        let file = write().ctx(ErrorKind::Target, || {
            format!("cannot write the qcow2 metadata of '{}'", path.display())
        })?;
        Ok(Some((file, layout.unit_offset(0))))
    })
    .await?;
    let Some((file, data_offset)) = created else {
        return Ok(None);
    };
    let sink = Sink::Qcow2 {
        file: Arc::new(file),
        data_offset,
    };
    restore_disk(
        repo.clone(),
        index.clone(),
        disk,
        sink,
        ZERO_BLOCK,
        progress,
    )
    .await
    .map(Some)
}

/// Restores `index` into `partial`, a freshly created qcow2 image, by pulling: the snapshot is
/// served read-only by Lifeboat's own NBD server ([`RepoSource`]) on a private unix socket and
/// `qemu-img convert -n --target-is-zero -W` copies it into the image. qemu-img asks for block
/// status (chunks not stored are holes and are skipped), reads chunks with many requests in
/// flight (each loaded, authenticated, decompressed and re-hashed on the blocking pool), skips
/// blocks that hold only zeros, and writes into its own reused buffers with O_DIRECT where the
/// filesystem allows it. Against pushing writes into a `qemu-nbd` export of the image, this
/// saves qemu-nbd's per-request buffer allocation and the client's payload copy (2 GiB mixed
/// disk: see docs/BENCHMARKS.md). A chunk that fails its checks fails the read, hence
/// qemu-img, and the restore with [`ErrorKind::Corrupt`] naming it.
async fn restore_qcow2_by_convert(
    repo: Arc<Repository>,
    index: Arc<IndexPages>,
    disk: &str,
    partial: &Path,
    progress: &Progress,
) -> Result<DiskRestoreStats> {
    let start = Instant::now();
    let size = index.disk_size();
    let cs = u64::from(index.chunk_size());
    let stored = StoredEntries::load(repo.clone(), index.clone(), disk).await?;
    let bytes_stored: u64 = stored
        .iter()
        .map(|i| {
            let (s, e) = chunk_range(i, cs, size);
            e - s
        })
        .sum();
    let source = Arc::new(CountingSource {
        inner: RepoSource::new(repo, index, CONVERT_CACHE_CHUNKS),
        progress: progress.clone(),
        counted: AtomicU64::new(0),
    });
    let socket_dir = tempfile::Builder::new()
        .prefix("lifeboat-nbd-")
        .tempdir()
        .ctx(ErrorKind::Other, || {
            "cannot create a socket directory".into()
        })?;
    let socket = socket_dir.path().join("restore.sock");
    let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
    exports.insert(CONVERT_EXPORT.to_string(), source.clone());
    let server = Arc::new(Server::new(exports, ServerOptions::default()));
    let listener = Server::bind_unix(&socket)
        .map_err(|e| Error::with_source(ErrorKind::Other, "cannot start the NBD server", e))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server.serve(listener, Some(socket.clone()), stopped));

    // O_DIRECT (`-t none`) skips the page-cache copy of the whole image and makes the final
    // flush cheap; filesystems that refuse O_DIRECT get qemu-img's default cache.
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(partial)
            .is_ok()
    };
    let copy = qemu::convert_into(&ConvertOptions {
        source: format!("nbd+unix:///{CONVERT_EXPORT}?socket={}", socket.display()),
        // Never probe the format of guest data.
        source_format: "raw".into(),
        target: partial.to_path_buf(),
        target_format: "qcow2".into(),
        target_cache: direct.then(|| "none".to_string()),
        coroutines: CONVERT_COROUTINES,
        // Generous: a stalled copy is the only thing this catches (≥ 5 MB/s of stored data).
        timeout: Duration::from_secs(600 + bytes_stored / 5_000_000),
    })
    .await;
    let _ = stop.send(true);
    let _ = serving.await;
    let (failures, last) = source.inner.failures();
    if failures > 0 {
        let why = last.unwrap_or_else(|| "a chunk could not be read".into());
        return Err(match copy {
            Err(e) => Error::with_source(
                ErrorKind::Corrupt,
                format!("cannot restore disk '{disk}': {why}"),
                e,
            ),
            Ok(()) => Error::new(
                ErrorKind::Corrupt,
                format!("cannot restore disk '{disk}': {why}"),
            ),
        });
    }
    copy.ctx(ErrorKind::Target, || {
        format!("cannot copy disk '{disk}' into '{}'", partial.display())
    })?;
    let p = partial.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&p).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
        .ctx(ErrorKind::Target, || {
            "cannot flush the restored image".into()
        })?;
    progress.add(size.saturating_sub(source.counted.load(Ordering::Relaxed)));
    Ok(DiskRestoreStats {
        bytes_written: bytes_stored,
        chunks: stored.count(),
        elapsed: start.elapsed(),
    })
}

/// Export name of the snapshot disk served to `qemu-img convert`.
const CONVERT_EXPORT: &str = "disk";
/// `qemu-img convert -m`: requests in flight (each up to 2 MiB, i.e. two 1 MiB chunks).
const CONVERT_COROUTINES: u32 = 8;
/// Chunks kept by the served source (qemu-img reads each chunk once, in one request).
const CONVERT_CACHE_CHUNKS: usize = 4;

/// The served snapshot disk, counting the bytes read for the progress display.
struct CountingSource {
    inner: RepoSource,
    progress: Progress,
    counted: AtomicU64,
}

impl BlockSource for CountingSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, len: u32) -> vmdisk::Result<Vec<Piece>> {
        let pieces = self.inner.read(offset, len)?;
        self.counted.fetch_add(u64::from(len), Ordering::Relaxed);
        self.progress.add(u64::from(len));
        Ok(pieces)
    }

    fn extents(&self, offset: u64, len: u32) -> vmdisk::Result<Vec<(u32, bool)>> {
        self.inner.extents(offset, len)
    }

    fn preferred_block_size(&self) -> u32 {
        self.inner.preferred_block_size()
    }
}

/// Pick the disks to restore.
pub fn select_disks<'a>(m: &'a Manifest, wanted: &[String]) -> Result<Vec<&'a DiskEntry>> {
    if wanted.is_empty() {
        return Ok(m.disks.iter().collect());
    }
    wanted
        .iter()
        .map(|w| {
            m.disks.iter().find(|d| &d.name == w).ok_or_else(|| {
                let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
                Error::new(
                    ErrorKind::Usage,
                    format!(
                        "the snapshot has no disk '{w}' (it has: {})",
                        names.join(", ")
                    ),
                )
            })
        })
        .collect()
}

/// The format disk `d` is restored in: `--format` if given, else its original format. The NVRAM
/// entry always keeps its own (raw) format: firmware reads the variable store as a plain file.
pub fn target_format(m: &Manifest, d: &DiskEntry, wanted: Option<ImageFormat>) -> String {
    match wanted {
        Some(f) if d.name != crate::relocate::nvram_entry(m) => f.as_str().to_string(),
        _ => d.format.clone(),
    }
}

/// `lifeboat restore`
pub async fn run(global: &GlobalOpts, args: RestoreArgs) -> Result<()> {
    let repo = repo::open_async(global).await?;
    let (snap_id, manifest) = resolve(&repo, &args.snapshot).await?;
    let disks = select_disks(&manifest, &args.disks)?;
    std::fs::create_dir_all(&args.to).ctx(ErrorKind::Target, || {
        format!("cannot create directory '{}'", args.to.display())
    })?;

    // Check every target before writing anything.
    let mut plan = Vec::new();
    for d in &disks {
        if d.name.contains('/') || d.name.starts_with('.') || d.name.is_empty() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("refusing disk name '{}' as a file name", d.name),
            ));
        }
        let format = target_format(&manifest, d, args.format);
        let target = args.to.join(format!("{}.{format}", d.name));
        if target.exists() && !args.force {
            return Err(Error::new(
                ErrorKind::Target,
                format!("'{}' exists: use --force to replace it", target.display()),
            ));
        }
        let partial = args.to.join(format!(
            ".{}.{format}.lifeboat-partial-{}",
            d.name,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&partial);
        plan.push((*d, format, target, PartialFile::new(partial)));
    }

    // With --define: pick the name and rewrite the XML before any data is written.
    let define = if args.define || args.start {
        Some(prepare_define(&manifest, &args, &plan).await?)
    } else {
        None
    };

    let total: u64 = plan.iter().map(|(d, ..)| d.virtual_size).sum();
    let progress = Progress::new(!global.quiet && !global.json, total, "restore");
    let mut results = Vec::new();
    for (d, format, _, partial) in &plan {
        let stats = restore_disk_to(repo.clone(), d, format, partial.path(), &progress).await;
        match stats {
            Ok(s) => results.push(s),
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
    }
    progress.finish();

    let mut out = Vec::new();
    let mut text = format!(
        "restored snapshot {} of {} ({})",
        snap_id.to_string().get(..12).unwrap_or_default(),
        manifest.name,
        manifest.time
    );
    for ((d, format, target, partial), s) in plan.into_iter().zip(results) {
        partial.persist(&target).ctx(ErrorKind::Target, || {
            format!("cannot rename into '{}'", target.display())
        })?;
        let secs = s.elapsed.as_secs_f64();
        text.push_str(&format!(
            "\n  {} -> {} ({format}, {} virtual, {} written, {:.1} s, {:.0} MB/s)",
            d.name,
            target.display(),
            human_bytes(d.virtual_size),
            human_bytes(s.bytes_written),
            secs,
            mb_per_s(s.bytes_written, secs)
        ));
        out.push(json!({
            "disk": d.name, "path": target, "format": format,
            "virtual_size": d.virtual_size, "bytes_written": s.bytes_written,
            "chunks": s.chunks, "seconds": secs,
        }));
    }
    let mut doc = json!({ "snapshot": snap_id.to_string(), "name": manifest.name, "disks": out });
    if let Some(p) = &define {
        crate::relocate::define(p, args.start).await?;
        let verb = if args.start {
            "defined and started"
        } else {
            "defined"
        };
        text.push_str(&format!("\n  domain '{}' {verb} on {}", p.name, p.uri));
        doc["domain"] = json!({ "name": p.name, "uri": p.uri, "started": args.start,
            "dropped_disks": p.rewritten.dropped_disks });
    }
    emit(global, &doc, &text);
    Ok(())
}

/// `--define`: rewrite the stored domain XML for the planned files, and check the target host.
async fn prepare_define(
    manifest: &Manifest,
    args: &RestoreArgs,
    plan: &[(&DiskEntry, String, PathBuf, PartialFile)],
) -> Result<crate::relocate::Prepared> {
    let dir = std::fs::canonicalize(&args.to).ctx(ErrorKind::Target, || {
        format!("cannot resolve '{}'", args.to.display())
    })?;
    let mut disks = std::collections::BTreeMap::new();
    let mut nvram = None;
    for (d, format, target, _) in plan {
        let path = dir.join(target.file_name().unwrap_or_default());
        if d.name == crate::relocate::nvram_entry(manifest) {
            nvram = Some(path);
        } else {
            disks.insert(
                d.name.clone(),
                crate::libvirt::rewrite::NewDisk {
                    path,
                    format: format.clone(),
                },
            );
        }
    }
    let layout = crate::relocate::Layout { disks, nvram, dir };
    crate::relocate::prepare(
        manifest,
        &args.connect,
        args.name.as_deref(),
        args.force,
        move |_| layout,
        crate::relocate::network_policy(&args.network),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo_format::{IndexId, SnapshotKind};

    fn entry(name: &str, format: &str) -> DiskEntry {
        super::super::test_disk_entry(name, format, IndexId::from_bytes([1; 32]), 1 << 20, 1 << 20)
    }

    #[test]
    fn format_option_applies_to_disks_not_to_the_nvram() {
        let mut m = Manifest::new("web", SnapshotKind::Vm, "h", jiff::Timestamp::UNIX_EPOCH);
        m.disks = vec![entry("vda", "raw"), entry("nvram", "raw")];
        m.metadata.insert("nvram_entry".into(), "nvram".into());
        let q = Some(ImageFormat::Qcow2);
        assert_eq!(target_format(&m, &m.disks[0], q), "qcow2");
        assert_eq!(target_format(&m, &m.disks[1], q), "raw");
        assert_eq!(target_format(&m, &m.disks[0], None), "raw");
        // Without the metadata key the entry named `nvram` is the NVRAM.
        m.metadata.clear();
        assert_eq!(target_format(&m, &m.disks[1], q), "raw");
    }
}
