//! Disk access for Lifeboat.
//!
//! - [`extent`]: [`BlockStatus`] descriptors and [`RangeSet`], the pure extent model used
//!   to decide which parts of a disk to read (allocation maps, dirty bitmaps, chunk
//!   indices).
//! - [`nbd`]: the NBD protocol — constants ([`nbd::proto`]), pure framing
//!   ([`nbd::frame`]) and an async, pipelining [`Client`] that reads, writes and queries
//!   block status (`base:allocation`, `qemu:dirty-bitmap:NAME`) over one connection.
//! - [`qcow2`]: the layout and metadata bytes of a fresh qcow2 image whose allocated data is
//!   known up front (pure; what `lifeboat restore` writes).
//! - [`qemu`]: `qemu-img` helpers ([`qemu::image_info`], bitmaps, image creation) and
//!   [`qemu::QemuNbd`], a supervised `qemu-nbd` serving one image on a private socket.
//!
//! Every fallible function returns [`Error`], whose [`ErrorKind`] tells protocol
//! violations, missing server features, server-reported errors, timeouts and closed
//! connections apart. Every network call and external process has a timeout.
#![deny(missing_docs)]

pub mod error;
pub mod extent;
pub mod nbd;
pub mod qcow2;
pub mod qemu;

pub use error::{Error, ErrorKind, Result};
pub use extent::{BlockStatus, RangeSet};
pub use nbd::{Client, ConnectOptions, NbdAddr};
