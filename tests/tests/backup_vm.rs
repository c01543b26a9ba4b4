//! `lifeboat backup VM` end to end, against real libvirt and a TCG guest: full then
//! incremental (bytes read ≈ what the guest wrote), checkpoint metadata lost → still
//! incremental, failure paths (repository unwritable, SIGTERM, kill -9 while frozen, VM destroyed
//! mid-run) leave the guest thawed and nothing committed, the shut-off path (incremental through
//! the persistent bitmap; bitmap removed → full with a reason), and every snapshot restores to a
//! clean filesystem with the right files, and a disk added since the last backup is read in full
//! (that disk only). One guest with two disks (qcow2 + raw, a third qcow2 hot-plugged at the end)
//! serves all steps.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lifeboat_e2e::{
    check_ext4, read_file_from_ext4, virsh, wait_until, DiskSpec, TestRepo, TestVm,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// What these tests run against a [`TestRepo`] besides its own commands.
trait RepoExt {
    fn backup(&self, vm: &TestVm, extra: &[&str]) -> Result<Value>;
    fn restore_dir(&self, snap: &str) -> Result<tempfile::TempDir>;
}

impl RepoExt for TestRepo {
    fn backup(&self, vm: &TestVm, extra: &[&str]) -> Result<Value> {
        let mut args = vec!["backup", "--json", &vm.name];
        args.extend_from_slice(extra);
        let o = self.cmd(&args).output()?;
        ensure!(
            o.status.success(),
            "backup failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    /// Restores `snap` into `TEMP/out` and returns `TEMP`.
    fn restore_dir(&self, snap: &str) -> Result<tempfile::TempDir> {
        Ok(self.restore(snap, "lifeboat-vm-restore-")?.0)
    }
}

fn disk<'a>(j: &'a Value, name: &str) -> Result<&'a Value> {
    j["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .with_context(|| format!("no disk {name} in {j}"))
}

fn md5(data: &[u8]) -> Result<String> {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(c.stdin.as_mut().context("stdin")?, data)?;
    drop(c.stdin.take());
    let o = c.wait_with_output()?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Restores `snap` and checks each ext4 disk is clean and holds `files` (disk, path, md5).
fn check_restore(repo: &TestRepo, snap: &str, files: &[(&str, &str, &str)]) -> Result<()> {
    let dir = repo.restore_dir(snap)?;
    let out = dir.path().join("out");
    for (d, path, sum) in files {
        let img = std::fs::read_dir(&out)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_stem().is_some_and(|s| s == *d))
            .with_context(|| format!("disk {d} not restored in {}", out.display()))?;
        check_ext4(&img).with_context(|| format!("snapshot {snap} disk {d}"))?;
        let data = read_file_from_ext4(&img, path)?;
        ensure!(
            md5(&data)? == *sum,
            "snapshot {snap}: {d}:{path} differs from what the guest wrote"
        );
    }
    Ok(())
}

fn guest_md5(vm: &TestVm, path: &str) -> Result<String> {
    let o = vm.exec_ok(&format!("md5sum {path}"))?;
    Ok(o.split_whitespace().next().unwrap_or_default().to_string())
}

fn no_leftovers(vm: &TestVm) -> Result<()> {
    let job = virsh(&vm.uri, &["domjobinfo", &vm.name]).unwrap_or_default();
    ensure!(
        job.contains("None") || job.trim().is_empty(),
        "job left: {job}"
    );
    let runs = vm.lifeboat_run_dirs();
    ensure!(runs.is_empty(), "socket dirs left: {runs:?}");
    Ok(())
}

fn wait_thawed(vm: &TestVm, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    wait_until(within, Duration::from_millis(200), || {
        Ok((vm.fsfreeze_status().ok().as_deref() == Some("thawed")).then_some(()))
    })
    .context("guest not thawed")?;
    Ok(t.elapsed())
}

fn spawn_paused(repo: &TestRepo, vm: &TestVm, env: &str, secs: &str) -> Result<Child> {
    Ok(repo
        .cmd(&["backup", "--json", &vm.name])
        .env(env, secs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn wait_job(vm: &TestVm) -> Result<()> {
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let j = virsh(&vm.uri, &["domjobinfo", &vm.name]).unwrap_or_default();
        Ok(j.contains("Backup").then_some(()))
    })
    .context("backup job did not start")
}

fn finish(c: Child) -> Result<Output> {
    Ok(c.wait_with_output()?)
}

#[test]
fn live_backup_incremental_failures_and_shut_off() -> Result<()> {
    let mut vm = TestVm::create(
        "bvm",
        &[
            DiskSpec::ext4("vda", "qcow2", 64),
            DiskSpec::ext4("vdb", "raw", 32),
        ],
    )?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let repo = TestRepo::new("lifeboat-vm-repo-")?;
    let mut files: Vec<(String, String, String)> = Vec::new();

    // 1. Full.
    vm.write_file("/mnt/vda/a.txt", b"first file on vda\n")?;
    vm.write_file("/mnt/vdb/b.txt", b"first file on vdb\n")?;
    for (d, p) in [("vda", "/a.txt"), ("vdb", "/b.txt")] {
        files.push((d.into(), p.into(), guest_md5(&vm, &format!("/mnt/{d}{p}"))?));
    }
    let full = repo.backup(&vm, &[])?;
    eprintln!("full: {full:#}");
    ensure!(full["mode"] == "full", "{full}");
    ensure!(full["quiesce"] == "application-consistent", "{full}");
    ensure!(full["freeze_status_at_begin"] == "frozen", "{full}");
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(disk(&full, "vdb")?["full_reason"]
        .as_str()
        .is_some_and(|r| r.contains("raw")));
    no_leftovers(&vm)?;
    let snaps = vec![(
        full["snapshot"].as_str().unwrap_or_default().to_string(),
        files.clone(),
    )];
    let mut snaps = snaps;

    // 2. Incremental after writing 8 MiB, within limits on the host load: the reads of both
    // disks are paced on one 4 MiB/s clock (≈ 2 s for the ≈ 9 MiB read, against ≈ 0.4 s for the
    // whole command without it), and one chunk is sealed at a time.
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vda/big bs=1M count=8 2>/dev/null && sync")?;
    files.push(("vda".into(), "/big".into(), guest_md5(&vm, "/mnt/vda/big")?));
    let started = Instant::now();
    let inc = repo.backup(&vm, &["--limit-read", "4M", "--cpus", "1"])?;
    let took = started.elapsed();
    eprintln!("incremental: {inc:#}");
    let a = disk(&inc, "vda")?;
    ensure!(a["mode"] == "incremental", "{inc}");
    let read = a["bytes_read"].as_u64().unwrap_or(0);
    ensure!(
        (8 * MIB..=12 * MIB).contains(&read),
        "incremental read {read} bytes after 8 MiB written"
    );
    let read_all: u64 = inc["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["bytes_read"].as_u64()).sum())
        .unwrap_or(0);
    // Only the first request (at most a 1 MiB chunk) starts without waiting for the clock.
    let floor = Duration::from_secs_f64(read_all.saturating_sub(MIB) as f64 / (4 * MIB) as f64);
    ensure!(
        took >= floor,
        "{read_all} bytes read at a limit of 4 MiB/s in {took:?} (at least {floor:?} expected)"
    );
    ensure!(inc["freeze_status_at_begin"] == "frozen");
    ensure!(vm.fsfreeze_status()? == "thawed");
    snaps.push((
        inc["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));

    // 3. Checkpoint metadata lost, bitmap kept: redefined, still incremental.
    let cp = inc["checkpoint"]
        .as_str()
        .context("checkpoint")?
        .to_string();
    virsh(&vm.uri, &["checkpoint-delete", &vm.name, &cp, "--metadata"])?;
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vda/c bs=1M count=2 2>/dev/null && sync")?;
    files.push(("vda".into(), "/c".into(), guest_md5(&vm, "/mnt/vda/c")?));
    let re = repo.backup(&vm, &[])?;
    eprintln!("after metadata loss: {re:#}");
    let a = disk(&re, "vda")?;
    ensure!(a["mode"] == "incremental", "{re}");
    let read = a["bytes_read"].as_u64().unwrap_or(0);
    ensure!((2 * MIB..=5 * MIB).contains(&read), "read {read}");
    snaps.push((
        re["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));

    // 4. Repository unwritable: fails, thawed, nothing committed, no leftovers.
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vda/d bs=1M count=1 2>/dev/null && sync")?;
    let n = repo.snapshot_count()?;
    let p = repo.path().to_string_lossy().into_owned();
    Command::new("mount").args(["--bind", &p, &p]).status()?;
    Command::new("mount")
        .args(["-o", "remount,ro,bind", &p])
        .status()?;
    let o = repo.cmd(&["backup", &vm.name]).output();
    Command::new("umount").arg(&p).status()?;
    let o = o?;
    ensure!(
        !o.status.success(),
        "backup to a read-only repository succeeded"
    );
    eprintln!("read-only repo: {}", String::from_utf8_lossy(&o.stderr));
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(repo.snapshot_count()? == n);
    no_leftovers(&vm)?;

    // 5. SIGTERM during the transfer.
    let c = spawn_paused(&repo, &vm, "LIFEBOAT_TEST_PAUSE_AFTER_BEGIN", "30")?;
    wait_job(&vm)?;
    Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()?;
    let o = finish(c)?;
    ensure!(
        o.status.code() == Some(130),
        "SIGTERM: {:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(repo.snapshot_count()? == n);
    no_leftovers(&vm)?;

    // 6. kill -9 while frozen: the guard thaws; the next run cleans up and succeeds.
    let c = spawn_paused(&repo, &vm, "LIFEBOAT_TEST_PAUSE_WHILE_FROZEN", "30")?;
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        Ok((vm.fsfreeze_status().ok().as_deref() == Some("frozen")).then_some(()))
    })?;
    wait_job(&vm)?;
    let pid = c.id();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    let _ = finish(c)?;
    let t = wait_thawed(&vm, Duration::from_secs(15))?;
    eprintln!("kill -9 while frozen: thawed by the guard {t:?} later");
    ensure!(repo.snapshot_count()? == n);
    files.push(("vda".into(), "/d".into(), guest_md5(&vm, "/mnt/vda/d")?));
    let after = repo.backup(&vm, &[])?;
    eprintln!("after kill -9: {after:#}");
    ensure!(
        after["notes"].to_string().contains("leftover backup job"),
        "{after}"
    );
    ensure!(disk(&after, "vda")?["mode"] == "incremental", "{after}");
    snaps.push((
        after["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));
    no_leftovers(&vm)?;

    // 7. VM destroyed mid-run: fails cleanly.
    let c = spawn_paused(&repo, &vm, "LIFEBOAT_TEST_PAUSE_AFTER_BEGIN", "3")?;
    wait_job(&vm)?;
    vm.destroy()?;
    let o = finish(c)?;
    ensure!(!o.status.success(), "backup of a destroyed VM succeeded");
    eprintln!("destroyed: {}", String::from_utf8_lossy(&o.stderr));
    ensure!(repo.snapshot_count()? == n + 1);
    no_leftovers(&vm)?;

    // 8. Shut off: back up through the disk files; bitmap state decides.
    let off1 = repo.backup(&vm, &[])?;
    eprintln!("shut off #1: {off1:#}");
    ensure!(off1["state"] == "shut off");
    let off2 = repo.backup(&vm, &[])?;
    eprintln!("shut off #2: {off2:#}");
    ensure!(disk(&off2, "vda")?["mode"] == "incremental", "{off2}");
    ensure!(
        disk(&off2, "vda")?["bytes_read"].as_u64() == Some(0),
        "{off2}"
    );
    let cp = off2["checkpoint"].as_str().context("cp")?;
    let img = vm.disk_path("vda");
    let o = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&img)
        .arg(cp)
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let off3 = repo.backup(&vm, &[])?;
    eprintln!("shut off, bitmap removed: {off3:#}");
    let a = disk(&off3, "vda")?;
    ensure!(a["mode"] == "full", "{off3}");
    ensure!(
        a["full_reason"]
            .as_str()
            .is_some_and(|r| r.contains("missing")),
        "{off3}"
    );
    snaps.push((
        off3["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));

    // 9. Every snapshot restores to clean filesystems with the right files.
    for (s, fs) in &snaps {
        let f: Vec<(&str, &str, &str)> = fs
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        check_restore(&repo, s, &f)?;
    }

    // 10. Started again: the live run continues the chain from the shut-off checkpoint.
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let live = repo.backup(&vm, &[])?;
    eprintln!("live after shut-off: {live:#}");
    ensure!(disk(&live, "vda")?["mode"] == "incremental", "{live}");
    if !live["warnings"].as_array().is_none_or(|w| w.is_empty()) {
        bail!("warnings: {live}");
    }

    // 11. A disk added since the last backup: that disk full (with the reason), the others
    //     incremental; the next run is incremental on the new disk too; both restore.
    vm.attach_disk(DiskSpec::ext4("vdc", "qcow2", 32))?;
    vm.write_file("/mnt/vdc/new.txt", b"on the disk added later\n")?;
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vda/e bs=1M count=1 2>/dev/null && sync")?;
    files.push((
        "vdc".into(),
        "/new.txt".into(),
        guest_md5(&vm, "/mnt/vdc/new.txt")?,
    ));
    files.push(("vda".into(), "/e".into(), guest_md5(&vm, "/mnt/vda/e")?));
    let added = repo.backup(&vm, &[])?;
    eprintln!("disk added: {added:#}");
    let a = disk(&added, "vda")?;
    ensure!(
        a["mode"] == "incremental",
        "old disk not incremental: {added}"
    );
    let read = a["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!((MIB..=4 * MIB).contains(&read), "vda read {read} for 1 MiB");
    let c = disk(&added, "vdc")?;
    ensure!(c["mode"] == "full", "new disk not full: {added}");
    ensure!(
        c["full_reason"].as_str().is_some_and(|r| r.contains("new")),
        "new disk's reason: {added}"
    );
    ensure!(disk(&added, "vdb")?["mode"] == "full", "{added}");
    ensure!(vm.fsfreeze_status()? == "thawed");
    no_leftovers(&vm)?;
    snaps.push((
        added["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));
    vm.exec_ok("dd if=/dev/urandom of=/mnt/vdc/f bs=1M count=1 2>/dev/null && sync")?;
    files.push(("vdc".into(), "/f".into(), guest_md5(&vm, "/mnt/vdc/f")?));
    let next = repo.backup(&vm, &[])?;
    eprintln!("after the added disk's first backup: {next:#}");
    for d in ["vda", "vdc"] {
        ensure!(disk(&next, d)?["mode"] == "incremental", "{d}: {next}");
    }
    let read = disk(&next, "vdc")?["bytes_read"]
        .as_u64()
        .unwrap_or(u64::MAX);
    ensure!((MIB..=4 * MIB).contains(&read), "vdc read {read} for 1 MiB");
    snaps.push((
        next["snapshot"].as_str().unwrap_or_default().into(),
        files.clone(),
    ));
    for (s, fs) in &snaps[snaps.len() - 2..] {
        let f: Vec<(&str, &str, &str)> = fs
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        check_restore(&repo, s, &f)?;
    }
    Ok(())
}
