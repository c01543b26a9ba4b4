//! guest-quiesce against the real qemu-ga in a booted test guest, through the harness's
//! `virsh qemu-agent-command --timeout` transport.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guest_quiesce::protocol::{GuestExec, GuestGetFsinfo};
use guest_quiesce::{Agent, ErrorKind, FreezeStatus};
use lifeboat_e2e::{DiskSpec, TestVm, VirshTransport};

#[test]
fn freeze_thaw_and_exec_through_guest_quiesce() -> Result<()> {
    let vm = TestVm::create(
        "quiesce",
        &[
            DiskSpec::ext4("vda", "qcow2", 32),
            DiskSpec::ext4("vdb", "qcow2", 32),
        ],
    )?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let agent = Agent::new(VirshTransport {
        uri: vm.uri.clone(),
        domain: vm.name.clone(),
    })
    .with_timeout_scale(3.0);

    agent.ping()?;
    let info = agent.info()?;
    ensure!(info.supports("guest-fsfreeze-freeze"), "{info:?}");
    ensure!(info.supports("guest-exec"), "{info:?}");
    let fs = agent.call(&GuestGetFsinfo)?;
    let mut mounts: Vec<&str> = fs.iter().map(|f| f.mountpoint.as_str()).collect();
    mounts.sort();
    ensure!(mounts == ["/mnt/vda", "/mnt/vdb"], "fsinfo {fs:?}");

    // exec: stdout, stderr, exit code, stdin.
    let r = agent.exec(
        "/bin/sh",
        &["-c", "echo out; echo err >&2; exit 3"],
        Duration::from_secs(60),
    )?;
    ensure!(r.exit_code == Some(3), "{r:?}");
    ensure!(r.stdout == b"out\n" && r.stderr == b"err\n", "{r:?}");
    let r = agent.exec_request(
        &GuestExec::new("/bin/sh", &["-c", "wc -c"]).with_input(&[7u8; 1000]),
        Duration::from_secs(60),
    )?;
    ensure!(String::from_utf8_lossy(&r.stdout).trim() == "1000", "{r:?}");
    let r = agent.exec("/bin/sh", &["-c", "kill -9 $$"], Duration::from_secs(60))?;
    ensure!(r.signal == Some(9) && r.exit_code.is_none(), "{r:?}");

    // A writer running across the freeze: its log must show a pause while frozen.
    vm.exec_ok(
        "(while :; do cut -d' ' -f1 /proc/uptime >> /mnt/vdb/ticks; sync /mnt/vdb/ticks 2>/dev/null; sleep 0.1; done) >/dev/null 2>&1 </dev/null & echo started",
    )?;
    std::thread::sleep(Duration::from_millis(1500));

    ensure!(agent.freeze_status()? == FreezeStatus::Thawed);
    ensure!(agent.freeze(None)? == 2);
    ensure!(agent.freeze_status()? == FreezeStatus::Frozen);
    // While frozen, qemu-ga refuses everything but a few commands.
    let e = agent
        .exec("/bin/true", &[] as &[&str], Duration::from_secs(30))
        .expect_err("guest-exec must be refused while frozen");
    ensure!(
        matches!(e.kind(), ErrorKind::AgentError { .. }),
        "unexpected error kind: {e} ({:?})",
        e.kind()
    );
    std::thread::sleep(Duration::from_secs(3));
    ensure!(agent.thaw()? == 2);
    ensure!(agent.freeze_status()? == FreezeStatus::Thawed);
    std::thread::sleep(Duration::from_millis(1500));
    let ticks = vm.exec_ok("cat /mnt/vdb/ticks")?;
    let times: Vec<f64> = ticks
        .lines()
        .map(|l| l.trim().parse::<f64>().context("tick"))
        .collect::<Result<_>>()?;
    let max_gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    eprintln!("{} ticks, longest gap {max_gap:.2}s", times.len());
    ensure!(
        max_gap >= 2.0,
        "writes went on while frozen (longest gap {max_gap:.2}s)"
    );

    // freeze-list: only the listed mount point.
    ensure!(agent.freeze(Some(&["/mnt/vda".to_string()]))? == 1);
    ensure!(agent.freeze_status()? == FreezeStatus::Frozen);
    ensure!(agent.thaw()? == 1);

    // Errors from the agent come back as AgentError.
    let e = agent
        .exec("/nonexistent", &[] as &[&str], Duration::from_secs(30))
        .expect_err("exec of a missing program");
    ensure!(
        matches!(e.kind(), ErrorKind::AgentError { .. }),
        "{e} ({:?})",
        e.kind()
    );
    vm.destroy()?;
    // Agent of a stopped domain.
    let e = agent.ping().expect_err("ping of a stopped domain");
    ensure!(
        matches!(e.kind(), ErrorKind::NotResponding | ErrorKind::Io),
        "{e} ({:?})",
        e.kind()
    );
    Ok(())
}

/// guest-quiesce's own unix socket transport against a real qemu-ga (a second agent on its own
/// virtio-serial port, since libvirt owns the standard one), including resync after a timeout.
#[test]
fn unix_socket_transport_against_real_agent() -> Result<()> {
    use guest_quiesce::protocol::GuestExecStatus;
    use guest_quiesce::UnixSocketTransport;
    use lifeboat_e2e::VmOptions;

    let vm = TestVm::create_with(
        "qgasock",
        &VmOptions {
            disks: vec![DiskSpec::ext4("vdb", "raw", 32)],
            direct_agent: true,
            ..VmOptions::default()
        },
    )?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let agent =
        Agent::new(UnixSocketTransport::new(vm.direct_agent_socket())).with_timeout_scale(3.0);
    lifeboat_e2e::wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        Ok(agent.ping().is_ok().then_some(()))
    })
    .context("direct agent did not answer")?;
    ensure!(agent.info()?.version.starts_with(char::is_numeric));
    let r = agent.exec(
        "/bin/sh",
        &["-c", "echo direct; exit 5"],
        Duration::from_secs(60),
    )?;
    ensure!(r.exit_code == Some(5) && r.stdout == b"direct\n", "{r:?}");

    // An exec that outlives its timeout, then a socket-level timeout; afterwards the
    // transport reconnects and resyncs.
    let e = agent
        .exec("/bin/sleep", &["3"], Duration::from_millis(300))
        .expect_err("exec must time out");
    ensure!(e.is_timeout(), "{e}");
    // Timeout on the socket itself: an absurdly short per-call timeout.
    let _ = agent.call_timeout(&GuestExecStatus { pid: 1 }, Duration::from_millis(1));
    agent.ping()?;

    ensure!(agent.freeze(None)? == 1);
    ensure!(agent.freeze_status()? == FreezeStatus::Frozen);
    ensure!(agent.thaw()? == 1);
    ensure!(agent.freeze_status()? == FreezeStatus::Thawed);
    Ok(())
}
