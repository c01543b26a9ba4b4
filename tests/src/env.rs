//! Host prerequisites: root, installed packages, running libvirt; the cached test guest.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{run, run_output, scripts_dir, virsh};

/// The libvirt URI the tests use.
pub const SYSTEM_URI: &str = "qemu:///system";

/// Where test VMs keep their disks and logs (reachable by the `libvirt-qemu` user).
pub const VM_ROOT: &str = "/var/lib/lifeboat-tests";

/// Prefix of every test domain's name (`lbt-<prefix>-<pid>-<n>`), used to sweep leftovers.
pub const DOMAIN_PREFIX: &str = "lbt-";

/// Fails unless running as root.
pub fn require_root() -> Result<()> {
    let uid = std::fs::metadata("/proc/self")
        .context("reading /proc/self")?
        .uid();
    if uid != 0 {
        bail!("end-to-end tests need root (QEMU, libvirt, loop-free disk images); run as root");
    }
    Ok(())
}

/// Checks the packages (`scripts/install-deps.sh --check`), starts virtlogd and libvirtd when
/// they are not running (`scripts/start-services.sh`) and removes test domains left by dead
/// test processes. Idempotent; does the work once per process.
pub fn ensure_libvirt() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| ensure_libvirt_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn ensure_libvirt_once() -> Result<()> {
    require_root()?;
    let scripts = scripts_dir();
    let out = run_output(
        Command::new("sh")
            .arg(scripts.join("install-deps.sh"))
            .arg("--check"),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!(
            "test dependencies missing: {}; run scripts/install-deps.sh (as root)",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    run(
        Command::new("sh").arg(scripts.join("start-services.sh")),
        Duration::from_secs(60),
    )
    .context("starting libvirt (scripts/start-services.sh)")?;
    std::fs::create_dir_all(VM_ROOT).with_context(|| format!("creating {VM_ROOT}"))?;
    set_mode(VM_ROOT.as_ref(), 0o755)?;
    sweep_stale_domains();
    Ok(())
}

pub(crate) fn set_mode(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Destroys and undefines `lbt-*-<pid>-<n>` domains whose test process is gone.
fn sweep_stale_domains() {
    let Ok(list) = virsh(SYSTEM_URI, &["list", "--all", "--name"]) else {
        return;
    };
    for name in list.lines().map(str::trim) {
        let Some(rest) = name.strip_prefix(DOMAIN_PREFIX) else {
            continue;
        };
        let mut parts = rest.rsplit('-');
        let _counter = parts.next();
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("lifeboat-e2e: removing stale test domain {name}");
        crate::vm::remove_domain(SYSTEM_URI, name);
        let _ = std::fs::remove_dir_all(PathBuf::from(VM_ROOT).join(name));
    }
}

/// The test guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    /// Debian kernel (copy).
    pub kernel: PathBuf,
    /// busybox + qemu-ga initramfs.
    pub initrd: PathBuf,
}

/// Builds (or finds in `/var/cache/lifeboat-tests/guest/`) the test guest with
/// `scripts/build-test-guest.sh`. Once per process.
pub fn test_guest() -> Result<GuestFiles> {
    static GUEST: OnceLock<Result<GuestFiles, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| build_guest().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_guest() -> Result<GuestFiles> {
    require_root()?;
    let out = run(
        Command::new("sh").arg(scripts_dir().join("build-test-guest.sh")),
        Duration::from_secs(600),
    )
    .context("building the test guest (scripts/build-test-guest.sh)")?;
    let mut kernel = None;
    let mut initrd = None;
    for line in out.lines() {
        if let Some(p) = line.strip_prefix("kernel=") {
            kernel = Some(PathBuf::from(p));
        } else if let Some(p) = line.strip_prefix("initrd=") {
            initrd = Some(PathBuf::from(p));
        }
    }
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) => Ok(GuestFiles { kernel, initrd }),
        _ => bail!("build-test-guest.sh printed no kernel=/initrd= lines: {out}"),
    }
}
