//! `lifeboat boot-test` end to end, against real libvirt and TCG guests. One harness VM with an
//! ext4 data disk (vdb) is backed up three times: good (app.db present, a start script for a
//! listener), damaged (app.db removed before the backup), and never-booting (its kernel command
//! line runs `sleep` as init: no agent, ever). Then:
//! - the good snapshot passes its checks (a file check, a command, a port check), with an RTO,
//!   the report and the stored result (`snapshots --json`) show it;
//! - the damaged snapshot fails with the failing check named;
//! - the never-booting snapshot fails at the timeout, with console evidence;
//! - SIGINT mid-test exits 130.
//!
//! After each, nothing is left: no domain (`virsh list --all`), no sandbox directory, no NBD
//! socket, no QEMU process or log.

mod restore_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lifeboat_e2e::{virsh, wait_until, DiskSpec, TestVm, SYSTEM_URI};
use restore_common::Scratch;
use serde_json::Value;

const PREFIX: &str = "lifeboat-boottest-";

/// instant_restore's socket directory for a sandbox directory (FNV-1a of the path).
fn socket_dir(sandbox_dir: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in sandbox_dir.to_string_lossy().as_bytes() {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from("/run/lifeboat/instant").join(format!("{h:016x}"))
}

fn sandbox_domains(vm: &str) -> Result<Vec<String>> {
    Ok(virsh(SYSTEM_URI, &["list", "--all", "--name"])?
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&format!("{PREFIX}{vm}")))
        .map(str::to_owned)
        .collect())
}

fn processes_mentioning(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let p = e.path().join("cmdline");
            if let Ok(c) = std::fs::read(&p) {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                if c.contains(s) {
                    out.push(format!("{}: {c}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    out
}

/// Nothing of sandbox `name` (or of any sandbox of `vm`) is left.
fn assert_clean(vm: &str, work: &Path, name: Option<&str>) -> Result<()> {
    // libvirt tears an autodestroy domain down asynchronously when its connection closes.
    wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        Ok(sandbox_domains(vm)?.is_empty().then_some(()))
    })
    .with_context(|| format!("sandbox domains left: {:?}", sandbox_domains(vm)))?;
    let left: Vec<_> = std::fs::read_dir(work)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "files left in the work dir: {left:?}");
    if let Some(name) = name {
        let sd = socket_dir(&work.join(name));
        ensure!(!sd.exists(), "NBD socket dir left: {}", sd.display());
        let log = Path::new("/var/log/libvirt/qemu").join(format!("{name}.log"));
        ensure!(!log.exists(), "QEMU log left: {}", log.display());
        let procs = processes_mentioning(name);
        ensure!(procs.is_empty(), "processes left: {procs:?}");
    }
    Ok(())
}

fn json_of(out: &std::process::Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "not JSON: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn boot_test_good_damaged_never_boots_and_interrupted() -> Result<()> {
    let t_all = Instant::now();
    let s = Scratch::new("boottest")?;
    let work = s.dir.join("work");
    std::fs::create_dir_all(&work)?;
    let work_s = work.to_string_lossy().into_owned();

    // The VM and its three snapshots.
    let vm = TestVm::create("bt", &[DiskSpec::ext4("vdb", "qcow2", 48)])?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    vm.write_file(
        "/mnt/vdb/app.db",
        &restore_common::pseudo_random(300_000, 7),
    )?;
    // Stands in for the application: the check starts it from the restored data disk.
    vm.write_file(
        "/mnt/vdb/start-app.sh",
        b"#!/bin/sh\n(busybox httpd -p 5432 -h /mnt/vdb || (nc -l -p 5432 </dev/null >/dev/null 2>&1 &)) 2>/dev/null\nexit 0\n",
    )?;
    vm.exec_ok("sync")?;
    let backup = |extra: &[&str]| -> Result<String> {
        let mut a = vec!["backup", "--json", "--connect", SYSTEM_URI, &vm.name];
        a.extend_from_slice(extra);
        let j: Value = serde_json::from_str(&s.ok(&a)?)?;
        let id = j["snapshot"]
            .as_str()
            .or_else(|| j[0]["snapshot"].as_str())
            .or_else(|| j["vms"][0]["snapshot"].as_str())
            .with_context(|| format!("no snapshot id in {j}"))?;
        Ok(id.to_owned())
    };
    let good = backup(&[])?;
    vm.exec_ok("rm /mnt/vdb/app.db && sync")?;
    let damaged = backup(&[])?;
    vm.destroy()?;
    // Never boots: `sleep` as init (no agent, no login), console without `quiet`.
    let xml = virsh(SYSTEM_URI, &["dumpxml", "--inactive", &vm.name])?;
    let broken = xml.replace(
        "console=ttyS0 quiet panic=-1",
        "console=ttyS0 panic=-1 rdinit=/bin/busybox -- sleep 3600",
    );
    ensure!(broken != xml, "cmdline not found in\n{xml}");
    let xml_path = s.dir.join("broken.xml");
    std::fs::write(&xml_path, broken)?;
    virsh(SYSTEM_URI, &["define", &xml_path.to_string_lossy()])?;
    let never = backup(&[])?;
    eprintln!("setup done after {:.1} s", t_all.elapsed().as_secs_f64());
    // The VM is shut off from here on: the sandbox uses its guest slot.

    // 1. Good snapshot: passes, with RTO, report and stored result.
    let report = s.dir.join("good.html");
    let out = s.output(
        &[
            "boot-test",
            &good,
            "--json",
            "--work-dir",
            &work_s,
            "--timeout",
            "150s",
            "--check",
            "test -s /mnt/vdb/app.db",
            "--check",
            "sh /mnt/vdb/start-app.sh",
            "--port",
            "5432",
            "--report",
            &report.to_string_lossy(),
        ],
        Duration::from_secs(300),
    )?;
    let j = json_of(&out)?;
    ensure!(
        out.status.success() && j["verdict"] == "pass",
        "good snapshot did not pass ({}): {j:#}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rto = j["rto_seconds"].as_f64().context("no RTO")?;
    eprintln!(
        "good snapshot: PASS, RTO {rto:.1} s (guest up after {:.1} s via {})",
        j["ready_seconds"].as_f64().unwrap_or(-1.0),
        j["readiness"]
    );
    ensure!(rto > 0.0 && rto < 150.0, "RTO {rto}");
    let checks = j["checks"].as_array().context("checks")?;
    ensure!(checks.len() == 3 && checks.iter().all(|c| c["passed"] == true));
    let sandbox = j["sandbox"].as_str().context("sandbox")?.to_owned();
    ensure!(
        sandbox.starts_with(&format!("{PREFIX}{}", vm.name)),
        "{sandbox}"
    );
    let html = std::fs::read_to_string(&report)?;
    ensure!(html.contains("PASS") && html.contains(&format!("{rto:.1} s")));
    ensure!(
        html.contains("LIFEBOAT-GUEST-READY"),
        "console evidence missing"
    );
    ensure!(html.contains("port 5432") || html.contains("TCP port 5432"));
    assert_clean(&vm.name, &work, Some(&sandbox))?;
    let snaps: Value = serde_json::from_str(&s.ok(&["snapshots", "--json"])?)?;
    let entry = snaps
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == good.as_str()))
        .context("good snapshot listed")?;
    ensure!(
        entry["boot_test"]["verdict"] == "pass"
            && entry["boot_test"]["rto_seconds"].as_f64() == Some(rto),
        "{entry:#}"
    );
    let text = s.ok(&["snapshots"])?;
    ensure!(
        text.contains("boot test") && text.contains("pass "),
        "{text}"
    );

    // 2. Damaged data: fails, naming the check.
    let out = s.output(
        &[
            "boot-test",
            &damaged,
            "--json",
            "--work-dir",
            &work_s,
            "--timeout",
            "150s",
            "--settle",
            "4s",
            "--check",
            "test -d /mnt/vdb",
            "--check",
            "test -s /mnt/vdb/app.db",
        ],
        Duration::from_secs(300),
    )?;
    let j = json_of(&out)?;
    ensure!(out.status.code() == Some(9), "exit {}: {j:#}", out.status);
    let reason = j["reason"].as_str().unwrap_or_default();
    ensure!(
        j["verdict"] == "fail" && reason.contains("`test -s /mnt/vdb/app.db` (exit 1)"),
        "{j:#}"
    );
    ensure!(!reason.contains("test -d"), "passing check named: {reason}");
    eprintln!("damaged snapshot: FAIL: {reason}");
    assert_clean(&vm.name, &work, j["sandbox"].as_str())?;

    // 3. Never boots: fails at the timeout with the console as evidence.
    let t = Instant::now();
    let out = s.output(
        &[
            "boot-test",
            &never,
            "--json",
            "--work-dir",
            &work_s,
            "--timeout",
            "25s",
            "--check",
            "true",
        ],
        Duration::from_secs(300),
    )?;
    let j = json_of(&out)?;
    ensure!(out.status.code() == Some(9), "exit {}: {j:#}", out.status);
    let reason = j["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("did not come up within 25 s"), "{j:#}");
    ensure!(t.elapsed() >= Duration::from_secs(25), "{:?}", t.elapsed());
    let console = j["console_tail"].as_str().unwrap_or_default();
    ensure!(
        console.contains("Linux version") || console.contains("busybox"),
        "no console evidence: {console:?}"
    );
    eprintln!("never-booting snapshot: FAIL: {reason}");
    assert_clean(&vm.name, &work, j["sandbox"].as_str())?;

    // 4. SIGINT mid-test.
    let mut child = s
        .cmd(&[
            "boot-test",
            &good,
            "--work-dir",
            &work_s,
            "--timeout",
            "300s",
            "--check",
            "false",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let name = wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
        if let Some(st) = child.try_wait()? {
            bail!("boot-test exited early: {st}");
        }
        Ok(sandbox_domains(&vm.name)?.into_iter().next())
    })?;
    // Let it get into the checks (the guest is up, guest-exec in flight).
    std::thread::sleep(Duration::from_secs(12));
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("boot-test did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(status.code() == Some(130), "exit after SIGINT: {status}");
    assert_clean(&vm.name, &work, Some(&name))?;
    eprintln!("SIGINT: exit 130, nothing left ({name})");

    drop(vm);
    eprintln!("boot-test e2e: {:.1} s", t_all.elapsed().as_secs_f64());
    Ok(())
}
