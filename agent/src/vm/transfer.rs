//! The data part of a domain backup ([`job::Transfer`](super::job::Transfer)): read every planned disk (and the NVRAM)
//! over NBD into the repository, then commit the snapshot with the job's facts.
//!
//! The same transfer serves a running domain (libvirt's pull-mode NBD server, one export per
//! disk target) and a shut-off one (`qemu-nbd` per disk file, see [`super::offline`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use repo_format::{DiskEntry, IndexId, Manifest, Repository, SnapshotId, SnapshotKind};
use serde_json::json;
use vmdisk::nbd::NbdAddr;
use vmdisk::qemu::{ImageInfo, QemuNbd, QemuNbdOptions};

use crate::backup_common as common;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::pipeline::backup::{DiskBackupStats, Mode, ALLOCATION_CONTEXT};
use crate::pipeline::limit::Limits;
use crate::vm::job::{JobFacts, Transfer};
use crate::vm::plan::DiskPlan;

/// Where the disks' NBD exports come from.
pub enum Source {
    /// libvirt's pull-mode NBD server: one export per disk target.
    Libvirt(PathBuf),
    /// qemu-nbd per disk file, sockets in this directory.
    Files(PathBuf),
}

/// One domain's transfer: what to read, and (after [`Transfer::transfer`]) what was read.
pub struct VmTransfer {
    /// The repository.
    pub repo: Arc<Repository>,
    /// Show progress on the terminal.
    pub show_progress: bool,
    /// The limits on reading and sealing (shared by every disk of the domain).
    pub limits: Limits,
    /// Snapshot name (the domain's name).
    pub name: String,
    /// Snapshot tags.
    pub tags: Vec<String>,
    /// Per-disk plans.
    pub plans: Vec<DiskPlan>,
    /// `qemu-img info` per disk target.
    pub infos: BTreeMap<String, ImageInfo>,
    /// The previous snapshot of this domain.
    pub parent: Option<(SnapshotId, Manifest)>,
    /// The base checkpoint of the incremental disks, if any.
    pub base: Option<String>,
    /// Where the exports come from.
    pub source: Source,
    /// The domain's NVRAM file, if any.
    pub nvram: Option<PathBuf>,
    /// The domain's inactive XML (stored in the manifest).
    pub inactive_xml: String,
    /// The domain's UUID (stored in the manifest).
    pub uuid: String,
    /// The new checkpoint, when any disk is tracked.
    pub new_cp: Option<String>,
    /// Disks read, with their stats (filled by [`Transfer::transfer`]).
    pub done: Vec<(DiskPlan, DiskBackupStats)>,
    /// NVRAM read: stats, stored index, size (filled by [`Transfer::transfer`]).
    pub nvram_done: Option<(DiskBackupStats, IndexId, u64)>,
}

impl VmTransfer {
    fn parent_entry(&self, target: &str) -> Option<DiskEntry> {
        self.parent
            .as_ref()
            .and_then(|(_, m)| m.disks.iter().find(|d| d.name == target).cloned())
    }
}

/// How a disk is read: with progress shown or not, within the run's limits.
struct ReadHow {
    show: bool,
    limits: Limits,
}

async fn read_one(
    repo: Arc<Repository>,
    how: &ReadHow,
    addr_dir: &Source,
    path: PathBuf,
    format: &str,
    target: &str,
    incremental_from: Option<(String, DiskEntry)>,
) -> Result<DiskBackupStats> {
    let mut contexts = vec![ALLOCATION_CONTEXT.to_string()];
    let (nbd, addr, export, dirty) = match addr_dir {
        Source::Libvirt(sock) => (
            None,
            NbdAddr::Unix(sock.clone()),
            target.to_string(),
            format!("qemu:dirty-bitmap:backup-{target}"),
        ),
        Source::Files(dir) => {
            let bitmap = incremental_from.as_ref().map(|(b, _)| b.clone());
            let n = QemuNbd::start(QemuNbdOptions {
                image: path.clone(),
                format: format.to_string(),
                read_only: true,
                bitmap: bitmap.clone(),
                socket_dir: dir.clone(),
                ..QemuNbdOptions::default()
            })
            .await
            .ctx(ErrorKind::Source, || {
                format!("cannot export '{}' over NBD", path.display())
            })?;
            let addr = n.addr();
            let export = n.export_name().to_string();
            (
                Some(n),
                addr,
                export,
                format!("qemu:dirty-bitmap:{}", bitmap.unwrap_or_default()),
            )
        }
    };
    if incremental_from.is_some() {
        contexts.push(dirty.clone());
    }
    let clients = common::connect_readers(&addr, export, contexts)
        .await
        .ctx(ErrorKind::Source, || {
            format!("cannot connect to the NBD export of disk {target}")
        })?;
    let mode = match incremental_from {
        Some((_, pe)) => common::incremental_mode(&repo, &pe, dirty).await?,
        None => Mode::Full,
    };
    let stats = common::read_disk(repo, clients, mode, how.show, target, &how.limits).await;
    if let Some(n) = nbd {
        let _ = n.stop().await;
    }
    stats.map_err(|e| Error::with_source(e.kind(), format!("backup of disk {target} failed"), e))
}

impl Transfer for VmTransfer {
    async fn transfer(&mut self) -> Result<()> {
        let how = ReadHow {
            show: self.show_progress,
            limits: self.limits.clone(),
        };
        let futs = self.plans.iter().map(|p| {
            let inc = if p.incremental {
                self.base.clone().zip(self.parent_entry(&p.disk.target))
            } else {
                None
            };
            read_one(
                self.repo.clone(),
                &how,
                &self.source,
                p.disk.path.clone(),
                &p.disk.format,
                &p.disk.target,
                inc,
            )
        });
        let stats = futures::future::try_join_all(futs).await?;
        self.done = self.plans.iter().cloned().zip(stats).collect();

        // NVRAM: a copy (QEMU may hold the file) read as a small raw disk.
        if let Some(nv) = self.nvram.clone().filter(|p| p.is_file()) {
            let dir = match &self.source {
                Source::Libvirt(s) => s.parent().map(PathBuf::from).unwrap_or_default(),
                Source::Files(d) => d.clone(),
            };
            let copy = dir.join("nvram.copy");
            std::fs::copy(&nv, &copy).ctx(ErrorKind::Source, || {
                format!("cannot copy NVRAM {}", nv.display())
            })?;
            let quiet = ReadHow {
                show: false,
                limits: self.limits.clone(),
            };
            let st = read_one(
                self.repo.clone(),
                &quiet,
                &Source::Files(dir.clone()),
                copy.clone(),
                "raw",
                "nvram",
                None,
            )
            .await;
            let _ = std::fs::remove_file(&copy);
            let st = st?;
            let (id, size) = (st.index, st.disk_size);
            self.nvram_done = Some((st, id, size));
        }
        Ok(())
    }

    async fn commit(&mut self, facts: &JobFacts) -> Result<SnapshotId> {
        let mut entries = Vec::new();
        let mut metadata = BTreeMap::new();
        for (p, st) in &self.done {
            let id = st.index;
            let info = self.infos.get(&p.disk.target);
            let cbt = match (&self.new_cp, p.tracked) {
                (Some(cp), true) => Some(json!({
                    "type": "libvirt-checkpoint",
                    "checkpoint": cp,
                    "bitmap": cp,
                })),
                _ => None,
            };
            metadata.insert(
                format!("mode.{}", p.disk.target),
                common::mode_name(p.incremental).to_string(),
            );
            if let Some(r) = &p.full_reason {
                metadata.insert(format!("full_reason.{}", p.disk.target), r.clone());
            }
            let mut entry = common::disk_entry(
                &p.disk.target,
                &p.disk.format,
                self.repo.chunk_size(),
                id,
                st,
                p.incremental,
            );
            entry.source = Some(p.disk.path.display().to_string());
            entry.qemu_img_info = info.map(|i| i.raw.clone());
            entry.create_options = common::create_options(&p.disk.format, info);
            entry.cbt = cbt;
            entries.push(entry);
        }
        if let Some((st, id, size)) = &self.nvram_done {
            let mut entry =
                common::disk_entry("nvram", "raw", self.repo.chunk_size(), *id, st, false);
            entry.virtual_size = *size;
            entry.source = self.nvram.as_ref().map(|p| p.display().to_string());
            entries.push(entry);
            metadata.insert("nvram_entry".to_string(), "nvram".to_string());
            if let Some(p) = &self.nvram {
                metadata.insert("nvram_path".to_string(), p.display().to_string());
            }
        }
        metadata.insert(
            common::DOMAIN_XML_KEY.to_string(),
            self.inactive_xml.clone(),
        );
        metadata.insert("domain_uuid".to_string(), self.uuid.clone());
        metadata.insert("quiesce".to_string(), facts.quiesce.clone());
        if let Some(w) = facts.freeze_window {
            metadata.insert("freeze_window_ms".to_string(), w.as_millis().to_string());
        }
        if let Some(s) = &facts.freeze_status_at_begin {
            metadata.insert("freeze_status_at_begin".to_string(), s.clone());
        }
        if let Some((n, x)) = &facts.checkpoint {
            metadata.insert("checkpoint".to_string(), n.clone());
            metadata.insert("checkpoint_xml".to_string(), x.clone());
        }
        if let Some(b) = &self.base {
            metadata.insert("base_checkpoint".to_string(), b.clone());
        }
        let incremental = self.done.iter().any(|(p, _)| p.incremental);
        let manifest = common::new_manifest(
            self.name.clone(),
            SnapshotKind::Vm,
            if incremental {
                self.parent.as_ref().map(|(id, _)| *id)
            } else {
                None
            },
            entries,
            metadata,
            self.tags.clone(),
        );
        common::commit(&self.repo, manifest).await
    }
}
