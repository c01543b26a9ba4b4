//! A guest whose filesystems somebody else froze (an admin's `virsh domfsfreeze`, another
//! tool's snapshot) is left as found: `lifeboat backup` neither freezes nor thaws it (a thaw
//! would end the other party's freeze), `--quiesce required` refuses before starting a job,
//! `auto` backs up crash-consistent and says why, and the early thaw guard, never armed, exits
//! without thawing. Once thawed, the next backup freezes and thaws as usual.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lifeboat_e2e::{check_ext4, virsh, DiskSpec, TestRepo, TestVm};
use serde_json::Value;

#[test]
fn a_guest_frozen_by_someone_else_stays_frozen() -> Result<()> {
    let vm = TestVm::create("frozen", &[DiskSpec::ext4("vda", "qcow2", 32)])?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    vm.write_file("/mnt/vda/a.txt", b"written before the foreign freeze\n")?;
    vm.exec_ok("sync")?;
    let repo = TestRepo::new("lifeboat-frozen-repo-")?;

    virsh(&vm.uri, &["domfsfreeze", &vm.name])?;
    ensure!(vm.fsfreeze_status()? == "frozen");

    // Required: refused before any job, nothing committed, still frozen.
    let o = repo
        .cmd(&["backup", "--json", "--quiesce", "required", &vm.name])
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("required, frozen by someone else: {err}");
    ensure!(!o.status.success(), "backup --quiesce required succeeded");
    ensure!(err.contains("already frozen"), "{err}");
    ensure!(repo.snapshot_count()? == 0);
    ensure!(
        vm.fsfreeze_status()? == "frozen",
        "a refused backup thawed the guest"
    );

    // Auto: backed up crash-consistent, left frozen.
    let o = repo.cmd(&["backup", "--json", &vm.name]).output()?;
    ensure!(
        o.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: Value = serde_json::from_slice(&o.stdout)?;
    eprintln!("auto, frozen by someone else: {j:#}");
    let q = j["quiesce"].as_str().unwrap_or_default();
    ensure!(
        q.starts_with("crash-consistent") && q.contains("already frozen"),
        "{j}"
    );
    ensure!(j["freeze_window_ms"].is_null(), "Lifeboat froze: {j}");
    // The unarmed guard has exited by now; give a stray thaw time to land before looking.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        vm.fsfreeze_status()? == "frozen",
        "the backup thawed a freeze it did not make"
    );
    let frozen_snap = j["snapshot"].as_str().context("snapshot")?.to_string();

    // Thawed by its owner: the next backup freezes and thaws itself.
    virsh(&vm.uri, &["domfsthaw", &vm.name])?;
    let o = repo.cmd(&["backup", "--json", &vm.name]).output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout)?;
    ensure!(j["quiesce"] == "application-consistent", "{j}");
    ensure!(vm.fsfreeze_status()? == "thawed");

    // The snapshot taken under the foreign freeze is a clean filesystem.
    let (dir, out) = repo.restore(&frozen_snap, "lifeboat-frozen-restore-")?;
    let img = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_stem().is_some_and(|s| s == "vda"))
        .context("vda not restored")?;
    check_ext4(&img)?;
    drop(dir);
    Ok(())
}
