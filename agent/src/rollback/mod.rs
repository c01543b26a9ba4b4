//! Pre-patch protection: short-lived rollback points with an enforced expiry
//! (`lifeboat protect`, `rollback`, `commit`, `reconcile`) and the snapshot audit.
//!
//! A rollback point is an external snapshot (one qcow2 overlay per disk next to it, named
//! `<disk file>.lifeboat-rb-<time>.qcow2`, plus an external memory state file with
//! `--memory`), taken inside the frozen window of the backup job that `protect` runs, so the
//! backup in the repository and the local point show the same moment. Its life is journaled
//! in [`state`]; [`take`] takes it; [`ops`] rolls back, consolidates and repairs; [`audit`]
//! lists every snapshot, overlay chain and checkpoint on a host ([`images`]: `qemu-img` calls).

pub mod audit;
pub mod images;
pub mod ops;
pub mod state;
pub mod take;
