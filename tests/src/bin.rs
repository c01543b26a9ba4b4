//! The `lifeboat` binary under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};

/// Builds the `lifeboat` binary once per test process (`cargo build -p lifeboat`, honouring
/// `CARGO_TARGET_DIR`) and returns its path.
pub fn lifeboat_bin() -> Result<PathBuf> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(b) = BIN.get() {
        return Ok(b.clone());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-q", "-p", "lifeboat"])
        .current_dir(&root)
        .output()
        .context("run cargo build -p lifeboat")?;
    ensure!(
        out.status.success(),
        "cargo build -p lifeboat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("lifeboat");
    ensure!(bin.is_file(), "no binary at {}", bin.display());
    Ok(BIN.get_or_init(|| bin).clone())
}

/// The step times of a `lifeboat backup --json` report (`steps_ms`): (step, milliseconds), in
/// the order the steps ran. Empty when the report has none.
pub fn backup_steps(report: &serde_json::Value) -> Vec<(String, f64)> {
    report["steps_ms"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    (
                        s["step"].as_str().unwrap_or("?").to_owned(),
                        s["ms"].as_f64().unwrap_or(-1.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
