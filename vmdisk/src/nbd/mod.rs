//! The NBD (Network Block Device) protocol: constants, pure framing, an async client and a read-only server.

pub mod client;
pub mod frame;
pub mod proto;
pub mod server;

pub use client::{Client, ConnectOptions, NbdAddr};
pub use server::{BlockSource, MemorySource, Piece, Server, ServerOptions};
