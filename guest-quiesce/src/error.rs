//! The crate's single public error type.

use std::fmt;

/// Boxed source error carried by [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong; callers branch on this (retry, skip quiescing, fail the job).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The call did not complete within its timeout (the agent may still be working on it).
    Timeout,
    /// The agent answered with `{"error":{"class":…,"desc":…}}`.
    AgentError {
        /// QAPI error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// Human-readable description from the agent.
        desc: String,
    },
    /// The reply was not valid QGA JSON or did not have the expected shape.
    Protocol,
    /// Reading from or writing to the transport failed.
    Io,
    /// No agent is listening or it is not connected (guest not booted, agent not running).
    NotResponding,
    /// The caller passed an invalid argument.
    InvalidArgument,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Timeout => f.write_str("timed out"),
            ErrorKind::AgentError { class, desc } => write!(f, "guest agent error {class}: {desc}"),
            ErrorKind::Protocol => f.write_str("guest agent protocol error"),
            ErrorKind::Io => f.write_str("I/O error"),
            ErrorKind::NotResponding => f.write_str("guest agent not responding"),
            ErrorKind::InvalidArgument => f.write_str("invalid argument"),
        }
    }
}

/// The error type of this crate: an [`ErrorKind`], a context message describing this layer's
/// operation (command name, socket path, …) and an optional boxed source.
///
/// `Display` prints only the context and the kind; walk [`std::error::Error::source`] for the
/// chain.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<BoxError>,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Creates an error without a source.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Creates an error with a source.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// This layer's message.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// True for [`ErrorKind::Timeout`].
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// Returns the error with `context` prepended to its context (`"context: old"`).
    pub fn context_prefix(mut self, context: impl fmt::Display) -> Self {
        self.context = format!("{context}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.context, self.kind)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
