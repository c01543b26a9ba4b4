//! Pure rewriting of a stored domain XML for defining it somewhere else (restore to another host,
//! instant restore).
//!
//! The XML is edited in place: [`roxmltree`] finds the nodes and their byte ranges, and each change
//! replaces exactly one range of the original text (an element, an attribute value, a text node),
//! so everything we do not touch — unknown elements, namespaced `qemu:` extensions, comments,
//! formatting — stays byte for byte. Every inserted value goes through [`escape`].
//!
//! What [`rewrite_domain_xml`] does, for a [`RewriteSpec`]:
//! - `<name>` → the new name; `<uuid>` removed (libvirt generates a new one);
//! - every `<interface>`: `<mac>` removed (libvirt generates `52:54:00:…`), then the interface is
//!   removed ([`NetworkPolicy::Remove`]) or its network / bridge name remapped (`OLD=NEW`);
//! - every `<disk device='disk'|'lun'>` whose target is in [`RewriteSpec::disks`] becomes
//!   `type='file'` with `<source file='NEW'/>`, `<driver type='FORMAT'>`, and no
//!   `<backingStore>`; other hard disks are removed (their sources belong to the old host) and
//!   reported in [`Rewritten::dropped_disks`]; CD-ROM and floppy media are ejected (`<source>`
//!   removed), since their files belong to the old host;
//! - `<os><nvram>` → the restored NVRAM file, or removed when none was restored (libvirt then
//!   creates a fresh variable store from the firmware's template);
//! - `file`/`unix` character devices (serial, console, channel) with an explicit `path` move into
//!   [`RewriteSpec::chardev_dir`] (the old directory may not exist on this host).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use super::error::{ErrorKind, LibvirtError, Result};
use super::xml::escape;

/// What to do with network interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkPolicy {
    /// Keep them; remap the names in the map (`<source network=…>` or `<source bridge=…>`),
    /// keep the others as they are.
    #[default]
    Keep,
    /// Keep them, remapping the listed names.
    Remap(BTreeMap<String, String>),
    /// Remove every `<interface>`.
    Remove,
}

/// A disk as it will be on the new host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDisk {
    /// Image file.
    pub path: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
}

/// How to rewrite a domain XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RewriteSpec {
    /// New domain name.
    pub name: String,
    /// Restored disks by target (`vda`).
    pub disks: BTreeMap<String, NewDisk>,
    /// Restored NVRAM file, if any.
    pub nvram: Option<PathBuf>,
    /// Network interfaces.
    pub network: NetworkPolicy,
    /// Where file/unix character devices with an explicit path go (console logs, sockets).
    pub chardev_dir: Option<PathBuf>,
}

/// The rewritten XML and what was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The new domain XML.
    pub xml: String,
    /// Targets of hard disks that were removed because they were not restored.
    pub dropped_disks: Vec<String>,
    /// Targets of CD-ROM/floppy drives whose media were ejected.
    pub ejected: Vec<String>,
    /// Number of interfaces removed.
    pub removed_interfaces: usize,
    /// Network / bridge names that stayed unmapped (they must exist on the target host).
    pub unmapped_networks: Vec<String>,
}

fn invalid(context: impl Into<String>) -> LibvirtError {
    LibvirtError::new(ErrorKind::InvalidData, context)
}

fn path_str<'a>(what: &str, p: &'a Path) -> Result<&'a str> {
    let s = p
        .to_str()
        .ok_or_else(|| invalid(format!("{what} path {} is not UTF-8", p.display())))?;
    if s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} path {s:?} contains control characters"
        )));
    }
    Ok(s)
}

/// Edits over the original text: non-overlapping byte ranges and their replacements.
#[derive(Default)]
struct Edits(Vec<(Range<usize>, String)>);

impl Edits {
    fn replace(&mut self, r: Range<usize>, s: impl Into<String>) {
        self.0.push((r, s.into()));
    }

    /// Removes a node, with the indentation and line break before it when it stands on its own line.
    fn remove(&mut self, text: &str, node: Node<'_, '_>) {
        let r = node.range();
        let before = text.get(..r.start).unwrap_or("");
        let trimmed = before.trim_end_matches([' ', '\t']);
        let start = if trimmed.ends_with('\n') {
            trimmed.len() - 1
        } else {
            r.start
        };
        self.0.push((start..r.end, String::new()));
    }

    fn apply(mut self, text: &str) -> Result<String> {
        self.0.sort_by_key(|(r, _)| r.start);
        let mut out = String::with_capacity(text.len() + 256);
        let mut pos = 0;
        for (r, s) in &self.0 {
            if r.start < pos || r.end > text.len() || r.start > r.end {
                return Err(invalid("internal error: overlapping XML edits"));
            }
            out.push_str(
                text.get(pos..r.start)
                    .ok_or_else(|| invalid("bad XML range"))?,
            );
            out.push_str(s);
            pos = r.end;
        }
        out.push_str(text.get(pos..).ok_or_else(|| invalid("bad XML range"))?);
        Ok(out)
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a, 'i: 'a>(node: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

/// Replaces the text content of a simple element (`<name>x</name>`) with `value`.
fn set_element_text(edits: &mut Edits, text: &str, node: Node<'_, '_>, value: &str) {
    let tag = node.tag_name().name();
    // Keep the start tag (attributes such as <nvram template=…>), replace everything after it.
    let r = node.range();
    let elem = text.get(r.clone()).unwrap_or("");
    let start_tag_end = elem.find('>').map(|i| r.start + i + 1).unwrap_or(r.end);
    let self_closing = elem
        .get(..start_tag_end - r.start)
        .is_some_and(|s| s.ends_with("/>"));
    if self_closing {
        let open = text
            .get(r.start..start_tag_end - 2)
            .unwrap_or("")
            .trim_end()
            .to_owned();
        edits.replace(r, format!("{open}>{}</{tag}>", escape(value)));
    } else {
        edits.replace(start_tag_end..r.end, format!("{}</{tag}>", escape(value)));
    }
}

/// Sets attribute `name` of element `node` to `value` (adding it to the start tag if missing).
fn set_attribute(edits: &mut Edits, node: Node<'_, '_>, name: &str, value: &str) {
    if let Some(a) = node
        .attributes()
        .find(|a| a.name() == name && a.namespace().is_none())
    {
        edits.replace(a.range_value(), escape(value));
    } else {
        let r = node.range();
        // After "<tag".
        let at = r.start + 1 + node.tag_name().name().len();
        edits.replace(at..at, format!(" {name}='{}'", escape(value)));
    }
}

/// Rewrites `xml` as described in the module documentation.
pub fn rewrite_domain_xml(xml: &str, spec: &RewriteSpec) -> Result<Rewritten> {
    if spec.name.is_empty() || spec.name.chars().any(char::is_control) || spec.name.contains('/') {
        return Err(invalid(format!("unusable domain name {:?}", spec.name)));
    }
    let doc = Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, "parse domain XML", e))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(invalid(format!(
            "expected a <domain> document, found <{}>",
            root.tag_name().name()
        )));
    }
    let mut edits = Edits::default();
    let mut out = Rewritten {
        xml: String::new(),
        dropped_disks: Vec::new(),
        ejected: Vec::new(),
        removed_interfaces: 0,
        unmapped_networks: Vec::new(),
    };

    let name = child(root, "name").ok_or_else(|| invalid("domain XML has no <name>"))?;
    set_element_text(&mut edits, xml, name, &spec.name);
    if let Some(uuid) = child(root, "uuid") {
        edits.remove(xml, uuid);
    }

    if let Some(os) = child(root, "os") {
        if let Some(nvram) = child(os, "nvram") {
            match &spec.nvram {
                Some(p) => set_element_text(&mut edits, xml, nvram, path_str("NVRAM", p)?),
                None => edits.remove(xml, nvram),
            }
        }
    }

    let Some(devices) = child(root, "devices") else {
        out.xml = edits.apply(xml)?;
        return Ok(out);
    };

    let mut seen_targets = Vec::new();
    for disk in children(devices, "disk") {
        let target = child(disk, "target")
            .and_then(|t| t.attribute("dev"))
            .ok_or_else(|| invalid("<disk> without <target dev>"))?;
        seen_targets.push(target.to_owned());
        let device = disk.attribute("device").unwrap_or("disk");
        let is_hard = matches!(device, "disk" | "lun");
        match spec.disks.get(target) {
            Some(new) if is_hard => {
                let path = path_str("disk", &new.path)?;
                if device == "lun" {
                    set_attribute(&mut edits, disk, "device", "disk");
                }
                set_attribute(&mut edits, disk, "type", "file");
                let src = format!("<source file='{}'/>", escape(path));
                match child(disk, "source") {
                    Some(s) => edits.replace(s.range(), src),
                    None => {
                        let t =
                            child(disk, "target").map_or(disk.range().start, |t| t.range().start);
                        edits.replace(t..t, format!("{src}\n      "));
                    }
                }
                match child(disk, "driver") {
                    Some(d) => set_attribute(&mut edits, d, "type", &new.format),
                    None => {
                        let t =
                            child(disk, "target").map_or(disk.range().start, |t| t.range().start);
                        edits.replace(
                            t..t,
                            format!(
                                "<driver name='qemu' type='{}'/>\n      ",
                                escape(&new.format)
                            ),
                        );
                    }
                }
                for b in children(disk, "backingStore") {
                    edits.remove(xml, b);
                }
            }
            _ if is_hard => {
                edits.remove(xml, disk);
                out.dropped_disks.push(target.to_owned());
            }
            _ => {
                if let Some(s) = child(disk, "source") {
                    edits.remove(xml, s);
                    out.ejected.push(target.to_owned());
                }
                for b in children(disk, "backingStore") {
                    edits.remove(xml, b);
                }
            }
        }
    }
    for t in spec.disks.keys() {
        if !seen_targets.contains(t) {
            return Err(invalid(format!(
                "the domain XML has no disk with target '{t}' for a restored disk"
            )));
        }
    }

    for iface in children(devices, "interface") {
        if spec.network == NetworkPolicy::Remove {
            edits.remove(xml, iface);
            out.removed_interfaces += 1;
            continue;
        }
        if let Some(mac) = child(iface, "mac") {
            edits.remove(xml, mac);
        }
        let kind = iface.attribute("type").unwrap_or("");
        let attr = match kind {
            "network" => "network",
            "bridge" => "bridge",
            _ => continue,
        };
        let Some(src) = child(iface, "source") else {
            continue;
        };
        let Some(old) = src.attribute(attr) else {
            continue;
        };
        match &spec.network {
            NetworkPolicy::Remap(map) if map.contains_key(old) => {
                set_attribute(&mut edits, src, attr, &map[old]);
            }
            _ => {
                if !out.unmapped_networks.iter().any(|n| n == old) {
                    out.unmapped_networks.push(old.to_owned());
                }
            }
        }
    }

    if let Some(dir) = &spec.chardev_dir {
        for dev in devices.children().filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "serial" | "console" | "channel" | "parallel"
                )
        }) {
            if !matches!(dev.attribute("type"), Some("file" | "unix")) {
                continue;
            }
            for s in children(dev, "source").chain(children(dev, "log")) {
                let attr = if s.tag_name().name() == "log" {
                    "file"
                } else {
                    "path"
                };
                let Some(old) = s.attribute(attr) else {
                    continue;
                };
                let base = Path::new(old)
                    .file_name()
                    .map(|b| b.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "chardev".into());
                let new = dir.join(base);
                set_attribute(&mut edits, s, attr, path_str("character device", &new)?);
            }
        }
    }

    out.xml = edits.apply(xml)?;
    Ok(out)
}

/// Whether disk `target` of a (live) domain XML still has a backing image (`<backingStore>` with
/// a `<source>`); `None` if there is no such disk.
pub fn disk_has_backing(xml: &str, target: &str) -> Result<Option<bool>> {
    let doc = Document::parse(xml)
        .map_err(|e| LibvirtError::with_source(ErrorKind::InvalidData, "parse domain XML", e))?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(None);
    };
    for disk in children(devices, "disk") {
        if child(disk, "target").and_then(|t| t.attribute("dev")) == Some(target) {
            return Ok(Some(
                children(disk, "backingStore").any(|b| child(b, "source").is_some()),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xml::{parse_domain_xml, DiskSource};

    const XML: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name>
  <uuid>0b0c5d0e-1111-2222-3333-444455556666</uuid>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='/base.raw'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>vda</serial>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/scratch.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install &amp; more.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source bridge='br0'/>
    </interface>
    <serial type='file'>
      <source path='/var/lib/old/console.log'/>
      <target port='0'/>
    </serial>
  </devices>
  <qemu:commandline><qemu:arg value='-no-user-config'/></qemu:commandline>
</domain>
"#;

    fn spec() -> RewriteSpec {
        let mut disks = BTreeMap::new();
        disks.insert(
            "vda".into(),
            NewDisk {
                path: "/restore/web/vda.qcow2".into(),
                format: "qcow2".into(),
            },
        );
        disks.insert(
            "vdb".into(),
            NewDisk {
                path: "/restore/web/vdb.raw".into(),
                format: "raw".into(),
            },
        );
        RewriteSpec {
            name: "web-restored".into(),
            disks,
            nvram: Some("/restore/web/nvram.fd".into()),
            network: NetworkPolicy::Keep,
            chardev_dir: Some("/restore/web".into()),
        }
    }

    #[test]
    fn rewrites_name_uuid_disks_nvram_macs() {
        let r = rewrite_domain_xml(XML, &spec()).expect("rewrite");
        let info = parse_domain_xml(&r.xml).expect("still valid");
        assert_eq!(info.name, "web-restored");
        assert_eq!(info.uuid, None);
        assert_eq!(info.nvram, Some(PathBuf::from("/restore/web/nvram.fd")));
        assert!(r.xml.contains("template='/usr/share/OVMF/OVMF_VARS.fd'"));
        let targets: Vec<_> = info.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb", "sda"]);
        assert_eq!(
            info.disks[0].source,
            DiskSource::File("/restore/web/vda.qcow2".into())
        );
        assert_eq!(info.disks[0].driver_type.as_deref(), Some("qcow2"));
        assert_eq!(
            info.disks[1].source,
            DiskSource::File("/restore/web/vdb.raw".into())
        );
        assert_eq!(info.disks[1].driver_type.as_deref(), Some("raw"));
        assert_eq!(info.disks[2].source, DiskSource::None);
        assert!(!r.xml.contains("backingStore"));
        assert!(!r.xml.contains("mac address"));
        assert!(r.xml.contains("<source network='default'/>"));
        assert!(r.xml.contains("/restore/web/console.log"));
        assert!(r.xml.contains("<qemu:arg value='-no-user-config'/>"));
        assert_eq!(r.dropped_disks, ["vdc"]);
        assert_eq!(r.ejected, ["sda"]);
        assert_eq!(r.unmapped_networks, ["default", "br0"]);
        assert!(!r.xml.contains("/srv/scratch.img"));
        assert!(!r.xml.contains("/dev/vg"));
        assert!(!r.xml.contains("0b0c5d0e"));
    }

    #[test]
    fn remaps_and_removes_networks() {
        let mut s = spec();
        s.network = NetworkPolicy::Remap(
            [("default".to_string(), "lan".to_string())]
                .into_iter()
                .collect(),
        );
        let r = rewrite_domain_xml(XML, &s).expect("rewrite");
        assert!(r.xml.contains("<source network='lan'/>"));
        assert!(r.xml.contains("<source bridge='br0'/>"));
        assert_eq!(r.unmapped_networks, ["br0"]);

        s.network = NetworkPolicy::Remove;
        let r = rewrite_domain_xml(XML, &s).expect("rewrite");
        assert!(!r.xml.contains("<interface"));
        assert_eq!(r.removed_interfaces, 2);
        Document::parse(&r.xml).expect("well-formed");
    }

    #[test]
    fn no_nvram_restored_removes_the_element() {
        let mut s = spec();
        s.nvram = None;
        let r = rewrite_domain_xml(XML, &s).expect("rewrite");
        assert!(!r.xml.contains("<nvram"));
        assert!(r.xml.contains("<loader"));
    }

    #[test]
    fn values_are_escaped() {
        let mut s = spec();
        s.name = "a<b>&'\"".into();
        s.disks.get_mut("vda").expect("vda").path = "/x/'quoted' & <odd>.qcow2".into();
        let r = rewrite_domain_xml(XML, &s).expect("rewrite");
        let info = parse_domain_xml(&r.xml).expect("valid");
        assert_eq!(info.name, "a<b>&'\"");
        assert_eq!(
            info.disks[0].source,
            DiskSource::File("/x/'quoted' & <odd>.qcow2".into())
        );
    }

    #[test]
    fn missing_source_and_driver_are_added() {
        let xml = "<domain><name>n</name><devices><disk type='volume' device='disk'><target dev='vda'/></disk></devices></domain>";
        let mut s = spec();
        s.disks.remove("vdb");
        let r = rewrite_domain_xml(xml, &s).expect("rewrite");
        let info = parse_domain_xml(&r.xml).expect("valid");
        assert_eq!(
            info.disks[0].source,
            DiskSource::File("/restore/web/vda.qcow2".into())
        );
        assert_eq!(info.disks[0].driver_type.as_deref(), Some("qcow2"));
        assert!(r.xml.contains("type='file'"));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(rewrite_domain_xml("<domain>", &spec()).is_err());
        assert!(rewrite_domain_xml("<network><name>x</name></network>", &spec()).is_err());
        assert!(rewrite_domain_xml("<domain/>", &spec()).is_err());
        // A restored disk the XML does not have.
        let xml = "<domain><name>n</name><devices/></domain>";
        assert!(rewrite_domain_xml(xml, &spec()).is_err());
        let mut s = spec();
        s.name = String::new();
        assert!(rewrite_domain_xml(XML, &s).is_err());
        let mut s = spec();
        s.name = "x\ny".into();
        assert!(rewrite_domain_xml(XML, &s).is_err());
    }

    #[test]
    fn self_closing_name_and_no_devices() {
        let xml = "<domain><name/><uuid>u</uuid></domain>";
        let s = RewriteSpec {
            name: "new".into(),
            ..RewriteSpec::default()
        };
        let r = rewrite_domain_xml(xml, &s).expect("rewrite");
        assert_eq!(r.xml, "<domain><name>new</name></domain>");
    }

    #[test]
    fn backing_detection() {
        let with = "<domain><devices><disk><source file='/o.qcow2'/><backingStore type='network' index='1'><format type='raw'/><source protocol='nbd' name='vda'><host transport='unix' socket='/s'/></source><backingStore/></backingStore><target dev='vda'/></disk></devices></domain>";
        let without = "<domain><devices><disk><source file='/o.qcow2'/><backingStore/><target dev='vda'/></disk></devices></domain>";
        assert_eq!(disk_has_backing(with, "vda").expect("ok"), Some(true));
        assert_eq!(disk_has_backing(without, "vda").expect("ok"), Some(false));
        assert_eq!(disk_has_backing(without, "vdb").expect("ok"), None);
    }
}
