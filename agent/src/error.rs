//! The agent's error type: a kind (mapped to a documented exit code), this layer's message, and the
//! error from the layer below as `source()`. The CLI prints the whole chain.

use std::fmt;

/// What went wrong, at the level an operator acts on. Each kind has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad command-line input or a request that cannot be satisfied as asked.
    Usage,
    /// The repository is missing, not a Lifeboat repository, or of an unsupported version.
    Repository,
    /// No key slot opens with the given passphrase or key file, or none was given.
    Key,
    /// The snapshot reference matches nothing or is ambiguous.
    SnapshotNotFound,
    /// Stored data failed authentication or hash checks, or is missing.
    Corrupt,
    /// The source (image, NBD export, hypervisor) is missing or failed.
    Source,
    /// The restore target exists, or could not be written.
    Target,
    /// The run was interrupted by a signal.
    Interrupted,
    /// A boot test ran and its verdict is "fail" (the guest did not come up or a check failed).
    BootTestFailed,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// The process exit code documented in the README.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Other => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Repository => 3,
            ErrorKind::Key => 4,
            ErrorKind::SnapshotNotFound => 5,
            ErrorKind::Corrupt => 6,
            ErrorKind::Source => 7,
            ErrorKind::Target => 8,
            ErrorKind::BootTestFailed => 9,
            ErrorKind::Interrupted => 130,
        }
    }
}

/// An agent error: kind + this layer's context + the lower layer's error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias for the agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error without a source.
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
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Attach agent context to lower-layer results.
pub trait Context<T> {
    /// Wrap the error with `kind` and a message describing what this layer was doing.
    fn ctx(self, kind: ErrorKind, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn ctx(self, kind: ErrorKind, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(kind, context(), e))
    }
}

/// Map a repository error to the agent's kind, so exit codes tell wrong key from corruption.
pub fn repo_kind(e: &repo_format::Error) -> ErrorKind {
    use repo_format::ErrorKind as K;
    match e.kind() {
        K::WrongKey => ErrorKind::Key,
        K::NotARepository | K::UnsupportedVersion => ErrorKind::Repository,
        K::Corrupt => ErrorKind::Corrupt,
        K::Ambiguous => ErrorKind::SnapshotNotFound,
        // An object that a manifest or index references (or that was just listed) is missing:
        // stored data is gone, as corrupt as a damaged object. Snapshot references that match
        // nothing are mapped to `SnapshotNotFound` where they are resolved.
        K::NotFound => ErrorKind::Corrupt,
        K::InvalidArgument => ErrorKind::Usage,
        _ => ErrorKind::Other,
    }
}

/// Wrap a repository error with context, choosing the kind from the repository error.
pub fn repo_err(e: repo_format::Error, context: impl Into<String>) -> Error {
    let kind = repo_kind(&e);
    Error::with_source(kind, context, e)
}

/// Print an error and its chain of sources, one layer per line.
pub fn format_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("error: {err}");
    let mut cur = err.source();
    let mut i = 1;
    while let Some(e) = cur {
        out.push_str(&format!("\n  {i}: {e}"));
        cur = e.source();
        i += 1;
    }
    out
}
