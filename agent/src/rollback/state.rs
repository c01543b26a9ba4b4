//! The rollback point's state file: `/var/lib/lifeboat/rollback/<vm>.json`, a small journal.
//!
//! The phase is written (atomically: temp file + fsync + rename + directory fsync) *before*
//! each irreversible step, so a run killed at any point leaves a file that tells the next run
//! whether to finish or undo. A per-VM lock file (`<vm>.lock`, `flock`) keeps two commands
//! from working on the same VM; the kernel drops it when a process dies, so a held lock means
//! a live command.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, ErrorKind, Result};

/// Default directory of the state files.
pub const DEFAULT_DIR: &str = "/var/lib/lifeboat/rollback";
/// Overrides [`DEFAULT_DIR`] (tests, non-root setups).
pub const DIR_ENV: &str = "LIFEBOAT_ROLLBACK_DIR";

/// The state directory.
pub fn dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Where the rollback point is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `protect` is about to create the snapshot (it may or may not exist).
    Creating,
    /// The snapshot exists; `protect` has finished when [`RollbackState::complete`] is set.
    Ready,
    /// `rollback` started: finish it.
    RollingBack,
    /// Consolidation (`commit`, `reconcile`, or undo of a failed `protect`) started: finish it.
    Committing,
}

/// One disk of a rollback point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbDisk {
    /// Target (`vda`).
    pub target: String,
    /// The image the disk used before: never deleted.
    pub base: PathBuf,
    /// Its format.
    pub base_format: String,
    /// The overlay the snapshot created.
    pub overlay: PathBuf,
}

/// The backup `protect` took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRef {
    /// Repository location.
    pub repo: Option<String>,
    /// Snapshot id.
    pub snapshot: String,
}

/// The state file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackState {
    /// Format version (1).
    pub version: u32,
    /// Domain name.
    pub vm: String,
    /// Domain UUID.
    pub uuid: String,
    /// libvirt URI.
    pub uri: String,
    /// libvirt snapshot name.
    pub snapshot: String,
    /// Why (`--reason`).
    pub reason: Option<String>,
    /// When the point was taken.
    pub created: Timestamp,
    /// When `reconcile` consolidates it.
    pub expires: Timestamp,
    /// Disks with overlays.
    pub disks: Vec<RbDisk>,
    /// External memory state file (`--memory`).
    pub memory: Option<PathBuf>,
    /// The memory state was taken with the guest filesystems frozen: thaw after restoring it.
    pub memory_frozen: bool,
    /// The backup taken with it (set once committed).
    pub backup: Option<BackupRef>,
    /// `protect` finished (backup committed).
    pub complete: bool,
    /// Journal phase.
    pub phase: Phase,
    /// Last change.
    pub updated: Timestamp,
}

impl RollbackState {
    /// Has it expired at `now`?
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires <= now
    }
}

/// Path of the state file of `vm`.
pub fn path(vm: &str) -> Result<PathBuf> {
    if vm.is_empty() || vm.contains('/') || vm.starts_with('.') || vm.contains('\0') {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("domain name {vm:?} cannot name a state file"),
        ));
    }
    Ok(dir().join(format!("{vm}.json")))
}

/// Loads the state of `vm`, if any.
pub fn load(vm: &str) -> Result<Option<RollbackState>> {
    let p = path(vm)?;
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::with_source(
                ErrorKind::Other,
                format!("cannot read {}", p.display()),
                e,
            ))
        }
    };
    serde_json::from_slice(&data)
        .ctx(ErrorKind::Other, || {
            format!("rollback state file {} is damaged", p.display())
        })
        .map(Some)
}

/// All state files (VM names), for `reconcile` and the audit.
pub fn list() -> Result<Vec<String>> {
    let d = dir();
    let rd = match std::fs::read_dir(&d) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::with_source(
                ErrorKind::Other,
                format!("cannot list {}", d.display()),
                e,
            ))
        }
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(vm) = n.strip_suffix(".json") {
            if !vm.starts_with('.') {
                out.push(vm.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(d: &Path) {
    if let Ok(f) = File::open(d) {
        let _ = f.sync_all();
    }
}

/// Writes the state atomically (temp + fsync + rename + directory fsync), stamping `updated`.
pub fn save(st: &mut RollbackState) -> Result<()> {
    st.updated = Timestamp::now();
    let p = path(&st.vm)?;
    let d = dir();
    std::fs::create_dir_all(&d).ctx(ErrorKind::Other, || {
        format!("cannot create {}", d.display())
    })?;
    let tmp = d.join(format!(".{}.json.tmp", st.vm));
    let data = serde_json::to_vec_pretty(st).ctx(ErrorKind::Other, || {
        "cannot encode the rollback state".into()
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    };
    write().ctx(ErrorKind::Other, || format!("cannot write {}", p.display()))?;
    sync_dir(&d);
    Ok(())
}

/// Removes the state file of `vm` (gone already is fine).
pub fn remove(vm: &str) -> Result<()> {
    let p = path(vm)?;
    match std::fs::remove_file(&p) {
        Ok(()) => {
            sync_dir(&dir());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::with_source(
            ErrorKind::Other,
            format!("cannot remove {}", p.display()),
            e,
        )),
    }
}

/// A held per-VM lock (released on drop or process death).
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

/// Takes the per-VM lock without waiting: a held lock means another live command.
pub fn lock(vm: &str) -> Result<VmLock> {
    path(vm)?;
    let d = dir();
    std::fs::create_dir_all(&d).ctx(ErrorKind::Other, || {
        format!("cannot create {}", d.display())
    })?;
    let p = d.join(format!("{vm}.lock"));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .ctx(ErrorKind::Other, || format!("cannot open {}", p.display()))?;
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!(
                "another lifeboat command is working on the rollback point of {vm} (lock {} held)",
                p.display()
            ),
        ));
    }
    Ok(VmLock { _file: f })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrip_json() {
        let st = RollbackState {
            version: 1,
            vm: "web".into(),
            uuid: "u".into(),
            uri: "qemu:///system".into(),
            snapshot: "lifeboat-rb-x".into(),
            reason: Some("kernel".into()),
            created: "2026-11-25T10:00:00Z".parse().unwrap(),
            expires: "2026-11-25T14:00:00Z".parse().unwrap(),
            disks: vec![RbDisk {
                target: "vda".into(),
                base: "/i/a.qcow2".into(),
                base_format: "qcow2".into(),
                overlay: "/i/a.qcow2.lifeboat-rb-x.qcow2".into(),
            }],
            memory: None,
            memory_frozen: false,
            backup: None,
            complete: false,
            phase: Phase::Creating,
            updated: "2026-11-25T10:00:00Z".parse().unwrap(),
        };
        let j = serde_json::to_string(&st).unwrap();
        assert!(j.contains("\"phase\":\"creating\""));
        let back: RollbackState = serde_json::from_str(&j).unwrap();
        assert_eq!(back, st);
        assert!(st.expired("2026-11-25T14:00:00Z".parse().unwrap()));
        assert!(!st.expired("2026-11-25T13:59:59Z".parse().unwrap()));
        assert!(path("../x").is_err());
        assert!(path(".hidden").is_err());
    }
}
