//! Which disks to back up, and full or incremental per disk (pure).

use std::path::PathBuf;

use repo_format::Manifest;

use crate::libvirt::{DiskDevice, DiskInfo};

/// A disk chosen for backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Target (`vda`).
    pub target: String,
    /// Host path of the image.
    pub path: PathBuf,
    /// `qcow2` or `raw` (from `<driver type>`; raw when absent).
    pub format: String,
}

/// Pick the disks to back up: real disks with a local source; cdrom, floppy, LUN, read-only,
/// shareable and `--exclude-disk` ones are skipped (returned with the reason as the second list).
pub fn select_disks(
    disks: &[DiskInfo],
    exclude: &[String],
) -> (Vec<Selected>, Vec<(String, String)>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for d in disks {
        let why = if d.device != DiskDevice::Disk {
            Some(format!("{:?} device", d.device).to_lowercase())
        } else if d.readonly {
            Some("read-only".to_string())
        } else if d.shareable {
            Some("shareable".to_string())
        } else if exclude.contains(&d.target) {
            Some("--exclude-disk".to_string())
        } else if d.source_path().is_none() {
            Some("no local file or block source".to_string())
        } else {
            None
        };
        match (why, d.source_path()) {
            (None, Some(p)) => out.push(Selected {
                target: d.target.clone(),
                path: p.to_path_buf(),
                format: d.driver_type.clone().unwrap_or_else(|| "raw".into()),
            }),
            (why, _) => skipped.push((d.target.clone(), why.unwrap_or_default())),
        }
    }
    (out, skipped)
}

/// Full or incremental for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The disk.
    pub disk: Selected,
    /// Read only what changed since the base checkpoint.
    pub incremental: bool,
    /// Why the disk is read in full.
    pub full_reason: Option<String>,
    /// The disk gets a bitmap in the new checkpoint (qcow2 only).
    pub tracked: bool,
}

/// Everything the per-disk decision needs to know about one disk.
#[derive(Debug, Clone)]
pub struct DiskFacts {
    /// Current virtual size.
    pub virtual_size: u64,
    /// A problem with the base bitmap of this disk (offline check with qemu-img), if any.
    pub bitmap_problem: Option<String>,
}

/// Decide per disk. `base`: the usable base checkpoint and the disks it has bitmaps for, or the
/// reason why there is none.
pub fn plan(
    disks: &[(Selected, DiskFacts)],
    parent: Option<&Manifest>,
    base: &Result<(String, Vec<String>), String>,
    chunk_size: u32,
    force_full: bool,
) -> Vec<DiskPlan> {
    disks
        .iter()
        .map(|(d, facts)| {
            let tracked = d.format == "qcow2";
            let pe = parent.and_then(|m| m.disks.iter().find(|e| e.name == d.target));
            let reason = if force_full {
                Some("--full was given".to_string())
            } else if !tracked {
                Some(format!(
                    "{} disks carry no change tracking (libvirt needs qcow2 for bitmaps)",
                    d.format
                ))
            } else if parent.is_none() {
                Some("no previous snapshot of this VM".to_string())
            } else if let Err(why) = base {
                Some(why.clone())
            } else if let (Some(pe), Ok((name, bdisks))) = (pe, base) {
                if pe.virtual_size != facts.virtual_size {
                    Some("the disk changed size since the previous snapshot".to_string())
                } else if pe.chunk_size != chunk_size {
                    Some(
                        "the repository chunk size differs from the previous snapshot's"
                            .to_string(),
                    )
                } else if !bdisks.contains(&d.target) {
                    Some(format!("the disk is not part of checkpoint {name}"))
                } else {
                    facts.bitmap_problem.clone()
                }
            } else {
                Some("the disk is new since the previous snapshot".to_string())
            };
            DiskPlan {
                disk: d.clone(),
                incremental: reason.is_none(),
                full_reason: reason,
                tracked,
            }
        })
        .collect()
}
