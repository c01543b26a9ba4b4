//! Pre-patch protection end to end (issue 6): `kill -9` (the `LIFEBOAT_TEST_CRASH_AT` test hook
//! aborts the process at a named point) during protect, rollback, commit and reconcile leaves
//! the disks intact and the next command repairs the state.

mod protect_common;

use std::time::Duration;

use anyhow::{ensure, Result};
use lifeboat_e2e::{check_ext4, read_file_from_ext4};
use protect_common::*;

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
