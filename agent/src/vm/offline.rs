//! Backup of a shut-off domain: no freeze and no job. Each disk is read through `qemu-nbd`
//! (incremental with the base checkpoint's persistent bitmap, which libvirt names after the
//! checkpoint); a new bitmap is added with `qemu-img` before reading, and once the snapshot is
//! committed a matching checkpoint is redefined in libvirt's metadata, so the chain goes on when
//! the VM runs again. libvirt and `qemu-img` calls that block run on blocking threads.

use repo_format::SnapshotId;
use vmdisk::qemu;

use crate::error::{Context, ErrorKind, Result};
use crate::libvirt::Dom;
use crate::repo::blocking;
use crate::vm::checkpoints;
use crate::vm::job::{JobFacts, Transfer};
use crate::vm::transfer::VmTransfer;

/// Back up the shut-off domain `dom` with `transfer`. `all_targets`: every disk target of the
/// domain (for the checkpoint XML); `tracked`: those that get the new bitmap; `prune`: our older
/// checkpoints, deleted after the commit.
pub async fn run(
    dom: Dom,
    transfer: &mut VmTransfer,
    all_targets: &[String],
    tracked: &[String],
    prune: &[String],
) -> Result<(SnapshotId, JobFacts)> {
    let mut facts = JobFacts {
        quiesce: "consistent: the domain is shut off".to_string(),
        ..JobFacts::default()
    };
    let mut added = Vec::new();
    let result = async {
        if let Some(cp) = &transfer.new_cp {
            for p in transfer.plans.iter().filter(|p| p.tracked) {
                qemu::bitmap_add(&p.disk.path, cp)
                    .await
                    .ctx(ErrorKind::Source, || {
                        format!("cannot add bitmap {cp} to {}", p.disk.path.display())
                    })?;
                added.push(p.disk.path.clone());
            }
            facts.checkpoint = Some((
                cp.clone(),
                checkpoint_xml(cp, all_targets, tracked, &transfer.inactive_xml),
            ));
        }
        transfer.transfer().await?;
        transfer.commit(&facts).await
    }
    .await;
    match result {
        Ok(snap) => {
            let dom_name = dom.name().to_string();
            // Redefine the new checkpoint in libvirt's metadata, then prune the old ones; then
            // the bitmaps of our old checkpoints that libvirt never knew.
            let cp_xml = facts.checkpoint.as_ref().map(|(_, xml)| xml.clone());
            let prune = prune.to_vec();
            let stale_bitmaps: Vec<_> = match &transfer.base {
                Some(b) => transfer
                    .plans
                    .iter()
                    .filter(|p| p.tracked)
                    .map(|p| (p.disk.path.clone(), b.clone()))
                    .collect(),
                None => Vec::new(),
            };
            let warnings = blocking(move || {
                let mut warnings = Vec::new();
                if let Some(xml) = &cp_xml {
                    if let Err(e) = dom.redefine_checkpoint(xml) {
                        warnings.push(format!(
                            "could not redefine the new checkpoint in libvirt (the next live backup redefines it from the repository): {e}"
                        ));
                    }
                }
                for old in prune {
                    if let Err(e) = checkpoints::delete(&dom, &old) {
                        warnings.push(format!("could not delete old checkpoint {old}: {e}"));
                    }
                }
                for (path, b) in &stale_bitmaps {
                    let _ = checkpoints::remove_bitmap_if_present(path, b);
                }
                Ok(warnings)
            })
            .await?;
            facts.warnings.extend(warnings);
            tracing::debug!(domain = dom_name, "offline backup committed");
            Ok((snap, facts))
        }
        Err(e) => {
            if let Some(cp) = &transfer.new_cp {
                for p in &added {
                    let _ = qemu::bitmap_remove(p, cp).await;
                }
            }
            Err(e)
        }
    }
}

/// The `<domaincheckpoint>` XML to redefine for a checkpoint created offline: a bitmap named
/// after the checkpoint on each tracked disk, the domain XML embedded.
fn checkpoint_xml(name: &str, all: &[String], tracked: &[String], dom_xml: &str) -> String {
    use crate::libvirt::xml::escape;
    let now = jiff::Timestamp::now().as_second();
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <creationTime>{now}</creationTime>\n  <disks>\n",
        escape(name)
    );
    for t in all {
        if tracked.contains(t) {
            x.push_str(&format!(
                "    <disk name='{}' checkpoint='bitmap' bitmap='{}'/>\n",
                escape(t),
                escape(name)
            ));
        } else {
            x.push_str(&format!(
                "    <disk name='{}' checkpoint='no'/>\n",
                escape(t)
            ));
        }
    }
    x.push_str("  </disks>\n");
    x.push_str(dom_xml.trim());
    x.push_str("\n</domaincheckpoint>\n");
    x
}
