//! End-to-end test harness for Lifeboat: boots real QEMU guests through libvirt.
//!
//! - [`ensure_libvirt`]: checks the packages (`scripts/install-deps.sh --check`) and starts
//!   virtlogd/libvirtd when needed (`scripts/start-services.sh`).
//! - [`test_guest`]: the cached test guest (Debian kernel + busybox/qemu-ga initramfs built by
//!   `scripts/build-test-guest.sh`; ~5–10 s from `virsh start` to a responding agent under TCG).
//! - [`TestVm`]: one isolated domain with [`DiskSpec`] disks; `exec`, `write_file`, freeze
//!   status, shutdown; destroyed and undefined on drop. At most 2 guests run at once
//!   (`LIFEBOAT_TEST_MAX_GUESTS`).
//! - [`TestVm::attach_disk`]: hot-plug (or `--config`) another disk, mounted in the guest.
//! - [`SecondHost`]: a second libvirtd in its own mount namespace (its own domains and state);
//!   [`SecondHost::restart`] restarts it with its guests running (libvirtd-restart tests, without
//!   touching the system daemon). Its guests boot their own copy of the kernel and initramfs.
//! - [`TestRepo`]: an unencrypted repository in a temporary directory, and the `lifeboat`
//!   commands run against it.
//! - [`check_ext4`] / [`read_file_from_ext4`]: host-side checks of disk images.
//!
//! Tests need root and fail (never skip) with a message naming `scripts/install-deps.sh` when a
//! tool is missing.

mod bin;
mod cmd;
mod env;
mod ext4;
mod repo;
mod second_host;
mod slots;
mod vm;

pub use bin::{backup_steps, lifeboat_bin};
pub use cmd::{run, run_output, scripts_dir, virsh, virsh_timeout, wait_until};
pub use env::{
    ensure_libvirt, require_root, test_guest, GuestFiles, DOMAIN_PREFIX, SYSTEM_URI, VM_ROOT,
};
pub use ext4::{check_ext4, image_format, read_file_from_ext4};
pub use repo::TestRepo;
pub use second_host::SecondHost;
pub use slots::{acquire_slot, GuestSlot};
pub use vm::{remove_domain, DiskSpec, ExecOutput, TestVm, VirshTransport, VmOptions};
