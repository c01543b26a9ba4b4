//! Pure XML helpers: read domain / checkpoint / backup XML, build backup and checkpoint XML.
//!
//! Nothing here talks to libvirt. Reading uses `roxmltree`; writing is done by hand with
//! [`escape`] on every value we insert, so names and paths can never change the structure.

use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use super::error::{ErrorKind, LibvirtError, Result};

/// How a disk is presented to the guest (`<disk device='...'>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDevice {
    /// A hard disk (`disk`, the default when the attribute is absent).
    Disk,
    /// A CD-ROM.
    Cdrom,
    /// A floppy.
    Floppy,
    /// A SCSI LUN passed through.
    Lun,
    /// Anything else libvirt may add later.
    Other(String),
}

/// Where a disk's data lives (`<disk type='...'>` + `<source>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `type='file'`, `<source file='...'/>`.
    File(PathBuf),
    /// `type='block'`, `<source dev='...'/>`.
    Block(PathBuf),
    /// `type='network'` (protocol, e.g. `rbd`, `nbd`, `iscsi`); no local path.
    Network(String),
    /// `type='volume'` (`pool`, `volume`); libvirt resolves it, see the live XML.
    Volume {
        /// Storage pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// No `<source>` (an empty CD-ROM drive) or a type we do not know.
    None,
}

/// One `<disk>` of a domain, as far as backups care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Guest target device name (`<target dev='vda'>`); the stable key of a disk.
    pub target: String,
    /// Guest bus (`<target bus='virtio'>`), if given.
    pub bus: Option<String>,
    /// Device kind.
    pub device: DiskDevice,
    /// Host source.
    pub source: DiskSource,
    /// Image format (`<driver type='qcow2'>`), if given.
    pub driver_type: Option<String>,
    /// `<readonly/>` present.
    pub readonly: bool,
    /// `<shareable/>` present.
    pub shareable: bool,
}

impl DiskInfo {
    /// The local path of the source, for file and block sources.
    pub fn source_path(&self) -> Option<&Path> {
        match &self.source {
            DiskSource::File(p) | DiskSource::Block(p) => Some(p),
            _ => None,
        }
    }
}

/// What we need to know about a domain from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXmlInfo {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, if present.
    pub uuid: Option<String>,
    /// All `<devices><disk>` in document order.
    pub disks: Vec<DiskInfo>,
    /// `<os><loader>` path (UEFI firmware), if present.
    pub loader: Option<PathBuf>,
    /// `<os><nvram>` path (per-VM UEFI variable store), if present.
    pub nvram: Option<PathBuf>,
}

/// A checkpoint as read from `virDomainCheckpointGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Checkpoint name.
    pub name: String,
    /// Parent checkpoint, if any.
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch (0 if absent).
    pub creation_time: i64,
    /// Per-disk participation: (disk target, bitmap name) where the bitmap is `None` for disks
    /// with `checkpoint='no'`. Libvirt names the persistent qcow2 bitmap after the checkpoint
    /// (the `bitmap` attribute, defaulting to the checkpoint name).
    pub disks: Vec<(String, Option<String>)>,
    /// The full XML as returned by libvirt; feed it to `redefine_checkpoint` unchanged.
    pub xml: String,
}

/// One disk of a pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    /// Disk target (`vda`). It is also the NBD export name; the dirty bitmap of an incremental
    /// backup is the NBD meta context `qemu:dirty-bitmap:backup-<target>`.
    pub target: String,
    /// Scratch (fleecing) file for copy-before-write; must be creatable by the QEMU user and
    /// must not exist. Libvirt creates and deletes it.
    pub scratch: PathBuf,
    /// Export this disk without a dirty bitmap even when the job is incremental (libvirt ≥ 7.6
    /// `backupmode='full'`): for a disk that is not part of the base checkpoint.
    pub full: bool,
}

/// A checkpoint created atomically with a backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSpec {
    /// Checkpoint name; also the name of the persistent bitmap in each qcow2 image.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Disk targets that get a bitmap; others are not tracked by this checkpoint.
    pub disks: Vec<String>,
}

/// A pull-mode backup: libvirt starts an NBD server on a Unix socket exporting each disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// Unix socket of the NBD server; its directory must be reachable by the QEMU user.
    pub socket: PathBuf,
    /// Disks to export; disks not listed are not part of the backup.
    pub disks: Vec<BackupDisk>,
    /// Checkpoint to base an incremental backup on (`<incremental>`); `None` = full.
    pub incremental_from: Option<String>,
    /// Checkpoint to create at the backup's point in time.
    pub new_checkpoint: Option<CheckpointSpec>,
}

/// One disk of a running backup job, as reported by `virDomainBackupGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJobDisk {
    /// Disk target.
    pub name: String,
    /// NBD export name (libvirt default: the target).
    pub export_name: String,
    /// Dirty bitmap exported for incremental backups (libvirt default `backup-<target>`,
    /// read as NBD meta context `qemu:dirty-bitmap:<export_bitmap>`); `None` for full backups.
    pub export_bitmap: Option<String>,
    /// Scratch file, if file-backed.
    pub scratch: Option<PathBuf>,
}

/// A running pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJobInfo {
    /// Checkpoint the job is incremental from.
    pub incremental: Option<String>,
    /// NBD server Unix socket, if the server uses one.
    pub socket: Option<PathBuf>,
    /// Disks with `backup='yes'`.
    pub disks: Vec<BackupJobDisk>,
}

fn invalid(context: impl Into<String>) -> LibvirtError {
    LibvirtError::new(ErrorKind::InvalidData, context)
}

fn parse_doc<'a>(xml: &'a str, what: &str) -> Result<Document<'a>> {
    Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, format!("parse {what}"), e))
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a, 'i: 'a>(node: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child_text(node: Node<'_, '_>, name: &str) -> Option<String> {
    child(node, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn expect_root<'a, 'i>(doc: &'a Document<'i>, name: &str) -> Result<Node<'a, 'i>> {
    let root = doc.root_element();
    if root.tag_name().name() == name {
        Ok(root)
    } else {
        Err(invalid(format!(
            "expected <{name}> document, found <{}>",
            root.tag_name().name()
        )))
    }
}

/// Parses a domain XML (live or inactive) into name, uuid, disks, loader and NVRAM path.
pub fn parse_domain_xml(xml: &str) -> Result<DomainXmlInfo> {
    let doc = parse_doc(xml, "domain XML")?;
    let root = expect_root(&doc, "domain")?;
    let name = child_text(root, "name").ok_or_else(|| invalid("domain XML has no <name>"))?;
    let uuid = child_text(root, "uuid");
    let os = child(root, "os");
    let loader = os.and_then(|o| child_text(o, "loader")).map(PathBuf::from);
    let nvram = os.and_then(|o| child_text(o, "nvram")).map(PathBuf::from);
    let mut disks = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for d in children(devices, "disk") {
            disks.push(parse_disk(d).map_err(|e| {
                LibvirtError::with_source(
                    ErrorKind::InvalidData,
                    format!("domain {name}: bad <disk>"),
                    e,
                )
            })?);
        }
    }
    Ok(DomainXmlInfo {
        name,
        uuid,
        disks,
        loader,
        nvram,
    })
}

fn parse_disk(d: Node<'_, '_>) -> Result<DiskInfo> {
    let target_node = child(d, "target").ok_or_else(|| invalid("<disk> without <target>"))?;
    let target = target_node
        .attribute("dev")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("<disk><target> without dev"))?
        .to_owned();
    let bus = target_node.attribute("bus").map(str::to_owned);
    let device = match d.attribute("device").unwrap_or("disk") {
        "disk" => DiskDevice::Disk,
        "cdrom" => DiskDevice::Cdrom,
        "floppy" => DiskDevice::Floppy,
        "lun" => DiskDevice::Lun,
        other => DiskDevice::Other(other.to_owned()),
    };
    let src = child(d, "source");
    let source = match (d.attribute("type").unwrap_or("file"), src) {
        (_, None) => DiskSource::None,
        ("file", Some(s)) => s
            .attribute("file")
            .map_or(DiskSource::None, |p| DiskSource::File(p.into())),
        ("block", Some(s)) => s
            .attribute("dev")
            .map_or(DiskSource::None, |p| DiskSource::Block(p.into())),
        ("network", Some(s)) => DiskSource::Network(s.attribute("protocol").unwrap_or("").into()),
        ("volume", Some(s)) => DiskSource::Volume {
            pool: s.attribute("pool").unwrap_or("").into(),
            volume: s.attribute("volume").unwrap_or("").into(),
        },
        _ => DiskSource::None,
    };
    let driver_type = child(d, "driver")
        .and_then(|n| n.attribute("type"))
        .map(str::to_owned);
    Ok(DiskInfo {
        target,
        bus,
        device,
        source,
        driver_type,
        readonly: child(d, "readonly").is_some(),
        shareable: child(d, "shareable").is_some(),
    })
}

/// Parses a checkpoint XML (`<domaincheckpoint>`); keeps the text in [`CheckpointInfo::xml`].
pub fn parse_checkpoint_xml(xml: &str) -> Result<CheckpointInfo> {
    let doc = parse_doc(xml, "checkpoint XML")?;
    let root = expect_root(&doc, "domaincheckpoint")?;
    let name = child_text(root, "name").ok_or_else(|| invalid("checkpoint XML has no <name>"))?;
    let parent = child(root, "parent").and_then(|p| child_text(p, "name"));
    let creation_time = match child_text(root, "creationTime") {
        None => 0,
        Some(t) => t
            .parse()
            .map_err(|_| invalid(format!("checkpoint {name}: bad creationTime {t:?}")))?,
    };
    let mut disks = Vec::new();
    if let Some(ds) = child(root, "disks") {
        for d in children(ds, "disk") {
            let disk = d
                .attribute("name")
                .ok_or_else(|| invalid(format!("checkpoint {name}: <disk> without name")))?;
            let bitmap = match d.attribute("checkpoint").unwrap_or("bitmap") {
                "no" => None,
                _ => Some(d.attribute("bitmap").unwrap_or(&name).to_owned()),
            };
            disks.push((disk.to_owned(), bitmap));
        }
    }
    Ok(CheckpointInfo {
        name,
        parent,
        creation_time,
        disks,
        xml: xml.to_owned(),
    })
}

/// Parses the XML of a running backup job (`virDomainBackupGetXMLDesc`).
pub fn parse_backup_job_xml(xml: &str) -> Result<BackupJobInfo> {
    let doc = parse_doc(xml, "backup job XML")?;
    let root = expect_root(&doc, "domainbackup")?;
    let incremental = child_text(root, "incremental");
    let socket = child(root, "server")
        .and_then(|s| s.attribute("socket"))
        .map(PathBuf::from);
    let mut disks = Vec::new();
    if let Some(ds) = child(root, "disks") {
        for d in children(ds, "disk") {
            if d.attribute("backup") == Some("no") {
                continue;
            }
            let name = d
                .attribute("name")
                .ok_or_else(|| invalid("backup job XML: <disk> without name"))?
                .to_owned();
            disks.push(BackupJobDisk {
                export_name: d.attribute("exportname").unwrap_or(&name).to_owned(),
                export_bitmap: d.attribute("exportbitmap").map(str::to_owned),
                scratch: child(d, "scratch")
                    .and_then(|s| s.attribute("file"))
                    .map(PathBuf::from),
                name,
            });
        }
    }
    Ok(BackupJobInfo {
        incremental,
        socket,
        disks,
    })
}

/// Escapes text for use in XML character data and in single- or double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Checks a name (checkpoint, disk target) we put into XML: non-empty, no control
/// characters (XML 1.0 cannot carry most of them), no `/` (libvirt stores checkpoints as files
/// named after them).
fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.chars().any(|c| c.is_control() || c == '/') {
        return Err(invalid(format!("invalid {what} name {s:?}")));
    }
    Ok(())
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

/// Builds the `<domainbackup mode='pull'>` XML for [`BackupSpec`] (the checkpoint part is
/// separate, see [`checkpoint_xml`]).
pub fn backup_xml(spec: &BackupSpec) -> Result<String> {
    if spec.disks.is_empty() {
        return Err(invalid("backup without disks"));
    }
    let mut x = String::from("<domainbackup mode='pull'>\n");
    if let Some(cp) = &spec.incremental_from {
        check_name("checkpoint", cp)?;
        x.push_str(&format!("  <incremental>{}</incremental>\n", escape(cp)));
    }
    let sock = path_str("NBD socket", &spec.socket)?;
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n",
        escape(sock)
    ));
    x.push_str("  <disks>\n");
    for d in &spec.disks {
        check_name("disk", &d.target)?;
        let scratch = path_str("scratch", &d.scratch)?;
        let mode = if d.full && spec.incremental_from.is_some() {
            " backupmode='full'"
        } else {
            ""
        };
        x.push_str(&format!(
            "    <disk name='{}' backup='yes'{mode} type='file'>\n      <scratch file='{}'/>\n    </disk>\n",
            escape(&d.target),
            escape(scratch)
        ));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    Ok(x)
}

/// Builds the `<domaincheckpoint>` XML for [`CheckpointSpec`]: listed disks get a bitmap
/// (named after the checkpoint by libvirt), unlisted disks do not participate.
pub fn checkpoint_xml(spec: &CheckpointSpec) -> Result<String> {
    check_name("checkpoint", &spec.name)?;
    if spec.disks.is_empty() {
        return Err(invalid(format!("checkpoint {} without disks", spec.name)));
    }
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n",
        escape(&spec.name)
    );
    if let Some(d) = &spec.description {
        x.push_str(&format!("  <description>{}</description>\n", escape(d)));
    }
    x.push_str("  <disks>\n");
    for d in &spec.disks {
        check_name("disk", d)?;
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='bitmap'/>\n",
            escape(d)
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    Ok(x)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests;
