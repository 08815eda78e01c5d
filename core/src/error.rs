//! Error types. Every variant names the operation or input that failed and carries the OS
//! status where there is one. Library code never prints and never panics on bad input.

use std::path::PathBuf;

use crate::op::OpKind;

/// Errors of the engine and its configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value (file key, environment variable, CLI flag) is invalid.
    #[error("invalid {name}: {reason}")]
    Config { name: String, reason: String },

    /// The target path does not exist.
    #[error("{}: no such file or device", path.display())]
    NotFound { path: PathBuf },

    /// The target is a directory, or another kind of file rio cannot do I/O on.
    #[error("{}: {what}", path.display())]
    BadTarget { path: PathBuf, what: String },

    /// An OS call on the target failed.
    #[error("{op} {}: {source}", path.display())]
    Os {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Offset, length or buffer address violates the target's alignment.
    #[error("{what} {value} is not a multiple of the {align_name} ({align} bytes)")]
    Alignment {
        what: &'static str,
        value: u64,
        align_name: &'static str,
        align: u64,
    },

    /// The request reaches past the end of the target.
    #[error("range {offset}+{len} reaches past the end of the target ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// The requested backend cannot work on this host or target.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },

    /// The operation is not supported by this backend or target.
    #[error("{op} is not supported by {backend} on this target")]
    Unsupported { op: OpKind, backend: &'static str },

    /// The queue already holds its maximum number of in-flight operations.
    #[error(
        "a read or write of {len} bytes is larger than one operation may be ({max} bytes); split it"
    )]
    TooLarge { len: u64, max: u64 },

    #[error("queue full ({depth} operations in flight)")]
    QueueFull { depth: u32 },

    /// The queue's buffer arena cannot supply a buffer of this size.
    #[error("buffer of {requested} bytes unavailable: {reason}")]
    BufferUnavailable { requested: usize, reason: String },

    /// Writing this device could destroy data that something else is using.
    #[error("refusing to write {}: {reason}", path.display())]
    InUse { path: PathBuf, reason: String },

    /// An I/O operation completed with an error.
    #[error(transparent)]
    Io(#[from] IoError),

    /// A backend reported a completion for a slot that is not in flight (never expected; the
    /// completion is dropped rather than used to index the queue's state).
    #[error("backend {backend} completed unknown or idle slot {slot}")]
    BadCompletion { backend: &'static str, slot: u32 },

    /// Waiting for completions exceeded the deadline.
    #[error("timed out after {0:?} waiting for completions")]
    Timeout(std::time::Duration),

    /// The userspace NVMe driver could not bring up or keep using a controller.
    #[error("NVMe controller {ctrl}: {reason}")]
    Controller { ctrl: String, reason: String },

    /// The controller posted a completion that names no outstanding command (out of range,
    /// stale, duplicate, or for another queue). It is dropped, never used.
    #[error(
        "NVMe controller {ctrl}: completion on queue {qid} for command id {cid:#06x} (SQ {sq_id}) that is not outstanding; dropped"
    )]
    BadNvmeCompletion {
        ctrl: String,
        qid: u16,
        cid: u16,
        sq_id: u16,
    },

    /// An admin command completed with an error status.
    #[error("NVMe controller {ctrl}: {error}")]
    Nvme {
        ctrl: String,
        error: crate::nvme::spec::NvmeError,
    },
}

/// Result alias for rio.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an individual I/O failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoErrorKind {
    /// The OS returned this errno.
    Os(i32),
    /// The transfer moved fewer bytes than asked (e.g. end of file).
    Short { done: u32 },
    /// The NVMe controller completed the command (or one of the commands it was split into)
    /// with an error status.
    Nvme(crate::nvme::spec::NvmeError),
    /// The command did not complete within the command timeout and was aborted.
    TimedOut { after_ms: u64 },
    /// The controller was reset while the command was outstanding: a command did not
    /// complete after an abort (`fatal: false`), or the controller failed (`fatal: true`:
    /// CSTS.CFS, it lost power or was reset from outside, or it left the bus).
    ControllerReset { fatal: bool },
}

/// A failed I/O operation: what it was, where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} at offset {offset} (+{len}) failed: {}", describe(.kind))]
pub struct IoError {
    pub op: OpKind,
    pub offset: u64,
    pub len: u64,
    pub kind: IoErrorKind,
}

fn describe(k: &IoErrorKind) -> String {
    match k {
        IoErrorKind::Os(e) => std::io::Error::from_raw_os_error(*e).to_string(),
        IoErrorKind::Short { done } => format!("short transfer ({done} bytes)"),
        IoErrorKind::Nvme(e) => e.to_string(),
        IoErrorKind::TimedOut { after_ms } => {
            format!("no completion after {after_ms} ms: command aborted")
        }
        IoErrorKind::ControllerReset { fatal: true } => {
            "the controller failed (fatal status, lost power, or gone): command failed by the reset that followed".into()
        }
        IoErrorKind::ControllerReset { fatal: false } => {
            "controller reset while the command was outstanding".into()
        }
    }
}

impl Error {
    /// A configuration error: setting `name` is invalid because of `reason`.
    pub fn config(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// True for errors caused by the caller's input (arguments, configuration, target choice),
    /// as opposed to failures of the device or host while running. The CLI maps the former to
    /// exit status 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Config { .. }
                | Error::NotFound { .. }
                | Error::BadTarget { .. }
                | Error::Alignment { .. }
                | Error::OutOfRange { .. }
                | Error::BackendUnavailable { .. }
                | Error::InUse { .. }
                | Error::Unsupported { .. }
        ) || matches!(self, Error::Os { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::EBUSY | libc::EINVAL)))
    }
}

impl From<crate::pool::PoolError> for Error {
    fn from(e: crate::pool::PoolError) -> Error {
        Error::BufferUnavailable {
            requested: 0,
            reason: e.to_string(),
        }
    }
}
