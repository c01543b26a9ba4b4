//! What `lifeboat backup` (libvirt domains, [`crate::vm`]) and `lifeboat backup-image` (image
//! files) share: finding the parent snapshot, reading one disk over NBD into the repository,
//! building its [`DiskEntry`] and the [`Manifest`], committing, and the per-disk report.
//!
//! The commands differ in where the NBD export comes from and how change tracking is recorded
//! (libvirt checkpoints vs. qcow2 bitmaps Lifeboat adds itself); everything here is the same for
//! both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use repo_format::{BackupMode, DiskEntry, IndexId, Manifest, Repository, SnapshotId, SnapshotKind};
use serde_json::{json, Value};
use vmdisk::nbd::{Client, ConnectOptions, NbdAddr};
use vmdisk::qemu::ImageInfo;

use crate::cli::LimitArgs;
use crate::error::{repo_err, Result};
use crate::pipeline::backup::{self, DiskBackupStats, Mode};
use crate::pipeline::limit::Limits;
use crate::pipeline::progress::Progress;
use crate::repo::blocking;

/// NBD request timeout for local exports.
pub const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// Manifest metadata key holding the domain XML (inactive definition).
pub const DOMAIN_XML_KEY: &str = "domain_xml";

/// The latest snapshot named `name`, if any.
pub fn latest_of(repo: &Repository, name: &str) -> Result<Option<(SnapshotId, Manifest)>> {
    let all = repo
        .list_snapshots()
        .map_err(|e| repo_err(e, "cannot list snapshots"))?;
    Ok(all.into_iter().rfind(|(_, m)| m.name == name))
}

/// Connect to a local NBD export with the given meta contexts and [`NBD_TIMEOUT`].
pub async fn connect(
    addr: &NbdAddr,
    export: String,
    contexts: Vec<String>,
) -> vmdisk::Result<Client> {
    Client::connect(
        addr,
        ConnectOptions {
            export,
            meta_contexts: contexts,
            timeout: NBD_TIMEOUT,
            ..ConnectOptions::default()
        },
    )
    .await
}

/// Connections a disk is read through: the chunks in flight are spread over them, so that a
/// server that handles each connection's requests in one thread or coroutine (QEMU's, qemu-nbd)
/// serves them in parallel.
pub const READ_CONNECTIONS: usize = 2;

/// [`connect`], plus more connections (up to [`READ_CONNECTIONS`], without meta contexts:
/// block status goes through the first) when the export allows several: read-only or
/// `CAN_MULTI_CONN`. A refused extra connection only means fewer connections.
pub async fn connect_readers(
    addr: &NbdAddr,
    export: String,
    contexts: Vec<String>,
) -> vmdisk::Result<Vec<Client>> {
    let first = connect(addr, export.clone(), contexts).await?;
    let mut clients = vec![first];
    if clients[0].is_read_only() || clients[0].can_multi_conn() {
        for _ in 1..READ_CONNECTIONS {
            match connect(addr, export.clone(), Vec::new()).await {
                Ok(c) => clients.push(c),
                Err(e) => {
                    tracing::debug!(error = %e, "extra NBD connection refused; reading with fewer");
                    break;
                }
            }
        }
    }
    Ok(clients)
}

/// Incremental mode reading the dirty extents of `context`, against the index of `parent`, the
/// disk's entry in the parent snapshot.
pub async fn incremental_mode(
    repo: &Arc<Repository>,
    parent: &DiskEntry,
    context: String,
) -> Result<Mode> {
    let r2 = repo.clone();
    let (id, size, chunk_size) = (parent.index, parent.virtual_size, parent.chunk_size);
    let parent = blocking(move || {
        r2.open_index(&id, size, chunk_size)
            .map_err(|e| repo_err(e, "cannot load the previous snapshot's index"))
    })
    .await?;
    Ok(Mode::Incremental {
        context,
        parent: Arc::new(parent),
    })
}

/// Read one disk through `clients` (connections to the same export, the first with the meta
/// contexts; see [`connect_readers`]) into the repository (progress shown when `show`) within
/// `limits`, then disconnect. The disk's index is stored, the snapshot not committed.
pub async fn read_disk(
    repo: Arc<Repository>,
    clients: Vec<Client>,
    mode: Mode,
    show: bool,
    label: &str,
    limits: &Limits,
) -> Result<DiskBackupStats> {
    let size = clients.first().map_or(0, Client::size);
    let progress = Progress::new(show, size, label);
    let stats = backup::backup_disk(repo, &clients, mode, &progress, limits).await;
    progress.finish();
    for c in clients {
        let _ = c.disconnect().await;
    }
    stats
}

/// The pipeline's limits for a run's `--limit-read` and `--cpus`.
pub fn limits(args: &LimitArgs) -> Limits {
    Limits::new(args.limit_read, args.cpus.map(usize::from))
}

/// The limits a backup ran with, for its `--json` output (`null`: none).
pub fn limits_json(args: &LimitArgs) -> Value {
    json!({ "read_bytes_per_s": args.limit_read, "cpus": args.cpus })
}

/// Commit a snapshot's manifest.
pub async fn commit(repo: &Arc<Repository>, manifest: Manifest) -> Result<SnapshotId> {
    let r2 = repo.clone();
    blocking(move || {
        r2.commit_snapshot(&manifest)
            .map_err(|e| repo_err(e, "cannot commit the snapshot"))
    })
    .await
}

/// A manifest stamped with this host, the current time and this tool's version.
pub fn new_manifest(
    name: String,
    kind: SnapshotKind,
    parent: Option<SnapshotId>,
    disks: Vec<DiskEntry>,
    metadata: BTreeMap<String, String>,
    tags: Vec<String>,
) -> Manifest {
    Manifest {
        version: 1,
        name,
        hostname: crate::commands::hostname(),
        time: jiff::Timestamp::now(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        parent,
        kind,
        disks,
        metadata,
        tags,
    }
}

/// The options `qemu-img create` needs to recreate the image as it was (qcow2 only): cluster
/// size and compat level.
pub fn create_options(format: &str, info: Option<&ImageInfo>) -> BTreeMap<String, String> {
    let mut opts = BTreeMap::new();
    if format == "qcow2" {
        if let Some(cs) = info.and_then(|i| i.cluster_size) {
            opts.insert("cluster_size".to_string(), cs.to_string());
        }
        if let Some(c) = info.and_then(|i| i.compat.clone()) {
            opts.insert("compat".to_string(), c);
        }
    }
    opts
}

/// "incremental" or "full".
pub fn mode_name(incremental: bool) -> &'static str {
    if incremental {
        "incremental"
    } else {
        "full"
    }
}

/// The manifest entry of a disk read into the repository (index stored as `index`). Source,
/// `qemu-img info`, create options and change tracking are left empty for the caller to fill.
pub fn disk_entry(
    name: &str,
    format: &str,
    chunk_size: u32,
    index: IndexId,
    stats: &DiskBackupStats,
    incremental: bool,
) -> DiskEntry {
    DiskEntry {
        name: name.to_string(),
        virtual_size: stats.disk_size,
        format: format.to_string(),
        chunk_size,
        index,
        source: None,
        qemu_img_info: None,
        create_options: BTreeMap::new(),
        backup_mode: if incremental {
            BackupMode::Incremental
        } else {
            BackupMode::Full
        },
        bytes_read: stats.bytes_read,
        bytes_new: stats.bytes_new,
        chunks_new: stats.chunks_new,
        cbt: None,
    }
}

/// The `--json` report of one disk: the fields both commands print (callers add their own).
pub fn disk_json(name: &str, stats: &DiskBackupStats) -> Value {
    json!({
        "name": name,
        "virtual_size": stats.disk_size,
        "allocated_bytes": stats.allocated_bytes,
        "dirty_bytes": stats.dirty_bytes,
        "bytes_read": stats.bytes_read,
        "bytes_new": stats.bytes_new,
        "chunks_new": stats.chunks_new,
        "seconds": stats.elapsed.as_secs_f64(),
    })
}

/// "V virtual, A allocated, read R, stored N new" for one disk's text report.
pub fn sizes_text(stats: &DiskBackupStats) -> String {
    use crate::commands::human_bytes;
    format!(
        "{} virtual, {} allocated, read {}, stored {} new",
        human_bytes(stats.disk_size),
        human_bytes(stats.allocated_bytes),
        human_bytes(stats.bytes_read),
        human_bytes(stats.bytes_new),
    )
}

/// " (reason)" when a disk was read in full for a reason, else "".
pub fn reason_suffix(full_reason: Option<&String>) -> String {
    full_reason.map(|r| format!(" ({r})")).unwrap_or_default()
}

/// The first 12 characters of a snapshot id, as the text reports print it.
pub fn short_id(id: &SnapshotId) -> String {
    id.to_string().get(..12).unwrap_or_default().to_string()
}
