//! [`DiskSpec`], [`VmOptions`] and [`ExecOutput`]: what a [`TestVm`] is made of and returns.

use crate::env::SYSTEM_URI;

#[cfg(doc)]
use super::TestVm;

/// One virtio disk of a [`TestVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// libvirt target (`vda`, `vdb`, …); also the disk's serial, so the guest mounts it at
    /// `/mnt/<target>` whatever name its kernel gives it.
    pub target: String,
    /// `qcow2` (compat 1.1) or `raw`.
    pub format: String,
    /// Virtual size in MiB.
    pub size_mib: u64,
    /// Format with ext4 on the host (the guest mounts it at `/mnt/<target>`).
    pub ext4: bool,
}

impl DiskSpec {
    /// A disk `target` of `size_mib` MiB in `format`, ext4-formatted.
    pub fn ext4(target: &str, format: &str, size_mib: u64) -> Self {
        DiskSpec {
            target: target.into(),
            format: format.into(),
            size_mib,
            ext4: true,
        }
    }

    /// An unformatted disk.
    pub fn blank(target: &str, format: &str, size_mib: u64) -> Self {
        DiskSpec {
            ext4: false,
            ..DiskSpec::ext4(target, format, size_mib)
        }
    }
}

/// Options of [`TestVm::create_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    /// libvirt URI (default `qemu:///system`).
    pub uri: String,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Guest memory in MiB (default 384).
    pub memory_mib: u64,
    /// Also expose a second qemu-ga on a unix socket at [`TestVm::direct_agent_socket`]
    /// (virtio-serial port `org.lifeboat.qga.direct`), for talking to the agent without
    /// libvirt (guest-quiesce's `UnixSocketTransport`).
    pub direct_agent: bool,
    /// Boot through UEFI firmware (`<os firmware='efi'>`: libvirt picks OVMF from package
    /// `ovmf`, no secure boot) instead of SeaBIOS, with the per-VM variable store (NVRAM) at
    /// [`TestVm::nvram_path`], created by libvirt from OVMF's template at the first start. The
    /// kernel and initramfs are still loaded directly (OVMF boots the kernel's EFI stub); the
    /// guest mounts efivarfs at `/sys/firmware/efi/efivars`.
    pub uefi: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            uri: SYSTEM_URI.to_owned(),
            disks: Vec::new(),
            memory_mib: 384,
            direct_agent: false,
            uefi: false,
        }
    }
}

/// Output of [`TestVm::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by a signal).
    pub exit: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}
