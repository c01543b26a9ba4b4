//! Tests of the domain, backup and checkpoint XML parsing and generation.

use super::*;

const DOMAIN: &str = r#"<domain type='kvm' id='3'>
  <name>web&amp;db</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/data'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>"#;

#[test]
fn parses_domain_disks_loader_nvram() {
    let d = parse_domain_xml(DOMAIN).unwrap();
    assert_eq!(d.name, "web&db");
    assert_eq!(
        d.uuid.as_deref(),
        Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    );
    assert_eq!(d.loader, Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()));
    assert_eq!(
        d.nvram,
        Some("/var/lib/libvirt/qemu/nvram/web_VARS.fd".into())
    );
    assert_eq!(d.disks.len(), 4);
    let vda = &d.disks[0];
    assert_eq!(vda.target, "vda");
    assert_eq!(vda.bus.as_deref(), Some("virtio"));
    assert_eq!(vda.device, DiskDevice::Disk);
    assert_eq!(vda.driver_type.as_deref(), Some("qcow2"));
    assert_eq!(
        vda.source_path(),
        Some(Path::new("/var/lib/libvirt/images/web.qcow2"))
    );
    assert!(!vda.readonly && !vda.shareable);
    assert_eq!(d.disks[1].source, DiskSource::Block("/dev/vg0/data".into()));
    assert!(d.disks[1].shareable);
    assert_eq!(d.disks[2].source, DiskSource::Network("rbd".into()));
    assert_eq!(d.disks[2].source_path(), None);
    assert_eq!(d.disks[3].device, DiskDevice::Cdrom);
    assert_eq!(d.disks[3].source, DiskSource::None);
    assert!(d.disks[3].readonly);
}

#[test]
fn malformed_domain_xml_is_an_error() {
    for bad in [
            "",
            "<domain>",
            "<notdomain><name>x</name></notdomain>",
            "<domain><uuid>u</uuid></domain>",
            "<domain><name>x</name><devices><disk type='file'><source file='/a'/></disk></devices></domain>",
            "<domain><name>x</name><devices><disk><target/></disk></devices></domain>",
        ] {
            let e = parse_domain_xml(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidData, "{bad}");
        }
}

#[test]
fn parses_checkpoint() {
    let xml = "<domaincheckpoint>\n  <name>cp2</name>\n  <parent>\n    <name>cp1</name>\n  </parent>\n  <creationTime>1700000000</creationTime>\n  <disks>\n    <disk name='vda' checkpoint='bitmap' bitmap='cp2'/>\n    <disk name='vdb' checkpoint='no'/>\n    <disk name='vdc' checkpoint='bitmap'/>\n  </disks>\n  <domain type='qemu'><name>x</name></domain>\n</domaincheckpoint>\n";
    let c = parse_checkpoint_xml(xml).unwrap();
    assert_eq!(c.name, "cp2");
    assert_eq!(c.parent.as_deref(), Some("cp1"));
    assert_eq!(c.creation_time, 1_700_000_000);
    assert_eq!(
        c.disks,
        vec![
            ("vda".into(), Some("cp2".into())),
            ("vdb".into(), None),
            ("vdc".into(), Some("cp2".into())),
        ]
    );
    assert_eq!(c.xml, xml);
    let root = parse_checkpoint_xml("<domaincheckpoint><name>r</name></domaincheckpoint>").unwrap();
    assert_eq!(root.parent, None);
    assert_eq!(root.creation_time, 0);
}

#[test]
fn malformed_checkpoint_xml_is_an_error() {
    for bad in [
        "<domaincheckpoint/>",
        "<domaincheckpoint><name>a</name><creationTime>x</creationTime></domaincheckpoint>",
        "<domaincheckpoint><name>a</name><disks><disk/></disks></domaincheckpoint>",
        "<domain><name>a</name></domain>",
    ] {
        assert_eq!(
            parse_checkpoint_xml(bad).unwrap_err().kind(),
            ErrorKind::InvalidData,
            "{bad}"
        );
    }
}

#[test]
fn parses_backup_job() {
    let xml = "<domainbackup mode='pull'>\n  <incremental>cp1</incremental>\n  <server transport='unix' socket='/run/lifeboat/x.sock'/>\n  <disks>\n    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1' exportname='vda' exportbitmap='backup-vda'>\n      <driver type='qcow2'/>\n      <scratch file='/var/tmp/s.vda'/>\n    </disk>\n    <disk name='vdb' backup='no'/>\n  </disks>\n</domainbackup>\n";
    let j = parse_backup_job_xml(xml).unwrap();
    assert_eq!(j.incremental.as_deref(), Some("cp1"));
    assert_eq!(j.socket, Some("/run/lifeboat/x.sock".into()));
    assert_eq!(
        j.disks,
        vec![BackupJobDisk {
            name: "vda".into(),
            export_name: "vda".into(),
            export_bitmap: Some("backup-vda".into()),
            scratch: Some("/var/tmp/s.vda".into()),
        }]
    );
}

fn spec() -> BackupSpec {
    BackupSpec {
        socket: "/run/lifeboat/a'b.sock".into(),
        disks: vec![
            BackupDisk {
                target: "vda".into(),
                scratch: "/var/lib/lifeboat/s<1>.qcow2".into(),
                full: false,
            },
            BackupDisk {
                target: "vdb".into(),
                scratch: "/var/lib/lifeboat/s&2.qcow2".into(),
                full: false,
            },
        ],
        incremental_from: Some("cp\"1".into()),
        new_checkpoint: None,
    }
}

#[test]
fn builds_backup_xml_escaped_and_parseable() {
    let x = backup_xml(&spec()).unwrap();
    assert_eq!(
            x,
            "<domainbackup mode='pull'>\n  <incremental>cp&quot;1</incremental>\n  <server transport='unix' socket='/run/lifeboat/a&apos;b.sock'/>\n  <disks>\n    <disk name='vda' backup='yes' type='file'>\n      <scratch file='/var/lib/lifeboat/s&lt;1&gt;.qcow2'/>\n    </disk>\n    <disk name='vdb' backup='yes' type='file'>\n      <scratch file='/var/lib/lifeboat/s&amp;2.qcow2'/>\n    </disk>\n  </disks>\n</domainbackup>\n"
        );
    // Round trip through our reader: values come back unescaped.
    let j = parse_backup_job_xml(&x).unwrap();
    assert_eq!(j.incremental.as_deref(), Some("cp\"1"));
    assert_eq!(j.socket, Some("/run/lifeboat/a'b.sock".into()));
    assert_eq!(
        j.disks[1].scratch,
        Some("/var/lib/lifeboat/s&2.qcow2".into())
    );
    assert_eq!(j.disks[1].export_name, "vdb");

    let full = BackupSpec {
        incremental_from: None,
        ..spec()
    };
    assert!(!backup_xml(&full).unwrap().contains("incremental"));
}

#[test]
fn rejects_unrepresentable_backup_specs() {
    let mut s = spec();
    s.disks.clear();
    assert!(backup_xml(&s).is_err());
    let mut s = spec();
    s.socket = "relative.sock".into();
    assert!(backup_xml(&s).is_err());
    let mut s = spec();
    s.disks[0].target = "v\nda".into();
    assert!(backup_xml(&s).is_err());
    let mut s = spec();
    s.incremental_from = Some(String::new());
    assert!(backup_xml(&s).is_err());
    let mut s = spec();
    s.disks[0].scratch = "/tmp/a\u{1}b".into();
    assert!(backup_xml(&s).is_err());
}

#[test]
fn builds_checkpoint_xml() {
    let c = CheckpointSpec {
        name: "lb-2024<1>".into(),
        description: Some("lifeboat & co".into()),
        disks: vec!["vda".into(), "vdb".into()],
    };
    let x = checkpoint_xml(&c).unwrap();
    assert_eq!(
            x,
            "<domaincheckpoint>\n  <name>lb-2024&lt;1&gt;</name>\n  <description>lifeboat &amp; co</description>\n  <disks>\n    <disk name='vda' checkpoint='bitmap'/>\n    <disk name='vdb' checkpoint='bitmap'/>\n  </disks>\n</domaincheckpoint>\n"
        );
    let back = parse_checkpoint_xml(&x).unwrap();
    assert_eq!(back.name, "lb-2024<1>");
    assert_eq!(
        back.disks,
        vec![
            ("vda".into(), Some("lb-2024<1>".into())),
            ("vdb".into(), Some("lb-2024<1>".into()))
        ]
    );
    assert!(checkpoint_xml(&CheckpointSpec {
        name: "a/b".into(),
        description: None,
        disks: vec!["vda".into()]
    })
    .is_err());
    assert!(checkpoint_xml(&CheckpointSpec {
        name: "a".into(),
        description: None,
        disks: vec![]
    })
    .is_err());
}
