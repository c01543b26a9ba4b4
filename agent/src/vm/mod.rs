//! Live and offline backup of libvirt domains (`lifeboat backup VM...`).
//!
//! - [`job`]: the live job's state machine (freeze → begin → thaw → transfer → commit → end),
//!   against the [`job::VmHost`] trait, unit-tested with a fault-injecting fake;
//! - [`host`]: `VmHost` over libvirt and the guest agent;
//! - [`guard`]: the out-of-process thaw guard (kill -9 safety);
//! - [`checkpoints`]: checkpoint names, base validation, deletion, leftovers of killed runs;
//! - [`prepare`]: the domain's state, disks and usable base checkpoint, before the backup;
//! - [`plan`]: which disks, full or incremental (pure);
//! - [`transfer`]: reading the disks over NBD and committing the snapshot ([`job::Transfer`]);
//! - [`offline`]: a shut-off domain (no job; bitmaps with qemu-img, checkpoint redefined).

pub mod checkpoints;
pub mod guard;
pub mod host;
pub mod job;
pub mod offline;
pub mod plan;
pub mod prepare;
pub mod transfer;
