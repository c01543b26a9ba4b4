//! QEMU guest agent (QGA) client for Lifeboat: ping, filesystem freeze/thaw, guest-exec.
//!
//! - [`protocol`]: the commands we use as typed [`Command`]s (wire name, arguments, reply type,
//!   default timeout) and the pure request encoder / reply decoder. No I/O.
//! - [`Agent`]: a client over any [`Transport`]; every call has a timeout.
//! - [`UnixSocketTransport`]: the agent's unix socket, with `guest-sync-delimited` resync.
//!   The `lifeboat` binary brings its own transport over libvirt.
//!
//! ```no_run
//! use guest_quiesce::{Agent, UnixSocketTransport};
//! # fn main() -> guest_quiesce::Result<()> {
//! let agent = Agent::new(UnixSocketTransport::new("/run/qga.sock"));
//! agent.ping()?;
//! let n = agent.freeze(None)?;
//! // ... take the snapshot ...
//! agent.thaw()?;
//! # let _ = n; Ok(()) }
//! ```
//!
//! The wire format is described in `repo-format/FORMAT.md`, section 4.
#![deny(missing_docs)]

mod client;
mod error;
pub mod protocol;
mod unix;

pub use client::{Agent, ExecResult, Transport};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use protocol::{Command, FreezeStatus};
pub use unix::UnixSocketTransport;

#[cfg(test)]
mod tests;
