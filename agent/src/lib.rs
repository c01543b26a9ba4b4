//! Lifeboat's agent: the `lifeboat` command line, the backup/restore pipeline and the libvirt
//! orchestration.
//!
//! - [`cli`]: argument definitions; [`commands`]: one module per command;
//! - [`pipeline`]: the concurrent data path (NBD → chunk → hash → compress → encrypt → store, and
//!   back);
//! - [`libvirt`]: the only module that talks to libvirt;
//! - [`error`]: the agent's error type and its exit codes.

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
pub mod vm;
