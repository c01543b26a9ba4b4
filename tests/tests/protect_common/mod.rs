//! Shared by the pre-patch protection tests (`protect.rs`, `protect_crash.rs`): a repository
//! and rollback state directory per test, the test guest with an ext4 `vdb`, and checks of the
//! disk chain and images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lifeboat_e2e::{lifeboat_bin, virsh, DiskSpec, TestVm, SYSTEM_URI};
use serde_json::Value;

pub struct Env {
    pub repo: tempfile::TempDir,
    pub state: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Result<Env> {
        let e = Env {
            repo: tempfile::Builder::new()
                .prefix("lifeboat-protect-repo-")
                .tempdir_in("/var/tmp")?,
            state: tempfile::Builder::new()
                .prefix("lifeboat-protect-state-")
                .tempdir_in("/var/tmp")?,
        };
        let o = e.run(&["repo", "init", "--encryption", "none"], None)?;
        ensure!(o.status.success(), "init: {}", stderr(&o));
        Ok(e)
    }

    pub fn cmd(&self, args: &[&str], crash_at: Option<&str>) -> Result<Command> {
        let mut c = Command::new(lifeboat_bin()?);
        c.arg("--repo").arg(self.repo.path()).args(args);
        c.env("LIFEBOAT_ROLLBACK_DIR", self.state.path());
        c.env_remove("LIFEBOAT_TEST_CRASH_AT");
        if let Some(p) = crash_at {
            c.env("LIFEBOAT_TEST_CRASH_AT", p);
        }
        Ok(c)
    }

    pub fn run(&self, args: &[&str], crash_at: Option<&str>) -> Result<Output> {
        Ok(self.cmd(args, crash_at)?.output()?)
    }

    /// Runs a command that must succeed and print JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.run(&a, None)?;
        ensure!(
            o.status.success(),
            "lifeboat {args:?} failed ({}): {}",
            o.status,
            stderr(&o)
        );
        serde_json::from_slice(&o.stdout)
            .with_context(|| format!("JSON of {args:?}: {}", String::from_utf8_lossy(&o.stdout)))
    }

    /// Runs a command with the crash hook; it must die by SIGABRT.
    pub fn crash(&self, args: &[&str], point: &str) -> Result<()> {
        let o = self.run(args, Some(point))?;
        ensure!(
            !o.status.success() && stderr(&o).contains(point),
            "lifeboat {args:?} with crash point {point} did not abort: {} {}",
            o.status,
            stderr(&o)
        );
        Ok(())
    }

    pub fn state_file(&self, vm: &str) -> PathBuf {
        self.state.path().join(format!("{vm}.json"))
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn boot() -> Result<TestVm> {
    let vm = TestVm::create("protect", &[DiskSpec::ext4("vdb", "qcow2", 64)])?;
    vm.start()?;
    vm.wait_agent(Duration::from_secs(120))?;
    Ok(vm)
}

/// The disk's current source in the live XML.
pub fn source(vm: &TestVm) -> Result<PathBuf> {
    let out = virsh(SYSTEM_URI, &["domblklist", &vm.name])?;
    out.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("vdb")).then(|| it.next().map(PathBuf::from))?
        })
        .context("vdb in domblklist")
}

pub fn backing_of(image: &Path) -> Result<Option<String>> {
    let o = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()?;
    ensure!(o.status.success(), "qemu-img info: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_owned))
}

pub fn overlays_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".lifeboat-rb-"))
        .collect())
}

/// The chain is back to the one base image: source = base, no backing, no overlay file, no
/// snapshot metadata, no state file.
pub fn assert_consolidated(env: &Env, vm: &TestVm) -> Result<()> {
    let base = vm.disk_path("vdb");
    ensure!(source(vm)? == base, "vdb runs on {:?}", source(vm)?);
    ensure!(backing_of(&base)?.is_none(), "base has a backing file");
    let left = overlays_in(base.parent().context("dir")?)?;
    ensure!(left.is_empty(), "leftover overlays {left:?}");
    let snaps = virsh(SYSTEM_URI, &["snapshot-list", "--name", &vm.name])?;
    ensure!(snaps.trim().is_empty(), "snapshot metadata left: {snaps}");
    ensure!(!env.state_file(&vm.name).exists(), "state file left");
    Ok(())
}

pub fn protect(env: &Env, vm: &TestVm, rollback_for: &str) -> Result<Value> {
    let j = env.json(&[
        "protect",
        &vm.name,
        "--rollback-for",
        rollback_for,
        "--reason",
        "kernel update",
    ])?;
    let overlay = source(vm)?;
    ensure!(
        overlay.to_string_lossy().contains(".lifeboat-rb-"),
        "vdb not on an overlay after protect: {overlay:?}"
    );
    ensure!(
        backing_of(&overlay)?.as_deref() == Some(&*vm.disk_path("vdb").to_string_lossy()),
        "overlay's backing is not the base"
    );
    ensure!(env.state_file(&vm.name).exists(), "no state file");
    Ok(j)
}

/// `qemu-img check -U` of every image file of vdb (base, and the rollback overlays that exist):
/// no corruption, no check error. Leaked clusters are allowed (an image in use by QEMU may
/// have metadata updates not yet written back).
pub fn assert_images_intact(vm: &TestVm) -> Result<()> {
    let base = vm.disk_path("vdb");
    let mut images = vec![base.clone()];
    images.extend(overlays_in(base.parent().context("dir")?)?);
    for img in images
        .iter()
        .filter(|p| !p.to_string_lossy().ends_with(".mem"))
    {
        let o = Command::new("qemu-img")
            .args(["check", "-U", "--output=json"])
            .arg(img)
            .output()?;
        let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
            format!(
                "qemu-img check {}: {} {}",
                img.display(),
                o.status,
                stderr(&o)
            )
        })?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        ensure!(
            n("corruptions") == 0 && n("check-errors") == 0,
            "{} is damaged: {v}",
            img.display()
        );
    }
    ensure!(base.exists(), "base image gone");
    Ok(())
}

/// Images intact, and the guest reads `want` from f.txt.
pub fn assert_data(vm: &TestVm, want: &str) -> Result<()> {
    assert_images_intact(vm)?;
    let got = vm.exec_ok("cat /mnt/vdb/f.txt")?;
    ensure!(got.trim() == want, "f.txt holds {got:?}, not {want:?}");
    Ok(())
}
