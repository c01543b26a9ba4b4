//! The harness itself: boot a test guest, write through guest-exec, freeze/thaw through libvirt,
//! shut down cleanly, check the data disk from the host.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use lifeboat_e2e::{check_ext4, read_file_from_ext4, virsh, DiskSpec, TestVm};

#[test]
fn boot_write_freeze_shutdown_check() -> Result<()> {
    let vm = TestVm::create(
        "harness",
        &[
            DiskSpec::ext4("vda", "qcow2", 64),
            DiskSpec::ext4("vdb", "raw", 64),
        ],
    )?;
    vm.start()?;
    let boot = vm.wait_agent(Duration::from_secs(120))?;
    eprintln!("time to first guest-ping: {boot:?}");
    ensure!(
        vm.console_log().contains("LIFEBOAT-GUEST-READY"),
        "no ready marker on the console:\n{}",
        vm.console_log()
    );

    // Both disks are mounted at /mnt/<target>.
    let mounts = vm.exec_ok("cat /proc/mounts")?;
    ensure!(
        mounts.contains(" /mnt/vda ext4 "),
        "vda not mounted: {mounts}"
    );
    ensure!(
        mounts.contains(" /mnt/vdb ext4 "),
        "vdb not mounted: {mounts}"
    );

    // Write through guest-exec, read back.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let t = Instant::now();
    vm.write_file("/mnt/vdb/hello.bin", &data)?;
    vm.exec_ok("echo hello from the guest > /mnt/vda/hello.txt && sync")?;
    eprintln!("write_file 200 KB + exec: {:?}", t.elapsed());
    ensure!(
        vm.read_file("/mnt/vdb/hello.bin")? == data,
        "read back differs"
    );
    let out = vm.exec("cat /mnt/vda/hello.txt; echo err >&2; exit 7")?;
    ensure!(out.exit == 7, "exit code {out:?}");
    ensure!(out.stdout == "hello from the guest\n", "stdout {out:?}");
    ensure!(out.stderr == "err\n", "stderr {out:?}");

    // Freeze and thaw through libvirt.
    ensure!(vm.fsfreeze_status()? == "thawed");
    let t = Instant::now();
    let froze = virsh(&vm.uri, &["domfsfreeze", &vm.name])?;
    eprintln!("domfsfreeze: {:?} ({})", t.elapsed(), froze.trim());
    ensure!(froze.contains("Froze 2 filesystem"), "{froze}");
    ensure!(vm.fsfreeze_status()? == "frozen");
    let thawed = virsh(&vm.uri, &["domfsthaw", &vm.name])?;
    ensure!(thawed.contains("Thawed 2 filesystem"), "{thawed}");
    ensure!(vm.fsfreeze_status()? == "thawed");

    // Clean shutdown, then the disks are clean and hold the files.
    let t = Instant::now();
    vm.shutdown(Duration::from_secs(60))?;
    eprintln!("shutdown: {:?}", t.elapsed());
    vm.destroy()?;
    check_ext4(&vm.disk_path("vda"))?;
    check_ext4(&vm.disk_path("vdb"))?;
    ensure!(read_file_from_ext4(&vm.disk_path("vdb"), "/hello.bin")? == data);
    ensure!(read_file_from_ext4(&vm.disk_path("vda"), "/hello.txt")? == b"hello from the guest\n");
    ensure!(read_file_from_ext4(&vm.disk_path("vda"), "/missing").is_err());
    Ok(())
}

#[test]
fn guest_without_disks_boots_and_runs_commands() -> Result<()> {
    let vm = TestVm::create("nodisk", &[])?;
    vm.start()?;
    let boot = vm.wait_agent(Duration::from_secs(120))?;
    eprintln!("time to first guest-ping (no disks): {boot:?}");
    ensure!(vm.exec_ok("echo $((6 * 7))")?.trim() == "42");
    // Nothing to freeze: libvirt reports 0 filesystems.
    ensure!(vm.fsfreeze_status()? == "thawed");
    vm.destroy()?;
    ensure!(!vm.is_running()?);
    Ok(())
}
