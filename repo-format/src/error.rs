//! The crate's single public error type.

use std::fmt;

/// Boxed source error carried by [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, coarsely; callers branch on this (exit codes, retries).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No key slot opens with the given passphrase or key file (or none was given for an
    /// encrypted repository).
    WrongKey,
    /// The backend holds no repository config, or a config that is not ours.
    NotARepository,
    /// The repository or an object uses a format version this build does not understand.
    UnsupportedVersion,
    /// An object failed authentication, hash verification or decoding; the context names it.
    Corrupt,
    /// An object, key slot or snapshot does not exist.
    NotFound,
    /// The object or repository already exists.
    AlreadyExists,
    /// A snapshot reference matches more than one snapshot.
    Ambiguous,
    /// The caller passed an invalid argument (bad key, bad chunk size, bad reference, ...).
    InvalidArgument,
    /// An I/O error from the storage backend.
    Io,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::WrongKey => "wrong key",
            ErrorKind::NotARepository => "not a repository",
            ErrorKind::UnsupportedVersion => "unsupported version",
            ErrorKind::Corrupt => "corrupt object",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Io => "I/O error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of this crate: a [`ErrorKind`], a context message describing this layer's
/// operation (object name, path, ...) and an optional boxed source.
///
/// `Display` prints only the context (this layer's message); walk
/// [`std::error::Error::source`] for the chain.
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

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// This layer's message.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Wraps `self` as the source of a new error with a higher-level context, keeping the kind.
    pub(crate) fn wrap(self, context: impl Into<String>) -> Self {
        let kind = self.kind;
        Error::with_source(kind, context, self)
    }

    pub(crate) fn corrupt(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, context)
    }

    pub(crate) fn invalid(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, context)
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let kind = match source.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, context, source)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.kind.as_str())
        } else {
            f.write_str(&self.context)
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
