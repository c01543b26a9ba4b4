//! Pre-patch protection end to end (issue 6), against real libvirt and TCG guests:
//! protect → patch → rollback; protect → commit → the next backup is incremental and correct;
//! an expired point is consolidated by reconcile; `kill -9` (the `LIFEBOAT_TEST_CRASH_AT` test
//! hook aborts the process at a named point) during protect, rollback, commit and reconcile
//! leaves the disks intact and the next command repairs the state; audit-snapshots finds a
//! snapshot made by hand with virsh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use lifeboat_e2e::{
    check_ext4, lifeboat_bin, read_file_from_ext4, virsh, DiskSpec, TestVm, SYSTEM_URI,
};
use serde_json::Value;

struct Env {
    repo: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Env {
    fn new() -> Result<Env> {
        let e = Env {
            repo: tempfile::Builder::new()
                .prefix("lifeboat-protect-repo-")
                .tempdir_in("/var/tmp")?,
            state: tempfile::Builder::new()
                .prefix("lifeboat-protect-state-")
                .tempdir_in("/var/tmp")?,
        };
        let o = e.run(&["repo", "init", "--encryption", "none"], None)?;
        ensure!(o.status.success(), "init: {}", stderr(&o));
        Ok(e)
    }

    fn cmd(&self, args: &[&str], crash_at: Option<&str>) -> Result<Command> {
        let mut c = Command::new(lifeboat_bin()?);
        c.arg("--repo").arg(self.repo.path()).args(args);
        c.env("LIFEBOAT_ROLLBACK_DIR", self.state.path());
        c.env_remove("LIFEBOAT_TEST_CRASH_AT");
        if let Some(p) = crash_at {
            c.env("LIFEBOAT_TEST_CRASH_AT", p);
        }
        Ok(c)
    }

    fn run(&self, args: &[&str], crash_at: Option<&str>) -> Result<Output> {
        Ok(self.cmd(args, crash_at)?.output()?)
    }

    /// Runs a command that must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.run(&a, None)?;
        ensure!(
            o.status.success(),
            "lifeboat {args:?} failed ({}): {}",
            o.status,
            stderr(&o)
        );
        serde_json::from_slice(&o.stdout)
            .with_context(|| format!("JSON of {args:?}: {}", String::from_utf8_lossy(&o.stdout)))
    }

    /// Runs a command with the crash hook; it must die by SIGABRT.
    fn crash(&self, args: &[&str], point: &str) -> Result<()> {
        let o = self.run(args, Some(point))?;
        ensure!(
            !o.status.success() && stderr(&o).contains(point),
            "lifeboat {args:?} with crash point {point} did not abort: {} {}",
            o.status,
            stderr(&o)
        );
        Ok(())
    }

    fn state_file(&self, vm: &str) -> PathBuf {
        self.state.path().join(format!("{vm}.json"))
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn boot() -> Result<TestVm> {
    let vm = TestVm::create("protect", &[DiskSpec::ext4("vdb", "qcow2", 64)])?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    Ok(vm)
}

/// The disk's current source in the live XML.
fn source(vm: &TestVm) -> Result<PathBuf> {
    let out = virsh(SYSTEM_URI, &["domblklist", &vm.name])?;
    out.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("vdb")).then(|| it.next().map(PathBuf::from))?
        })
        .context("vdb in domblklist")
}

fn backing_of(image: &Path) -> Result<Option<String>> {
    let o = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()?;
    ensure!(o.status.success(), "qemu-img info: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_owned))
}

fn overlays_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".lifeboat-rb-"))
        .collect())
}

/// The chain is back to the one base image: source = base, no backing, no overlay file, no
/// snapshot metadata, no state file.
fn assert_consolidated(env: &Env, vm: &TestVm) -> Result<()> {
    let base = vm.disk_path("vdb");
    ensure!(source(vm)? == base, "vdb runs on {:?}", source(vm)?);
    ensure!(backing_of(&base)?.is_none(), "base has a backing file");
    let left = overlays_in(base.parent().context("dir")?)?;
    ensure!(left.is_empty(), "leftover overlays {left:?}");
    let snaps = virsh(SYSTEM_URI, &["snapshot-list", "--name", &vm.name])?;
    ensure!(snaps.trim().is_empty(), "snapshot metadata left: {snaps}");
    ensure!(!env.state_file(&vm.name).exists(), "state file left");
    Ok(())
}

fn protect(env: &Env, vm: &TestVm, rollback_for: &str) -> Result<Value> {
    let j = env.json(&[
        "protect",
        &vm.name,
        "--rollback-for",
        rollback_for,
        "--reason",
        "kernel update",
    ])?;
    let overlay = source(vm)?;
    ensure!(
        overlay.to_string_lossy().contains(".lifeboat-rb-"),
        "vdb not on an overlay after protect: {overlay:?}"
    );
    ensure!(
        backing_of(&overlay)?.as_deref() == Some(&*vm.disk_path("vdb").to_string_lossy()),
        "overlay's backing is not the base"
    );
    ensure!(env.state_file(&vm.name).exists(), "no state file");
    Ok(j)
}

#[test]
fn protect_patch_then_rollback() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    vm.exec_ok("echo before > /mnt/vdb/before.txt && sync")?;
    let j = protect(&env, &vm, "4h")?;
    let snap = j["backup"]["snapshot"]
        .as_str()
        .context("backup snapshot id")?;
    ensure!(
        j["backup"]["quiesce"] == "application-consistent",
        "backup not application-consistent: {}",
        j["backup"]
    );
    let desc = virsh(
        SYSTEM_URI,
        &[
            "snapshot-dumpxml",
            &vm.name,
            j["rollback_point"].as_str().unwrap_or(""),
        ],
    )?;
    ensure!(
        desc.contains("kernel update") && desc.contains("expires") && desc.contains(snap),
        "label: {desc}"
    );
    // The patch.
    vm.exec_ok("echo patched > /mnt/vdb/patch.txt && echo changed > /mnt/vdb/before.txt && sync")?;

    let t = Instant::now();
    let r = env.json(&["rollback", &vm.name])?;
    eprintln!(
        "rollback: {:.1} s (command), {:.1} s wall",
        r["seconds"].as_f64().unwrap_or(-1.0),
        t.elapsed().as_secs_f64()
    );
    ensure!(vm.is_running()?, "VM not running after rollback");
    let boot = vm.wait_agent(Duration::from_secs(120))?;
    eprintln!(
        "guest agent answered {:.1} s after rollback",
        boot.as_secs_f64()
    );
    ensure!(
        vm.exec_ok("cat /mnt/vdb/before.txt")?.trim() == "before",
        "file not rolled back"
    );
    let ls = vm.exec_ok("ls /mnt/vdb")?;
    ensure!(!ls.contains("patch.txt"), "the patch is still there: {ls}");
    assert_consolidated(&env, &vm)?;

    // The backup protect took is in the repository.
    let list = env.json(&["snapshots"])?;
    ensure!(list.to_string().contains(snap), "backup {snap} not listed");

    // No point any more: rollback says so and names the backup protect took.
    vm.exec_ok("echo later > /mnt/vdb/later.txt && sync")?;
    let o = env.run(&["rollback", &vm.name], None)?;
    ensure!(!o.status.success(), "rollback without a point succeeded");
    ensure!(
        stderr(&o).contains(snap) && stderr(&o).contains("--from-backup"),
        "rollback without a point: {}",
        stderr(&o)
    );
    // --from-backup: the VM runs on the restored disks of protect's backup.
    let r = env.json(&["rollback", &vm.name, "--from-backup"])?;
    eprintln!("rollback --from-backup: {r}");
    vm.wait_agent(Duration::from_secs(120))?;
    ensure!(
        vm.exec_ok("cat /mnt/vdb/before.txt")?.trim() == "before",
        "not the backup's data"
    );
    let ls = vm.exec_ok("ls /mnt/vdb")?;
    ensure!(
        !ls.contains("later.txt") && !ls.contains("patch.txt"),
        "{ls}"
    );
    ensure!(vm.disk_path("vdb").exists(), "the old image was deleted");
    Ok(())
}

#[test]
fn protect_shut_off_vm_commit_and_rollback() -> Result<()> {
    let env = Env::new()?;
    let vm = TestVm::create("protect", &[DiskSpec::ext4("vdb", "qcow2", 64)])?;
    let base = vm.disk_path("vdb");
    // Shut off: backup through the image files, the point as an offline snapshot.
    protect(&env, &vm, "4h")?;
    ensure!(!vm.is_running()?, "protect started the VM");
    let c = env.json(&["commit", &vm.name])?;
    eprintln!("offline commit: {c}");
    assert_consolidated(&env, &vm)?;
    // Once more, and roll back: the VM is started on its base image.
    protect(&env, &vm, "4h")?;
    let r = env.json(&["rollback", &vm.name])?;
    eprintln!("offline rollback: {r}");
    vm.wait_agent(Duration::from_secs(120))?;
    assert_consolidated(&env, &vm)?;
    vm.destroy()?;
    check_ext4(&base)?;

    // An offline point carries the checkpoints: start on the overlay, change data, back up
    // (incremental through the chain), commit live, back up again (incremental and correct).
    protect(&env, &vm, "4h")?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    vm.write_file("/mnt/vdb/a.bin", &data)?;
    vm.exec_ok("sync")?;
    let b = env.json(&["backup", &vm.name])?;
    eprintln!("backup on the offline overlay: {b}");
    ensure!(
        b["mode"] == "incremental",
        "not incremental on the overlay: {b}"
    );
    let read = b["disks"][0]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(read <= 12 << 20, "read {read} bytes for a 2 MiB change");
    env.json(&["commit", &vm.name])?;
    assert_consolidated(&env, &vm)?;
    vm.write_file("/mnt/vdb/b.bin", &data)?;
    vm.exec_ok("sync")?;
    let b = env.json(&["backup", &vm.name])?;
    eprintln!("backup after the live commit: {b}");
    ensure!(
        b["mode"] == "incremental",
        "not incremental after commit: {b}"
    );
    let read = b["disks"][0]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(read <= 12 << 20, "read {read} bytes for a 2 MiB change");
    let snap = b["snapshot"].as_str().context("snapshot")?;
    let to = tempfile::Builder::new()
        .prefix("lifeboat-protect-restore-")
        .tempdir_in("/var/tmp")?;
    let o = env.run(
        &["restore", snap, "--to", &to.path().to_string_lossy()],
        None,
    )?;
    ensure!(o.status.success(), "restore: {}", stderr(&o));
    let img = to.path().join("vdb.qcow2");
    check_ext4(&img)?;
    ensure!(
        read_file_from_ext4(&img, "/a.bin")? == data,
        "a.bin differs"
    );
    ensure!(
        read_file_from_ext4(&img, "/b.bin")? == data,
        "b.bin differs"
    );
    Ok(())
}

#[test]
fn protect_then_commit_keeps_incremental_backups() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vdb/old.bin bs=1M count=8 && sync")?;
    protect(&env, &vm, "4h")?;
    // The patch: 4 MiB of new data.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    vm.write_file("/mnt/vdb/new.bin", &data)?;
    vm.exec_ok("sync")?;

    let t = Instant::now();
    let c = env.json(&["commit", &vm.name])?;
    eprintln!(
        "commit: {:.1} s (command), {:.1} s wall",
        c["seconds"].as_f64().unwrap_or(-1.0),
        t.elapsed().as_secs_f64()
    );
    assert_consolidated(&env, &vm)?;
    ensure!(
        vm.exec_ok("ls /mnt/vdb")?.contains("new.bin"),
        "data lost by commit"
    );

    let b = env.json(&["backup", &vm.name])?;
    let disk = &b["disks"][0];
    eprintln!("backup after commit: {b}");
    ensure!(b["mode"] == "incremental", "not incremental: {b}");
    let read = disk["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        read <= 16 << 20,
        "incremental read {read} bytes for a 4 MiB change"
    );

    let snap = b["snapshot"].as_str().context("snapshot")?;
    let to = tempfile::Builder::new()
        .prefix("lifeboat-protect-restore-")
        .tempdir_in("/var/tmp")?;
    let o = env.run(
        &["restore", snap, "--to", &to.path().to_string_lossy()],
        None,
    )?;
    ensure!(o.status.success(), "restore: {}", stderr(&o));
    let img = to.path().join("vdb.qcow2");
    check_ext4(&img)?;
    ensure!(
        read_file_from_ext4(&img, "/new.bin")? == data,
        "restored new.bin differs"
    );
    ensure!(
        read_file_from_ext4(&img, "/old.bin")?.len() == 8 << 20,
        "restored old.bin wrong"
    );
    Ok(())
}

#[test]
fn protect_expired_point_is_reconciled() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    protect(&env, &vm, "1s")?;
    std::thread::sleep(Duration::from_secs(2));
    let r = env.json(&["reconcile"])?;
    ensure!(
        r["points"][0]["action"] == "consolidated",
        "reconcile did not consolidate: {r}"
    );
    assert_consolidated(&env, &vm)?;
    vm.wait_agent(Duration::from_secs(30))?;
    // Idempotent.
    let r = env.json(&["reconcile"])?;
    ensure!(r["points"].as_array().is_some_and(|a| a.is_empty()), "{r}");

    // The state file is lost: --adopt-orphans rebuilds it from the snapshot, expiry holds.
    protect(&env, &vm, "1s")?;
    std::fs::remove_file(env.state_file(&vm.name))?;
    std::thread::sleep(Duration::from_secs(2));
    let r = env.json(&["reconcile", &vm.name])?;
    ensure!(r["points"].as_array().is_some_and(|a| a.is_empty()), "{r}");
    let r = env.json(&["reconcile", &vm.name, "--adopt-orphans"])?;
    ensure!(
        r["points"][0]["action"] == "consolidated",
        "orphan not consolidated: {r}"
    );
    assert_consolidated(&env, &vm)?;
    vm.wait_agent(Duration::from_secs(30))?;
    Ok(())
}

/// `qemu-img check -U` of every image file of vdb (base, and the rollback overlays that exist):
/// no corruption, no check error. Leaked clusters are allowed (an image in use by QEMU may
/// have metadata updates not yet written back).
fn assert_images_intact(vm: &TestVm) -> Result<()> {
    let base = vm.disk_path("vdb");
    let mut images = vec![base.clone()];
    images.extend(overlays_in(base.parent().context("dir")?)?);
    for img in images
        .iter()
        .filter(|p| !p.to_string_lossy().ends_with(".mem"))
    {
        let o = Command::new("qemu-img")
            .args(["check", "-U", "--output=json"])
            .arg(img)
            .output()?;
        let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
            format!(
                "qemu-img check {}: {} {}",
                img.display(),
                o.status,
                stderr(&o)
            )
        })?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        ensure!(
            n("corruptions") == 0 && n("check-errors") == 0,
            "{} is damaged: {v}",
            img.display()
        );
    }
    ensure!(base.exists(), "base image gone");
    Ok(())
}

/// Images intact, and the guest reads `want` from f.txt.
fn assert_data(vm: &TestVm, want: &str) -> Result<()> {
    assert_images_intact(vm)?;
    let got = vm.exec_ok("cat /mnt/vdb/f.txt")?;
    ensure!(got.trim() == want, "f.txt holds {got:?}, not {want:?}");
    Ok(())
}

#[test]
fn protect_kill9_at_every_step_is_repaired() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    let base = vm.disk_path("vdb");
    vm.exec_ok("echo v1 > /mnt/vdb/f.txt && sync")?;
    let args = |rf: &'static str| -> Vec<String> {
        vec![
            "protect".into(),
            vm.name.clone(),
            "--rollback-for".into(),
            rf.into(),
        ]
    };
    let a4h = args("4h");
    let a4h: Vec<&str> = a4h.iter().map(String::as_str).collect();
    let backups =
        || -> Result<usize> { Ok(env.json(&["snapshots"])?.as_array().map_or(0, Vec::len)) };

    // protect: killed inside the frozen window right after the snapshot, before the backup.
    env.crash(&a4h, "protect-after-snapshot")?;
    assert_images_intact(&vm)?;
    // The thaw guard thaws the guest once the killed process's pipe closes.
    lifeboat_e2e::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        Ok(vm
            .fsfreeze_status()
            .is_ok_and(|s| s == "thawed")
            .then_some(()))
    })?;
    ensure!(backups()? == 0, "the killed protect committed a backup");
    let o = env.run(&["commit", &vm.name], None)?;
    let msg = stderr(&o);
    ensure!(
        msg.contains("interrupted"),
        "commit after killed protect: {msg}"
    );
    assert_consolidated(&env, &vm)?;
    assert_data(&vm, "v1")?;

    // protect: killed after its backup committed, before the point was marked complete. The
    // next protect consolidates the half-made point, says so, and takes a new one.
    env.crash(&a4h, "protect-before-complete")?;
    ensure!(backups()? == 1, "the backup before the kill is not listed");
    assert_images_intact(&vm)?;
    let j = env.json(&a4h)?;
    ensure!(
        j.to_string().contains("interrupted"),
        "protect after a killed protect does not report the repair: {j}"
    );
    ensure!(backups()? == 2, "protect after the repair did not back up");
    ensure!(
        source(&vm)?.to_string_lossy().contains(".lifeboat-rb-"),
        "no rollback point after the repair"
    );
    assert_data(&vm, "v1")?;

    // rollback: killed after stopping the VM. The base still holds the point's data (clean:
    // it was frozen when the point was taken); the next rollback finishes.
    vm.exec_ok("echo v2 > /mnt/vdb/f.txt && sync")?;
    env.crash(&["rollback", &vm.name], "rollback-after-destroy")?;
    ensure!(
        !vm.is_running()?,
        "VM still running after rollback-after-destroy"
    );
    assert_images_intact(&vm)?;
    check_ext4(&base)?;
    ensure!(
        read_file_from_ext4(&base, "/f.txt")? == b"v1\n",
        "base data"
    );
    let r = env.json(&["rollback", &vm.name])?;
    ensure!(r.to_string().contains("interrupted"), "{r}");
    vm.wait_agent(Duration::from_secs(120))?;
    assert_data(&vm, "v1")?;
    assert_consolidated(&env, &vm)?;

    // rollback: killed after the definition points back to the base, before the overlay and
    // the snapshot metadata are gone; the next rollback finishes.
    protect(&env, &vm, "4h")?;
    vm.exec_ok("echo v2b > /mnt/vdb/f.txt && sync")?;
    env.crash(&["rollback", &vm.name], "rollback-after-redefine")?;
    assert_images_intact(&vm)?;
    ensure!(
        read_file_from_ext4(&base, "/f.txt")? == b"v1\n",
        "base data"
    );
    let r = env.json(&["rollback", &vm.name])?;
    ensure!(r.to_string().contains("interrupted"), "{r}");
    vm.wait_agent(Duration::from_secs(120))?;
    assert_data(&vm, "v1")?;
    assert_consolidated(&env, &vm)?;

    // commit: killed after the pivot; reconcile finishes it.
    protect(&env, &vm, "4h")?;
    vm.exec_ok("echo v3 > /mnt/vdb/f.txt && sync")?;
    env.crash(&["commit", &vm.name], "commit-after-first-pivot")?;
    assert_images_intact(&vm)?;
    ensure!(source(&vm)? == base, "not pivoted to the base");
    let r = env.json(&["reconcile"])?;
    ensure!(r["points"][0]["action"] == "repaired", "{r}");
    assert_consolidated(&env, &vm)?;
    assert_data(&vm, "v3")?;

    // commit: killed before the clean-up; the next commit finishes it.
    protect(&env, &vm, "4h")?;
    vm.exec_ok("echo v4 > /mnt/vdb/f.txt && sync")?;
    env.crash(&["commit", &vm.name], "commit-before-cleanup")?;
    assert_images_intact(&vm)?;
    let c = env.json(&["commit", &vm.name])?;
    ensure!(
        c["note"]
            .as_str()
            .is_some_and(|n| n.contains("interrupted")),
        "{c}"
    );
    assert_consolidated(&env, &vm)?;
    assert_data(&vm, "v4")?;

    // reconcile: killed after the first pivot, and (next point) before deleting the overlay;
    // the next reconcile repairs each.
    for point in ["commit-after-first-pivot", "commit-before-cleanup"] {
        protect(&env, &vm, "1s")?;
        std::thread::sleep(Duration::from_secs(2));
        env.crash(&["reconcile"], point)?;
        assert_images_intact(&vm)?;
        let r = env.json(&["reconcile"])?;
        ensure!(r["points"][0]["action"] == "repaired", "{point}: {r}");
        assert_consolidated(&env, &vm)?;
        assert_data(&vm, "v4")?;
    }
    vm.destroy()?;
    check_ext4(&base)?;
    ensure!(
        read_file_from_ext4(&base, "/f.txt")? == b"v4\n",
        "final data"
    );
    Ok(())
}

#[test]
fn protect_with_memory_rolls_back_the_running_guest() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    vm.exec_ok("echo before > /mnt/vdb/m.txt && sync")?;
    let j = env.json(&["protect", &vm.name, "--rollback-for", "4h", "--memory"])?;
    let mem = j["memory"].as_str().context("memory file")?.to_string();
    ensure!(Path::new(&mem).exists(), "no memory file");
    // Proof of a resumed (not rebooted) guest: a tmpfs file written before protect... the
    // guest's uptime keeps counting from before.
    let up_before: f64 = vm
        .exec_ok("cut -d' ' -f1 /proc/uptime")?
        .trim()
        .parse()
        .unwrap_or(0.0);
    vm.exec_ok("echo patched > /mnt/vdb/m.txt && sync")?;
    let r = env.json(&["rollback", &vm.name])?;
    eprintln!("rollback with memory: {r}");
    vm.wait_agent(Duration::from_secs(60))?;
    let up_after: f64 = vm
        .exec_ok("cut -d' ' -f1 /proc/uptime")?
        .trim()
        .parse()
        .unwrap_or(0.0);
    ensure!(
        up_after >= up_before - 1.0,
        "guest rebooted: uptime {up_before} → {up_after}"
    );
    ensure!(vm.fsfreeze_status()? == "thawed", "guest left frozen");
    vm.exec_ok("echo 3 > /proc/sys/vm/drop_caches")?;
    ensure!(
        vm.exec_ok("cat /mnt/vdb/m.txt")?.trim() == "before",
        "not rolled back"
    );
    ensure!(!Path::new(&mem).exists(), "memory file left");
    assert_consolidated(&env, &vm)?;
    Ok(())
}

#[test]
fn audit_finds_a_snapshot_made_by_hand() -> Result<()> {
    let env = Env::new()?;
    let vm = boot()?;
    virsh(
        SYSTEM_URI,
        &[
            "snapshot-create-as",
            "--domain",
            &vm.name,
            "--name",
            "by-hand",
            "--disk-only",
            "--atomic",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let a = env.json(&[
        "audit-snapshots",
        "--older-than",
        "1s",
        "--connect",
        SYSTEM_URI,
    ])?;
    let d = a["domains"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == vm.name.as_str()))
        .context("domain in audit")?;
    let s = d["snapshots"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "by-hand"))
        .with_context(|| format!("snapshot by-hand not found: {d}"))?;
    ensure!(s["kind"] == "external" && s["lifeboat"] == false, "{s}");
    ensure!(
        !s["flags"].as_array().is_some_and(|f| f.is_empty()),
        "not flagged: {s}"
    );
    let chain = d["disks"][0]["chain"].as_array().context("chain")?;
    ensure!(chain.len() == 2, "chain: {chain:?}");
    ensure!(
        chain[0]["actual_size"].as_u64().is_some(),
        "no overlay size"
    );
    ensure!(
        a["flagged"].as_u64().unwrap_or(0) >= 2,
        "flagged: {}",
        a["flagged"]
    );
    let text = env.run(&["audit-snapshots", "--older-than", "1s"], None)?;
    ensure!(
        String::from_utf8_lossy(&text.stdout).contains("by-hand"),
        "text table"
    );
    Ok(())
}
