//! The deployer's errors.

use baton_core::runtime::HandlerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] baton_core::error::Error),
    #[error("lock {key}: {message}")]
    Lock { key: String, message: String },
    #[error("reading {what} in namespace {namespace}: {source}")]
    Read {
        what: String,
        namespace: String,
        source: kube::Error,
    },
    #[error("writing {what} in namespace {namespace}: {source}")]
    Write {
        what: String,
        namespace: String,
        source: kube::Error,
    },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("applying the new image to Deployment {namespace}/{name}: {source}")]
    PatchDeployment {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("following the rollout: {0}")]
    Rollout(#[from] baton_core::rollout::WaitError),
    #[error("release {release_id} has no spec (no release.requested in its history)")]
    NoSpec { release_id: String },
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        match e {
            // Without a spec there is nothing to act on: the history is broken.
            Error::NoSpec { .. } => HandlerError::Permanent(e.to_string()),
            // Everything else is the bus or the cluster being unavailable for a moment.
            other => HandlerError::Retry(other.to_string()),
        }
    }
}
