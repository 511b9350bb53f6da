//! What can go wrong with a token operation. Messages name the field, never
//! the value (which could be a secret pasted into the wrong place).

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is invalid.
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
    /// The caller's role allows the call, but not with this credential or
    /// on this token (see `caller`): the reason says which rule.
    #[error("{0}")]
    Forbidden(String),
    #[error("API token {0} not found")]
    NotFound(String),
    #[error("API token {0} already exists")]
    AlreadyExists(String),
    /// The call is valid, but not now: this control plane is not set up for
    /// it, or what it acts on changed meanwhile.
    #[error("{0}")]
    Conflict(String),
    #[error("a token with the same secret digest already exists")]
    DigestTaken,
    #[error("namespace {namespace} already has {limit} API tokens, the most allowed; delete tokens it no longer needs first")]
    QuotaExceeded { namespace: String, limit: u32 },
    #[error("namespace {namespace} is making writes faster than this control plane allows (--namespace-writes-per-second); try again in {}s", super::rate::whole_seconds(*retry_after))]
    TooManyWrites {
        namespace: String,
        retry_after: std::time::Duration,
    },
    #[error("this client reports leaked credentials faster than this control plane takes them; try again in {}s", super::rate::whole_seconds(*retry_after))]
    TooManyReports { retry_after: std::time::Duration },
    #[error(transparent)]
    Store(StoreError),
    #[error("the OS random source failed: {0}")]
    Random(getrandom::Error),
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(name) => Self::AlreadyExists(name),
            StoreError::DigestTaken => Self::DigestTaken,
            StoreError::QuotaExceeded { namespace, limit } => Self::QuotaExceeded { namespace, limit },
            other => Self::Store(other),
        }
    }
}
