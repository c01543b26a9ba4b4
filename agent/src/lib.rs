//! Lifeboat's agent: the `lifeboat` command line, the backup/restore pipeline and the libvirt
//! orchestration.
//!
//! - [`cli`]: argument definitions; [`commands`]: one module per command (thin CLI glue);
//! - [`vm`]: backup of libvirt domains (live job, shut-off domains, checkpoints, planning);
//! - [`backup_common`]: what `backup` and `backup-image` share (parent snapshot, reading a disk
//!   over NBD, manifest entries, reports);
//! - [`pipeline`]: the concurrent data path (NBD → chunk → hash → compress → encrypt → store, and
//!   back);
//! - [`libvirt`]: the only module that talks to libvirt;
//! - [`error`]: the agent's error type and its exit codes.

pub mod backup_common;
pub mod boottest;
pub mod cli;
pub mod commands;
pub mod error;
pub mod libvirt;
pub mod logging;
pub mod pipeline;
pub mod relocate;
pub mod repo;
pub mod rollback;
pub mod signals;
pub mod socket_dirs;
pub mod vm;
