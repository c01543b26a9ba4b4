//! `lifeboat backup VM` end to end, the quiescing options (real libvirt, TCG guest with two ext4
//! disks, one guest for all steps):
//! 1. `--pre-freeze` / `--post-thaw` run in the guest, in order: the pre-freeze marker is in the
//!    snapshot, the post-thaw marker is not, and the guest's clock shows the frozen window between
//!    them; while frozen (all filesystems), writes to the second disk block.
//! 2. A failing pre-freeze command fails the run with the command's error, before any freeze or
//!    job; the post-thaw command still runs (documented: "always, once the pre-freeze command
//!    ran"); nothing committed, no checkpoint, no job.
//! 3. `--freeze-limit`: the agent is stuck while frozen (test hook); the thaw guard thaws the guest
//!    at about the limit while the agent still runs, the run reports it, and the next backup
//!    succeeds incrementally with no leftovers.
//! 4. `--freeze-mountpoint /mnt/vda`: only that filesystem is frozen; writes to /mnt/vdb proceed
//!    while writes to /mnt/vda block until the thaw.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use guest_quiesce::{Agent, UnixSocketTransport};
use lifeboat_e2e::{
    check_ext4, read_file_from_ext4, virsh, wait_until, DiskSpec, TestRepo, TestVm, VmOptions,
};
use serde_json::Value;

const PAUSE_WHILE_FROZEN: &str = "LIFEBOAT_TEST_PAUSE_WHILE_FROZEN";

/// What these tests run against a [`TestRepo`] besides its own commands.
trait RepoExt {
    fn spawn_backup(&self, vm: &TestVm, extra: &[&str], pause: Option<u64>) -> Result<Child>;
    fn restore_disk(&self, snap: &str, d: &str) -> Result<(tempfile::TempDir, std::path::PathBuf)>;
}

impl RepoExt for TestRepo {
    /// `backup --json VM EXTRA…`, optionally paused `pause` seconds while frozen, in the
    /// background.
    fn spawn_backup(&self, vm: &TestVm, extra: &[&str], pause: Option<u64>) -> Result<Child> {
        let mut args = vec!["backup", "--json", &vm.name];
        args.extend_from_slice(extra);
        let mut c = self.cmd(&args);
        if let Some(p) = pause {
            c.env(PAUSE_WHILE_FROZEN, p.to_string());
        }
        Ok(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// Restores `snap` and returns the directory and the restored image of disk `d`.
    fn restore_disk(&self, snap: &str, d: &str) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
        let (to, out) = self.restore(snap, "lifeboat-hooks-restore-")?;
        let img = std::fs::read_dir(&out)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_stem().is_some_and(|s| s == d))
            .with_context(|| format!("disk {d} not restored in {}", out.display()))?;
        Ok((to, img))
    }
}

/// The finished run: exit status, JSON (when it succeeded), stderr.
fn finish(c: Child) -> Result<(Output, Value, String)> {
    let o = c.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let j = if o.status.success() {
        serde_json::from_slice(&o.stdout)
            .with_context(|| format!("backup output: {}", String::from_utf8_lossy(&o.stdout)))?
    } else {
        Value::Null
    };
    Ok((o, j, stderr))
}

fn finish_ok(c: Child) -> Result<(Value, String)> {
    let (o, j, stderr) = finish(c)?;
    ensure!(o.status.success(), "backup failed ({}): {stderr}", o.status);
    Ok((j, stderr))
}

fn disk<'a>(j: &'a Value, name: &str) -> Result<&'a Value> {
    j["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .with_context(|| format!("no disk {name} in {j}"))
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

fn checkpoints(vm: &TestVm) -> Result<Vec<String>> {
    Ok(virsh(&vm.uri, &["checkpoint-list", &vm.name, "--name"])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn wait_status(vm: &TestVm, want: &str, within: Duration) -> Result<Instant> {
    wait_until(within, Duration::from_millis(100), || {
        Ok((vm.fsfreeze_status().ok().as_deref() == Some(want)).then(Instant::now))
    })
    .with_context(|| format!("guest not {want} within {within:?}"))
}

/// The second qemu-ga (its own virtio-serial port): the one libvirt uses refuses guest-exec while
/// it has the filesystems frozen.
type Direct = Agent<UnixSocketTransport>;

/// `sh -c script` through the direct agent.
fn direct_exec(a: &Direct, script: &str) -> Result<(i32, String)> {
    let r = a.exec("/bin/sh", &["-c", script], Duration::from_secs(30))?;
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    eprintln!(
        "direct exec {script:?}: {:?} {out:?} {:?}",
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    Ok((r.exit_code.unwrap_or(-1), out))
}

/// Inside the guest, while (maybe) frozen: write to `/mnt/<free>` (must not block), start a
/// write to `/mnt/<probe>` in the background and report after 2 s whether it finished.
/// Returns (free disk written, probe write finished). The caller checks the guest was still
/// frozen afterwards, so the whole probe ran inside the frozen window.
fn probe_writes(a: &Direct, free: Option<&str>, probe: &str, tag: &str) -> Result<(bool, bool)> {
    let done = format!("/tmp/probe-{tag}-done");
    let mut script = String::from("mkdir -p /tmp; ");
    if let Some(f) = free {
        script += &format!("echo {tag} > /mnt/{f}/free-{tag} && echo free-written; ");
    }
    script += &format!(
        "(echo {tag} > /mnt/{probe}/probe-{tag}; echo done > {done}) </dev/null >/dev/null 2>&1 & \
         sleep 2; test -e {done} && echo probe-done || echo probe-blocked"
    );
    let (exit, out) = direct_exec(a, &script)?;
    ensure!(exit == 0, "probe {tag} failed: {exit} {out:?}");
    Ok((out.contains("free-written"), out.contains("probe-done")))
}

fn uptime_of(vm: &TestVm, path: &str) -> Result<f64> {
    let s = vm.exec_ok(&format!("cat {path}"))?;
    s.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("{path}: not an uptime: {s:?}"))
}

#[test]
fn pre_post_hooks_freeze_limit_and_mountpoints() -> Result<()> {
    let vm = TestVm::create_with(
        "hooks",
        &VmOptions {
            disks: vec![
                DiskSpec::ext4("vda", "qcow2", 48),
                DiskSpec::ext4("vdb", "qcow2", 32),
            ],
            direct_agent: true,
            ..VmOptions::default()
        },
    )?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let direct: Direct =
        Agent::new(UnixSocketTransport::new(vm.direct_agent_socket())).with_timeout_scale(3.0);
    wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        Ok(direct.ping().is_ok().then_some(()))
    })
    .context("direct agent did not answer")?;
    let repo = TestRepo::new("lifeboat-hooks-repo-")?;
    vm.exec_ok("mkdir -p /tmp && rm -f /tmp/hook-* /mnt/vda/*.mark")?;

    // 1. Pre-freeze and post-thaw hooks, in order around a 10 s frozen window (all filesystems
    //    frozen: a write to vdb blocks).
    let pre = "cat /proc/uptime > /tmp/hook-pre && echo before-freeze > /mnt/vda/pre.mark";
    let post = "cat /proc/uptime > /tmp/hook-post && echo after-thaw > /mnt/vda/post.mark";
    let c = repo.spawn_backup(&vm, &["--pre-freeze", pre, "--post-thaw", post], Some(10))?;
    wait_status(&vm, "frozen", Duration::from_secs(60))?;
    let (_, pre_seen) = direct_exec(
        &direct,
        "test -e /tmp/hook-pre && test ! -e /tmp/hook-post && echo ok",
    )?;
    ensure!(
        pre_seen.contains("ok"),
        "while frozen: pre-freeze not run or post-thaw already run"
    );
    let (_, blocked_done) = probe_writes(&direct, None, "vdb", "all")?;
    ensure!(
        vm.fsfreeze_status()? == "frozen",
        "the guest thawed during the probe (frozen window too short under this load)"
    );
    ensure!(
        !blocked_done,
        "a write to vdb finished while all filesystems were frozen"
    );
    let (j, stderr) = finish_ok(c)?;
    eprintln!("hooks: {j:#}\n{stderr}");
    ensure!(j["quiesce"] == "application-consistent", "{j}");
    ensure!(j["freeze_status_at_begin"] == "frozen", "{j}");
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(j["warnings"].as_array().is_none_or(|w| w.is_empty()), "{j}");
    let window = j["freeze_window_ms"].as_f64().context("freeze_window_ms")? / 1000.0;
    ensure!(window >= 10.0, "freeze window {window} s with a 10 s pause");
    // The step times show where the run's time went: the 10 s frozen pause lands between the
    // freeze status and the thaw, and the steps come in the order they ran.
    let steps = lifeboat_e2e::backup_steps(&j);
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    let order = [
        "libvirt: domain, disks, checkpoints",
        "pre-freeze command",
        "freeze",
        "backup job start (with checkpoint)",
        "freeze status",
        "thaw",
        "post-thaw command",
        "transfer",
        "commit",
        "end job",
    ];
    let pos: Vec<Option<usize>> = order
        .iter()
        .map(|o| names.iter().position(|n| n == o))
        .collect();
    ensure!(
        pos.iter().all(Option::is_some) && pos.windows(2).all(|w| w[0] < w[1]),
        "steps missing or out of order: {steps:?}"
    );
    let ms = |name: &str| steps.iter().find(|(n, _)| n == name).map_or(-1.0, |s| s.1);
    ensure!(
        ms("thaw") >= 10_000.0,
        "the frozen pause is not in the thaw step: {steps:?}"
    );
    ensure!(
        steps.iter().all(|(_, m)| *m >= 0.0) && ms("freeze") < 10_000.0,
        "{steps:?}"
    );
    let (t_pre, t_post) = (
        uptime_of(&vm, "/tmp/hook-pre")?,
        uptime_of(&vm, "/tmp/hook-post")?,
    );
    eprintln!("guest uptime: pre-freeze {t_pre}, post-thaw {t_post}, window {window:.1} s");
    ensure!(
        t_post - t_pre >= 9.0,
        "post-thaw ran {:.1} s after pre-freeze, less than the 10 s frozen window",
        t_post - t_pre
    );
    no_leftovers(&vm)?;
    // The pre-freeze write is in the snapshot, the post-thaw write is not.
    let snap1 = j["snapshot"].as_str().context("snapshot")?.to_string();
    let (_d, img) = repo.restore_disk(&snap1, "vda")?;
    check_ext4(&img)?;
    ensure!(read_file_from_ext4(&img, "/pre.mark")? == b"before-freeze\n");
    ensure!(
        read_file_from_ext4(&img, "/post.mark").is_err(),
        "the post-thaw command's file is in the snapshot: it ran before the job began"
    );
    ensure!(vm.read_file("/mnt/vda/post.mark")? == b"after-thaw\n");
    ensure!(
        vm.read_file("/mnt/vdb/probe-all")? == b"all\n",
        "blocked write lost after thaw"
    );

    // 2. A failing pre-freeze command: the run fails with its error before freezing; the
    //    post-thaw command still runs; nothing committed, no job, no new checkpoint.
    let n = repo.snapshot_count()?;
    let cps = checkpoints(&vm)?;
    let c = repo.spawn_backup(
        &vm,
        &[
            "--pre-freeze",
            "echo flush-refused >&2; exit 7",
            "--post-thaw",
            "cat /proc/uptime > /tmp/hook-post2",
        ],
        None,
    )?;
    let (o, _, stderr) = finish(c)?;
    eprintln!("failing pre-freeze: {}\n{stderr}", o.status);
    ensure!(
        !o.status.success(),
        "a run with a failing pre-freeze command succeeded"
    );
    ensure!(stderr.contains("pre-freeze command failed"), "{stderr}");
    ensure!(stderr.contains("exit status 7): flush-refused"), "{stderr}");
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(
        vm.exec_ok("test -e /tmp/hook-post2 && echo ran")?
            .contains("ran"),
        "post-thaw did not run"
    );
    ensure!(repo.snapshot_count()? == n, "a snapshot was committed");
    ensure!(
        checkpoints(&vm)? == cps,
        "checkpoints changed: {:?} → {:?}",
        cps,
        checkpoints(&vm)?
    );
    no_leftovers(&vm)?;

    // 3. The freeze limit fires while the agent is stuck frozen: the guard thaws at ~5 s.
    let limit = 5u64;
    let pause = 25u64;
    let c = repo.spawn_backup(&vm, &["--freeze-limit", &limit.to_string()], Some(pause))?;
    let spawned = Instant::now();
    let frozen_at = wait_status(&vm, "frozen", Duration::from_secs(60))?;
    let thawed_at = wait_status(&vm, "thawed", Duration::from_secs(pause - 5))?;
    let frozen_for = thawed_at - frozen_at;
    eprintln!(
        "freeze limit {limit} s: frozen {:?} after spawn, thawed {frozen_for:?} later",
        frozen_at - spawned
    );
    let mut c = c;
    ensure!(
        c.try_wait()?.is_none(),
        "the agent exited before the guard's thaw: not a guard thaw"
    );
    ensure!(
        frozen_for <= Duration::from_secs(limit + 7),
        "thawed {frozen_for:?} after the freeze with a {limit} s limit"
    );
    // Writes proceed while the agent is still stuck.
    let (_, done) = probe_writes(&direct, None, "vdb", "limit")?;
    ensure!(done, "a write blocked after the guard's thaw");
    ensure!(c.try_wait()?.is_none(), "the agent finished early");
    let (j, stderr) = finish_ok(c)?;
    eprintln!("freeze limit: {j:#}\n{stderr}");
    ensure!(
        stderr.contains("exceeded its hard limit"),
        "guard message missing: {stderr}"
    );
    let warnings = j["warnings"].to_string();
    ensure!(
        warnings.contains("the freeze limit fired") && warnings.contains("hard limit of 5 s"),
        "no warning about the freeze limit: {j}"
    );
    // The job normally began inside the window (consistent); when the guard fired before it
    // began, the run must say the snapshot is only crash-consistent.
    if j["freeze_status_at_begin"] == "frozen" {
        ensure!(j["quiesce"] == "application-consistent", "{j}");
    } else {
        ensure!(
            j["quiesce"]
                .as_str()
                .is_some_and(|q| q.starts_with("crash-consistent: the guest was no longer frozen")),
            "{j}"
        );
    }
    ensure!(vm.fsfreeze_status()? == "thawed");
    no_leftovers(&vm)?;
    // The next backup succeeds, incrementally, with no warnings.
    let c = repo.spawn_backup(&vm, &[], None)?;
    let (j, _) = finish_ok(c)?;
    eprintln!("after the freeze limit: {j:#}");
    ensure!(disk(&j, "vda")?["mode"] == "incremental", "{j}");
    ensure!(j["quiesce"] == "application-consistent", "{j}");
    ensure!(j["warnings"].as_array().is_none_or(|w| w.is_empty()), "{j}");
    no_leftovers(&vm)?;

    // 4. --freeze-mountpoint /mnt/vda: vdb stays writable, vda blocks until the thaw.
    let c = repo.spawn_backup(&vm, &["--freeze-mountpoint", "/mnt/vda"], Some(10))?;
    wait_status(&vm, "frozen", Duration::from_secs(60))?;
    let (free_written, probe_done) = probe_writes(&direct, Some("vdb"), "vda", "mp")?;
    ensure!(
        vm.fsfreeze_status()? == "frozen",
        "the guest thawed during the probe (frozen window too short under this load)"
    );
    ensure!(
        free_written,
        "writing to /mnt/vdb failed while only /mnt/vda was frozen"
    );
    ensure!(
        !probe_done,
        "a write to /mnt/vda finished while it was frozen"
    );
    let (j, stderr) = finish_ok(c)?;
    eprintln!("freeze-mountpoint: {j:#}\n{stderr}");
    ensure!(j["quiesce"] == "application-consistent", "{j}");
    ensure!(j["freeze_status_at_begin"] == "frozen", "{j}");
    ensure!(vm.fsfreeze_status()? == "thawed");
    ensure!(
        vm.read_file("/mnt/vda/probe-mp")? == b"mp\n",
        "blocked write lost after thaw"
    );
    no_leftovers(&vm)?;
    Ok(())
}
