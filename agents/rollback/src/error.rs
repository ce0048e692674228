//! The rollback agent's errors.

use baton_core::runtime::HandlerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] baton_core::error::Error),
    #[error("reading Deployment {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: baton_core::rollout::WaitError,
    },
    #[error("restoring the template of Deployment {namespace}/{name}: {source}")]
    Restore {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("{doing} in namespace {namespace}: {source}")]
    Cluster {
        doing: String,
        namespace: String,
        source: kube::Error,
    },
    #[error("lock {key}: {message}")]
    Lock { key: String, message: String },
    #[error("the app's lock is held by release {holder}, still in flight; trying again later")]
    Busy { holder: String },
    #[error("following the rollback: {0}")]
    Wait(baton_core::rollout::WaitError),
    #[error("{0}")]
    Invalid(String),
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(_) => HandlerError::Permanent(e.to_string()),
            other => HandlerError::Retry(other.to_string()),
        }
    }
}
