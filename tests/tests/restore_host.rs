//! Restore to another host: a VM backed up on the first libvirtd is restored, defined and
//! started on a second one after the original is gone; its files come back intact.

mod restore_common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guest_quiesce::protocol::{GuestExec, GuestPing};
use guest_quiesce::Agent;
use lifeboat_e2e::{
    acquire_slot, virsh, wait_until, DiskSpec, SecondHost, TestVm, VirshTransport, SYSTEM_URI,
};
use restore_common::*;

#[test]
fn restore_on_second_host_boots_with_the_files() -> Result<()> {
    let s = Scratch::new("restore-host")?;
    let data = pseudo_random(300_000, 9);
    let (name, snap) = {
        let vm = TestVm::create("rsthost", &[DiskSpec::ext4("vdb", "qcow2", 64)])?;
        vm.start()?;
        vm.wait_agent(Duration::from_secs(120))?;
        vm.write_file("/mnt/vdb/data.bin", &data)?;
        vm.exec_ok("echo restored elsewhere > /mnt/vdb/hello.txt && sync")?;
        vm.shutdown(Duration::from_secs(60))?;
        let xml = s.dir.join("domain.xml");
        std::fs::write(
            &xml,
            virsh(SYSTEM_URI, &["dumpxml", "--inactive", &vm.name])?,
        )?;
        s.ok(&[
            "backup-image",
            &vm.disk_path("vdb").to_string_lossy(),
            "--name",
            &vm.name,
            "--disk",
            "vdb",
            "--domain-xml",
            &xml.to_string_lossy(),
        ])?;
        (vm.name.clone(), format!("{}@latest", vm.name))
        // Dropping the TestVm undefines the domain and deletes its disks and directory.
    };
    ensure!(
        !virsh(SYSTEM_URI, &["list", "--all", "--name"])?.contains(&name),
        "original still defined"
    );

    let host = SecondHost::start()?;
    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let to = s.dir.join("restored");
    let out = s.ok(&[
        "restore",
        &snap,
        "--to",
        &to.to_string_lossy(),
        "--connect",
        &host.uri,
        "--start",
        "--no-network",
        "--json",
    ])?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(j["domain"]["name"] == name.as_str(), "{j}");
    let agent = Agent::new(VirshTransport {
        uri: host.uri.clone(),
        domain: name.clone(),
    })
    .with_timeout_scale(3.0);
    wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
        Ok(agent
            .call_timeout(&GuestPing, Duration::from_secs(2))
            .is_ok()
            .then_some(()))
    })
    .context("guest agent on the second host")?;
    let cat = |p: &str| -> Result<Vec<u8>> {
        let r = agent.exec_request(&GuestExec::new("/bin/cat", &[p]), Duration::from_secs(120))?;
        ensure!(
            r.success(),
            "cat {p}: {:?}",
            String::from_utf8_lossy(&r.stderr)
        );
        Ok(r.stdout)
    };
    ensure!(cat("/mnt/vdb/data.bin")? == data, "data.bin differs");
    ensure!(cat("/mnt/vdb/hello.txt")? == b"restored elsewhere\n");
    let xml = host.virsh(&["dumpxml", &name])?;
    ensure!(!xml.contains("52:54:00:12:34:56"));
    ensure!(
        xml.contains(&*to.join("vdb.qcow2").to_string_lossy()),
        "{xml}"
    );

    // The name is taken now: an explicit --name of it is refused (exit 8), nothing written.
    let again = s.output(
        &[
            "restore",
            &snap,
            "--to",
            &s.dir.join("again").to_string_lossy(),
            "--connect",
            &host.uri,
            "--define",
            "--name",
            &name,
        ],
        Duration::from_secs(120),
    )?;
    ensure!(again.status.code() == Some(8), "{again:?}");
    ensure!(!s.dir.join("again").join("vdb.qcow2").exists());
    host.virsh(&["destroy", &name])?;
    Ok(())
}

#[test]
fn restore_define_of_corrupt_snapshot_fails_before_defining() -> Result<()> {
    let s = Scratch::new("restore-corrupt")?;
    let pid = std::process::id();
    let name = format!("lbt-rstc-{pid}");
    let img = s.dir.join("c.raw");
    make_raw(&img, 64 << 20, &[(0, pseudo_random(4 << 20, 3))])?;
    let xml = s.dir.join("c.xml");
    std::fs::write(
        &xml,
        guest_domain_xml(&name, &s.dir, &[("vda", &img, "raw")])?,
    )?;
    s.ok(&[
        "backup-image",
        &img.to_string_lossy(),
        "--name",
        &name,
        "--disk",
        "vda",
        "--domain-xml",
        &xml.to_string_lossy(),
    ])?;
    for d in std::fs::read_dir(s.repo.join("chunks"))? {
        for f in std::fs::read_dir(d?.path())? {
            let p = f?.path();
            set_mode(&p, 0o644)?;
            let mut b = std::fs::read(&p)?;
            let i = b.len() / 2;
            b[i] ^= 1;
            std::fs::write(&p, b)?;
        }
    }
    let out = s.output(
        &[
            "restore",
            &format!("{name}@latest"),
            "--to",
            &s.dir.join("out").to_string_lossy(),
            "--connect",
            SYSTEM_URI,
            "--start",
            "--no-network",
        ],
        Duration::from_secs(120),
    )?;
    ensure!(out.status.code() == Some(6), "{out:?}");
    ensure!(
        !virsh(SYSTEM_URI, &["list", "--all", "--name"])?.contains(&name),
        "domain defined"
    );
    ensure!(!s.dir.join("out").join("vda.raw").exists());
    Ok(())
}
