//! Before a domain backup: what libvirt and `qemu-img` say about the domain and its disks —
//! state, XML, UUID, the disks to back up, leftovers of killed runs, and whether the previous
//! snapshot's checkpoint can serve as the incremental base.

use std::collections::BTreeMap;
use std::path::PathBuf;

use repo_format::Manifest;
use vmdisk::qemu::{self, ImageInfo};

use crate::error::{Context, ErrorKind, Result};
use crate::libvirt::{Dom, Hypervisor};
use crate::repo::blocking;
use crate::vm::checkpoints;
use crate::vm::plan::{self, DiskFacts};

/// The domain as found before the backup.
pub struct Prepared {
    /// The domain.
    pub dom: Dom,
    /// Running (live job) or shut off (offline).
    pub active: bool,
    /// The inactive definition (stored in the manifest).
    pub inactive_xml: String,
    /// The domain's UUID.
    pub uuid: String,
    /// The NVRAM file, if any.
    pub nvram: Option<PathBuf>,
    /// Every disk target of the domain.
    pub all_targets: Vec<String>,
    /// The disks to back up.
    pub selected: Vec<plan::Selected>,
    /// Skipped disks, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Things worth a warning (leftovers cleaned, checkpoint redefined).
    pub notes: Vec<String>,
    /// Checkpoint names a new checkpoint must not reuse.
    pub existing_cps: Vec<String>,
    /// The usable base checkpoint and the disks it has bitmaps for, or why there is none.
    pub base: std::result::Result<(String, Vec<String>), String>,
}

/// Inspect domain `vm` at `uri` (on a blocking thread). `parent`: the previous snapshot of the
/// domain; `prefix`: the prefix of this repository's checkpoints; `exclude`: `--exclude-disk`.
pub async fn domain(
    uri: &str,
    vm: &str,
    exclude: &[String],
    parent: Option<&Manifest>,
    prefix: String,
) -> Result<Prepared> {
    let meta = |k: &str| parent.and_then(|m| m.metadata.get(k).cloned());
    let base_name = meta("checkpoint");
    let stored_xml = meta("checkpoint_xml");
    let parent_uuid = meta("domain_uuid");
    let uri = uri.to_string();
    let vm = vm.to_string();
    let exclude = exclude.to_vec();
    blocking(move || -> Result<Prepared> {
        let hv = Hypervisor::connect(&uri)
            .ctx(ErrorKind::Source, || format!("cannot connect to libvirt at {uri}"))?;
        let dom = hv
            .domain(&vm)
            .ctx(ErrorKind::Source, || format!("no domain {vm}"))?;
        let vm2 = vm.clone();
        let src = move |w: &'static str| {
            let vm = vm2.clone();
            move || format!("cannot read the {w} of domain {vm}")
        };
        let active = dom.is_active().ctx(ErrorKind::Source, src("state"))?;
        let inactive_xml = dom.xml(true).ctx(ErrorKind::Source, src("XML"))?;
        let live = crate::libvirt::parse_domain_xml(
            &dom.xml(false).ctx(ErrorKind::Source, src("XML"))?,
        )
        .ctx(ErrorKind::Source, src("XML"))?;
        let uuid = dom.uuid().ctx(ErrorKind::Source, src("UUID"))?;
        let (selected, skipped) = plan::select_disks(&live.disks, &exclude);
        let mut keep = base_name.clone();
        let mut notes = Vec::new();
        if parent_uuid.as_deref().is_some_and(|u| u != uuid) {
            keep = None;
        }
        notes.extend(checkpoints::clean_leftovers(&dom, &prefix, keep.as_deref())?);
        let existing_cps = dom
            .checkpoints()
            .ctx(ErrorKind::Source, src("checkpoints"))?
            .into_iter()
            .map(|c| c.name)
            .collect();
        let base = match (&base_name, keep.is_some()) {
            (None, _) => Err("the previous snapshot recorded no checkpoint".to_string()),
            (Some(_), false) => Err("the domain's UUID differs from the previous snapshot's".into()),
            (Some(b), true) if active => {
                match checkpoints::validate_live(&dom, b, stored_xml.as_deref()) {
                    checkpoints::Base::Usable { name, disks, redefined } => {
                        if redefined {
                            notes.push(format!(
                                "checkpoint {name} was missing from libvirt: redefined from the repository"
                            ));
                        }
                        Ok((name, disks))
                    }
                    checkpoints::Base::Unusable(why) => Err(why),
                }
            }
            // Shut off: each disk's bitmap is checked with qemu-img (see `disk_facts`).
            (Some(b), true) => Ok((b.clone(), selected.iter().map(|s| s.target.clone()).collect())),
        };
        // Never reuse the base's name (its metadata may be gone while its bitmap stays).
        let mut existing_cps: Vec<String> = existing_cps;
        existing_cps.extend(base_name.iter().cloned());
        Ok(Prepared {
            dom,
            active,
            inactive_xml,
            uuid,
            nvram: live.nvram,
            all_targets: live.disks.iter().map(|d| d.target.clone()).collect(),
            selected,
            skipped,
            notes,
            existing_cps,
            base,
        })
    })
    .await
}

/// `qemu-img info` per selected disk (by target), and the facts the plan needs: size and, for a
/// shut-off domain, the state of the base bitmap.
pub async fn disk_facts(
    prep: &Prepared,
) -> Result<(
    BTreeMap<String, ImageInfo>,
    Vec<(plan::Selected, DiskFacts)>,
)> {
    let mut infos = BTreeMap::new();
    let mut disks = Vec::new();
    for s in &prep.selected {
        let info = qemu::image_info_as(&s.path, Some(&s.format))
            .await
            .ctx(ErrorKind::Source, || {
                format!("cannot inspect disk {} ({})", s.target, s.path.display())
            })?;
        let bitmap_problem = match (&prep.base, prep.active) {
            (Ok((b, _)), false) if s.format == "qcow2" => {
                match info.bitmaps.iter().find(|x| &x.name == b) {
                    None => Some(format!(
                        "bitmap '{b}' of the previous snapshot is missing from the image"
                    )),
                    Some(x) if x.is_inconsistent() || x.flags.iter().any(|f| f == "in-use") => {
                        Some(format!(
                            "bitmap '{b}' is marked {:?} (QEMU did not close the image cleanly)",
                            x.flags
                        ))
                    }
                    Some(_) => None,
                }
            }
            _ => None,
        };
        disks.push((
            s.clone(),
            DiskFacts {
                virtual_size: info.virtual_size,
                bitmap_problem,
            },
        ));
        infos.insert(s.target.clone(), info);
    }
    Ok((infos, disks))
}
