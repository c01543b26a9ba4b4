//! The second libvirt host: independent domain list, and it runs test guests.

use std::time::Duration;

use anyhow::{ensure, Result};
use lifeboat_e2e::{virsh, DiskSpec, SecondHost, TestVm, SYSTEM_URI};

#[test]
fn second_host_runs_its_own_domains() -> Result<()> {
    let host = SecondHost::start()?;
    let vm = TestVm::create_on(&host.uri, "host2", &[DiskSpec::ext4("vdb", "qcow2", 32)])?;
    let here = host.virsh(&["list", "--all", "--name"])?;
    ensure!(here.contains(&vm.name), "{here}");
    let there = virsh(SYSTEM_URI, &["list", "--all", "--name"])?;
    ensure!(
        !there.contains(&vm.name),
        "domain leaked to the main host: {there}"
    );
    vm.start()?;
    let boot = vm.wait_agent(Duration::from_secs(120))?;
    eprintln!("second host: time to first guest-ping {boot:?}");
    ensure!(vm.exec_ok("ls /mnt")?.contains("vdb"));
    vm.shutdown(Duration::from_secs(60))?;
    Ok(())
}
