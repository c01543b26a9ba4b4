//! The live libvirt path: a running TCG domain (the e2e harness's test guest: Debian kernel,
//! busybox + qemu-ga initramfs) with a copy of the mixed image as its disk `vda`.
//!
//! Per round, on fresh domains with identical disks (each tool keeps its own checkpoint chain):
//! - domain A: the NBD read ceiling of libvirt's pull-mode export (`virsh backup-begin` with an
//!   NBD server on a unix socket, `nbdcopy` → null:, `virsh domjobabort`); `lifeboat backup`
//!   full, 1 % of the disk rewritten in the guest (guest-exec `dd` of random 64 KiB pieces
//!   spread over the disk), `lifeboat backup` incremental; the freeze window is what Lifeboat
//!   reports (`freeze_window_ms` in `--json`: freeze → job started → thawed);
//! - domain B (when installed): the same ceiling, `virtnbdbackup` full, the same amount
//!   rewritten, `virtnbdbackup` incremental;
//! - `lifeboat instant-restore` of A's incremental snapshot into a new domain: time from the
//!   command's start to the domain running and to its guest agent answering, and until the data
//!   has moved (the command exits).
//!
//! Domains, backup jobs, sockets and files are removed on every path (drop guards); domains are
//! named like the e2e harness's (`lbt-<prefix>-<pid>-<n>`), so a killed run's leftovers are
//! swept by the next harness or test run, and each holds one of the host's guest slots.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use guest_quiesce::protocol::GuestPing;
use guest_quiesce::Agent;
use lifeboat_e2e::{
    acquire_slot, remove_domain, virsh, virsh_timeout, DiskSpec, TestVm, VirshTransport, VmOptions,
    SYSTEM_URI, VM_ROOT,
};

use crate::dirty::{dirty_offsets, DIRTY_PIECE};
use crate::diskstats;
use crate::proc::{self, Timed};
use crate::report::{Best, LiveFacts, Report};
use crate::{rm, u64_at, Ctx, MIB};

/// How long a guest may take from `virsh start` to a responding agent (TCG on a loaded host).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest single backup (either tool) or NBD read.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(1200);

/// Why the live section cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    for tool in ["virsh", "nbdcopy"] {
        if !proc::have(tool) {
            return Some(format!("{tool} is missing: run scripts/install-deps.sh"));
        }
    }
    if let Err(e) = lifeboat_e2e::ensure_libvirt() {
        return Some(format!("libvirt is not usable: {e:#}"));
    }
    if let Err(e) = lifeboat_e2e::test_guest() {
        return Some(format!(
            "no test guest (scripts/build-test-guest.sh): {e:#}"
        ));
    }
    None
}

/// A running domain booting the test guest, its `vda` a copy of `image`.
fn boot(prefix: &str, image: &Path, size: u64) -> Result<(TestVm, f64)> {
    proc::check_interrupted()?;
    let vm = TestVm::create_with(
        prefix,
        &VmOptions {
            disks: vec![DiskSpec::blank("vda", "qcow2", size / MIB)],
            ..VmOptions::default()
        },
    )?;
    let disk = vm.disk_path("vda");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&disk)
        .status()
        .context("cannot run cp")?;
    if !st.success() {
        bail!("cp {} {} failed", image.display(), disk.display());
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o644))?;
    std::fs::File::open(&disk)?.sync_all()?;
    vm.start()?;
    let boot = vm.wait_agent(BOOT_TIMEOUT)?;
    Ok((vm, boot.as_secs_f64()))
}

/// Rewrites `total` bytes of `vm`'s vda in the guest: random 64 KiB pieces spread over the
/// disk, then `sync`. Returns the seconds it took.
fn dirty_in_guest(vm: &TestVm, size: u64, total: u64) -> Result<f64> {
    let blocks: Vec<String> = dirty_offsets(size, total)
        .iter()
        .map(|off| (off / DIRTY_PIECE).to_string())
        .collect();
    let script = format!(
        "for s in {}; do dd if=/dev/urandom of=/dev/vda bs={DIRTY_PIECE} count=1 seek=$s conv=notrunc 2>/dev/null || exit 1; done; sync",
        blocks.join(" ")
    );
    let t = Instant::now();
    let out = vm.exec_timeout(&script, Duration::from_secs(900))?;
    if out.exit != 0 {
        bail!(
            "{}: writing the dirty data failed (exit {}): {}",
            vm.name,
            out.exit,
            out.stderr.trim()
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// An active pull-mode backup job; aborted on drop.
struct PullJob<'a> {
    vm: &'a TestVm,
    dir: PathBuf,
    active: bool,
}

impl PullJob<'_> {
    fn end(&mut self) -> Result<()> {
        if self.active {
            self.active = false;
            virsh(&self.vm.uri, &["domjobabort", &self.vm.name])?;
        }
        Ok(())
    }
}

impl Drop for PullJob<'_> {
    fn drop(&mut self) {
        if self.active {
            let _ = virsh_timeout(
                &self.vm.uri,
                &["domjobabort", &self.vm.name],
                Duration::from_secs(30),
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ceiling: `nbdcopy` of libvirt's pull-mode export of vda (full, no checkpoint) to null:.
fn nbd_ceiling(ctx: &Ctx, vm: &TestVm, facts: &mut LiveFacts) -> Result<proc::Run> {
    let dir = vm.dir.join("pull");
    rm(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut job = PullJob {
        vm,
        dir: dir.clone(),
        active: false,
    };
    // QEMU (user libvirt-qemu) creates the socket.
    let out = Command::new("chown")
        .arg("libvirt-qemu:")
        .arg(&dir)
        .output()
        .context("cannot run chown")?;
    if !out.status.success() {
        bail!(
            "chown libvirt-qemu {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sock = dir.join("nbd.sock");
    let xml = dir.join("backup.xml");
    std::fs::write(
        &xml,
        format!(
            "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n    <disk name='vda' backup='yes' type='file'>\n      <scratch file='{}'/>\n    </disk>\n  </disks>\n</domainbackup>\n",
            sock.display(),
            dir.join("vda.scratch").display()
        ),
    )?;
    virsh(&vm.uri, &["backup-begin", &vm.name, &xml.to_string_lossy()])?;
    job.active = true;
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    let device = device_sampler(ctx);
    let r = proc::run_timeout(
        &["nbdcopy", &uri, "null:"],
        &[],
        &ctx.scratch,
        BACKUP_TIMEOUT,
    )?;
    if let Some(u) = device.and_then(diskstats::Sampler::stop) {
        facts.ceiling_device.push((r.secs, u));
    }
    job.end()?;
    Ok(r)
}

/// Samples the work directory's block device (where the repositories and the domains' disks
/// are), if it is one.
fn device_sampler(ctx: &Ctx) -> Option<diskstats::Sampler> {
    diskstats::device_of(&ctx.work).and_then(|d| diskstats::Sampler::start(&d))
}

/// `lifeboat backup VM --json` into `repo`: the run and its report.
fn lb_backup(ctx: &Ctx, repo: &Path, vm: &TestVm) -> Result<(proc::Run, serde_json::Value)> {
    let r = ctx.lb_timeout(repo, &["backup", &vm.name], BACKUP_TIMEOUT)?;
    let j = r.json()?;
    Ok((r, j))
}

/// Removes a domain and its directory on drop.
struct DomainGuard {
    name: String,
    dir: PathBuf,
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        remove_domain(SYSTEM_URI, &self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One round of the live section.
pub fn round(
    ctx: &Ctx,
    image: &Path,
    size: u64,
    with_virtnbdbackup: bool,
    rep: &mut Report,
) -> Result<()> {
    let dirty_total = size / 100;
    let repo = ctx.work.join("repo-live");
    let mut facts = LiveFacts {
        device: diskstats::device_of(&ctx.work).map(|d| {
            if diskstats::device_of(Path::new(VM_ROOT)).as_ref() == Some(&d) {
                format!("`{d}`, which also holds the domains' disks")
            } else {
                format!("`{d}`; the domains' disks are on another device")
            }
        }),
        ..LiveFacts::default()
    };

    // Domain A: ceiling, Lifeboat full, 1 % dirty, Lifeboat incremental.
    eprintln!("  live: booting domain A...");
    let snapshot;
    {
        let (vm, boot_s) = boot("benchlb", image, size)?;
        facts.boot_secs.push(boot_s);
        eprintln!("  live: {} up in {boot_s:.1} s; NBD ceiling...", vm.name);
        let r = nbd_ceiling(ctx, &vm, &mut facts)?;
        rep.add("live.nbdcopy", Best::of(&r, 0));
        eprintln!("  live: lifeboat backup full...");
        ctx.init_repo(&repo)?;
        let device = device_sampler(ctx);
        let (r, j) = lb_backup(ctx, &repo, &vm)?;
        if let Some(u) = device.and_then(diskstats::Sampler::stop) {
            facts.full_device.push((r.secs, u));
        }
        if j["mode"] != "full" {
            bail!("first live backup was not full: {j}");
        }
        facts
            .quiesce
            .push(j["quiesce"].as_str().unwrap_or("?").to_owned());
        facts
            .freeze_ms
            .push(("full", j["freeze_window_ms"].as_f64()));
        rep.add("live.lb.full", Best::of(&r, proc::du_bytes(&repo)));
        if rep.allocated == 0 {
            // --only-live: no offline full backup measured the allocation.
            rep.allocated = u64_at(&j, "/disks/0/allocated_bytes");
        }
        let w = dirty_in_guest(&vm, size, dirty_total)?;
        facts.dirty_write_secs.push(w);
        eprintln!("  live: dirtied in {w:.1} s; lifeboat backup incremental...");
        let (r, j) = lb_backup(ctx, &repo, &vm)?;
        if j["mode"] != "incremental" {
            bail!("second live backup was not incremental: {j}");
        }
        facts
            .quiesce
            .push(j["quiesce"].as_str().unwrap_or("?").to_owned());
        facts
            .freeze_ms
            .push(("incremental", j["freeze_window_ms"].as_f64()));
        facts.dirty = u64_at(&j, "/disks/0/dirty_bytes");
        facts.incr_read = u64_at(&j, "/disks/0/bytes_read");
        facts
            .incr_disk_secs
            .extend(j.pointer("/disks/0/seconds").and_then(|x| x.as_f64()));
        let steps = lifeboat_e2e::backup_steps(&j);
        facts.incr_steps = (!steps.is_empty()).then_some((r.secs, steps));
        rep.add("live.lb.incr", Best::of(&r, proc::du_bytes(&repo)));
        snapshot = j["snapshot"]
            .as_str()
            .context("no snapshot id in the backup report")?
            .to_owned();
    } // domain A destroyed, undefined and its files removed here.

    // Instant restore of A's incremental snapshot into a new domain.
    eprintln!("  live: instant-restore...");
    instant_restore(ctx, &repo, &snapshot, &mut facts, rep)?;
    ctx.discard(&repo);

    // Domain B: virtnbdbackup on an identical fresh disk.
    if with_virtnbdbackup {
        eprintln!("  live: booting domain B for virtnbdbackup...");
        let (vm, boot_s) = boot("benchvnb", image, size)?;
        facts.boot_secs.push(boot_s);
        let r = nbd_ceiling(ctx, &vm, &mut facts)?;
        rep.add("live.nbdcopy", Best::of(&r, 0));
        let out = ctx.work.join("virtnbdbackup");
        rm(&out);
        let o = out.to_string_lossy().into_owned();
        eprintln!("  live: virtnbdbackup full...");
        let r = proc::run_timeout(
            &["virtnbdbackup", "-d", &vm.name, "-l", "full", "-o", &o],
            &[],
            &ctx.scratch,
            BACKUP_TIMEOUT,
        )?;
        rep.add("live.vnb.full", Best::of(&r, proc::du_bytes(&out)));
        let w = dirty_in_guest(&vm, size, dirty_total)?;
        facts.dirty_write_secs.push(w);
        eprintln!("  live: virtnbdbackup incremental...");
        let before = proc::du_bytes(&out);
        let r = proc::run_timeout(
            &["virtnbdbackup", "-d", &vm.name, "-l", "inc", "-o", &o],
            &[],
            &ctx.scratch,
            BACKUP_TIMEOUT,
        )?;
        rep.add(
            "live.vnb.incr",
            Best::of(&r, proc::du_bytes(&out).saturating_sub(before)),
        );
        rm(&out);
    }
    rep.add_live(facts);
    Ok(())
}

/// `lifeboat instant-restore` of `snapshot` as a new domain: time to running (domain state
/// polled every 50 ms), to the guest agent answering, and to the command's exit (data moved).
fn instant_restore(
    ctx: &Ctx,
    repo: &Path,
    snapshot: &str,
    facts: &mut LiveFacts,
    rep: &mut Report,
) -> Result<()> {
    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let name = format!("lbt-benchir-{}-0", std::process::id());
    let storage = PathBuf::from(VM_ROOT);
    let _guard = DomainGuard {
        name: name.clone(),
        dir: storage.join(&name),
    };
    let r = repo.to_string_lossy();
    let s = storage.to_string_lossy();
    let argv = [
        ctx.lifeboat.as_str(),
        "--repo",
        &r,
        "--key-file",
        &ctx.key,
        "--json",
        "instant-restore",
        snapshot,
        "--connect",
        SYSTEM_URI,
        "--name",
        &name,
        "--storage",
        &s,
        "--no-network",
    ];
    let stdout_path = ctx.scratch.join("instant.json");
    let stdout = std::fs::File::create(&stdout_path)?;
    let mut child = Timed::spawn(
        &argv,
        &[],
        &ctx.scratch.join("instant.time"),
        Stdio::from(stdout),
    )?;
    // Drain stderr so the command never blocks on a full pipe.
    let mut se = child.child.stderr.take().context("stderr pipe")?;
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let t0 = child.start;
    let early_exit = |child: &mut Timed| -> Result<()> {
        if let Some(st) = child.try_wait()? {
            bail!("instant-restore exited before the domain ran ({st})");
        }
        Ok(())
    };
    let running = loop {
        proc::check_interrupted()?;
        early_exit(&mut child)?;
        let st = virsh_timeout(SYSTEM_URI, &["domstate", &name], Duration::from_secs(10));
        if matches!(st, Ok(ref x) if x.trim() == "running") {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the instantly restored domain was not running after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The agent is pinged from a thread while this one waits for the command to exit, so that
    // neither time waits for the other.
    let domain = name.clone();
    let ping_t = std::thread::spawn(move || -> Option<Duration> {
        let agent = Agent::new(VirshTransport {
            uri: SYSTEM_URI.into(),
            domain,
        })
        .with_timeout_scale(3.0);
        while t0.elapsed() < BOOT_TIMEOUT && proc::check_interrupted().is_ok() {
            if agent
                .call_timeout(&GuestPing, Duration::from_secs(2))
                .is_ok()
            {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    });
    let status = child
        .wait_timeout(BACKUP_TIMEOUT)
        .context("instant-restore did not finish moving the data")?;
    let moved = t0.elapsed();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "instant-restore failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    let answering = ping_t.join().ok().flatten().with_context(|| {
        format!("the instantly restored guest's agent did not answer within {BOOT_TIMEOUT:?}")
    })?;
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&stdout_path)?)
        .context("instant-restore --json output")?;
    facts.ir_reported_running.push(
        j["running_after_seconds"]
            .as_f64()
            .context("no running_after_seconds in instant-restore's report")?,
    );
    let (rss, cpu) = child.usage();
    let b = |secs: Duration| Best {
        cpu_secs: None,
        ..Best::time(secs.as_secs_f64(), rss, 0)
    };
    rep.add("live.ir.running", b(running));
    rep.add("live.ir.agent", b(answering));
    rep.add(
        "live.ir.moved",
        Best {
            cpu_secs: cpu,
            ..b(moved)
        },
    );
    Ok(())
}
