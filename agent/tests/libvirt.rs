//! Integration tests of `lifeboat::libvirt` against the real libvirtd (`qemu:///system`), with
//! throw-away domains that need no guest OS (`<domain type='qemu'>`, 128 MiB, qcow2 disks, no
//! boot device: SeaBIOS idles). Need root, libvirtd, qemu-img, nbdinfo, nbdcopy and virsh;
//! without them every test fails with a message naming `scripts/install-deps.sh` and
//! `scripts/start-services.sh`.
//!
//! Findings on libvirt 9.0 / QEMU 7.2 (Debian 12) that the pipeline relies on:
//! - Pull-mode exports are named after the disk target (`vda`). A full backup exports only
//!   `base:allocation`; an incremental one adds `qemu:dirty-bitmap:backup-vda`.
//! - The NBD socket is created by QEMU (user `libvirt-qemu`): its directory must be writable by
//!   that user (a root-owned 0755 `/run/lifeboat` gives "Failed to bind socket ... Permission
//!   denied"). Scratch files may go into a root-owned 0755 directory: libvirt creates them.
//! - `virDomainAbortJob` returns before the job is gone; `Dom::abort_job` waits for it, after
//!   which the scratch files are deleted.
//! - The persistent bitmap libvirt creates in each qcow2 image for a checkpoint is named after
//!   the checkpoint (`bitmap='cp1'` in the checkpoint XML; `qemu-img info` lists `cp1`). For a
//!   shut-off domain the agent reads the image with `qemu-nbd -B <checkpoint>` instead.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lifeboat::libvirt::{
    BackupDisk, BackupSpec, CheckpointSpec, DomState, ErrorKind, Hypervisor, JobKind, Redefined,
};

const URI: &str = "qemu:///system";
const HINT: &str = "run scripts/install-deps.sh (as root) to install the tools and \
                    scripts/start-services.sh to start virtlogd + libvirtd";

fn hypervisor() -> Hypervisor {
    for tool in ["virsh", "qemu-img", "nbdinfo", "nbdcopy"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "{tool} is missing: {HINT}");
    }
    match Hypervisor::connect(URI) {
        Ok(h) => h,
        Err(e) => panic!(
            "cannot connect to libvirt at {URI} ({e}: {:?}): {HINT}",
            source_text(&e)
        ),
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&c.to_string());
        s.push_str("; ");
        cur = c.source();
    }
    s
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawn {cmd} ({HINT})"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A throw-away domain with its files; destroyed, undefined (with checkpoint metadata) and
/// deleted on drop, also when the test fails.
struct TestDomain {
    name: String,
    dir: PathBuf,
    sock_dir: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestDomain {
    /// Defines (not starts) `lbvirt-<tag>-<pid>-<n>` with qcow2 disks `vda`, `vdb`, ... of
    /// 64 MiB each.
    fn define(hv: &Hypervisor, tag: &str, disks: usize) -> Result<(Self, lifeboat::libvirt::Dom)> {
        let name = format!(
            "lbvirt-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from("/var/lib/lifeboat-tests").join(&name);
        let sock_dir = PathBuf::from("/run/lifeboat").join(&name);
        let td = TestDomain {
            name: name.clone(),
            dir: dir.clone(),
            sock_dir: sock_dir.clone(),
        };
        for d in [&dir, &sock_dir] {
            fs::create_dir_all(d)?;
        }
        run(
            "chmod",
            &["0755", "/var/lib/lifeboat-tests", dir.to_str().unwrap()],
        )?;
        // QEMU creates the NBD socket: the directory must belong to its user.
        run(
            "chown",
            &["libvirt-qemu:libvirt-qemu", sock_dir.to_str().unwrap()],
        )?;
        run("chmod", &["0750", sock_dir.to_str().unwrap()])?;
        let mut disk_xml = String::new();
        for i in 0..disks {
            let dev = format!("vd{}", char::from(b'a' + u8::try_from(i)?));
            let img = dir.join(format!("{dev}.qcow2"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "compat=1.1",
                    img.to_str().unwrap(),
                    "64M",
                ],
            )?;
            disk_xml.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{dev}' bus='virtio'/></disk>\n",
                img.display()
            ));
        }
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\n{disk_xml}</devices></domain>"
        );
        let dom = hv.define_xml(&xml).context("define test domain")?;
        Ok((td, dom))
    }

    fn image(&self, dev: &str) -> PathBuf {
        self.dir.join(format!("{dev}.qcow2"))
    }

    fn scratch(&self, dev: &str, n: u32) -> PathBuf {
        self.dir.join(format!("scratch-{dev}-{n}.qcow2"))
    }

    fn socket(&self) -> PathBuf {
        self.sock_dir.join("nbd.sock")
    }

    fn nbd_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// Writes `len` bytes of `pattern` at `offset` into the running domain's disk `dev`, with
    /// no guest, through HMP `qemu-io`. QEMU 7.2 with libvirt's `-blockdev` has no named
    /// BlockBackends, and the format node (`libvirt-1-format`) refuses writes while the device
    /// holds it; `qemu-io -d` with the QOM path of the virtio-blk backend works:
    /// `/machine/peripheral/<alias>/virtio-backend` where `<alias>` is the disk's libvirt alias
    /// (`virtio-disk0` for the first virtio disk). Success prints nothing.
    fn qemu_io_write(&self, dev: &str, pattern: u8, offset: &str, len: &str) -> Result<()> {
        let alias = self.alias(dev)?;
        let cmd = format!(
            "qemu-io -d /machine/peripheral/{alias}/virtio-backend \"write -P 0x{pattern:02x} {offset} {len}\""
        );
        let out = run(
            "virsh",
            &["qemu-monitor-command", &self.name, "--hmp", &cmd],
        )?;
        ensure!(out.trim().is_empty(), "qemu-io: {out}");
        Ok(())
    }

    /// libvirt alias of disk `dev` from the live XML.
    fn alias(&self, dev: &str) -> Result<String> {
        let xml = run("virsh", &["dumpxml", &self.name])?;
        let doc = roxmltree::Document::parse(&xml)?;
        let disk = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(dev))
            })
            .context("disk not in XML")?;
        Ok(disk
            .children()
            .find(|c| c.has_tag_name("alias"))
            .and_then(|a| a.attribute("name"))
            .context("no alias")?
            .to_owned())
    }

    /// Names of the dirty bitmaps QEMU has on any block node (`query-named-block-nodes`).
    fn qemu_bitmaps(&self) -> Result<Vec<String>> {
        let out = run(
            "virsh",
            &[
                "qemu-monitor-command",
                &self.name,
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut names = Vec::new();
        for node in v["return"].as_array().context("no return")? {
            for b in node["dirty-bitmaps"].as_array().into_iter().flatten() {
                if let Some(n) = b["name"].as_str() {
                    if !names.iter().any(|x| x == n) {
                        names.push(n.to_owned());
                    }
                }
            }
        }
        Ok(names)
    }

    fn remove_bitmap(&self, node: &str, name: &str) -> Result<()> {
        run(
            "virsh",
            &[
                "qemu-monitor-command",
                &self.name,
                &format!(
                    r#"{{"execute":"block-dirty-bitmap-remove","arguments":{{"node":"{node}","name":"{name}"}}}}"#
                ),
            ],
        )?;
        Ok(())
    }

    fn spec(&self, n: u32, disks: &[&str], from: Option<&str>, new: Option<&str>) -> BackupSpec {
        BackupSpec {
            socket: self.socket(),
            disks: disks
                .iter()
                .map(|d| BackupDisk {
                    target: (*d).to_owned(),
                    scratch: self.scratch(d, n),
                    full: false,
                })
                .collect(),
            incremental_from: from.map(str::to_owned),
            new_checkpoint: new.map(|c| CheckpointSpec {
                name: c.to_owned(),
                description: Some(format!("test <{c}> & co")),
                disks: disks.iter().map(|d| (*d).to_owned()).collect(),
            }),
        }
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["destroy", &self.name]).output();
        let _ = Command::new("virsh")
            .args(["undefine", "--checkpoints-metadata", "--nvram", &self.name])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(&self.sock_dir);
    }
}

/// `nbdinfo --list`: (export name, contexts).
fn nbd_exports(uri: &str) -> Result<Vec<(String, Vec<String>)>> {
    let out = run("nbdinfo", &["--json", "--list", uri])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut res = Vec::new();
    for e in v["exports"].as_array().context("no exports")? {
        let name = e["export-name"].as_str().unwrap_or_default().to_owned();
        let ctx = e["contexts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        res.push((name, ctx));
    }
    Ok(res)
}

/// `nbdinfo --map=CONTEXT`: ranges (offset, length, type) with type bit 0 set.
fn nbd_map_set(uri: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    let out = run("nbdinfo", &["--json", &format!("--map={context}"), uri])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut res = Vec::new();
    for e in v.as_array().context("map is not an array")? {
        let t = e["type"].as_u64().context("type")?;
        if t & 1 != 0 {
            res.push((
                e["offset"].as_u64().context("offset")?,
                e["length"].as_u64().context("length")?,
            ));
        }
    }
    Ok(res)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !f()? {
        ensure!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn read_range(file: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

const MIB: u64 = 1024 * 1024;

#[test]
fn pull_backup_full_then_incremental_with_checkpoint_redefine() -> Result<()> {
    let hv = hypervisor();
    let (td, dom) = TestDomain::define(&hv, "pull", 2)?;
    assert_eq!(dom.state()?, DomState::ShutOff);
    assert!(hv.list_domains()?.contains(&td.name));
    run("virsh", &["start", &td.name])?;
    assert_eq!(dom.state()?, DomState::Running);
    let disks = dom.disks()?;
    assert_eq!(
        disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(),
        ["vda", "vdb"]
    );
    assert_eq!(disks[0].source_path(), Some(td.image("vda").as_path()));
    assert_eq!(disks[0].driver_type.as_deref(), Some("qcow2"));
    assert_eq!(dom.active_job()?, None);

    // Known data before the full backup.
    td.qemu_io_write("vda", 0x11, "0", "64k")?;
    td.qemu_io_write("vdb", 0x22, "2M", "64k")?;

    // 1. Full backup + checkpoint cp1.
    dom.backup_begin(&td.spec(1, &["vda", "vdb"], None, Some("cp1")))?;
    assert_eq!(dom.active_job()?, Some(JobKind::Backup));
    let job = dom.backup_job()?;
    assert_eq!(job.socket.as_deref(), Some(td.socket().as_path()));
    assert_eq!(job.incremental, None);
    assert_eq!(job.disks.len(), 2);
    assert_eq!(job.disks[0].export_name, "vda");
    assert_eq!(job.disks[0].export_bitmap, None);
    assert_eq!(
        job.disks[0].scratch.as_deref(),
        Some(td.scratch("vda", 1).as_path())
    );
    assert!(td.scratch("vda", 1).exists());

    let exports = nbd_exports(&td.nbd_uri(""))?;
    let names: Vec<_> = exports.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["vda", "vdb"], "{exports:?}");
    for (_, ctx) in &exports {
        assert!(
            ctx.iter().all(|c| !c.starts_with("qemu:dirty-bitmap:")),
            "{ctx:?}"
        );
    }
    // Writes after the backup began must not show up in the export (fleecing).
    td.qemu_io_write("vda", 0x33, "0", "64k")?;
    let copy = td.dir.join("full-vda.raw");
    run("nbdcopy", &[&td.nbd_uri("vda"), copy.to_str().unwrap()])?;
    assert_eq!(fs::metadata(&copy)?.len(), 64 * MIB);
    assert!(read_range(&copy, 0, 65536)?.iter().all(|&b| b == 0x11));
    assert!(read_range(&copy, 65536, 65536)?.iter().all(|&b| b == 0));
    let copy_b = td.dir.join("full-vdb.raw");
    run("nbdcopy", &[&td.nbd_uri("vdb"), copy_b.to_str().unwrap()])?;
    assert!(read_range(&copy_b, 2 * MIB, 65536)?
        .iter()
        .all(|&b| b == 0x22));

    // A second job while one runs.
    let e = dom
        .backup_begin(&td.spec(9, &["vda"], None, None))
        .unwrap_err();
    eprintln!("second backup: {e:?}");
    assert_eq!(e.kind(), ErrorKind::JobActive, "{e:?}");

    dom.abort_job()?;
    assert_eq!(dom.active_job()?, None);
    assert!(!td.scratch("vda", 1).exists() && !td.scratch("vdb", 1).exists());
    let e = dom.abort_job().unwrap_err();
    eprintln!("abort without job: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NoJob, "{e:?}");

    let cps = dom.checkpoints()?;
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].name, "cp1");
    assert_eq!(cps[0].parent, None);
    assert!(cps[0].creation_time > 1_600_000_000);
    assert_eq!(
        cps[0].disks,
        [
            ("vda".into(), Some("cp1".into())),
            ("vdb".into(), Some("cp1".into()))
        ]
    );
    assert!(td.qemu_bitmaps()?.contains(&"cp1".to_owned()));

    // 2. Guest-less writes after cp1.
    td.qemu_io_write("vda", 0x5a, "1M", "256k")?;

    // 3. Incremental from cp1 with new checkpoint cp2: exactly the written range is dirty.
    // (The 0x33 write at 0 happened after cp1 too.)
    dom.backup_begin(&td.spec(2, &["vda", "vdb"], Some("cp1"), Some("cp2")))?;
    let job = dom.backup_job()?;
    assert_eq!(job.incremental.as_deref(), Some("cp1"));
    assert_eq!(job.disks[0].export_bitmap.as_deref(), Some("backup-vda"));
    let exports = nbd_exports(&td.nbd_uri(""))?;
    let vda = exports.iter().find(|e| e.0 == "vda").context("no vda")?;
    assert!(
        vda.1.contains(&"qemu:dirty-bitmap:backup-vda".to_owned()),
        "{exports:?}"
    );
    let dirty = nbd_map_set(&td.nbd_uri("vda"), "qemu:dirty-bitmap:backup-vda")?;
    assert_eq!(dirty, [(0, 65536), (MIB, 256 * 1024)]);
    let dirty_b = nbd_map_set(&td.nbd_uri("vdb"), "qemu:dirty-bitmap:backup-vdb")?;
    assert_eq!(dirty_b, []);
    dom.abort_job()?;

    let cps = dom.checkpoints()?;
    assert_eq!(
        cps.iter()
            .map(|c| (c.name.as_str(), c.parent.as_deref()))
            .collect::<Vec<_>>(),
        [("cp1", None), ("cp2", Some("cp1"))]
    );
    // Creating a checkpoint whose name exists.
    let e = dom
        .backup_begin(&td.spec(3, &["vda"], None, Some("cp2")))
        .unwrap_err();
    eprintln!("existing checkpoint: {e:?}");
    assert_eq!(e.kind(), ErrorKind::CheckpointExists, "{e:?}");
    assert_eq!(dom.active_job()?, None);

    // 4. Metadata-only delete keeps the bitmap; redefine brings the checkpoint back.
    let saved = dom.checkpoint_xml("cp2")?;
    assert!(saved.contains("<domain"));
    dom.delete_checkpoint("cp2", true)?;
    assert_eq!(dom.checkpoints()?.len(), 1);
    let e = dom.checkpoint_xml("cp2").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSuchCheckpoint, "{e:?}");
    let e = dom.delete_checkpoint("cp2", true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSuchCheckpoint, "{e:?}");
    assert!(td.qemu_bitmaps()?.contains(&"cp2".to_owned()));
    // virtnbdbackup's "Bitmap already exists" pitfall: the bitmap is still in the image, so a
    // new checkpoint of the same name fails (QEMU transaction error) even without metadata.
    let e = dom
        .backup_begin(&td.spec(5, &["vda"], None, Some("cp2")))
        .unwrap_err();
    eprintln!("checkpoint name of a leftover bitmap: {e:?}");
    assert_eq!(e.kind(), ErrorKind::CheckpointExists, "{e:?}");
    assert_eq!(dom.active_job()?, None);
    assert!(!td.scratch("vda", 5).exists());
    assert_eq!(dom.redefine_checkpoint(&saved)?, Redefined::Validated);
    // Redefining an existing checkpoint with the same XML is accepted (idempotent).
    assert_eq!(dom.redefine_checkpoint(&saved)?, Redefined::Validated);
    assert_eq!(dom.checkpoints()?.len(), 2);

    td.qemu_io_write("vda", 0x77, "4M", "64k")?;
    dom.backup_begin(&td.spec(4, &["vda"], Some("cp2"), Some("cp3")))?;
    let dirty = nbd_map_set(&td.nbd_uri("vda"), "qemu:dirty-bitmap:backup-vda")?;
    assert_eq!(dirty, [(4 * MIB, 65536)]);
    dom.abort_job()?;

    // Redefine with validation when the bitmap is gone from the image: inconsistent.
    let saved3 = dom.checkpoint_xml("cp3")?;
    dom.delete_checkpoint("cp3", true)?;
    td.remove_bitmap("libvirt-2-format", "cp3")
        .or_else(|_| td.remove_bitmap("libvirt-1-format", "cp3"))?;
    assert!(!td.qemu_bitmaps()?.contains(&"cp3".to_owned()));
    let e = dom.redefine_checkpoint(&saved3).unwrap_err();
    eprintln!("redefine without bitmap: {e:?}");
    assert_eq!(e.kind(), ErrorKind::CheckpointInconsistent, "{e:?}");

    // A real delete removes the bitmap from the images too.
    dom.delete_checkpoint("cp2", false)?;
    assert!(!td.qemu_bitmaps()?.contains(&"cp2".to_owned()));
    Ok(())
}

#[test]
fn unreachable_libvirtd_is_a_connect_error() {
    let e =
        Hypervisor::connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connect, "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn guest_agent_calls_without_agent_fail_fast_with_no_agent() -> Result<()> {
    let hv = hypervisor();
    let (td, dom) = TestDomain::define(&hv, "noagent", 1)?;
    run("virsh", &["start", &td.name])?;
    let start = Instant::now();
    let e = dom.fs_freeze(&[]).unwrap_err();
    eprintln!("freeze: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NoAgent, "{e:?}");
    let e = dom.fs_thaw(&["/".to_owned()]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoAgent, "{e:?}");
    let e = dom
        .agent_command(r#"{"execute":"guest-ping"}"#, 5)
        .unwrap_err();
    eprintln!("agent command: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NoAgent, "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));

    // With a configured agent channel but no agent in the guest.
    run("virsh", &["destroy", &td.name])?;
    let xml = dom.xml(true)?.replace(
        "</devices>",
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices>",
    );
    let dom = hv.define_xml(&xml)?;
    run("virsh", &["start", &td.name])?;
    let start = Instant::now();
    let e = dom.fs_freeze(&[]).unwrap_err();
    eprintln!("freeze, channel without agent: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NoAgent, "{e:?}");
    let e = dom
        .agent_command(r#"{"execute":"guest-ping"}"#, 2)
        .unwrap_err();
    eprintln!("agent command, channel without agent: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NoAgent, "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    Ok(())
}

#[test]
fn shut_off_domain_keeps_checkpoints_and_bitmaps_but_cannot_back_up() -> Result<()> {
    let hv = hypervisor();
    let (td, dom) = TestDomain::define(&hv, "off", 1)?;
    let e = hv.domain("lbvirt-does-not-exist").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSuchDomain, "{e:?}");

    run("virsh", &["start", &td.name])?;
    dom.backup_begin(&td.spec(1, &["vda"], None, Some("cp1")))?;
    dom.abort_job()?;
    run("virsh", &["destroy", &td.name])?;
    wait_until("shut off", Duration::from_secs(10), || {
        Ok(dom.state()? == DomState::ShutOff)
    })?;
    assert_eq!(dom.active_job()?, None);

    let e = dom
        .backup_begin(&td.spec(2, &["vda"], Some("cp1"), Some("cp2")))
        .unwrap_err();
    eprintln!("backup of shut-off domain: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NotRunning, "{e:?}");
    let e = dom.abort_job().unwrap_err();
    eprintln!("abort on shut-off domain: {e:?}");
    assert_eq!(e.kind(), ErrorKind::NotRunning, "{e:?}");

    let cps = dom.checkpoints()?;
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].disks, [("vda".into(), Some("cp1".into()))]);
    // The persistent bitmap in the qcow2 image is named after the checkpoint.
    let info = run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            td.image("vda").to_str().unwrap(),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&info)?;
    let bitmaps: Vec<&str> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .context("no bitmaps in qemu-img info")?
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(bitmaps, ["cp1"]);

    // Metadata of a shut-off domain can be dropped and redefined.
    let saved = dom.checkpoint_xml("cp1")?;
    dom.delete_checkpoint("cp1", true)?;
    assert!(dom.checkpoints()?.is_empty());
    // libvirt cannot validate bitmaps of a shut-off domain.
    assert_eq!(dom.redefine_checkpoint(&saved)?, Redefined::Unvalidated);
    assert_eq!(dom.checkpoints()?.len(), 1);

    // Looked up again by name, the handle is the same domain.
    let again = hv.domain(&td.name)?;
    assert_eq!(again.uuid()?, dom.uuid()?);
    Ok(())
}
