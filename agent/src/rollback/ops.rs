//! The rollback point's operations, all blocking (libvirt, qemu-img): roll back, consolidate,
//! adopt, and repair after an interrupted run (taking one: [`super::take`]).
//!
//! Invariants:
//! - a base image is never written by a rollback and never deleted;
//! - an overlay or memory file is deleted only when neither the live nor the persistent domain
//!   XML mentions it (as a source or anywhere in a backing chain);
//! - the journal phase is saved before each irreversible step (see [`super::state`]), and every
//!   step checks what is already done, so running the same operation again finishes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::images::{bitmaps, qemu_img};
use super::state::{self, Phase, RbDisk, RollbackState};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::snapshot::DiskSourceSpec;
use crate::libvirt::{self, parse_domain_xml, Dom, Hypervisor};

/// Test hook: `LIFEBOAT_TEST_CRASH_AT=<point>` aborts the process (no cleanup, like `kill -9`)
/// when it reaches that point: `protect-after-snapshot` (inside the backup's frozen window),
/// `protect-before-complete`, `rollback-after-destroy`, `rollback-after-redefine`,
/// `commit-after-first-pivot`, `commit-before-cleanup` (also reached by `reconcile`).
pub const CRASH_ENV: &str = "LIFEBOAT_TEST_CRASH_AT";

/// Aborts the process if [`CRASH_ENV`] names `point`.
pub fn crash_point(point: &str) {
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == point) {
        eprintln!("lifeboat: test hook {CRASH_ENV}={point}: aborting");
        std::process::abort();
    }
}

/// Name prefix of Lifeboat's rollback snapshots.
pub const SNAPSHOT_PREFIX: &str = "lifeboat-rb-";

pub(super) fn src(e: libvirt::LibvirtError, what: impl Into<String>) -> Error {
    Error::with_source(ErrorKind::Source, what, e)
}

/// Both domain XMLs (live, persistent) as text.
fn xmls(dom: &Dom) -> Result<(String, String)> {
    Ok((
        dom.xml(false).map_err(|e| src(e, "read domain XML"))?,
        dom.xml(true)
            .map_err(|e| src(e, "read persistent domain XML"))?,
    ))
}

fn mentions(xml: &str, p: &Path) -> bool {
    let s = p.to_string_lossy();
    xml.contains(&*s) || xml.contains(&libvirt::xml::escape(&s))
}

/// Current top source per target.
fn top_sources(xml: &str) -> Result<BTreeMap<String, PathBuf>> {
    Ok(parse_domain_xml(xml)
        .map_err(|e| src(e, "parse domain XML"))?
        .disks
        .into_iter()
        .filter_map(|d| d.source_path().map(|p| (d.target.clone(), p.to_path_buf())))
        .collect())
}

/// Does any XML of the domain still use one of the point's overlays (the snapshot exists)?
pub fn overlays_in_use(dom: &Dom, st: &RollbackState) -> Result<bool> {
    let (live, inactive) = xmls(dom)?;
    Ok(st
        .disks
        .iter()
        .any(|d| mentions(&live, &d.overlay) || mentions(&inactive, &d.overlay)))
}

/// Deletes overlays and the memory file that no domain XML mentions; returns what was
/// deleted. A file still mentioned is an error (it is never deleted).
fn delete_files(dom: &Dom, st: &RollbackState) -> Result<Vec<PathBuf>> {
    let (live, inactive) = xmls(dom)?;
    let mut files: Vec<&PathBuf> = st.disks.iter().map(|d| &d.overlay).collect();
    files.extend(st.memory.iter());
    let mut gone = Vec::new();
    for f in files {
        if st.disks.iter().any(|d| &d.base == f) {
            continue; // never a base image
        }
        if mentions(&live, f) || mentions(&inactive, f) {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "{} is still used by domain {}: not deleted",
                    f.display(),
                    st.vm
                ),
            ));
        }
        match std::fs::remove_file(f) {
            Ok(()) => gone.push(f.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::with_source(
                    ErrorKind::Other,
                    format!("cannot delete {}", f.display()),
                    e,
                ))
            }
        }
    }
    Ok(gone)
}

fn base_sources(st: &RollbackState) -> BTreeMap<String, DiskSourceSpec> {
    st.disks
        .iter()
        .map(|d| {
            (
                d.target.clone(),
                DiskSourceSpec {
                    path: d.base.clone(),
                    format: d.base_format.clone(),
                },
            )
        })
        .collect()
}

/// Points the persistent definition's disks that still use an overlay back to the bases.
fn redefine_on_bases(hv: &Hypervisor, dom: &Dom, st: &RollbackState) -> Result<bool> {
    let inactive = dom
        .xml(true)
        .map_err(|e| src(e, "read persistent domain XML"))?;
    if !st.disks.iter().any(|d| mentions(&inactive, &d.overlay)) {
        return Ok(false);
    }
    let new = libvirt::snapshot::set_disk_sources(&inactive, &base_sources(st))
        .map_err(|e| src(e, "point the disks back to the base images"))?;
    hv.define_xml(&new)
        .map_err(|e| src(e, format!("redefine {} on its base images", st.vm)))?;
    Ok(true)
}

/// Deletes checkpoint metadata whose bitmap is missing from a qcow2 base image (checkpoints
/// made after the rollback point lived only in the discarded overlays). Returns their names.
fn drop_orphan_checkpoints(dom: &Dom, st: &RollbackState) -> Result<Vec<String>> {
    let cps = dom.checkpoints().map_err(|e| src(e, "list checkpoints"))?;
    if cps.is_empty() {
        return Ok(Vec::new());
    }
    let mut have: Vec<Vec<String>> = Vec::new();
    for d in st.disks.iter().filter(|d| d.base_format == "qcow2") {
        have.push(bitmaps(&d.base, &d.base_format)?);
    }
    let mut dropped = Vec::new();
    // Children before parents.
    for c in cps.iter().rev() {
        if have.iter().any(|b| !b.contains(&c.name)) {
            dom.delete_checkpoint(&c.name, true)
                .map_err(|e| src(e, format!("delete checkpoint {}", c.name)))?;
            dropped.push(c.name.clone());
        }
    }
    Ok(dropped)
}

/// What a rollback or consolidation did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seconds it took.
    pub seconds: f64,
    /// Files deleted.
    pub deleted: Vec<PathBuf>,
    /// Notes for the operator.
    pub notes: Vec<String>,
}

/// Rolls the domain back to the point: stop it, point the disks back to the bases, drop the
/// snapshot metadata and checkpoints that only the overlays carried, delete the overlays,
/// restore the memory state (or start the domain if it was running or the point has no
/// memory state). Resumable: each step checks whether it is done.
pub fn rollback(hv: &Hypervisor, st: &mut RollbackState) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut out = Outcome::default();
    let dom = hv
        .domain(&st.vm)
        .map_err(|e| src(e, format!("look up domain {}", st.vm)))?;
    if st.phase != Phase::RollingBack {
        st.phase = Phase::RollingBack;
        state::save(st)?;
    }
    // 1. Stop the domain while it runs on the overlays (the state is being discarded).
    let active = dom.is_active().map_err(|e| src(e, "query domain state"))?;
    if active {
        let live = dom.xml(false).map_err(|e| src(e, "read domain XML"))?;
        if st.disks.iter().any(|d| mentions(&live, &d.overlay)) {
            dom.destroy().map_err(|e| src(e, "stop the domain"))?;
        }
    }
    crash_point("rollback-after-destroy");
    let active = dom.is_active().map_err(|e| src(e, "query domain state"))?;
    // 2. Persistent definition back on the base images.
    if !active && redefine_on_bases(hv, &dom, st)? {
        out.notes
            .push("disks pointed back to the base images".into());
    }
    crash_point("rollback-after-redefine");
    // 3. libvirt's snapshot record, and checkpoints whose bitmaps were only in the overlays.
    dom.delete_snapshot_metadata(&st.snapshot)
        .map_err(|e| src(e, "delete the snapshot metadata"))?;
    let dropped = drop_orphan_checkpoints(&dom, st)?;
    if !dropped.is_empty() {
        out.notes.push(format!(
            "checkpoints taken after the rollback point were dropped (the next backup falls back to an older base or a full read): {}",
            dropped.join(", ")
        ));
    }
    // 4. Run again: from the memory state, or a fresh boot.
    let mut restored = false;
    if !active {
        if let Some(mem) = st.memory.clone().filter(|m| m.exists()) {
            let saved = hv
                .save_image_xml(&mem)
                .map_err(|e| src(e, "read the memory state's domain XML"))?;
            let xml = libvirt::snapshot::set_disk_sources(&saved, &base_sources(st))
                .map_err(|e| src(e, "point the memory state's disks to the base images"))?;
            hv.restore_memory(&mem, &xml)
                .map_err(|e| src(e, "restore the memory state"))?;
            restored = true;
        } else {
            dom.start().map_err(|e| src(e, "start the domain"))?;
        }
    }
    if restored && st.memory_frozen {
        thaw_after_restore(&dom, &mut out);
    }
    // 5. Overlays and memory file: no XML mentions them any more.
    out.deleted = delete_files(&dom, st)?;
    archive(st);
    state::remove(&st.vm)?;
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

fn thaw_after_restore(dom: &Dom, out: &mut Outcome) {
    // The memory state was saved inside the backup's freeze: the guest comes back frozen. The
    // agent reconnects after the restore; try for a while.
    let start = Instant::now();
    loop {
        match dom.fs_thaw(&[]) {
            Ok(n) => {
                out.notes.push(format!("guest filesystems thawed ({n})"));
                return;
            }
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                out.notes.push(format!(
                    "could not thaw the guest filesystems after restoring the memory state: {e}; run `virsh domfsthaw {}`",
                    dom.name()
                ));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Consolidates the point into the base images ("the patch went fine", expiry, or undo of a
/// failed `protect`): a running domain gets an active block commit + pivot per disk (libvirt
/// merges the checkpoint bitmaps into the base), a shut-off one `qemu-img commit` + bitmap
/// merge + redefinition. Then the snapshot metadata, the overlays and the memory file go.
/// Resumable.
pub fn consolidate(hv: &Hypervisor, st: &mut RollbackState) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut out = Outcome::default();
    let dom = hv
        .domain(&st.vm)
        .map_err(|e| src(e, format!("look up domain {}", st.vm)))?;
    if st.phase != Phase::Committing {
        st.phase = Phase::Committing;
        state::save(st)?;
    }
    let active = dom.is_active().map_err(|e| src(e, "query domain state"))?;
    let mut first = true;
    if active {
        let live = dom.xml(false).map_err(|e| src(e, "read domain XML"))?;
        let tops = top_sources(&live)?;
        for d in &st.disks {
            match tops.get(&d.target) {
                Some(top) if top == &d.overlay => {
                    dom.block_commit(&d.target).map_err(|e| {
                        src(e, format!("commit {} into {}", d.overlay.display(), d.base.display()))
                    })?;
                    if first {
                        crash_point("commit-after-first-pivot");
                        first = false;
                    }
                }
                Some(top) if top == &d.base => {}
                Some(top) if mentions(&live, &d.overlay) => {
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!(
                            "disk {} of {} runs on {}, on top of the rollback overlay: consolidate that snapshot first",
                            d.target, st.vm, top.display()
                        ),
                    ))
                }
                _ => {}
            }
        }
        // libvirt updates the persistent definition on pivot; make sure.
        redefine_on_bases(hv, &dom, st)?;
    } else {
        let inactive = dom
            .xml(true)
            .map_err(|e| src(e, "read persistent domain XML"))?;
        let tops = top_sources(&inactive)?;
        for d in &st.disks {
            if tops.get(&d.target) == Some(&d.overlay) {
                offline_commit(d)?;
                if first {
                    crash_point("commit-after-first-pivot");
                    first = false;
                }
            }
        }
        redefine_on_bases(hv, &dom, st)?;
    }
    crash_point("commit-before-cleanup");
    dom.delete_snapshot_metadata(&st.snapshot)
        .map_err(|e| src(e, "delete the snapshot metadata"))?;
    out.deleted = delete_files(&dom, st)?;
    archive(st);
    state::remove(&st.vm)?;
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// `qemu-img commit` of a shut-off disk's overlay into its base, then the overlay's bitmaps
/// merged into the base's (what libvirt does on a live commit). Idempotent.
fn offline_commit(d: &RbDisk) -> Result<()> {
    qemu_img(&[
        "commit".as_ref(),
        "-q".as_ref(),
        "-d".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        d.overlay.as_os_str(),
    ])?;
    if d.base_format != "qcow2" {
        return Ok(());
    }
    let base_bitmaps = bitmaps(&d.base, &d.base_format)?;
    for b in bitmaps(&d.overlay, "qcow2")? {
        if !base_bitmaps.contains(&b) {
            qemu_img(&[
                "bitmap".as_ref(),
                "--add".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                d.base.as_os_str(),
                b.as_ref(),
            ])?;
        }
        qemu_img(&[
            "bitmap".as_ref(),
            "--merge".as_ref(),
            b.as_ref(),
            "-b".as_ref(),
            d.overlay.as_os_str(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            d.base.as_os_str(),
            b.as_ref(),
        ])?;
    }
    Ok(())
}

/// Keeps the last consolidated point's record (`<vm>.last.json`): `rollback` then knows which
/// backup to offer.
fn archive(st: &RollbackState) {
    let mut last = st.clone();
    last.updated = Timestamp::now();
    if let Ok(data) = serde_json::to_vec_pretty(&last) {
        let _ = std::fs::write(state::dir().join(format!("{}.last", st.vm)), data);
    }
}

/// Rebuilds the state of a Lifeboat rollback snapshot whose state file is lost (state
/// directory wiped, restored host): overlays from the snapshot XML, bases from the overlays'
/// backing files, expiry from the description. `None` when it cannot be rebuilt safely (no
/// expiry recorded, an overlay without a backing file).
pub fn adopt(
    dom: &Dom,
    uri: &str,
    snap: &libvirt::snapshot::SnapshotInfo,
) -> Result<Option<RollbackState>> {
    let Some(expires) = snap
        .description
        .as_deref()
        .and_then(|d| d.split("expires: ").nth(1))
        .and_then(|r| r.split(';').next())
        .and_then(|t| t.trim().parse::<Timestamp>().ok())
    else {
        return Ok(None);
    };
    let created = Timestamp::from_second(snap.creation_time).unwrap_or(expires);
    let mut disks = Vec::new();
    for d in snap.disks.iter().filter(|d| d.snapshot == "external") {
        let Some(overlay) = d.file.clone() else {
            return Ok(None);
        };
        let out = qemu_img(&[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            overlay.as_os_str(),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out).ctx(ErrorKind::Other, || {
            "qemu-img info printed invalid JSON".into()
        })?;
        let base = v
            .get("full-backing-filename")
            .or_else(|| v.get("backing-filename"))
            .and_then(|b| b.as_str());
        let format = v.get("backing-filename-format").and_then(|b| b.as_str());
        let (Some(base), Some(format)) = (base, format) else {
            return Ok(None);
        };
        disks.push(RbDisk {
            target: d.name.clone(),
            base: PathBuf::from(base),
            base_format: format.to_string(),
            overlay,
        });
    }
    if disks.is_empty() {
        return Ok(None);
    }
    Ok(Some(RollbackState {
        version: 1,
        vm: dom.name().to_string(),
        uuid: dom.uuid().map_err(|e| src(e, "read domain UUID"))?,
        uri: uri.to_string(),
        snapshot: snap.name.clone(),
        reason: snap
            .description
            .as_deref()
            .and_then(|d| d.split("reason: ").nth(1))
            .and_then(|r| r.split(';').next())
            .map(str::to_owned),
        created,
        expires,
        disks,
        memory: snap.memory_file.clone(),
        memory_frozen: true,
        backup: None,
        complete: true,
        phase: Phase::Ready,
        updated: Timestamp::now(),
    }))
}

/// The last consolidated point of `vm`, if recorded.
pub fn last(vm: &str) -> Option<RollbackState> {
    let data = std::fs::read(state::dir().join(format!("{vm}.last"))).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Finishes or undoes an interrupted run, from the journal. Returns a description of what
/// was found and done, or `None` when the state is a normal, complete rollback point.
pub fn repair(hv: &Hypervisor, st: &mut RollbackState) -> Result<Option<String>> {
    match (st.phase, st.complete) {
        (Phase::Ready, true) => Ok(None),
        (Phase::RollingBack, _) => {
            let o = rollback(hv, st)?;
            Ok(Some(format!(
                "an interrupted rollback of {} was finished ({:.1} s){}",
                st.vm,
                o.seconds,
                notes(&o)
            )))
        }
        (Phase::Committing, _) => {
            let o = consolidate(hv, st)?;
            Ok(Some(format!(
                "an interrupted consolidation of {} was finished ({:.1} s){}",
                st.vm,
                o.seconds,
                notes(&o)
            )))
        }
        (Phase::Creating, _) | (Phase::Ready, false) => {
            // `protect` died before its backup committed: the point is not what was asked
            // for, so it is consolidated (nothing lingers).
            let dom = hv
                .domain(&st.vm)
                .map_err(|e| src(e, format!("look up domain {}", st.vm)))?;
            let exists = overlays_in_use(&dom, st)?;
            if exists {
                let o = consolidate(hv, st)?;
                Ok(Some(format!(
                    "protect of {} was interrupted before it completed (its backup may not have committed): its rollback point was consolidated ({:.1} s); run protect again",
                    st.vm, o.seconds
                )))
            } else {
                dom.delete_snapshot_metadata(&st.snapshot)
                    .map_err(|e| src(e, "delete the snapshot metadata"))?;
                let gone = delete_files(&dom, st)?;
                state::remove(&st.vm)?;
                Ok(Some(format!(
                    "protect of {} was interrupted before its rollback point was taken; cleaned up {} file(s); run protect again",
                    st.vm,
                    gone.len()
                )))
            }
        }
    }
}

fn notes(o: &Outcome) -> String {
    if o.notes.is_empty() {
        String::new()
    } else {
        format!("; {}", o.notes.join("; "))
    }
}

/// Parses `4h`, `30m`, `1d`, `90s`, `2w` (also combined: `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::new(
            ErrorKind::Usage,
            format!("bad duration {s:?} (expected e.g. 4h, 30m, 1d, 90s)"),
        )
    };
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let mult = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604800,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(mult)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        any = true;
    }
    if !num.is_empty() || !any || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(14400));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        for bad in ["", "4", "h", "4x", "0s", "-1h", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mentions_matches_escaped() {
        assert!(mentions("<source file='/a/b&amp;c'/>", Path::new("/a/b&c")));
        assert!(!mentions("<source file='/a/b'/>", Path::new("/a/c")));
    }
}
