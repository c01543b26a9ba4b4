//! `lifeboat backup` while libvirtd restarts (issue 3: "libvirtd restarted mid-backup: the run
//! fails cleanly, nothing half-committed"). The guest runs on a private [`SecondHost`] daemon,
//! so restarting it does not disturb the other tests' libvirtd. The backup is paused by the
//! `LIFEBOAT_TEST_PAUSE_AFTER_BEGIN` hook after the job began (guest thawed, NBD export up), the
//! daemon restarts (the guest keeps running, the job is recovered by the new daemon), then:
//! the run exits non-zero naming the lost connection, the repository lists no new snapshot, the
//! guest is thawed, the failed run itself ended the (recovered) job and deleted its checkpoint
//! after connecting again, and the next runs are incremental; every snapshot restores to a clean
//! filesystem with the guest's files.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use lifeboat_e2e::{
    check_ext4, read_file_from_ext4, virsh, DiskSpec, SecondHost, TestRepo, TestVm,
};
use serde_json::Value;

/// A [`TestRepo`] whose backups go to the libvirt at `uri`.
struct Repo {
    repo: TestRepo,
    uri: String,
}

impl Repo {
    fn new(uri: &str) -> Result<Repo> {
        Ok(Repo {
            repo: TestRepo::new("lifeboat-lvrestart-repo-")?,
            uri: uri.to_owned(),
        })
    }

    fn cmd(&self, args: &[&str]) -> Result<Command> {
        Ok(self.repo.cmd(args))
    }

    fn backup_cmd(&self, vm: &TestVm) -> Result<Command> {
        self.cmd(&["backup", "--json", "--connect", &self.uri, &vm.name])
    }

    fn backup(&self, vm: &TestVm) -> Result<Value> {
        let o = self.backup_cmd(vm)?.output()?;
        ensure!(
            o.status.success(),
            "backup failed ({}): {}",
            o.status,
            stderr(&o)
        );
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    fn snapshots(&self) -> Result<Vec<String>> {
        Ok(self
            .repo
            .snapshots()?
            .iter()
            .filter_map(|s| s["id"].as_str().or_else(|| s["snapshot"].as_str()))
            .map(str::to_owned)
            .collect())
    }

    /// Restores `snap` and checks vda is a clean ext4 holding `files` (path, contents).
    fn check_restore(&self, snap: &str, files: &[(&str, &[u8])]) -> Result<()> {
        let (_to, out) = self.repo.restore(snap, "lifeboat-lvrestart-restore-")?;
        let img = out.join("vda.qcow2");
        check_ext4(&img).with_context(|| format!("snapshot {snap}"))?;
        for (path, data) in files {
            ensure!(
                read_file_from_ext4(&img, path)? == *data,
                "snapshot {snap}: {path} differs from what the guest wrote"
            );
        }
        Ok(())
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// No backup job on the domain, no socket dir under /run/lifeboat, no scratch file.
fn no_leftovers(vm: &TestVm) -> Result<()> {
    let job = virsh(&vm.uri, &["domjobinfo", &vm.name])?;
    ensure!(!job.contains("Backup"), "backup job left: {job}");
    let runs = vm.lifeboat_run_dirs();
    ensure!(runs.is_empty(), "socket dirs left: {runs:?}");
    let scratch = Path::new("/var/lib/lifeboat/scratch").join(&vm.name);
    let files: Vec<_> = std::fs::read_dir(&scratch)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(files.is_empty(), "scratch files left: {files:?}");
    Ok(())
}

#[test]
fn libvirtd_restart_mid_backup_fails_cleanly_and_next_run_recovers() -> Result<()> {
    let t0 = Instant::now();
    let mut host = SecondHost::start()?;
    let vm = TestVm::create_on(&host.uri, "lvrst", &[DiskSpec::ext4("vda", "qcow2", 64)])?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    let repo = Repo::new(&host.uri)?;
    eprintln!(
        "second host up and guest booted after {:.1} s (guest slot wait included)",
        t0.elapsed().as_secs_f64()
    );

    // 1. A full backup: the base of what follows.
    let a = pattern(1 << 20, 1);
    vm.write_file("/mnt/vda/a.bin", &a)?;
    vm.exec_ok("sync")?;
    let full = repo.backup(&vm)?;
    ensure!(full["mode"] == "full", "{full}");
    let full_snap = full["snapshot"].as_str().context("snapshot")?.to_owned();
    ensure!(repo.snapshots()? == [full_snap.clone()], "after the full");

    // 2. libvirtd restarts while the run waits between job start and transfer.
    let b = pattern(2 << 20, 2);
    vm.write_file("/mnt/vda/b.bin", &b)?;
    vm.exec_ok("sync")?;
    let mut child = repo
        .backup_cmd(&vm)?
        .env("LIFEBOAT_TEST_PAUSE_AFTER_BEGIN", "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Restart once the run sits in the hook (job begun, checkpoint read back, guest thawed):
    // without a check before the commit, the transfer would go on over the still-open NBD
    // export and commit.
    let err = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("test hook: pausing") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("the backup did not reach the pause hook")?;
    ensure!(
        virsh(&vm.uri, &["domjobinfo", &vm.name])?.contains("Backup"),
        "no backup job while the run is paused"
    );
    let t = Instant::now();
    host.restart()?;
    eprintln!("libvirtd restarted in {:.1} s", t.elapsed().as_secs_f64());
    ensure!(vm.is_running()?, "the guest stopped with libvirtd");
    let o = child.wait_with_output()?;
    let msg = reader.join().unwrap_or_default();
    eprintln!("backup across a libvirtd restart: {} {msg}", o.status);
    ensure!(
        !o.status.success(),
        "backup across a libvirtd restart succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    ensure!(
        msg.contains("error: lost the connection to libvirtd")
            && msg.contains("nothing was committed"),
        "unclear error: {msg}"
    );
    ensure!(
        repo.snapshots()? == [full_snap.clone()],
        "a snapshot was committed by the interrupted run"
    );
    ensure!(
        vm.fsfreeze_status()? == "thawed",
        "guest left frozen after the interrupted run"
    );
    // The failed run connected again to end the job the new daemon recovered, and deleted the
    // checkpoint it had created: only the full's checkpoint is left.
    no_leftovers(&vm)?;
    let cps = virsh(&vm.uri, &["checkpoint-list", "--name", &vm.name])?;
    let cps: Vec<&str> = cps.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        cps == [full["checkpoint"].as_str().unwrap_or("?")],
        "checkpoints after the failed run: {cps:?}"
    );

    // 3. The next run succeeds, incremental from the full; the one after it too.
    let c = pattern(1 << 20, 3);
    vm.write_file("/mnt/vda/c.bin", &c)?;
    vm.exec_ok("sync")?;
    let next = repo.backup(&vm)?;
    eprintln!("after the restart: {next:#}");
    ensure!(next["mode"] == "incremental", "{next}");
    ensure!(
        next["notes"].as_array().is_some_and(|n| n.is_empty()),
        "the failed run left something to clean up: {next}"
    );
    no_leftovers(&vm)?;
    let cps = virsh(&vm.uri, &["checkpoint-list", "--name", &vm.name])?;
    let cps: Vec<&str> = cps.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        cps == [next["checkpoint"].as_str().unwrap_or("?")],
        "checkpoints after the recovery run: {cps:?}, {next}"
    );
    let next_snap = next["snapshot"].as_str().context("snapshot")?.to_owned();
    let d = pattern(1 << 20, 4);
    vm.write_file("/mnt/vda/d.bin", &d)?;
    vm.exec_ok("sync")?;
    let last = repo.backup(&vm)?;
    ensure!(last["mode"] == "incremental", "{last}");
    let read = last["disks"][0]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(read <= 6 << 20, "incremental read {read} bytes for 1 MiB");
    let last_snap = last["snapshot"].as_str().context("snapshot")?.to_owned();
    ensure!(repo.snapshots()?.len() == 3, "{:?}", repo.snapshots()?);

    eprintln!("backups done after {:.1} s", t0.elapsed().as_secs_f64());

    // 4. Restores.
    repo.check_restore(&full_snap, &[("/a.bin", &a)])?;
    repo.check_restore(
        &next_snap,
        &[("/a.bin", &a), ("/b.bin", &b), ("/c.bin", &c)],
    )?;
    repo.check_restore(
        &last_snap,
        &[
            ("/a.bin", &a),
            ("/b.bin", &b),
            ("/c.bin", &c),
            ("/d.bin", &d),
        ],
    )?;
    Ok(())
}
