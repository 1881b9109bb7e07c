//! The client's error type. gRPC statuses from the registry are mapped back by code.

use std::path::PathBuf;

use delta_proto::Digest;
use tonic::{Code, Status};

/// Everything a client operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry has no such thing.
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry refused the request (bad input, failed precondition, conflict, limit).
    #[error("registry refused the request ({code:?}): {message}")]
    Rejected {
        /// The gRPC code.
        code: Code,
        /// The registry's message.
        message: String,
    },
    /// Any other gRPC failure.
    #[error("registry call failed: {0}")]
    Rpc(Status),
    /// The registry cannot be reached.
    #[error("cannot connect to the registry at {url}")]
    Connect {
        /// Registry URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// Downloaded or cached bytes do not match their digest.
    #[error("{what} should hash to {expected} but hashes to {actual}")]
    Integrity {
        /// What was checked.
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// A local file is not usable safetensors.
    #[error("{path}: not valid safetensors")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: delta_proto::safetensors::HeaderError,
    },
    /// A delta or base does not fit (shapes, names, fingerprint, config).
    #[error("{0}")]
    Invalid(String),
    /// A manifest is malformed or does not fit its base.
    #[error(transparent)]
    Manifest(#[from] delta_proto::manifest::ManifestError),
    /// A name or reference is malformed.
    #[error(transparent)]
    Name(#[from] delta_proto::reference::NameError),
    /// Local I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Client results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The request id (`x-request-id`) of the last call the registry refused or failed, for
/// the CLI to print with the error (one command is one operation, so "the last" is the
/// one that failed). Operators find the call in the registry's logs by it.
pub fn last_request_id() -> Option<String> {
    LAST_REQUEST_ID.lock().ok().and_then(|g| g.clone())
}

static LAST_REQUEST_ID: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        if let Some(id) = s
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            && let Ok(mut g) = LAST_REQUEST_ID.lock()
        {
            *g = Some(id.to_owned());
        }
        match s.code() {
            Code::NotFound => Error::NotFound(s.message().to_owned()),
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::DataLoss => Error::Rejected {
                code: s.code(),
                message: s.message().to_owned(),
            },
            _ => Error::Rpc(s),
        }
    }
}

/// Attaches a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
