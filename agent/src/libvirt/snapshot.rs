//! Snapshots and block commit, for rollback points (`lifeboat protect` / `rollback` / `commit`)
//! and the snapshot audit.
//!
//! Verified against libvirt 9.0 / QEMU 7.2 (`tests/tests/protect.rs`):
//! - an external disk-only snapshot (`DISK_ONLY | ATOMIC`) creates one qcow2 overlay per disk
//!   and switches the running domain (and its persistent definition) to it; libvirt copies the
//!   active checkpoint bitmaps into the overlay, so incremental backups go on;
//! - libvirt 9.0 cannot revert external snapshots: the caller stops the domain, points the
//!   disks back to the base images ([`set_disk_sources`]) and redefines;
//! - an active block commit (`ACTIVE | SHALLOW`) merges the overlay into its backing image
//!   and, once pivoted, the domain runs on the base image again; libvirt merges the overlay's
//!   bitmaps into the base image's, so checkpoints stay valid;
//! - for a shut-off domain libvirt 9.0 refuses an external snapshot while checkpoints exist
//!   ("cannot perform block operations while checkpoint exists"): `rollback::take` then makes the
//!   overlays itself;
//! - a snapshot or backup job is a domain "async job": a snapshot cannot be created while a
//!   backup job runs, so a rollback point is taken after the freeze and before the backup job
//!   begins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roxmltree::{Document, Node};
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;
use virt::sys;

use super::error::{ErrorKind, LibvirtError, Result};
use super::xml::escape;
use super::{cstring, ffi, Dom, Hypervisor};

fn invalid(msg: impl Into<String>) -> LibvirtError {
    LibvirtError::new(ErrorKind::InvalidData, msg)
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a, 'i: 'a>(n: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child_text(n: Node<'_, '_>, name: &str) -> Option<String> {
    child(n, name).and_then(|c| c.text()).map(str::to_owned)
}

fn path_str<'a>(what: &str, p: &'a Path) -> Result<&'a str> {
    let s = p
        .to_str()
        .ok_or_else(|| invalid(format!("{what} path {} is not UTF-8", p.display())))?;
    if !p.is_absolute() || s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} path {s:?} must be absolute and printable"
        )));
    }
    Ok(s)
}

/// One disk of an external snapshot: its new overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDiskSpec {
    /// Disk target (`vda`).
    pub target: String,
    /// The new overlay file (qcow2) libvirt creates.
    pub overlay: PathBuf,
}

/// An external snapshot to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// Snapshot name.
    pub name: String,
    /// Free text (`<description>`).
    pub description: String,
    /// Disks that get an overlay.
    pub disks: Vec<SnapshotDiskSpec>,
    /// Disks left out (`snapshot='no'`): CD-ROMs, read-only or shareable disks.
    pub excluded: Vec<String>,
    /// External memory state file; `None` = disk-only snapshot.
    pub memory: Option<PathBuf>,
}

/// Builds the `<domainsnapshot>` XML of an external snapshot.
pub fn snapshot_xml(spec: &SnapshotSpec) -> Result<String> {
    if spec.name.is_empty() || spec.name.chars().any(|c| c.is_control() || c == '/') {
        return Err(invalid(format!("invalid snapshot name {:?}", spec.name)));
    }
    if spec.disks.is_empty() {
        return Err(invalid("snapshot without disks"));
    }
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", escape(&spec.name)));
    x.push_str(&format!(
        "  <description>{}</description>\n",
        escape(&spec.description)
    ));
    match &spec.memory {
        Some(m) => x.push_str(&format!(
            "  <memory snapshot='external' file='{}'/>\n",
            escape(path_str("memory state", m)?)
        )),
        None => x.push_str("  <memory snapshot='no'/>\n"),
    }
    x.push_str("  <disks>\n");
    for d in &spec.disks {
        x.push_str(&format!(
            "    <disk name='{}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>\n",
            escape(&d.target),
            escape(path_str("overlay", &d.overlay)?)
        ));
    }
    for t in &spec.excluded {
        x.push_str(&format!("    <disk name='{}' snapshot='no'/>\n", escape(t)));
    }
    x.push_str("  </disks>\n</domainsnapshot>\n");
    Ok(x)
}

/// One disk of a snapshot, as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDiskInfo {
    /// Disk target.
    pub name: String,
    /// `internal`, `external` or `no`.
    pub snapshot: String,
    /// The overlay (external snapshots).
    pub file: Option<PathBuf>,
}

/// A snapshot, as read from `virDomainSnapshotGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// `<description>`, if any.
    pub description: Option<String>,
    /// Creation time, seconds since the Unix epoch (0 if absent).
    pub creation_time: i64,
    /// Domain state when taken (`running`, `shutoff`, `disk-snapshot`, ...).
    pub state: String,
    /// `<memory snapshot=...>`: `no`, `internal`, `external`.
    pub memory: String,
    /// External memory state file.
    pub memory_file: Option<PathBuf>,
    /// Disks.
    pub disks: Vec<SnapshotDiskInfo>,
}

impl SnapshotInfo {
    /// External if any disk or the memory is external, else internal.
    pub fn is_external(&self) -> bool {
        self.memory == "external" || self.disks.iter().any(|d| d.snapshot == "external")
    }
}

/// Parses a `<domainsnapshot>` XML.
pub fn parse_snapshot_xml(xml: &str) -> Result<SnapshotInfo> {
    let doc = Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, "parse snapshot XML", e))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domainsnapshot" {
        return Err(invalid(format!(
            "expected <domainsnapshot>, found <{}>",
            root.tag_name().name()
        )));
    }
    let name = child_text(root, "name").ok_or_else(|| invalid("snapshot XML has no <name>"))?;
    let creation_time = child_text(root, "creationTime")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let mem = child(root, "memory");
    let mut disks = Vec::new();
    if let Some(ds) = child(root, "disks") {
        for d in children(ds, "disk") {
            disks.push(SnapshotDiskInfo {
                name: d.attribute("name").unwrap_or("").to_owned(),
                snapshot: d.attribute("snapshot").unwrap_or("").to_owned(),
                file: child(d, "source")
                    .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                    .map(PathBuf::from),
            });
        }
    }
    Ok(SnapshotInfo {
        name,
        description: child_text(root, "description"),
        creation_time,
        state: child_text(root, "state").unwrap_or_default(),
        memory: mem
            .and_then(|m| m.attribute("snapshot"))
            .unwrap_or("no")
            .to_owned(),
        memory_file: mem.and_then(|m| m.attribute("file")).map(PathBuf::from),
        disks,
    })
}

/// A disk's new source for [`set_disk_sources`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSourceSpec {
    /// Image file.
    pub path: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
}

/// Points the listed disks (by target) of a domain XML at new image files, in place: the
/// `<source file>` and `<driver type>` values change and any `<backingStore>` of that disk is
/// removed (libvirt probes the chain again). Everything else stays byte for byte. Every listed
/// target must exist as a `type='file'` disk.
pub fn set_disk_sources(xml: &str, disks: &BTreeMap<String, DiskSourceSpec>) -> Result<String> {
    let doc = Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, "parse domain XML", e))?;
    let root = doc.root_element();
    let devices = child(root, "devices").ok_or_else(|| invalid("domain XML has no <devices>"))?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut seen = Vec::new();
    for disk in children(devices, "disk") {
        let Some(target) = child(disk, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let Some(spec) = disks.get(target) else {
            continue;
        };
        if disk.attribute("type").unwrap_or("file") != "file" {
            return Err(invalid(format!("disk {target} is not a file disk")));
        }
        let path = escape(path_str("disk", &spec.path)?);
        let src =
            child(disk, "source").ok_or_else(|| invalid(format!("disk {target}: no <source>")))?;
        let attr = src
            .attributes()
            .find(|a| a.name() == "file")
            .ok_or_else(|| invalid(format!("disk {target}: <source> without file")))?;
        edits.push((attr.range_value(), path));
        if let Some(drv) = child(disk, "driver") {
            if let Some(a) = drv.attributes().find(|a| a.name() == "type") {
                edits.push((a.range_value(), escape(&spec.format)));
            }
        }
        for bs in children(disk, "backingStore") {
            edits.push((bs.range(), String::new()));
        }
        seen.push(target.to_owned());
    }
    for t in disks.keys() {
        if !seen.contains(t) {
            return Err(invalid(format!("domain XML has no disk {t}")));
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut pos = 0;
    for (r, s) in edits {
        if r.start < pos {
            return Err(invalid("overlapping XML edits"));
        }
        out.push_str(
            xml.get(pos..r.start)
                .ok_or_else(|| invalid("bad XML range"))?,
        );
        out.push_str(&s);
        pos = r.end;
    }
    out.push_str(xml.get(pos..).ok_or_else(|| invalid("bad XML range"))?);
    Ok(out)
}

/// Replaces (or adds) the `<description>` of a `<domainsnapshot>` XML, in place.
pub fn replace_description(xml: &str, description: &str) -> Result<String> {
    let doc = Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, "parse snapshot XML", e))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domainsnapshot" {
        return Err(invalid("not a <domainsnapshot>"));
    }
    let new = format!("<description>{}</description>", escape(description));
    let (range, text) = match child(root, "description") {
        Some(d) => (d.range(), new),
        None => {
            let name = child(root, "name").ok_or_else(|| invalid("snapshot XML has no <name>"))?;
            (name.range().end..name.range().end, format!("\n  {new}"))
        }
    };
    let mut out = String::with_capacity(xml.len() + text.len());
    out.push_str(
        xml.get(..range.start)
            .ok_or_else(|| invalid("bad XML range"))?,
    );
    out.push_str(&text);
    out.push_str(
        xml.get(range.end..)
            .ok_or_else(|| invalid("bad XML range"))?,
    );
    Ok(out)
}

/// How long [`Dom::block_commit`] waits for the commit job to become ready.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

impl Dom {
    fn snapshot(&self, name: &str) -> Result<DomainSnapshot> {
        cstring("snapshot name", name)?;
        DomainSnapshot::lookup_by_name(&self.dom, name, 0)
            .map_err(|e| self.err(&format!("look up snapshot {name}"), e))
    }

    /// Creates an external snapshot (`ATOMIC`, and `DISK_ONLY` when there is no memory file).
    /// Does not quiesce: the caller freezes the guest around it.
    pub fn create_external_snapshot(&self, spec: &SnapshotSpec) -> Result<()> {
        let xml = snapshot_xml(spec)?;
        cstring("snapshot XML", &xml)?;
        let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        if spec.memory.is_none() {
            flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY;
        }
        DomainSnapshot::create_xml(&self.dom, &xml, flags)
            .map_err(|e| self.err(&format!("create snapshot {}", spec.name), e))?;
        Ok(())
    }

    /// All snapshots (internal and external) with metadata, parsed.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let list = self
            .dom
            .list_all_snapshots(0)
            .map_err(|e| self.err("list snapshots", e))?;
        list.iter()
            .map(|s| {
                let xml = s
                    .get_xml_desc(0)
                    .map_err(|e| self.err("get snapshot XML", e))?;
                parse_snapshot_xml(&xml)
            })
            .collect()
    }

    /// Deletes libvirt's record of a snapshot (`METADATA_ONLY`); images stay. Missing
    /// snapshot → `Ok(false)`.
    pub fn delete_snapshot_metadata(&self, name: &str) -> Result<bool> {
        let s = match self.snapshot(name) {
            Ok(s) => s,
            Err(e) if e.virt_code() == Some(virt::error::ErrorNumber::NoDomainSnapshot) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        s.delete(sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            .map_err(|e| self.err(&format!("delete snapshot metadata {name}"), e))?;
        Ok(true)
    }

    /// Replaces a snapshot's `<description>` (as `virsh snapshot-edit` does: the snapshot's
    /// own XML, edited, redefined with `REDEFINE`). Images are not touched.
    pub fn set_snapshot_description(&self, name: &str, description: &str) -> Result<()> {
        let s = self.snapshot(name)?;
        let xml = s
            .get_xml_desc(0)
            .map_err(|e| self.err(&format!("get XML of snapshot {name}"), e))?;
        let new = replace_description(&xml, description)?;
        cstring("snapshot XML", &new)?;
        DomainSnapshot::create_xml(&self.dom, &new, sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
            .map_err(|e| self.err(&format!("redefine snapshot {name}"), e))?;
        Ok(())
    }

    /// Commits the active image of disk `target` into its backing image and pivots to it:
    /// starts an active block commit (unless one already runs on the disk, e.g. left by a
    /// killed run), waits until it is ready (at most [`COMMIT_TIMEOUT`]), then pivots.
    pub fn block_commit(&self, target: &str) -> Result<()> {
        let t = cstring("disk target", target)?;
        if self.block_job(target)?.is_none() {
            ffi::block_commit_active(&self.dom, &t)
                .map_err(|e| self.err(&format!("start block commit of {target}"), e))?;
        }
        let start = Instant::now();
        loop {
            let ready = match self.block_job(target)? {
                Some((cur, end)) => cur == end,
                None => {
                    return Err(LibvirtError::new(
                        ErrorKind::Other,
                        format!(
                            "block commit of {target} (domain {}) ended before the pivot",
                            self.name
                        ),
                    ))
                }
            };
            if ready {
                match ffi::block_job_abort(&self.dom, &t, true) {
                    Ok(()) => return Ok(()),
                    // "not ready for pivot yet": cur == end is seen before QEMU's READY event.
                    Err(e) if e.code() == virt::error::ErrorNumber::BlockCopyActive => {}
                    Err(e) if e.message().contains("not ready") => {}
                    Err(e) => return Err(self.err(&format!("pivot block commit of {target}"), e)),
                }
            }
            if start.elapsed() > COMMIT_TIMEOUT {
                return Err(LibvirtError::new(
                    ErrorKind::JobActive,
                    format!(
                        "block commit of {target} (domain {}) not ready after {}s",
                        self.name,
                        COMMIT_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cancels the block job on `target` without pivoting, if one runs.
    pub fn block_job_cancel(&self, target: &str) -> Result<()> {
        let t = cstring("disk target", target)?;
        if self.block_job(target)?.is_some() {
            ffi::block_job_abort(&self.dom, &t, false)
                .map_err(|e| self.err(&format!("cancel block job on {target}"), e))?;
        }
        Ok(())
    }
}

impl Hypervisor {
    /// The domain XML stored in a memory state file (`virDomainSaveImageGetXMLDesc`).
    pub fn save_image_xml(&self, file: &Path) -> Result<String> {
        let f = path_str("memory state", file)?;
        cstring("memory state path", f)?;
        Domain::save_image_get_xml_desc(&self.conn, f, 0).map_err(|e| {
            LibvirtError::from_virt(format!("read the domain XML of {}", file.display()), e)
        })
    }

    /// Starts a domain from a memory state file with `xml` (e.g. [`Hypervisor::save_image_xml`]
    /// with other disk sources) as its configuration, running.
    pub fn restore_memory(&self, file: &Path, xml: &str) -> Result<()> {
        let f = cstring("memory state path", path_str("memory state", file)?)?;
        let x = cstring("domain XML", xml)?;
        ffi::restore_flags(&self.conn, &f, &x).map_err(|e| {
            LibvirtError::from_virt(format!("restore memory state {}", file.display()), e)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_xml_roundtrip() {
        let spec = SnapshotSpec {
            name: "lifeboat-rb-1".into(),
            description: "reason=<kernel> & co".into(),
            disks: vec![SnapshotDiskSpec {
                target: "vda".into(),
                overlay: "/img/a.lifeboat-rb-1.qcow2".into(),
            }],
            excluded: vec!["sda".into()],
            memory: Some("/img/vm.mem".into()),
        };
        let xml = snapshot_xml(&spec).unwrap();
        let info = parse_snapshot_xml(&xml).unwrap();
        assert_eq!(info.name, "lifeboat-rb-1");
        assert_eq!(info.description.as_deref(), Some("reason=<kernel> & co"));
        assert_eq!(info.memory, "external");
        assert_eq!(info.disks.len(), 2);
        assert_eq!(
            info.disks[0].file.as_deref(),
            Some(Path::new("/img/a.lifeboat-rb-1.qcow2"))
        );
        assert!(info.is_external());
        assert!(snapshot_xml(&SnapshotSpec {
            name: "a/b".into(),
            ..spec.clone()
        })
        .is_err());
        assert!(snapshot_xml(&SnapshotSpec {
            disks: vec![SnapshotDiskSpec {
                target: "vda".into(),
                overlay: "relative.qcow2".into()
            }],
            ..spec
        })
        .is_err());
    }

    #[test]
    fn set_disk_sources_edits_in_place() {
        let xml = "<domain><name>x</name><!-- keep -->\n<devices>\n<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/a.rb.qcow2' index='2'/><backingStore type='file' index='1'><format type='raw'/><source file='/i/a.raw'/><backingStore/></backingStore><target dev='vda' bus='virtio'/></disk>\n<disk type='file' device='cdrom'><source file='/i/cd.iso'/><target dev='sda'/></disk></devices></domain>";
        let mut m = BTreeMap::new();
        m.insert(
            "vda".to_string(),
            DiskSourceSpec {
                path: "/i/a.raw".into(),
                format: "raw".into(),
            },
        );
        let out = set_disk_sources(xml, &m).unwrap();
        assert_eq!(out, "<domain><name>x</name><!-- keep -->\n<devices>\n<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/i/a.raw' index='2'/><target dev='vda' bus='virtio'/></disk>\n<disk type='file' device='cdrom'><source file='/i/cd.iso'/><target dev='sda'/></disk></devices></domain>");
        m.insert(
            "vdz".to_string(),
            DiskSourceSpec {
                path: "/i/z".into(),
                format: "raw".into(),
            },
        );
        assert!(set_disk_sources(xml, &m).is_err());
    }

    #[test]
    fn description_is_replaced_or_added() {
        let x = "<domainsnapshot>\n  <name>a</name>\n  <description>old</description>\n  <state>running</state>\n</domainsnapshot>";
        let out = replace_description(x, "new & <b>").unwrap();
        assert_eq!(
            parse_snapshot_xml(&out).unwrap().description.as_deref(),
            Some("new & <b>")
        );
        assert!(out.contains("<state>running</state>"));
        let x = "<domainsnapshot>\n  <name>a</name>\n  <state>running</state>\n</domainsnapshot>";
        let out = replace_description(x, "d").unwrap();
        assert_eq!(
            parse_snapshot_xml(&out).unwrap().description.as_deref(),
            Some("d")
        );
        assert!(replace_description("<domain/>", "d").is_err());
    }

    #[test]
    fn parse_snapshot_rejects_garbage() {
        assert!(parse_snapshot_xml("<domain/>").is_err());
        assert!(parse_snapshot_xml("<domainsnapshot>").is_err());
        assert!(parse_snapshot_xml("<domainsnapshot/>").is_err());
    }
}
