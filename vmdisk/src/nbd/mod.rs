//! The NBD (Network Block Device) protocol: constants, pure framing and an async client.

pub mod client;
pub mod frame;
pub mod proto;

pub use client::{Client, ConnectOptions, NbdAddr};
