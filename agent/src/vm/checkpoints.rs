//! Our checkpoints: naming, validation of the base, deletion, leftovers of killed runs.
//!
//! Names are `lifeboat-<repo id, 8 hex>-<unix time>-<n>`; only names with this repository's
//! prefix are ever deleted. A checkpoint is a valid base only once the snapshot that recorded
//! it is committed (manifest metadata `checkpoint` and `checkpoint_xml`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::{self, Dom, JobKind, Redefined};

/// Per-run socket directories live here (`<domain>.<pid>/`), owned by libvirt-qemu.
pub const RUN_DIR: &str = "/run/lifeboat";
/// Scratch (fleecing) files: `<SCRATCH_DIR>/<domain>/<target>.<pid>.qcow2`.
pub const SCRATCH_DIR: &str = "/var/lib/lifeboat/scratch";

/// The prefix of this repository's checkpoints: `lifeboat-<8 hex>-`.
pub fn prefix(repo_id: &str) -> String {
    format!("lifeboat-{}-", repo_id.get(..8).unwrap_or(repo_id))
}

/// A new checkpoint name not in `existing`.
pub fn new_name(repo_id: &str, existing: &[String]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let p = prefix(repo_id);
    (0u32..)
        .map(|n| format!("{p}{now}-{n}"))
        .find(|c| !existing.contains(c))
        .unwrap_or_else(|| format!("{p}{now}-x"))
}

/// Removes `<parent>…</parent>` from a checkpoint XML: the stored XML names the parent it had
/// when created, which we have since pruned; libvirt would refuse to redefine it.
pub fn strip_parent(xml: &str) -> String {
    match (xml.find("<parent>"), xml.find("</parent>")) {
        (Some(a), Some(b)) if b > a => {
            let mut s = xml[..a].to_string();
            s.push_str(&xml[b + "</parent>".len()..]);
            s
        }
        _ => xml.to_string(),
    }
}

/// Outcome of checking the base checkpoint of a running domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// Usable; `redefined` when its metadata had to be recreated from the repository.
    Usable {
        /// Checkpoint name.
        name: String,
        /// Disks with a bitmap in it.
        disks: Vec<String>,
        /// Metadata recreated from the stored XML.
        redefined: bool,
    },
    /// Not usable: every disk is backed up in full, for this reason.
    Unusable(String),
}

/// Validate `name` on a running domain: libvirt's metadata if present, else the XML stored in
/// the repository; `REDEFINE_VALIDATE` makes libvirt check that the bitmaps are in QEMU.
pub fn validate_live(dom: &Dom, name: &str, stored_xml: Option<&str>) -> Base {
    let (xml, redefined) = match dom.checkpoint_xml(name) {
        Ok(x) => (x, false),
        Err(e) if e.kind() == libvirt::ErrorKind::NoSuchCheckpoint => match stored_xml {
            Some(x) => (strip_parent(x), true),
            None => {
                return Base::Unusable(format!(
                    "checkpoint {name} is unknown to libvirt and the repository has no XML to redefine it"
                ))
            }
        },
        Err(e) => return Base::Unusable(format!("cannot read checkpoint {name}: {e}")),
    };
    match dom.redefine_checkpoint(&xml) {
        Ok(Redefined::Validated) | Ok(Redefined::Unvalidated) => {
            let disks = libvirt::parse_checkpoint_xml(&xml)
                .map(|c| {
                    c.disks
                        .into_iter()
                        .filter(|(_, b)| b.is_some())
                        .map(|(d, _)| d)
                        .collect()
                })
                .unwrap_or_default();
            Base::Usable {
                name: name.to_string(),
                disks,
                redefined,
            }
        }
        Err(e) => Base::Unusable(format!(
            "checkpoint {name} failed validation: its bitmap is missing or inconsistent ({e}{})",
            e.virt_code().map(|_| "").unwrap_or("")
        )),
    }
}

/// Delete checkpoint `name`. Running domain: libvirt deletes the bitmaps too. Shut-off domain:
/// libvirt's metadata only, then `qemu-img bitmap --remove` on each qcow2 disk.
pub fn delete(dom: &Dom, name: &str) -> Result<()> {
    let active = dom
        .is_active()
        .ctx(ErrorKind::Source, || "cannot query the domain state".into())?;
    match dom.delete_checkpoint(name, !active) {
        Ok(()) => {}
        Err(e) if e.kind() == libvirt::ErrorKind::NoSuchCheckpoint => {}
        Err(e) => {
            return Err(Error::with_source(
                ErrorKind::Source,
                format!("cannot delete checkpoint {name}"),
                e,
            ))
        }
    }
    if !active {
        let disks = dom
            .disks()
            .ctx(ErrorKind::Source, || "cannot list disks".into())?;
        for d in disks {
            if d.driver_type.as_deref() != Some("qcow2") || d.readonly {
                continue;
            }
            if let Some(p) = d.source_path() {
                remove_bitmap_if_present(p, name)?;
            }
        }
    }
    Ok(())
}

/// `qemu-img bitmap --remove` when the image has the bitmap (blocking, with a timeout).
pub fn remove_bitmap_if_present(image: &Path, bitmap: &str) -> Result<()> {
    let info = run_timeout(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U", "-f", "qcow2"])
            .arg(image),
    )?;
    let has = serde_json::from_slice::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| {
            v.pointer("/format-specific/data/bitmaps")
                .and_then(|b| b.as_array().cloned())
        })
        .is_some_and(|bs| bs.iter().any(|b| b["name"] == bitmap));
    if has {
        run_timeout(
            Command::new("qemu-img")
                .args(["bitmap", "--remove", "-f", "qcow2"])
                .arg(image)
                .arg(bitmap),
        )?;
    }
    Ok(())
}

fn run_timeout(cmd: &mut Command) -> Result<Vec<u8>> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ctx(ErrorKind::Source, || format!("cannot run {what}"))?;
    let start = Instant::now();
    loop {
        if let Some(_st) = child
            .try_wait()
            .ctx(ErrorKind::Source, || format!("waiting for {what}"))?
        {
            let out = child
                .wait_with_output()
                .ctx(ErrorKind::Source, || format!("reading {what}"))?;
            if !out.status.success() {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "{what} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            return Ok(out.stdout);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(ErrorKind::Source, format!("{what} timed out")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: u32) -> bool {
    pid != std::process::id()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("lifeboat"))
            .unwrap_or(false)
}

fn our_run_dirs(domain: &str) -> Vec<(PathBuf, Option<u32>)> {
    let pfx = format!("{domain}.");
    std::fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n.strip_prefix(&pfx)?.parse::<u32>().ok();
            Some((e.path(), pid))
        })
        .collect()
}

/// Before a run: refuse when another live lifeboat process backs this domain up; abort a
/// leftover backup job of ours (socket under [`RUN_DIR`]); remove stale socket and scratch
/// dirs; delete our checkpoints other than `keep`. Returns what was done.
pub fn clean_leftovers(dom: &Dom, our_prefix: &str, keep: Option<&str>) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let name = dom.name().to_string();
    for (_, pid) in our_run_dirs(&name) {
        if let Some(p) = pid.filter(|p| pid_alive(*p)) {
            return Err(Error::new(
                ErrorKind::Usage,
                format!("another lifeboat process (pid {p}) is backing up domain {name}"),
            ));
        }
    }
    match dom
        .active_job()
        .ctx(ErrorKind::Source, || "cannot query the domain's job".into())?
    {
        None => {}
        Some(JobKind::Backup) => {
            let job = dom.backup_job().ctx(ErrorKind::Source, || {
                "cannot read the running backup job".into()
            })?;
            let ours = job
                .socket
                .as_deref()
                .is_some_and(|s| s.starts_with(RUN_DIR));
            if !ours {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!("domain {name} runs a backup job that Lifeboat did not start"),
                ));
            }
            dom.abort_job().ctx(ErrorKind::Source, || {
                "cannot abort the leftover backup job".into()
            })?;
            notes.push("aborted a leftover backup job of an interrupted run".to_string());
        }
        Some(other) => {
            return Err(Error::new(
                ErrorKind::Source,
                format!("domain {name} has another job running ({other:?})"),
            ))
        }
    }
    for (dir, _) in our_run_dirs(&name) {
        if std::fs::remove_dir_all(&dir).is_ok() {
            notes.push(format!("removed stale socket dir {}", dir.display()));
        }
    }
    let scratch = Path::new(SCRATCH_DIR).join(&name);
    for e in std::fs::read_dir(&scratch).into_iter().flatten().flatten() {
        if std::fs::remove_file(e.path()).is_ok() {
            notes.push(format!("removed stale scratch file {}", e.path().display()));
        }
    }
    let cps = dom
        .checkpoints()
        .ctx(ErrorKind::Source, || "cannot list checkpoints".into())?;
    // Children first, so libvirt merges nothing into a checkpoint we delete next.
    for c in cps.iter().rev() {
        if c.name.starts_with(our_prefix) && Some(c.name.as_str()) != keep {
            delete(dom, &c.name)?;
            notes.push(format!(
                "deleted checkpoint {} (not a committed base)",
                c.name
            ));
        }
    }
    Ok(notes)
}

/// The per-run socket and scratch directories; removed on drop.
pub struct RunDirs {
    /// `/run/lifeboat/<domain>.<pid>`.
    pub run: PathBuf,
    /// `/var/lib/lifeboat/scratch/<domain>`.
    pub scratch: PathBuf,
}

impl RunDirs {
    /// Create both; the socket dir is handed to libvirt-qemu (QEMU creates the socket).
    pub fn create(domain: &str) -> Result<RunDirs> {
        let run = Path::new(RUN_DIR).join(format!("{domain}.{}", std::process::id()));
        let scratch = Path::new(SCRATCH_DIR).join(domain);
        let mk = |p: &Path| {
            std::fs::create_dir_all(p).ctx(ErrorKind::Other, || {
                format!("cannot create {}", p.display())
            })
        };
        mk(&run)?;
        let dirs = RunDirs { run, scratch };
        mk(&dirs.scratch)?;
        let out = Command::new("chown")
            .arg("libvirt-qemu:")
            .arg(&dirs.run)
            .output()
            .ctx(ErrorKind::Other, || "cannot run chown".into())?;
        if !out.status.success() {
            tracing::warn!(
                "chown libvirt-qemu {}: {}",
                dirs.run.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(dirs)
    }

    /// The NBD socket path.
    pub fn socket(&self) -> PathBuf {
        self.run.join("nbd.sock")
    }

    /// A scratch file for `target`.
    pub fn scratch_file(&self, target: &str) -> PathBuf {
        self.scratch
            .join(format!("{target}.{}.qcow2", std::process::id()))
    }
}

impl Drop for RunDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run);
        let me = format!(".{}.qcow2", std::process::id());
        for e in std::fs::read_dir(&self.scratch)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().ends_with(&me) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = new_name("0123456789abcdef", &[]);
        assert!(n.starts_with("lifeboat-01234567-"), "{n}");
        assert!(n.ends_with("-0"));
        let n2 = new_name("0123456789abcdef", std::slice::from_ref(&n));
        assert!(n2.ends_with("-1"), "{n2}");
        assert_eq!(
            strip_parent("<a><parent>\n<name>x</name>\n</parent><b/></a>"),
            "<a><b/></a>"
        );
    }
}
