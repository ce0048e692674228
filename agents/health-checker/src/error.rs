//! Errors of the health-checker. Each message carries its cause's text (and no `source`, so an
//! `anyhow` chain at the top does not print the cause twice).

use baton_core::cluster::ClusterError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster access: {0}")]
    Cluster(ClusterError),
    #[error("building the HTTP client of the checks: {0}")]
    HttpClient(reqwest::Error),
    #[error("listing the pods of namespace {namespace}: {message}")]
    ListPods { namespace: String, message: String },
}

impl From<ClusterError> for Error {
    fn from(e: ClusterError) -> Self {
        Error::Cluster(e)
    }
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::ListPods { .. })
    }
}
