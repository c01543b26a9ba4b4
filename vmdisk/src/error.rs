//! The crate's single public error type.

use std::fmt;

/// What went wrong, coarsely; match on this, read the context for details.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Local I/O failed (socket, file, spawning a process).
    Io,
    /// The peer sent malformed or hostile data; the connection is unusable afterwards.
    Protocol,
    /// The server lacks a feature or metadata context that is needed.
    Unsupported,
    /// The server reported an error for a request; `code` is the NBD error value
    /// (errno-like: 1 EPERM, 5 EIO, 12 ENOMEM, 22 EINVAL, 28 ENOSPC, 75 EOVERFLOW,
    /// 95 ENOTSUP, 108 ESHUTDOWN).
    ServerError {
        /// The NBD error value as sent by the server.
        code: u32,
    },
    /// A request, handshake or external process did not finish in time.
    Timeout,
    /// The connection is closed or was broken by an earlier failure.
    Closed,
    /// The caller passed an invalid argument (range outside the export, unknown context, ...).
    InvalidArgument,
    /// An external tool (qemu-img, qemu-nbd) failed; the context holds its stderr tail.
    Process,
}

/// The error type of this crate: a kind, this layer's context and an optional source.
///
/// `Display` prints only the context; walk [`std::error::Error::source`] for the chain.
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error without source.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// A new error wrapping `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An [`ErrorKind::Io`] error wrapping an `std::io::Error`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Io, context, source)
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// This layer's message.
    pub fn context(&self) -> &str {
        &self.context
    }

    pub(crate) fn protocol(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Protocol, context)
    }

    pub(crate) fn invalid(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, context)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("context", &self.context);
        if let Some(s) = &self.source {
            d.field("source", &s.to_string());
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|b| b.as_ref() as &(dyn std::error::Error + 'static))
    }
}
