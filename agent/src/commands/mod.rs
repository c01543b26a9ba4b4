//! One module per command. Each returns `Result<()>` and prints text or, with `--json`, one JSON
//! document on stdout.

pub mod audit;
pub mod backup;
pub mod backup_image;
pub mod boot_test;
pub mod commit;
pub mod instant_restore;
pub mod protect;
pub mod reconcile;
pub mod repo;
pub mod restore;
pub mod rollback;
pub mod snapshots;
pub mod verify;

use crate::cli::{Cli, Command, RepoCommand};
use crate::error::Result;

/// Run the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Repo(RepoCommand::Init(a)) => repo::init(g, a).await,
        Command::Repo(RepoCommand::AddKey(a)) => repo::add_key(g, a).await,
        Command::Repo(RepoCommand::GenerateKeyFile(a)) => repo::generate_key_file(g, a),
        Command::BackupImage(a) => backup_image::run(g, a).await,
        Command::Backup(a) => backup::run(g, a).await,
        Command::ThawGuard(a) => backup::thaw_guard(a).await,
        Command::Snapshots(a) => snapshots::run(g, a).await,
        Command::Restore(a) => restore::run(g, a).await,
        Command::InstantRestore(a) => instant_restore::run(g, a).await,
        Command::BootTest(a) => boot_test::run(g, a).await,
        Command::Verify(a) => verify::run(g, a).await,
        Command::Protect(a) => protect::run(g, a).await,
        Command::Rollback(a) => rollback::run(g, a).await,
        Command::Commit(a) => commit::run(g, a).await,
        Command::Reconcile(a) => reconcile::run(g, a).await,
        Command::AuditSnapshots(a) => audit::run(g, a).await,
    }
}

/// Print a command's result: `json` on stdout with `--json`, else `text` (nothing with `--quiet`).
pub fn emit(global: &crate::cli::GlobalOpts, json: &serde_json::Value, text: &str) {
    if global.json {
        println!(
            "{}",
            serde_json::to_string_pretty(json).unwrap_or_else(|_| json.to_string())
        );
    } else if !text.is_empty() && !global.quiet {
        println!("{text}");
    }
}

/// Human-readable bytes (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// MB/s (decimal megabytes, as disk tools report) for `bytes` over `secs`.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / 1e6 / secs
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A disk entry for unit tests: disk `name` in `format`, of `virtual_size` bytes in chunks of
/// `chunk_size`, whose index is `index`; a full backup with nothing else recorded.
#[cfg(test)]
pub(crate) fn test_disk_entry(
    name: &str,
    format: &str,
    index: repo_format::IndexId,
    virtual_size: u64,
    chunk_size: u32,
) -> repo_format::DiskEntry {
    repo_format::DiskEntry {
        name: name.into(),
        virtual_size,
        format: format.into(),
        chunk_size,
        index,
        source: None,
        qemu_img_info: None,
        create_options: Default::default(),
        backup_mode: repo_format::BackupMode::Full,
        bytes_read: 0,
        bytes_new: 0,
        chunks_new: 0,
        cbt: None,
    }
}
