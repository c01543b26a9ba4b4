//! [`TestRepo`]: an unencrypted repository in a temporary directory under `/var/tmp`, with the
//! `lifeboat` commands the end-to-end tests run against it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::bin::lifeboat_bin;

/// The test hooks that pause a backup (set per command by the tests that use them, never
/// inherited from the environment of the test process).
const PAUSE_HOOKS: [&str; 2] = [
    "LIFEBOAT_TEST_PAUSE_AFTER_BEGIN",
    "LIFEBOAT_TEST_PAUSE_WHILE_FROZEN",
];

/// A repository (`repo init --encryption none`) removed on drop.
#[derive(Debug)]
pub struct TestRepo {
    dir: tempfile::TempDir,
}

impl TestRepo {
    /// Initialises a repository in a new `/var/tmp/<prefix>…` directory.
    pub fn new(prefix: &str) -> Result<TestRepo> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .context("creating the repository directory")?;
        let r = TestRepo { dir };
        let o = r.cmd(&["repo", "init", "--encryption", "none"]).output()?;
        ensure!(
            o.status.success(),
            "repo init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(r)
    }

    /// The repository directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `lifeboat --repo DIR ARGS…`, without the pause hooks. Panics only when the `lifeboat`
    /// binary cannot be found or built (a broken test setup, not a test result).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(lifeboat_bin().expect("lifeboat binary"));
        c.arg("--repo").arg(self.path()).args(args);
        for hook in PAUSE_HOOKS {
            c.env_remove(hook);
        }
        c
    }

    /// The snapshots `lifeboat snapshots --json` lists.
    pub fn snapshots(&self) -> Result<Vec<Value>> {
        let o = self.cmd(&["snapshots", "--json"]).output()?;
        ensure!(
            o.status.success(),
            "snapshots: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout)?;
        Ok(v.as_array()
            .or_else(|| v["snapshots"].as_array())
            .cloned()
            .unwrap_or_default())
    }

    /// How many snapshots the repository lists.
    pub fn snapshot_count(&self) -> Result<usize> {
        Ok(self.snapshots()?.len())
    }

    /// `lifeboat restore SNAP --to TEMP/out`; returns the temporary directory (removed on drop)
    /// and the `out` directory holding the restored images.
    pub fn restore(&self, snap: &str, prefix: &str) -> Result<(tempfile::TempDir, PathBuf)> {
        let to = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")?;
        let out = to.path().join("out");
        let o = self.cmd(&["restore", snap, "--to"]).arg(&out).output()?;
        ensure!(
            o.status.success(),
            "restore {snap}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok((to, out))
    }
}
