//! NBD message framing: pure encoders and decoders, no I/O.
//!
//! Decoding follows mini-redis: [`check_reply`] / [`check_option_reply`] look at a byte
//! buffer and return the length of the next complete message (or
//! [`FrameError::Incomplete`]); [`parse_reply`] / [`parse_option_reply`] then decode exactly
//! that many bytes. Everything a server sends is validated here or in the per-request
//! collectors ([`ReadAssembler`], [`BlockStatusCollector`], [`EmptyCollector`]), which
//! check chunks against the request they answer. No function panics on any input.
//!
//! - `option.rs`: the client's side of the handshake — option
//!   requests it encodes, option replies and their payloads it decodes;
//! - `request.rs`: transmission request headers ([`Request`]), for both sides;
//! - `reply.rs`: transmission replies ([`Reply`], [`Chunk`], [`check_reply`], [`parse_reply`]);
//! - `collect.rs`: the client's per-request collectors;
//! - `server.rs`: the server's side of the handshake and its reply payloads;
//! - `tests.rs`: round trips and hostile input (proptest).
//!
//! Every public item is re-exported here, so callers use `nbd::frame::Name`.

use super::proto::*;
use crate::error::Error;

/// Largest structured reply payload accepted: a 32 MiB read chunk plus its offset, with
/// room to spare. Bigger lengths are treated as hostile rather than buffered.
pub const MAX_REPLY_PAYLOAD: u32 = 33 * 1024 * 1024;
/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_REPLY_PAYLOAD: u32 = 64 * 1024;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// More bytes are needed; `needed` is the total frame length when already known.
    Incomplete {
        /// Total length of the frame, if the header was complete enough to tell.
        needed: Option<usize>,
    },
    /// The bytes can never form a valid message.
    Invalid(String),
}

impl FrameError {
    fn invalid(msg: impl Into<String>) -> Self {
        FrameError::Invalid(msg.into())
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Incomplete { .. } => Error::protocol("truncated NBD message"),
            FrameError::Invalid(m) => Error::protocol(m),
        }
    }
}

/// Turns server-supplied bytes into a printable, bounded string.
pub fn sanitize(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STRING_LEN)]);
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(512)
        .collect()
}

mod collect;
mod option;
mod reply;
mod request;
mod server;

pub use collect::*;
pub use option::*;
pub use reply::*;
pub use request::*;
pub use server::*;

#[cfg(test)]
mod tests;
