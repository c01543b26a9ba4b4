//! The sandbox domain XML, from the XML that `libvirt::rewrite` produced for the snapshot (new
//! name, no UUID, no interfaces, disks on the throw-away overlays). Pure code; like the
//! rewrite, it edits byte ranges of the original text, so what it does not touch stays as is.
//!
//! On top of the rewrite, for isolation and evidence:
//! - every `<serial>` and `<console>` is replaced by one `<serial type='file'>` writing to the
//!   sandbox's console log (the kernel's `console=ttyS0` lands there);
//! - `<graphics>` (if the original had any) become one VNC display that listens nowhere
//!   (`<listen type='none'/>`): enough for a screenshot, reachable by nobody; SPICE channels and
//!   USB redirection go with them;
//! - host resources are removed: `<hostdev>` (PCI/USB passthrough would be taken from the
//!   production VM), `<filesystem>` (host directory shares), `<redirdev>`, `<smartcard>`,
//!   `<parallel>`, and any remaining `<interface>`;
//! - unix-socket channels (the guest agent) lose their explicit path, so libvirt places and
//!   removes the socket itself.

use std::ops::Range;
use std::path::Path;

use roxmltree::{Document, Node};

use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::xml::escape;

/// The sandbox XML and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxXml {
    /// The domain XML to create.
    pub xml: String,
    /// The original had graphics: a screenshot can be taken.
    pub graphics: bool,
    /// There is a QEMU guest agent channel (`org.qemu.guest_agent.0`).
    pub agent_channel: bool,
    /// Devices removed for isolation (`hostdev`, `filesystem`, …), for the report.
    pub removed: Vec<String>,
}

fn invalid(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, why)
}

/// Applies the edits described in the module documentation; the console goes to `console_log`.
pub fn sandbox_xml(xml: &str, console_log: &Path) -> Result<SandboxXml> {
    let doc = Document::parse(xml).map_err(|e| {
        Error::with_source(ErrorKind::Corrupt, "cannot parse the sandbox domain XML", e)
    })?;
    let root = doc.root_element();
    let devices = root
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "devices")
        .ok_or_else(|| invalid("the domain XML has no <devices>"))?;
    let log = console_log
        .to_str()
        .filter(|s| !s.chars().any(char::is_control))
        .ok_or_else(|| invalid("console log path is not usable in XML"))?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut out = SandboxXml {
        xml: String::new(),
        graphics: false,
        agent_channel: false,
        removed: Vec::new(),
    };
    let remove = |edits: &mut Vec<(Range<usize>, String)>, n: Node<'_, '_>| {
        let r = n.range();
        let before = xml.get(..r.start).unwrap_or("");
        let trimmed = before.trim_end_matches([' ', '\t']);
        let start = if trimmed.ends_with('\n') {
            trimmed.len() - 1
        } else {
            r.start
        };
        edits.push((start..r.end, String::new()));
    };
    for dev in devices.children().filter(Node::is_element) {
        let tag = dev.tag_name().name();
        match tag {
            "serial" | "console" => remove(&mut edits, dev),
            "graphics" => {
                out.graphics = true;
                remove(&mut edits, dev);
            }
            "hostdev" | "filesystem" | "redirdev" | "smartcard" | "parallel" | "interface" => {
                remove(&mut edits, dev);
                out.removed.push(tag.to_string());
            }
            "channel" => {
                let name = dev
                    .children()
                    .find(|c| c.is_element() && c.tag_name().name() == "target")
                    .and_then(|t| t.attribute("name"));
                match dev.attribute("type") {
                    Some("spicevmc") | Some("spiceport") => remove(&mut edits, dev),
                    Some("unix") => {
                        if name == Some("org.qemu.guest_agent.0") {
                            out.agent_channel = true;
                        }
                        if let Some(src) = dev
                            .children()
                            .find(|c| c.is_element() && c.tag_name().name() == "source")
                        {
                            edits.push((src.range(), "<source mode='bind'/>".into()));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out.removed.sort();
    out.removed.dedup();
    let mut add = format!(
        "  <serial type='file'>\n      <source path='{}' append='off'/>\n      <target port='0'/>\n    </serial>\n",
        escape(log)
    );
    if out.graphics {
        add.push_str("    <graphics type='vnc'>\n      <listen type='none'/>\n    </graphics>\n");
    }
    // Insert before </devices>.
    let r = devices.range();
    let body = xml.get(r.clone()).unwrap_or("");
    let close = body
        .rfind("</devices>")
        .map(|i| r.start + i)
        .ok_or_else(|| invalid("<devices> is not closed"))?;
    edits.push((close..close, format!("{add}  ")));

    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let mut s = String::with_capacity(xml.len() + add.len());
    let mut pos = 0;
    for (r, rep) in &edits {
        if r.start < pos {
            return Err(invalid("internal error: overlapping XML edits"));
        }
        s.push_str(xml.get(pos..r.start).unwrap_or(""));
        s.push_str(rep);
        pos = r.end;
    }
    s.push_str(xml.get(pos..).unwrap_or(""));
    // Must still parse.
    Document::parse(&s)
        .map_err(|e| Error::with_source(ErrorKind::Other, "internal error: bad sandbox XML", e))?;
    out.xml = s;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>
  <name>lifeboat-boottest-web</name>
  <devices>
    <disk type='file' device='disk'>
      <source file='/sandbox/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <graphics type='spice' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    </hostdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <video><model type='qxl'/></video>
  </devices>
</domain>
";

    #[test]
    fn isolates_and_redirects() {
        let s = sandbox_xml(XML, Path::new("/sandbox/console.log")).unwrap();
        assert!(s.graphics && s.agent_channel);
        assert_eq!(s.removed, vec!["filesystem", "hostdev"]);
        let x = &s.xml;
        for gone in [
            "type='pty'",
            "spice",
            "0.0.0.0",
            "hostdev",
            "/srv/share",
            "web.agent",
        ] {
            assert!(!x.contains(gone), "{gone} left in\n{x}");
        }
        assert!(x.contains("<source path='/sandbox/console.log' append='off'/>"));
        assert!(x.contains("<listen type='none'/>"));
        assert!(x.contains("<source mode='bind'/>"));
        assert!(x.contains("<video><model type='qxl'/></video>"));
        let doc = Document::parse(x).unwrap();
        let serials = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "serial")
            .count();
        assert_eq!(serials, 1);
    }

    #[test]
    fn no_graphics_no_agent() {
        let x = "<domain><name>a</name><devices><disk/></devices></domain>";
        let s = sandbox_xml(x, Path::new("/d/c&.log")).unwrap();
        assert!(!s.graphics && !s.agent_channel);
        assert!(!s.xml.contains("graphics"));
        assert!(s.xml.contains("/d/c&amp;.log"));
        assert!(sandbox_xml("<domain/>", Path::new("/c")).is_err());
        assert!(sandbox_xml("<dom", Path::new("/c")).is_err());
    }
}
