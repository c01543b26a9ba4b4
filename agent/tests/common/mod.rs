//! Helpers shared by the end-to-end tests of the image path (`tests/image_*.rs`): a throw-away
//! repository per test, running the real `lifeboat` binary, test images made with the real
//! qemu-img / qemu-io and `scripts/make-mixed-image.sh`.
//!
//! A missing tool is a test failure naming `scripts/install-deps.sh`, never a silent pass.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// The passphrase of every test repository.
pub const PASSWORD: &str = "correct horse battery staple";
/// 1 MiB.
pub const MIB: u64 = 1 << 20;

const HINT: &str = "run scripts/install-deps.sh (as root) to install the tools the tests need";

/// Fail (not skip) when a tool the tests need is missing.
pub fn require_tools() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        for (tool, arg) in [
            ("qemu-img", "--version"),
            ("qemu-nbd", "--version"),
            ("qemu-io", "--version"),
            ("mkfs.ext4", "-V"),
            ("python3", "--version"),
        ] {
            let ok = Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "{tool} is missing or does not run: {HINT}");
        }
    });
}

/// The workspace root (parent of `agent/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// What a `lifeboat` run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from_output(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Parse stdout as the `--json` document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Assert a failure with `code`, a one-line `error:` message containing `needle`, and no panic.
    pub fn assert_fails(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(self.code, code, "wrong exit code: {self:#?}");
        assert_no_panic(self);
        let first = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no 'error:' line on stderr: {self:#?}"));
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr does not mention {needle:?}: {self:#?}"
        );
        assert!(first.len() < 300, "error line too long: {first}");
        self
    }
}

/// stderr never shows a panic.
pub fn assert_no_panic(r: &Run) {
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"),
        "the process panicked: {r:#?}"
    );
}

/// One test's world: a temporary directory holding a repository (`repo/`), images and targets.
pub struct Env {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The repository path.
    pub repo: PathBuf,
    /// Extra environment for every run (e.g. cleared password).
    pub password: Option<String>,
}

impl Env {
    /// A new empty world (no repository yet).
    pub fn new() -> Env {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("lifeboat-test-")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        Env {
            dir,
            repo,
            password: Some(PASSWORD.to_string()),
        }
    }

    /// A new world with an initialised encrypted repository (default chunk size).
    pub fn with_repo() -> Env {
        let env = Env::new();
        env.ok(&["repo", "init"]);
        env
    }

    /// A path inside the test directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The `lifeboat` command with this world's repository and passphrase, and a clean environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
        c.args(args)
            .env("LIFEBOAT_REPO", &self.repo)
            .env_remove("LIFEBOAT_PASSWORD_FILE")
            .env_remove("LIFEBOAT_KEY_FILE")
            .env_remove("LIFEBOAT_LOG")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null());
        match &self.password {
            Some(p) => c.env("LIFEBOAT_PASSWORD", p),
            None => c.env_remove("LIFEBOAT_PASSWORD"),
        };
        c
    }

    /// Run lifeboat and collect its output.
    pub fn run(&self, args: &[&str]) -> Run {
        let r = Run::from_output(self.cmd(args).output().unwrap());
        assert_no_panic(&r);
        r
    }

    /// Run lifeboat, asserting success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "lifeboat {args:?} failed: {r:#?}");
        r
    }

    /// Run lifeboat with `--json`, asserting success; the parsed document.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.ok(&a).json()
    }

    /// `backup-image FILE --name NAME --disk DISK --json`; the disk's stats and the snapshot id.
    pub fn backup(&self, file: &Path, name: &str, disk: &str) -> Backup {
        Backup::from_json(&self.backup_json(file, name, disk, &[]))
    }

    /// `backup-image FILE --name NAME --disk DISK [extra...] --json`, asserting success; the
    /// whole document.
    pub fn backup_json(&self, file: &Path, name: &str, disk: &str, extra: &[&str]) -> Value {
        let mut a = vec![
            "backup-image",
            file.to_str().unwrap(),
            "--name",
            name,
            "--disk",
            disk,
        ];
        a.extend_from_slice(extra);
        self.json(&a)
    }

    /// The repository, opened as the CLI opens it (this world's passphrase, from a file).
    pub fn open_repo(&self) -> std::sync::Arc<repo_format::Repository> {
        let pw = self.path("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        let global = lifeboat::cli::GlobalOpts {
            repo: Some(self.repo.to_string_lossy().into_owned()),
            password_file: Some(pw),
            key_file: None,
            json: false,
            verbose: 0,
            quiet: true,
        };
        lifeboat::repo::open(&global).unwrap()
    }

    /// `restore REF --to DIR [extra...]`, asserting success.
    pub fn restore(&self, reference: &str, to: &Path, extra: &[&str]) -> Value {
        let mut a = vec!["restore", reference, "--to", to.to_str().unwrap()];
        a.extend_from_slice(extra);
        self.json(&a)
    }
}

/// The stats of one single-disk backup.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The snapshot id.
    pub snapshot: String,
    /// "full" or "incremental".
    pub mode: String,
    /// Bytes read from the export.
    pub bytes_read: u64,
    /// Sealed bytes of new chunks.
    pub bytes_new: u64,
    /// New chunk objects.
    pub chunks_new: u64,
    /// Bytes the bitmap marked dirty (incremental).
    pub dirty_bytes: Option<u64>,
}

impl Backup {
    fn from_json(j: &Value) -> Backup {
        let d = &j["disks"][0];
        Backup {
            snapshot: j["snapshot"].as_str().unwrap().to_string(),
            mode: j["mode"].as_str().unwrap().to_string(),
            bytes_read: d["bytes_read"].as_u64().unwrap(),
            bytes_new: d["bytes_new"].as_u64().unwrap(),
            chunks_new: d["chunks_new"].as_u64().unwrap(),
            dirty_bytes: d["dirty_bytes"].as_u64(),
        }
    }
}

/// Run a tool, asserting success; its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {HINT}"));
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A mixed-content image (scripts/make-mixed-image.sh) of `size_mib` MiB in `fmt`, copied to
/// `dest`. Generated once per (size, format, script version) into the target's test scratch
/// directory and reused (generation takes seconds; copies are sparse).
pub fn mixed_image(size_mib: u64, fmt: &str, dest: &Path) {
    static LOCK: Mutex<()> = Mutex::new(());
    let script = workspace().join("scripts/make-mixed-image.sh");
    let text = std::fs::read(&script).unwrap();
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    let cache_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lifeboat-images");
    std::fs::create_dir_all(&cache_dir).unwrap();
    let cached = cache_dir.join(format!("mixed-{size_mib}-{:016x}.{fmt}", h.finish()));
    {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if !cached.exists() {
            let tmp = cached.with_extension(format!("{fmt}.tmp{}", std::process::id()));
            tool(
                script.to_str().unwrap(),
                &[tmp.to_str().unwrap(), &size_mib.to_string(), fmt],
            );
            std::fs::rename(&tmp, &cached).unwrap();
        }
    }
    sparse_copy(&cached, dest);
}

/// `cp --sparse=always`, leaving a writable copy.
pub fn sparse_copy(from: &Path, to: &Path) {
    tool(
        "cp",
        &[
            "--sparse=always",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
    );
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// qemu-io commands against an image (opened read-write with its format).
pub fn qemu_io(image: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image.to_str().unwrap());
    let out = tool("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// `qemu-img compare` (formats probed): identical or fail with its report.
pub fn assert_identical(a: &Path, b: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", a.to_str().unwrap(), b.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): {HINT}"));
    assert!(
        o.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img convert -O qcow2 [-o OPTIONS] FROM TO` (source format probed: test images only).
pub fn convert_to_qcow2(from: &Path, to: &Path, options: &str) {
    let mut args = vec!["convert", "-q", "-O", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([from.to_str().unwrap(), to.to_str().unwrap()]);
    tool("qemu-img", &args);
}

/// `qemu-img check` of a qcow2 image: no corruption and no leaked cluster.
pub fn assert_qcow2_clean(image: &Path) {
    let out = tool(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
    assert!(
        out.contains("No errors were found"),
        "{}: {out}",
        image.display()
    );
}

/// Whether Lifeboat wrote the qcow2 image itself: its L1 table is the cluster right after the
/// header (`qemu-img create` puts the refcount structures there and the L1 table after them).
pub fn written_natively(image: &Path) -> bool {
    let mut h = [0u8; 48];
    std::io::Read::read_exact(&mut std::fs::File::open(image).unwrap(), &mut h).unwrap();
    let cluster_bits = u32::from_be_bytes(h[20..24].try_into().unwrap());
    let l1_offset = u64::from_be_bytes(h[40..48].try_into().unwrap());
    l1_offset == 1 << cluster_bits
}

/// `qemu-img info --output=json`.
pub fn image_info(image: &Path) -> Value {
    let out = tool(
        "qemu-img",
        &["info", "--output=json", "-U", image.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

/// Bytes the file system allocated for `path` (st_blocks × 512).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Flip every bit of the byte at `offset` (negative: from the end) of a read-only object.
pub fn flip_byte(path: &Path, offset: i64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = if offset < 0 {
        bytes.len() - offset.unsigned_abs() as usize
    } else {
        offset as usize
    };
    bytes[i] ^= 0xff;
    rewrite(path, &bytes);
}

/// Replace a (read-only) file's content in place.
pub fn rewrite(path: &Path, bytes: &[u8]) {
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every file under `dir` (recursively), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Nothing (no file, no hidden temporary file) in `dir`, which may not exist.
pub fn assert_empty_dir(dir: &Path) {
    let left = files_under(dir);
    assert!(left.is_empty(), "files left at the target: {left:?}");
}

/// Processes (pid, command line) whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && pid != std::process::id() {
            out.push((pid, cmd));
        }
    }
    out
}

/// Write `len` bytes of random data to `path` (a new raw image).
pub fn random_raw(path: &Path, len_mib: u64) {
    tool(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={len_mib}"),
            "status=none",
        ],
    );
}
