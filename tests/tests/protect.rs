//! Pre-patch protection end to end (issue 6), against real libvirt and TCG guests:
//! protect → patch → rollback; protect → commit → the next backup is incremental and correct;
//! an expired point is consolidated by reconcile; audit-snapshots finds a snapshot made by hand
//! with virsh. `kill -9` at every step: `protect_crash.rs`.

mod protect_common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use lifeboat_e2e::{check_ext4, read_file_from_ext4, virsh, DiskSpec, TestVm, SYSTEM_URI};
use protect_common::*;

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
