//! The one error type of the `libvirt` module.

use std::fmt;

use virt::error::ErrorNumber;

/// Result alias of the `libvirt` module.
pub type Result<T, E = LibvirtError> = std::result::Result<T, E>;

/// What went wrong, coarse enough for callers to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Cannot open or talk to the hypervisor connection (libvirtd down, RPC error, auth).
    Connect,
    /// No domain with that name / UUID.
    NoSuchDomain,
    /// The operation needs a running domain, but it is shut off.
    NotRunning,
    /// The QEMU guest agent is not configured, not connected or not responding.
    NoAgent,
    /// A checkpoint (libvirt metadata) or its persistent bitmap in the image already exists.
    CheckpointExists,
    /// No checkpoint with that name.
    NoSuchCheckpoint,
    /// A checkpoint cannot be used: its bitmap is missing or broken in the image
    /// (`VIR_ERR_CHECKPOINT_INCONSISTENT`, e.g. from redefine with validation, or from an
    /// incremental backup). The caller must fall back to a full backup.
    CheckpointInconsistent,
    /// Another job (backup, migration, ...) is already active on the domain, or no backup job
    /// is active when one was expected.
    JobActive,
    /// The hypervisor / driver / configuration does not support the operation.
    Unsupported,
    /// XML from libvirt could not be parsed, or a value we were given cannot be expressed.
    InvalidData,
    /// No job is active (e.g. [`super::Dom::abort_job`] without a backup running).
    NoJob,
    /// Anything else libvirt reported.
    Other,
}

/// Error of the `libvirt` module: a kind, the operation that failed (context), and the
/// libvirt error as source.
#[derive(Debug)]
pub struct LibvirtError {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl LibvirtError {
    /// An error without source.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error with a source.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// Wraps a libvirt error, deriving the kind from its error code.
    pub fn from_virt(context: impl Into<String>, err: virt::error::Error) -> Self {
        let kind = classify(&err);
        Self::with_source(kind, context, err)
    }

    /// Wraps a libvirt error from a guest-agent call: libvirt reports an agent that is not
    /// configured as "argument unsupported" and one that is configured but not connected as
    /// "agent unresponsive"; both are [`ErrorKind::NoAgent`] here.
    pub(crate) fn from_virt_agent(context: impl Into<String>, err: virt::error::Error) -> Self {
        let kind = match classify(&err) {
            ErrorKind::Unsupported => ErrorKind::NoAgent,
            k => k,
        };
        Self::with_source(kind, context, err)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What was being done.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The libvirt error code, if the source is a libvirt error.
    pub fn virt_code(&self) -> Option<ErrorNumber> {
        self.source
            .as_deref()
            .and_then(|s| s.downcast_ref::<virt::error::Error>())
            .map(|e| e.code())
    }
}

impl fmt::Display for LibvirtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for LibvirtError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Maps a libvirt error to a kind. Codes first; a few conditions are reported by libvirt only
/// through generic codes, those are recognised by message (verified against libvirt 9.0 /
/// QEMU 7.2 in `agent/tests/libvirt.rs`).
fn classify(err: &virt::error::Error) -> ErrorKind {
    use virt::error::ErrorDomain;
    let msg = err.message();
    match err.code() {
        ErrorNumber::NoConnect | ErrorNumber::AuthFailed | ErrorNumber::AuthCancelled => {
            ErrorKind::Connect
        }
        // The RPC layer: "Cannot recv data" / "Cannot write data" (system error), and "client
        // socket is closed" (internal error) once libvirtd went away, e.g. restarted.
        ErrorNumber::Rpc | ErrorNumber::SystemError | ErrorNumber::InternalError
            if err.domain() == ErrorDomain::Rpc =>
        {
            ErrorKind::Connect
        }
        ErrorNumber::NoDomain => ErrorKind::NoSuchDomain,
        ErrorNumber::AgentUnresponsive
        | ErrorNumber::AgentUnsynced
        | ErrorNumber::AgentCommandTimeout => ErrorKind::NoAgent,
        ErrorNumber::NoDomainCheckpoint => ErrorKind::NoSuchCheckpoint,
        ErrorNumber::CheckpointInconsistent => ErrorKind::CheckpointInconsistent,
        // "domain is not running" (operation invalid), "cannot perform disk backup for
        // inactive domain" (operation unsupported).
        ErrorNumber::OperationInvalid | ErrorNumber::OperationUnsupported
            if msg.contains("not running") || msg.contains("inactive domain") =>
        {
            ErrorKind::NotRunning
        }
        // "no job is active on the domain"
        ErrorNumber::OperationInvalid if msg.contains("no job") => ErrorKind::NoJob,
        // "cannot acquire state change lock (held by ...)": another job holds the domain.
        ErrorNumber::OperationTimeout if msg.contains("lock") => ErrorKind::JobActive,
        ErrorNumber::OperationInvalid if msg.contains("job") => ErrorKind::JobActive,
        ErrorNumber::NoSupport
        | ErrorNumber::OperationUnsupported
        | ErrorNumber::ArgumentUnsupported
        | ErrorNumber::ConfigUnsupported => ErrorKind::Unsupported,
        // "domain moment cp1 already exists" (metadata), QEMU "Bitmap already exists: cp1"
        // (a bitmap of that name is in the image but libvirt has no metadata for it).
        _ if msg.contains("already exists") => ErrorKind::CheckpointExists,
        _ => ErrorKind::Other,
    }
}
