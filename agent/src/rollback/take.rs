//! Taking a rollback point: plan it (nothing changed), then journal `creating`, take the
//! external snapshot (disks, and memory with `--memory`) or, for a shut-off domain, the
//! overlays by hand, and journal `ready`.

use std::time::Duration;

use jiff::Timestamp;

use super::images::{bitmap_list, qemu_img};
use super::ops::{crash_point, src, SNAPSHOT_PREFIX};
use super::state::{self, Phase, RbDisk, RollbackState};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::snapshot::{DiskSourceSpec, SnapshotDiskSpec, SnapshotSpec};
use crate::libvirt::{self, parse_domain_xml, DiskDevice, Dom, Hypervisor};

/// What to take.
#[derive(Debug, Clone)]
pub struct TakeOptions {
    /// Expiry.
    pub rollback_for: Duration,
    /// Label.
    pub reason: Option<String>,
    /// Also the memory state.
    pub memory: bool,
}

fn stamp(t: Timestamp) -> String {
    t.strftime("%Y%m%dT%H%M%SZ").to_string()
}

/// Plans a rollback point of a domain (nothing is changed): overlays next to the disks,
/// `<disk file>.lifeboat-rb-<time>.qcow2`; every writable file disk gets one. Other disks
/// (network, block, read-only, shareable, CD-ROM) make the plan fail, except CD-ROMs and
/// read-only disks, which are left out of the snapshot (rolling back does not concern them).
pub fn plan(dom: &Dom, uri: &str, opts: &TakeOptions) -> Result<(RollbackState, Vec<String>)> {
    let vm = dom.name().to_string();
    let info = parse_domain_xml(&dom.xml(false).map_err(|e| src(e, "read domain XML"))?)
        .map_err(|e| src(e, "parse domain XML"))?;
    let now = Timestamp::now();
    let name = format!("{SNAPSHOT_PREFIX}{}", stamp(now));
    let mut disks = Vec::new();
    let mut excluded = Vec::new();
    for d in &info.disks {
        let skip = matches!(d.device, DiskDevice::Cdrom | DiskDevice::Floppy) || d.readonly;
        if skip {
            excluded.push(d.target.clone());
            continue;
        }
        if d.shareable {
            return Err(Error::new(
                ErrorKind::Usage,
                format!("disk {} of {vm} is shareable: cannot snapshot it", d.target),
            ));
        }
        let base = match &d.source {
            libvirt::DiskSource::File(p) => p.clone(),
            other => {
                return Err(Error::new(
                    ErrorKind::Usage,
                    format!(
                    "disk {} of {vm} is not a file ({other:?}): rollback points need file disks",
                    d.target
                ),
                ))
            }
        };
        let file = base
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| d.target.clone());
        let overlay = base.with_file_name(format!("{file}.{name}.qcow2"));
        disks.push(RbDisk {
            target: d.target.clone(),
            base,
            base_format: d.driver_type.clone().unwrap_or_else(|| "raw".into()),
            overlay,
        });
    }
    if disks.is_empty() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("{vm} has no writable file disk to protect"),
        ));
    }
    let memory = opts
        .memory
        .then(|| disks[0].base.with_file_name(format!("{vm}.{name}.mem")));
    let expires = now
        .checked_add(
            jiff::SignedDuration::try_from(opts.rollback_for).unwrap_or(jiff::SignedDuration::MAX),
        )
        .unwrap_or(Timestamp::MAX);
    let st = RollbackState {
        version: 1,
        vm,
        uuid: dom.uuid().map_err(|e| src(e, "read domain UUID"))?,
        uri: uri.to_string(),
        snapshot: name,
        reason: opts.reason.clone(),
        created: now,
        expires,
        disks,
        memory,
        memory_frozen: false,
        backup: None,
        complete: false,
        phase: Phase::Creating,
        updated: now,
    };
    Ok((st, excluded))
}

/// The snapshot's description: what the point is for, and when it goes.
pub fn description(st: &RollbackState) -> String {
    format!(
        "Lifeboat rollback point; reason: {}; created: {}; expires: {}; state: {}",
        st.reason.as_deref().unwrap_or("-"),
        st.created,
        st.expires,
        state::path(&st.vm)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    )
}

/// Takes the rollback point: journal `creating`, external snapshot (disks, + memory), journal
/// `ready`. `frozen`: the guest filesystems are frozen right now (recorded for the memory
/// state, which must be thawed after a restore).
pub fn take(
    hv: &Hypervisor,
    dom: &Dom,
    st: &mut RollbackState,
    excluded: &[String],
    frozen: bool,
) -> Result<()> {
    st.phase = Phase::Creating;
    st.memory_frozen = frozen && st.memory.is_some();
    state::save(st)?;
    if !dom.is_active().map_err(|e| src(e, "query domain state"))? {
        take_offline(hv, dom, st)?;
        st.phase = Phase::Ready;
        state::save(st)?;
        crash_point("protect-after-snapshot");
        return Ok(());
    }
    let spec = SnapshotSpec {
        name: st.snapshot.clone(),
        description: description(st),
        disks: st
            .disks
            .iter()
            .map(|d| SnapshotDiskSpec {
                target: d.target.clone(),
                overlay: d.overlay.clone(),
            })
            .collect(),
        excluded: excluded.to_vec(),
        memory: st.memory.clone(),
    };
    dom.create_external_snapshot(&spec).map_err(|e| {
        src(
            e,
            format!("cannot create the rollback snapshot of {}", st.vm),
        )
    })?;
    st.phase = Phase::Ready;
    state::save(st)?;
    crash_point("protect-after-snapshot");
    Ok(())
}

/// A shut-off domain's point, made by hand: libvirt 9.0 refuses offline external snapshots
/// while checkpoints exist ("cannot perform block operations while checkpoint exists"). Each
/// overlay is created with `qemu-img create -b BASE`, gets an empty, enabled copy of every
/// bitmap of its base (what libvirt does for a live snapshot: the checkpoints go on recording
/// in the overlay, and libvirt merges same-named bitmaps along the chain for a backup), and the
/// definition is pointed at the overlays. There is no libvirt snapshot metadata for it; the
/// state file is the record.
fn take_offline(hv: &Hypervisor, dom: &Dom, st: &RollbackState) -> Result<()> {
    for d in &st.disks {
        if d.overlay.exists() {
            // A leftover of a killed run that no XML uses (protect repairs first).
            std::fs::remove_file(&d.overlay).ctx(ErrorKind::Other, || {
                format!("cannot remove stale {}", d.overlay.display())
            })?;
        }
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            d.base.as_os_str(),
            "-F".as_ref(),
            d.base_format.as_ref(),
            d.overlay.as_os_str(),
        ])?;
        if d.base_format == "qcow2" {
            for (name, gran) in bitmap_list(&d.base, &d.base_format)? {
                let g = gran.to_string();
                qemu_img(&[
                    "bitmap".as_ref(),
                    "--add".as_ref(),
                    "--enable".as_ref(),
                    "-g".as_ref(),
                    g.as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    d.overlay.as_os_str(),
                    name.as_ref(),
                ])?;
            }
        }
    }
    let inactive = dom
        .xml(true)
        .map_err(|e| src(e, "read persistent domain XML"))?;
    let overlays = st
        .disks
        .iter()
        .map(|d| {
            (
                d.target.clone(),
                DiskSourceSpec {
                    path: d.overlay.clone(),
                    format: "qcow2".into(),
                },
            )
        })
        .collect();
    let new = libvirt::snapshot::set_disk_sources(&inactive, &overlays)
        .map_err(|e| src(e, "point the disks at the overlays"))?;
    hv.define_xml(&new)
        .map_err(|e| src(e, format!("redefine {} on its overlays", st.vm)))?;
    Ok(())
}
