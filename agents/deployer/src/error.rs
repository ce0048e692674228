//! The deployer's errors.

use baton_core::runtime::HandlerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] baton_core::error::Error),
    #[error(transparent)]
    Lock(#[from] baton_core::lock::LockError),
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
    /// The fence closed before a write (the release no longer owns the workload), or could
    /// not be checked: nothing was written.
    #[error(transparent)]
    Fence(#[from] baton_core::fence::FenceError),
    /// The release's spec is not its configuration's (or that can't be read now).
    #[error(transparent)]
    Spec(baton_core::runtime::HandlerError),
}

impl Error {
    /// A short, stable word for what failed, used as a metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Bus(e) => e.category(),
            Error::Lock(_) => "lock",
            Error::Read { .. } => "kube_read",
            Error::Write { .. } | Error::PatchDeployment { .. } => "kube_write",
            Error::Encode { .. } => "encode",
            Error::Rollout(_) => "rollout",
            Error::NoSpec { .. } => "no_spec",
            Error::Fence(baton_core::fence::FenceError::Closed { .. }) => "fenced",
            Error::Fence(baton_core::fence::FenceError::Bus(e)) => e.category(),
            Error::Spec(e) => e.category(),
        }
    }

    /// The API server's refusal, when this error is one: the release cannot go on, and its
    /// failure is a verdict (`deploy.failed` with the API's message), not a retry.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Error::Read { what, source, .. } | Error::Write { what, source, .. } => {
                baton_core::cluster::refusal(source).map(|m| format!("{what}: {m}"))
            }
            Error::PatchDeployment {
                namespace,
                name,
                source,
            } => baton_core::cluster::refusal(source)
                .map(|m| format!("applying the new image to Deployment {namespace}/{name}: {m}")),
            Error::Rollout(baton_core::rollout::WaitError::Read { what, source, .. }) => {
                baton_core::cluster::refusal(source).map(|m| format!("reading {what}: {m}"))
            }
            _ => None,
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        let category = e.category();
        match e {
            // Without a spec there is nothing to act on: the history is broken.
            Error::NoSpec { .. } => HandlerError::permanent(category, e.to_string()),
            Error::Bus(b) | Error::Fence(baton_core::fence::FenceError::Bus(b)) => {
                HandlerError::from(b)
            }
            Error::Spec(e) => e,
            // A refusal that reached the runtime could not be told as a verdict: never retried.
            other if other.refusal().is_some() => {
                HandlerError::permanent(category, other.to_string())
            }
            // Everything else is the bus or the cluster being unavailable for a moment.
            other => HandlerError::retry(category, other.to_string()),
        }
    }
}
