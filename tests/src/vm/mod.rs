//! [`TestVm`]: a libvirt test domain booting the cached test guest, with its own disks under
//! `/var/lib/lifeboat-tests/<name>/`; and [`VirshTransport`], a guest-quiesce transport over
//! `virsh qemu-agent-command`.

mod create;
mod guest;
mod spec;
mod transport;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_quiesce::Agent;

use crate::cmd::virsh_timeout;
use crate::env::GuestFiles;
use crate::slots::GuestSlot;

pub use spec::{DiskSpec, ExecOutput, VmOptions};
pub use transport::VirshTransport;

/// A test domain: `type='qemu'` (TCG), 384 MiB, 1 vCPU, direct kernel boot of the test guest,
/// serial console logged to `<dir>/console.log`, a libvirt-managed agent channel, virtio disks
/// from [`DiskSpec`]s, no network. Persistent (`virsh define`). Dropping it destroys and
/// undefines the domain and deletes `dir` (set `LIFEBOAT_KEEP_TEST_VMS=1` to keep the files).
///
/// Each test VM holds one of the host's guest slots (see `LIFEBOAT_TEST_MAX_GUESTS`) from
/// creation to drop.
#[derive(Debug)]
pub struct TestVm {
    /// Domain name, `lbt-<prefix>-<pid>-<n>`.
    pub name: String,
    /// `/var/lib/lifeboat-tests/<name>/`: disks, console log, domain XML.
    pub dir: PathBuf,
    /// libvirt URI (`qemu:///system`).
    pub uri: String,
    /// Disks as created.
    pub disks: Vec<DiskSpec>,
    /// Options it was created with.
    pub options: VmOptions,
    /// Kernel and initrd booted.
    pub guest: GuestFiles,
    agent: Agent<VirshTransport>,
    started: Mutex<Option<Instant>>,
    _slot: GuestSlot,
}

impl TestVm {
    /// Lifeboat's per-run directories of this domain (`/run/lifeboat/<domain>.<pid>`: NBD
    /// sockets of a backup job) that still exist; empty when every run cleaned up.
    pub fn lifeboat_run_dirs(&self) -> Vec<PathBuf> {
        let prefix = format!("{}.", self.name);
        std::fs::read_dir("/run/lifeboat")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }

    /// Path of the image of disk `target` (`<dir>/<target>.<format>`).
    pub fn disk_path(&self, target: &str) -> PathBuf {
        let fmt = self
            .disks
            .iter()
            .find(|d| d.target == target)
            .map(|d| d.format.as_str())
            .unwrap_or("img");
        self.dir.join(format!("{target}.{fmt}"))
    }

    /// The UEFI variable store of a [`VmOptions::uefi`] domain (`<dir>/VARS.fd`; exists once
    /// the domain has started).
    pub fn nvram_path(&self) -> PathBuf {
        self.dir.join("VARS.fd")
    }

    /// Unix socket of the direct agent ([`VmOptions::direct_agent`]).
    pub fn direct_agent_socket(&self) -> PathBuf {
        self.dir.join("qga-direct.sock")
    }

    /// Path of the serial console log.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The serial console output so far (empty if none yet).
    pub fn console_log(&self) -> String {
        std::fs::read(self.console_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The guest agent client (over `virsh qemu-agent-command`, timeouts ×3 for TCG).
    pub fn agent(&self) -> &Agent<VirshTransport> {
        &self.agent
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Destroys and undefines domain `name` (with checkpoint/snapshot metadata and NVRAM), ignoring
/// errors.
pub fn remove_domain(uri: &str, name: &str) {
    let _ = virsh_timeout(uri, &["destroy", name], Duration::from_secs(30));
    let full = virsh_timeout(
        uri,
        &[
            "undefine",
            "--checkpoints-metadata",
            "--snapshots-metadata",
            "--nvram",
            name,
        ],
        Duration::from_secs(30),
    );
    if full.is_err() {
        let _ = virsh_timeout(uri, &["undefine", name], Duration::from_secs(30));
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lifeboat-e2e: {} console (last 40 lines):\n{}",
                self.name,
                tail(&self.console_log(), 40)
            );
        }
        remove_domain(&self.uri, &self.name);
        if std::env::var_os("LIFEBOAT_KEEP_TEST_VMS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lifeboat-e2e: keeping {}", self.dir.display());
        }
    }
}
