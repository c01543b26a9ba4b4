//! `lifeboat backup-image FILE --name NAME`: back up a qcow2 or raw image that no VM is using.
//!
//! The image is exported read-only through `qemu-nbd` and read with our NBD client. Change
//! tracking for qcow2: each backup adds a persistent dirty bitmap `lifeboat-<repo>-<token>` to the
//! image *before* reading it and records the bitmap's name in the snapshot; the next backup exports
//! the image with that bitmap and reads only the dirty extents, then removes it once the new
//! snapshot is committed. Raw images have no bitmaps and are read in full (only allocated extents).

use std::path::Path;
use std::sync::Arc;

use repo_format::{DiskEntry, Repository, SnapshotId, SnapshotKind};
use serde_json::json;
use vmdisk::qemu::{self, ImageInfo, QemuNbd, QemuNbdOptions};

use super::{emit, mb_per_s};
use crate::backup_common::{self as common, latest_of};
use crate::cli::{BackupImageArgs, GlobalOpts};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::pipeline::backup::{Mode, ALLOCATION_CONTEXT};
use crate::repo::{self, blocking};

/// Manifest metadata key holding the domain XML; kept here for existing paths
/// (`crate::relocate` imports it from this module).
pub use crate::backup_common::DOMAIN_XML_KEY;

/// Prefix of the persistent bitmaps Lifeboat adds to qcow2 images.
pub const BITMAP_PREFIX: &str = "lifeboat-";

/// Read and sanity-check a domain XML file given with `--domain-xml`.
pub fn read_domain_xml(path: &Path) -> Result<String> {
    let xml = std::fs::read_to_string(path).ctx(ErrorKind::Usage, || {
        format!("cannot read the domain XML '{}'", path.display())
    })?;
    crate::libvirt::parse_domain_xml(&xml).map_err(|e| {
        Error::with_source(
            ErrorKind::Usage,
            format!("'{}' is not a libvirt domain XML", path.display()),
            e,
        )
    })?;
    Ok(xml)
}

/// Change-tracking decision for one disk.
#[derive(Debug, Clone)]
pub struct CbtPlan {
    /// The bitmap to read dirty extents from (incremental), if any.
    pub base_bitmap: Option<String>,
    /// Why the backup is full, when it is.
    pub full_reason: Option<String>,
}

/// The bitmap name a disk entry recorded for the next incremental backup.
pub fn recorded_bitmap(entry: &DiskEntry) -> Option<String> {
    entry
        .cbt
        .as_ref()
        .and_then(|c| c.get("bitmap"))
        .and_then(|b| b.as_str())
        .map(str::to_string)
}

/// Decide between full and incremental for a qcow2 image.
pub fn plan_cbt(
    info: &ImageInfo,
    parent: Option<&DiskEntry>,
    chunk_size: u32,
    force_full: bool,
) -> CbtPlan {
    let full = |why: &str| CbtPlan {
        base_bitmap: None,
        full_reason: Some(why.to_string()),
    };
    if force_full {
        return full("--full was given");
    }
    if info.format != "qcow2" {
        return full("raw images carry no change tracking");
    }
    let Some(parent) = parent else {
        return full("no previous snapshot of this disk");
    };
    let Some(bitmap) = recorded_bitmap(parent) else {
        return full("the previous snapshot recorded no change-tracking bitmap");
    };
    if parent.virtual_size != info.virtual_size {
        return full("the disk changed size since the previous snapshot");
    }
    if parent.chunk_size != chunk_size {
        return full("the repository chunk size differs from the previous snapshot's");
    }
    let Some(b) = info.bitmaps.iter().find(|b| b.name == bitmap) else {
        return full(&format!(
            "bitmap '{bitmap}' of the previous snapshot is missing from the image"
        ));
    };
    if b.flags.iter().any(|f| f == "inconsistent" || f == "in-use") {
        return full(&format!(
            "bitmap '{bitmap}' is marked {:?} (the image was not closed cleanly)",
            b.flags
        ));
    }
    CbtPlan {
        base_bitmap: Some(bitmap),
        full_reason: None,
    }
}

fn new_bitmap_name(repo: &Repository) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let repo_id = repo.id().to_string();
    let short = repo_id.get(..8).unwrap_or(&repo_id);
    format!("{BITMAP_PREFIX}{short}-{:x}{:x}", nanos, std::process::id())
}

/// `lifeboat backup-image`
pub async fn run(global: &GlobalOpts, args: BackupImageArgs) -> Result<()> {
    let file = args.file.clone();
    if !file.is_file() {
        return Err(Error::new(
            ErrorKind::Source,
            format!("image '{}' does not exist or is not a file", file.display()),
        ));
    }
    if let Some(p) = &args.domain_xml {
        read_domain_xml(p)?; // fail before reading the image
    }
    let repo = repo::open_async(global).await?;
    let info = qemu::image_info(&file).await.ctx(ErrorKind::Source, || {
        format!("cannot inspect image '{}'", file.display())
    })?;
    let format = match args.format {
        Some(f) => f.as_str().to_string(),
        None => info.format.clone(),
    };
    if format != "qcow2" && format != "raw" {
        return Err(Error::new(
            ErrorKind::Source,
            format!(
                "image '{}' is {format}: only qcow2 and raw are supported",
                file.display()
            ),
        ));
    }
    let disk_name = args.disk.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into())
    });

    let name = args.name.clone();
    let repo2 = repo.clone();
    let parent = blocking(move || latest_of(&repo2, &name)).await?;
    let parent_entry = parent
        .as_ref()
        .and_then(|(_, m)| m.disks.iter().find(|d| d.name == disk_name).cloned());
    let plan = plan_cbt(&info, parent_entry.as_ref(), repo.chunk_size(), args.full);

    // Remove our own stale bitmaps (from interrupted runs) so they do not accumulate.
    let repo_id = repo.id().to_string();
    let ours = format!("{BITMAP_PREFIX}{}", repo_id.get(..8).unwrap_or(&repo_id));
    if format == "qcow2" {
        for b in &info.bitmaps {
            if b.name.starts_with(&ours) && Some(&b.name) != plan.base_bitmap.as_ref() {
                tracing::info!(bitmap = %b.name, "removing a stale change-tracking bitmap");
                qemu::bitmap_remove(&file, &b.name)
                    .await
                    .ctx(ErrorKind::Source, || {
                        format!("cannot remove stale bitmap '{}'", b.name)
                    })?;
            }
        }
    }

    let track = format == "qcow2" && !args.no_track && info.compat.as_deref() != Some("0.10");
    let new_bitmap = track.then(|| new_bitmap_name(&repo));
    if let Some(b) = &new_bitmap {
        qemu::bitmap_add(&file, b)
            .await
            .ctx(ErrorKind::Source, || {
                format!(
                    "cannot add change-tracking bitmap '{b}' to '{}'",
                    file.display()
                )
            })?;
    }

    let result = transfer(
        global,
        &args,
        repo.clone(),
        &file,
        &format,
        &info,
        &disk_name,
        &plan,
        new_bitmap.as_deref(),
        parent.as_ref().map(|(id, _)| *id),
        parent_entry.as_ref(),
    )
    .await;

    match result {
        Ok((snap_id, stats_json, text)) => {
            if let Some(old) = &plan.base_bitmap {
                if let Err(e) = qemu::bitmap_remove(&file, old).await {
                    tracing::warn!(bitmap = %old, error = %e, "could not remove the previous bitmap");
                }
            }
            let mut j = stats_json;
            j["snapshot"] = json!(snap_id.to_string());
            emit(global, &j, &text);
            Ok(())
        }
        Err(e) => {
            if let Some(b) = &new_bitmap {
                if let Err(e2) = qemu::bitmap_remove(&file, b).await {
                    tracing::warn!(bitmap = %b, error = %e2, "could not remove the new bitmap after a failure");
                }
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn transfer(
    global: &GlobalOpts,
    args: &BackupImageArgs,
    repo: Arc<Repository>,
    file: &Path,
    format: &str,
    info: &ImageInfo,
    disk_name: &str,
    plan: &CbtPlan,
    new_bitmap: Option<&str>,
    parent_id: Option<SnapshotId>,
    parent_entry: Option<&DiskEntry>,
) -> Result<(SnapshotId, serde_json::Value, String)> {
    let socket_dir = tempfile::Builder::new()
        .prefix("lifeboat-nbd-")
        .tempdir()
        .ctx(ErrorKind::Other, || {
            "cannot create a socket directory".into()
        })?;
    let nbd = QemuNbd::start(QemuNbdOptions {
        image: file.to_path_buf(),
        format: format.to_string(),
        read_only: true,
        bitmap: plan.base_bitmap.clone(),
        socket_dir: socket_dir.path().to_path_buf(),
        ..QemuNbdOptions::default()
    })
    .await
    .ctx(ErrorKind::Source, || {
        format!("cannot export '{}' over NBD", file.display())
    })?;

    let mut contexts = vec![ALLOCATION_CONTEXT.to_string()];
    let dirty_ctx = plan
        .base_bitmap
        .as_ref()
        .map(|b| format!("qemu:dirty-bitmap:{b}"));
    contexts.extend(dirty_ctx.iter().cloned());
    let clients = common::connect_readers(&nbd.addr(), nbd.export_name().to_string(), contexts)
        .await
        .ctx(ErrorKind::Source, || {
            "cannot connect to the NBD export".into()
        })?;

    let mode = match (&dirty_ctx, parent_entry) {
        (Some(ctx), Some(pe)) => common::incremental_mode(&repo, pe, ctx.clone()).await?,
        _ => Mode::Full,
    };
    let incremental = matches!(mode, Mode::Incremental { .. });

    let show = !global.quiet && !global.json;
    let limits = common::limits(&args.limits);
    let stats = common::read_disk(repo.clone(), clients, mode, show, disk_name, &limits).await;
    let stop = nbd.stop().await;
    let stats = stats?;
    stop.ctx(ErrorKind::Source, || "qemu-nbd did not stop cleanly".into())?;

    let index_id = stats.index;

    let mode_str = common::mode_name(incremental);
    let mut disk = common::disk_entry(
        disk_name,
        format,
        repo.chunk_size(),
        index_id,
        &stats,
        incremental,
    );
    disk.source = Some(file.display().to_string());
    disk.qemu_img_info = Some(info.raw.clone());
    disk.create_options = common::create_options(format, Some(info));
    disk.cbt = new_bitmap.map(|b| json!({ "type": "qcow2-bitmap", "bitmap": b }));
    let mut metadata = std::collections::BTreeMap::new();
    if let Some(r) = &plan.full_reason {
        metadata.insert("full_reason".to_string(), r.clone());
    }
    if let Some(p) = &args.domain_xml {
        metadata.insert(DOMAIN_XML_KEY.to_string(), read_domain_xml(p)?);
    }
    let manifest = common::new_manifest(
        args.name.clone(),
        SnapshotKind::Image,
        if incremental { parent_id } else { None },
        vec![disk],
        metadata,
        args.tags.clone(),
    );
    let snap_id = common::commit(&repo, manifest).await?;

    let secs = stats.elapsed.as_secs_f64();
    let mut disk_json = common::disk_json(disk_name, &stats);
    disk_json["chunks_processed"] = json!(stats.chunks_processed);
    let json = json!({
        "name": args.name,
        "mode": mode_str,
        "full_reason": plan.full_reason,
        "disks": [disk_json],
        "limits": common::limits_json(&args.limits),
    });
    let text = format!(
        "snapshot {} of {}: {mode_str}{}\n  {disk_name}: {} in {} chunks, {:.1} s ({:.0} MB/s read)",
        common::short_id(&snap_id),
        args.name,
        common::reason_suffix(plan.full_reason.as_ref()),
        common::sizes_text(&stats),
        stats.chunks_new,
        secs,
        mb_per_s(stats.bytes_read, secs),
    );
    Ok((snap_id, json, text))
}
