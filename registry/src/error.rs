//! The registry's error type, and the one place it becomes a gRPC status.

use delta_proto::Digest;
use tonic::Status;

/// Everything a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest, name, tag, reference or field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A manifest fails validation (shape, role, file, size).
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// Uploaded bytes do not hash to the declared digest.
    #[error("uploaded bytes hash to {actual}, not the declared {declared}")]
    DigestMismatch {
        /// What the client said.
        declared: Digest,
        /// What the bytes are.
        actual: Digest,
    },
    /// More or fewer bytes than declared.
    #[error("upload of {digest} declared {declared} bytes but {received} arrived")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Declared size.
        declared: u64,
        /// Bytes received so far.
        received: u64,
    },
    /// A chunk does not continue the upload where it stands.
    #[error("upload {upload_id} is at offset {expected}, chunk starts at {got}")]
    OutOfRange {
        /// The session.
        upload_id: String,
        /// Where it stands.
        expected: u64,
        /// What the client sent.
        got: u64,
    },
    /// Something named does not exist.
    #[error("{what} {name} not found")]
    NotFound {
        /// Kind of thing (`blob`, `repository`, `tag`, `base`, `upload`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A precondition on stored state failed: unregistered base, tag CAS lost, blob missing.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something already exists and cannot be changed.
    #[error("{0}")]
    AlreadyExists(String),
    /// A configured limit was exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// No valid token where one is needed.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token does not grant what the call needs.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A client stopped sending.
    #[error("{0}")]
    Timeout(String),
    /// Another stream is using the upload session.
    #[error("upload {0} is in use by another stream")]
    Busy(String),
    /// Stored bytes no longer match their digest.
    #[error("stored blob {0} is corrupt: its bytes no longer match the digest")]
    Corrupt(Digest),
    /// `fsck --repair` moved a corrupt blob aside.
    #[error(
        "blob {0} is quarantined: fsck found its stored bytes corrupt; push it again to heal it"
    )]
    Quarantined(Digest),
    /// SQLite failed.
    #[error("metadata database error")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL failed (the cause is the error's source).
    #[error("metadata database (PostgreSQL) error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The metadata database returned something the schema does not allow.
    #[error("metadata database error: {0}")]
    Database(String),
    /// The object store failed.
    #[error("object store error")]
    Blob(#[from] object_store::Error),
    /// Local I/O failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("transport error")]
    Transport(#[from] tonic::transport::Error),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Registry results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The longest status message sent: beyond it, standard clients fail on the size of the
/// status header and never show the error. Inputs are quoted as `delta_proto::excerpt`s
/// anyway; this is the last line of defence.
const MAX_STATUS_MESSAGE: usize = 1024;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let status = status_of(err);
        if status.message().len() <= MAX_STATUS_MESSAGE {
            return status;
        }
        let message = delta_proto::excerpt(status.message());
        Status::new(status.code(), message)
    }
}

/// tonic refuses a request message over the decoding limit with `OUT_OF_RANGE` ("decoded
/// message length too large: found N bytes, the limit is: M bytes"). A limit is a
/// resource: this gives the same refusal as `RESOURCE_EXHAUSTED`, naming the setting.
/// Any other status passes unchanged.
pub fn message_limit_status(code: tonic::Code, message: &str) -> Option<Status> {
    if code != tonic::Code::OutOfRange || !message.contains("decoded message length too large") {
        return None;
    }
    let number_after = |what: &str| -> Option<u64> {
        let rest = &message[message.find(what)? + what.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let text = match (number_after("found "), number_after("limit is: ")) {
        (Some(found), Some(limit)) => format!(
            "a request message of {found} bytes is over the registry's limit of {limit} bytes (--max-message-bytes); blobs travel in chunks of {} bytes",
            delta_proto::CHUNK_SIZE
        ),
        _ => format!(
            "a request message is over the registry's size limit (--max-message-bytes): {}",
            delta_proto::excerpt(message)
        ),
    };
    Some(Status::resource_exhausted(text))
}

/// Whether an error is the storage running out of space (a full disk, a quota), anywhere
/// in its chain of causes.
pub fn is_storage_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && (matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) || matches!(io.raw_os_error(), Some(28 | 122)))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

fn status_of(err: Error) -> Status {
    match &err {
        Error::InvalidArgument(_)
        | Error::InvalidManifest(_)
        | Error::DigestMismatch { .. }
        | Error::SizeMismatch { .. } => Status::invalid_argument(err.to_string()),
        Error::OutOfRange { .. } => Status::out_of_range(err.to_string()),
        Error::NotFound { .. } => Status::not_found(err.to_string()),
        Error::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
        Error::AlreadyExists(_) => Status::already_exists(err.to_string()),
        Error::LimitExceeded(_) => Status::resource_exhausted(err.to_string()),
        Error::Busy(_) => Status::aborted(err.to_string()),
        Error::Timeout(_) => Status::deadline_exceeded(err.to_string()),
        // Refusals are logged by the telemetry layer, with the request id.
        Error::Unauthenticated(_) => Status::unauthenticated(err.to_string()),
        Error::PermissionDenied(_) => Status::permission_denied(err.to_string()),
        Error::Corrupt(_) => {
            tracing::error!(error = %err, "corrupt blob");
            Status::data_loss(err.to_string())
        }
        Error::Quarantined(_) => Status::data_loss(err.to_string()),
        Error::Blob(_) | Error::Io(_) if is_storage_full(&err) => {
            tracing::error!(error = ?err, "blob storage is full");
            Status::resource_exhausted(
                "the registry's blob storage is full (no space left); nothing was stored: \
                 retry once its operator has freed space",
            )
        }
        Error::Db(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DiskFull =>
        {
            tracing::error!(error = ?err, "metadata database is full");
            Status::resource_exhausted(
                "the registry's metadata database is out of space; nothing was recorded: \
                 retry once its operator has freed space",
            )
        }
        Error::Blob(object_store::Error::NotFound { .. }) => {
            tracing::error!(error = ?err, "blob row without stored bytes");
            Status::data_loss("a stored blob is missing from the object store")
        }
        Error::Postgres(e)
            if e.is_closed()
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) =>
        {
            tracing::error!(error = ?err, "metadata database unreachable");
            Status::unavailable("the metadata database is unreachable; retry")
        }
        Error::Db(_)
        | Error::Postgres(_)
        | Error::Database(_)
        | Error::Blob(_)
        | Error::Io(_)
        | Error::Transport(_)
        | Error::Join(_) => {
            tracing::error!(error = ?err, "internal error");
            Status::internal("internal error")
        }
    }
}

impl From<delta_proto::digest::DigestError> for Error {
    fn from(e: delta_proto::digest::DigestError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<delta_proto::reference::NameError> for Error {
    fn from(e: delta_proto::reference::NameError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

/// A job kind, job state or token scope a caller named that does not exist.
impl From<delta_proto::UnknownName> for Error {
    fn from(e: delta_proto::UnknownName) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<delta_proto::manifest::ManifestError> for Error {
    fn from(e: delta_proto::manifest::ManifestError) -> Self {
        Error::InvalidManifest(e.to_string())
    }
}
