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
    #[error(transparent)]
    Lock(#[from] baton_core::lock::LockError),
    /// The fence closed before a write (the release no longer owns the workload), or could
    /// not be checked: nothing was written.
    #[error(transparent)]
    Fence(#[from] baton_core::fence::FenceError),
    #[error("the app's lock is held by release {holder}, still in flight; trying again later")]
    Busy { holder: String },
    #[error("following the rollback: {0}")]
    Wait(baton_core::rollout::WaitError),
    #[error("{0}")]
    Invalid(String),
    /// The release's spec is not its configuration's (or that can't be read now).
    #[error(transparent)]
    Spec(baton_core::runtime::HandlerError),
}

impl Error {
    /// A short, stable word for what failed, used as a metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Bus(e) => e.category(),
            Error::Read { .. } => "kube_read",
            Error::Restore { .. } | Error::Cluster { .. } => "kube_write",
            Error::Lock(_) => "lock",
            Error::Fence(baton_core::fence::FenceError::Closed { .. }) => "fenced",
            Error::Fence(baton_core::fence::FenceError::Bus(e)) => e.category(),
            Error::Busy { .. } => "busy",
            Error::Wait(_) => "rollout",
            Error::Invalid(_) => "invalid",
            Error::Spec(e) => e.category(),
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        let category = e.category();
        match e {
            Error::Invalid(_) => HandlerError::permanent(category, e.to_string()),
            Error::Bus(b) | Error::Fence(baton_core::fence::FenceError::Bus(b)) => {
                HandlerError::from(b)
            }
            Error::Spec(e) => e,
            Error::Restore { ref source, .. } | Error::Cluster { ref source, .. }
                if baton_core::cluster::refusal(source).is_some() =>
            {
                HandlerError::permanent(category, e.to_string())
            }
            other => HandlerError::retry(category, other.to_string()),
        }
    }
}
