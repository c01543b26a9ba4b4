//! Command-line interface definitions (clap). Parsing only: the commands live in `commands/`.
// The doc comments here are also clap's `--help` text, where `<time>`-style placeholders are the
// convention; rustdoc would read them as unclosed HTML tags.
#![allow(rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Lifeboat: backups of KVM/libvirt virtual machines into an independent, encrypted repository.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Options shared by all commands.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by all commands.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Repository location (a directory).
    #[arg(long, short = 'r', env = "LIFEBOAT_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the repository passphrase from this file (first line). The passphrase may also come
    /// from LIFEBOAT_PASSWORD.
    #[arg(long, env = "LIFEBOAT_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Open the repository with a key file instead of a passphrase.
    #[arg(long, env = "LIFEBOAT_KEY_FILE", global = true)]
    pub key_file: Option<PathBuf>,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v info, -vv debug, -vvv trace). LIFEBOAT_LOG overrides.
    #[arg(long, short = 'v', action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No progress bar and no informational output.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
}

/// Lifeboat's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Repository management.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Back up a disk image file (qcow2 or raw) that no running VM is using.
    BackupImage(BackupImageArgs),
    /// Back up libvirt VMs (running: live through a pull-mode backup job; shut off: through
    /// their disk files), incrementally when change tracking allows.
    Backup(BackupArgs),
    /// Internal: the thaw guard started by `backup` (thaws the guest if the agent dies).
    #[command(name = "__thaw-guard", hide = true)]
    ThawGuard(ThawGuardArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot's disks into a directory (and optionally define and start the VM).
    Restore(RestoreArgs),
    /// Run a VM from a snapshot at once, served from the repository, while its data moves to
    /// local storage.
    InstantRestore(InstantRestoreArgs),
    /// Prove a snapshot recovers: boot it in an isolated sandbox (throw-away overlays, no
    /// network), run checks in the guest, measure the RTO, store the verdict, tear down.
    BootTest(BootTestArgs),
    /// Check the repository: every snapshot, index and (with --read-data) chunk.
    Verify(VerifyArgs),
    /// Before a patch: a backup into the repository plus a local rollback point (disk
    /// overlays, memory with --memory) taken at the same frozen moment, with an expiry.
    Protect(ProtectArgs),
    /// Return a VM to its rollback point (or, with --from-backup, to protect's backup).
    Rollback(RollbackArgs),
    /// "The patch went fine": consolidate the rollback point into the disks now.
    Commit(CommitArgs),
    /// Consolidate every expired rollback point and repair interrupted ones (run by a timer).
    Reconcile(ReconcileArgs),
    /// List every snapshot, overlay chain and checkpoint on the host; flag what is past policy.
    AuditSnapshots(AuditSnapshotsArgs),
}

/// `lifeboat protect`
#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// Domain name.
    pub vm: String,
    /// How long the rollback point lives (e.g. 4h, 30m, 1d); `reconcile` consolidates it after.
    #[arg(long, value_name = "DURATION")]
    pub rollback_for: String,
    /// Why (stored with the rollback point).
    #[arg(long)]
    pub reason: Option<String>,
    /// Also save the memory state, so that rollback resumes the running guest.
    #[arg(long)]
    pub memory: bool,
    /// libvirt URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Guest filesystem freeze policy (protect promises an application-consistent backup).
    #[arg(long, value_enum, default_value = "required")]
    pub quiesce: QuiesceArg,
    /// Hard limit on the freeze in seconds.
    #[arg(long, default_value_t = 60)]
    pub freeze_limit: u64,
    /// A tag to attach to the backup (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Internal/testing: take only the rollback point, without a backup.
    #[arg(long, hide = true)]
    pub no_backup: bool,
    /// Limits on the backup's load on the host.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// `lifeboat rollback`
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Domain name.
    pub vm: String,
    /// libvirt URI (used when no rollback point records one).
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// If the rollback point is gone, restore the VM from the backup `protect` took.
    #[arg(long)]
    pub from_backup: bool,
}

/// `lifeboat commit`
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Domain name.
    pub vm: String,
}

/// `lifeboat reconcile`
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Only these domains (default: every rollback point).
    pub vms: Vec<String>,
    /// Only rollback points on this libvirt URI (default: all).
    #[arg(long)]
    pub connect: Option<String>,
    /// Also look for Lifeboat rollback snapshots whose state file is gone (on --connect, or
    /// qemu:///system) and rebuild it from the snapshot, so their expiry holds. Use it where
    /// one state directory serves the host (the timer).
    #[arg(long)]
    pub adopt_orphans: bool,
}

/// `lifeboat audit-snapshots`
#[derive(Debug, Args)]
pub struct AuditSnapshotsArgs {
    /// Policy: flag what is older than this (e.g. 24h, 7d).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub older_than: String,
    /// libvirt URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
}

/// `lifeboat repo ...`
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a new repository.
    Init(InitArgs),
    /// Add a key slot (another passphrase or a key file) to the repository.
    AddKey(AddKeyArgs),
    /// Generate a new random key file (to use with `repo init --key-file` or `repo add-key`).
    GenerateKeyFile(GenerateKeyFileArgs),
}

/// Encryption choices for a new repository.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EncryptionArg {
    /// Authenticated encryption (see --cipher) with keyed BLAKE3 chunk ids (the default).
    Repokey,
    /// No encryption and plain BLAKE3 ids: anyone with the storage reads the data.
    None,
}

/// Object ciphers for a new encrypted repository.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CipherArg {
    /// AEGIS-256 where this CPU has AES instructions, else XChaCha20-Poly1305.
    Auto,
    /// AEGIS-256 (draft-irtf-cfrg-aegis-aead).
    Aegis256,
    /// XChaCha20-Poly1305.
    Xchacha20poly1305,
}

/// `lifeboat repo init`
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Repository location (overrides --repo).
    pub location: Option<String>,
    /// Encryption mode.
    #[arg(long, value_enum, default_value = "repokey")]
    pub encryption: EncryptionArg,
    /// The authenticated cipher of an encrypted repository's objects.
    ///
    /// Both take random 192-bit nonces and 128-bit tags; readers follow the repository's
    /// config. AEGIS-256 is several times faster where the CPU has AES instructions (x86-64
    /// AES-NI, ARMv8 crypto extensions; ≈ 5.8 GB/s against ≈ 1 GB/s per core on the bench
    /// machine) and much slower where it has none.
    #[arg(long, value_enum, default_value = "auto")]
    pub cipher: CipherArg,
    /// Chunk size: a power of two, a multiple of 64 KiB (e.g. 1M, 4M, 256K).
    ///
    /// The unit of deduplication and of storage: an incremental backup stores a new version of
    /// every chunk that holds a changed block. With frames (the default, see --frame-size) it
    /// reads, seals and stores only the changed frames of such a chunk; without frames it reads
    /// and stores the whole chunk, so that smaller chunks (256K) suit VMs whose writes are small
    /// and scattered. Larger chunks make full backups cheaper (fewer objects).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub chunk_size: u64,
    /// zstd compression level of the repository's chunks, 1 (fastest) to 22 (densest).
    ///
    /// The default, 1, costs about a quarter less CPU than zstd's default 3 for about 2 % more
    /// stored data on a typical VM disk: backup windows and host CPU usually matter more than
    /// that. Reading does not depend on the level.
    #[arg(long, default_value_t = repo_format::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Frame size of chunk objects: a power of two from 64K, smaller than the chunk size; 0 for
    /// unframed chunks.
    ///
    /// Each chunk is compressed and encrypted as independent frames, so that an incremental
    /// backup reads, seals and stores only the frames that hold a changed block; the new
    /// version of the chunk refers to the others in the previous one (a format-3 repository's
    /// delta objects). 64K (QEMU's dirty-bitmap granularity) makes
    /// incrementals of small scattered writes cheapest; larger frames compress slightly better
    /// (the bench's mixed disk: 64K frames store ≈ 7 % more than unframed 1M chunks, 256K ≈ 3 %).
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub frame_size: u64,
}

/// `lifeboat repo add-key`
#[derive(Debug, Args)]
pub struct AddKeyArgs {
    /// Add this key file (made by `repo generate-key-file`) as a new key slot.
    #[arg(long, conflicts_with = "new_password_file")]
    pub new_key_file: Option<PathBuf>,
    /// Add the passphrase in this file as a new key slot.
    #[arg(long)]
    pub new_password_file: Option<PathBuf>,
    /// A label for the key slot.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// `lifeboat repo generate-key-file`
#[derive(Debug, Args)]
pub struct GenerateKeyFileArgs {
    /// Where to write the key file (refuses to overwrite).
    pub path: PathBuf,
}

/// Output image formats for restore.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ImageFormat {
    /// QEMU copy-on-write v2 (sparse, with the original cluster size and options when known).
    Qcow2,
    /// A sparse raw file.
    Raw,
}

impl ImageFormat {
    /// The qemu-img format name.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// `lifeboat backup-image`
#[derive(Debug, Args)]
pub struct BackupImageArgs {
    /// The image file to back up.
    pub file: PathBuf,
    /// The name snapshots of this image are listed under (e.g. the VM's name).
    #[arg(long)]
    pub name: String,
    /// The disk's name inside the snapshot (default: the file name without extension).
    #[arg(long)]
    pub disk: Option<String>,
    /// Image format (default: probed with qemu-img info).
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// Read the whole image even when change tracking would allow an incremental backup.
    #[arg(long)]
    pub full: bool,
    /// Do not add a persistent dirty bitmap to a qcow2 image for the next incremental backup.
    #[arg(long)]
    pub no_track: bool,
    /// A tag to attach to the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Store this libvirt domain XML (e.g. `virsh dumpxml --inactive VM`) with the snapshot, so
    /// that `restore --define` and `instant-restore` can recreate the VM.
    #[arg(long)]
    pub domain_xml: Option<PathBuf>,
    /// Limits on the backup's load on the host.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Limits on a backup's load on the host (none by default: a backup uses every core and reads
/// as fast as the disks and the repository allow).
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Read the disks at most at RATE bytes per second, all the disks being read together (a
    /// VM's disks are read at once, VMs one after another; e.g. 200M or 200M/s = 200 MiB/s; K,
    /// M, G, T are powers of 1024). Only allocated data is read.
    /// For a running domain a lower rate makes the backup job last longer, and with it the
    /// snapshot's copy-before-write scratch space on the host.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub limit_read: Option<u64>,
    /// Hash, compress and encrypt at most N chunks at once: nearly all of a backup's CPU, so
    /// about N cores (default: every chunk in flight, which keeps all cores busy).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub cpus: Option<u16>,
}

/// Quiescing policy for `backup`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum QuiesceArg {
    /// Freeze through the guest agent; without one, warn and back up crash-consistent.
    Auto,
    /// Fail before starting the job unless the guest's filesystems can be frozen.
    Required,
    /// Do not freeze (crash-consistent).
    Off,
}

/// `lifeboat backup`
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Domain names.
    #[arg(required = true)]
    pub vms: Vec<String>,
    /// libvirt URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Read every disk in full even when an incremental backup is possible.
    #[arg(long)]
    pub full: bool,
    /// Do not back up this disk target (repeatable).
    #[arg(long = "exclude-disk", value_name = "TARGET")]
    pub exclude_disks: Vec<String>,
    /// Guest filesystem freeze policy.
    #[arg(long, value_enum, default_value = "auto")]
    pub quiesce: QuiesceArg,
    /// Freeze only this guest mount point (repeatable; default: all).
    #[arg(long = "freeze-mountpoint", value_name = "M")]
    pub freeze_mountpoints: Vec<String>,
    /// Command run in the guest (sh -c, through the guest agent) before freezing.
    #[arg(long)]
    pub pre_freeze: Option<String>,
    /// Command run in the guest after thawing (always, once the pre-freeze command ran).
    #[arg(long)]
    pub post_thaw: Option<String>,
    /// Hard limit on the freeze in seconds: the thaw guard thaws the guest after it.
    #[arg(long, default_value_t = 60)]
    pub freeze_limit: u64,
    /// A tag to attach to the snapshots (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Limits on the backup's load on the host.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// `lifeboat __thaw-guard` (internal).
#[derive(Debug, Args)]
pub struct ThawGuardArgs {
    /// libvirt URI.
    #[arg(long)]
    pub connect: String,
    /// Domain name.
    #[arg(long)]
    pub domain: String,
    /// Thaw after this many seconds even while the agent lives.
    #[arg(long)]
    pub timeout: u64,
}

/// `lifeboat snapshots`
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only snapshots of this name.
    pub name: Option<String>,
}

/// `lifeboat boot-test`
#[derive(Debug, Args)]
pub struct BootTestArgs {
    /// Snapshot: an id prefix, NAME@latest or NAME@<time>.
    pub snapshot: String,
    /// A command that must exit 0 in the guest (`/bin/sh -c CMD`, through the guest agent);
    /// repeatable. Retried until it passes or the time runs out.
    #[arg(long = "check", value_name = "CMD")]
    pub checks: Vec<String>,
    /// A TCP port that must be listening inside the guest; repeatable.
    #[arg(long = "port", value_name = "N")]
    pub ports: Vec<u16>,
    /// YAML policy for this VM: `checks`, `ports`, `timeout`, `settle`.
    #[arg(long, value_name = "FILE.yaml")]
    pub policy: Option<PathBuf>,
    /// Time limit from the start until every check passed (e.g. 90s, 10m). Default: the
    /// policy's, else 10m.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// How long checks are retried once the guest is up (default: until the time limit).
    #[arg(long, value_name = "DURATION")]
    pub settle: Option<String>,
    /// The libvirt to run the sandbox on.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Write a self-contained HTML report (checks, RTO, console, screenshot) to this file.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
    /// On failure, keep the sandbox running for inspection until Ctrl-C (then tear it down).
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Directory for the sandbox's overlays and console log (removed afterwards).
    #[arg(long, default_value = "/var/lib/lifeboat/boottest", value_name = "DIR")]
    pub work_dir: PathBuf,
    /// Do not store the result in the repository.
    #[arg(long)]
    pub no_store: bool,
}

/// `lifeboat restore`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot: an id prefix, NAME@latest or NAME@<time>.
    pub snapshot: String,
    /// Directory to restore into; each disk becomes DIR/<disk>.<format>.
    #[arg(long)]
    pub to: PathBuf,
    /// Only this disk (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Output format of the disks (default: each disk's original format; the NVRAM stays raw).
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// Replace existing files at the target (and, with --define, a domain of the same name).
    #[arg(long)]
    pub force: bool,
    /// With --define / --start: the libvirt to define the VM on.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Define the VM from the domain XML stored in the snapshot, with the restored disks.
    #[arg(long)]
    pub define: bool,
    /// Start the VM after defining it (implies --define).
    #[arg(long)]
    pub start: bool,
    /// Name of the new VM (default: the original name, or NAME-restored-<time> if taken).
    #[arg(long)]
    pub name: Option<String>,
    /// Network interfaces.
    #[command(flatten)]
    pub network: NetworkArgs,
}

/// How network interfaces of a restored VM are treated.
#[derive(Debug, Clone, Args)]
pub struct NetworkArgs {
    /// Connect interfaces on network or bridge OLD to NEW instead (repeatable).
    #[arg(long = "network", value_name = "OLD=NEW", value_parser = parse_mapping)]
    pub network_map: Vec<(String, String)>,
    /// Remove all network interfaces.
    #[arg(long, conflicts_with = "network_map")]
    pub no_network: bool,
}

/// `lifeboat instant-restore`
#[derive(Debug, Args)]
pub struct InstantRestoreArgs {
    /// Snapshot: an id prefix, NAME@latest or NAME@<time> (not with --resume).
    #[arg(required_unless_present = "resume")]
    pub snapshot: Option<String>,
    /// The libvirt to run the VM on.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Name of the new VM (default: the original name, or NAME-restored-<time> if taken). With
    /// --resume: the VM to resume.
    #[arg(long, required_if_eq("resume", "true"))]
    pub name: Option<String>,
    /// Directory for the local disks (qcow2 overlays that end up holding all data) and the
    /// state file.
    #[arg(long, default_value = "/var/lib/libvirt/images")]
    pub storage: PathBuf,
    /// Continue an interrupted instant restore of --name: serve its snapshot again and finish
    /// moving the data.
    #[arg(long)]
    pub resume: bool,
    /// Chunks (1 MiB each) cached in memory for the whole VM, split evenly between its disks
    /// (at least 4 per disk). Bounds the process's memory while the VM runs from the backup.
    #[arg(long, default_value_t = 64)]
    pub cache_chunks: usize,
    /// Network interfaces.
    #[command(flatten)]
    pub network: NetworkArgs,
}

/// Parse `OLD=NEW`.
pub fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("'{s}': expected OLD=NEW")),
    }
}

/// `lifeboat verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Also read, decrypt and hash every chunk the snapshots reference.
    #[arg(long)]
    pub read_data: bool,
    /// Only these snapshots (default: all).
    pub snapshots: Vec<String>,
}

/// Parse sizes like `1M`, `64K`, `4MiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 1M, 256K, 4MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parse a rate in bytes per second: a size ([`parse_size`]) with an optional `/s`, not zero.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(size)? {
        0 => Err(format!(
            "a rate of '{s}' would never finish; give at least 1 byte per second"
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200M"), Ok(200 << 20));
        assert_eq!(parse_rate("200M/s"), Ok(200 << 20));
        assert_eq!(parse_rate("1048576"), Ok(1 << 20));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("0M/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5M/h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
