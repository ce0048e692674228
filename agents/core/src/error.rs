//! Errors of the shared runtime. Each says whether retrying can help: the consumer loop maps a
//! retryable error to a delayed nak and a permanent one to term plus a dead letter.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read NATS credentials {path}: {source}")]
    ReadCredentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("NATS credentials: {0}")]
    Credentials(String),
    #[error("{0}")]
    Url(String),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("not allowed to publish {subject}: the NATS user has no permission for it")]
    PermissionDenied { subject: String },
    #[error("publish to {subject} failed: {source}")]
    Publish {
        subject: String,
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("no publish acknowledgement for {subject} within {seconds}s")]
    PublishTimeout { subject: String, seconds: u64 },
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("consumer {consumer} on {stream}: {message}")]
    Consumer {
        stream: String,
        consumer: String,
        message: String,
    },
    #[error("reading the events of release {release_id}: {message}")]
    History { release_id: String, message: String },
    #[error("release {release_id} has more than the {limit} events a release may have; refused")]
    HistoryTooLong { release_id: String, limit: u64 },
    #[error("bus definition {path}: {message}")]
    Definition { path: String, message: String },
    #[error("applying {kind} {name}: {message}")]
    Apply {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("dead-lettering a message from {subject}: {message}")]
    DeadLetter { subject: String, message: String },
    #[error("http endpoint on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error("telemetry: {0}")]
    Telemetry(String),
}

impl Error {
    /// A short, stable word for what failed, used as a metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ReadCredentials { .. } | Error::Credentials(_) => "credentials",
            Error::Connect { .. } | Error::Url(_) => "connect",
            Error::PermissionDenied { .. } => "permission",
            Error::Publish { .. } | Error::PublishTimeout { .. } => "publish",
            Error::Stream { .. } | Error::Consumer { .. } => "stream",
            Error::History { .. } => "history",
            Error::HistoryTooLong { .. } => "history_too_long",
            Error::Definition { .. } | Error::Apply { .. } => "definition",
            Error::DeadLetter { .. } => "dead_letter",
            Error::Http { .. } => "http",
            Error::Telemetry(_) => "telemetry",
        }
    }

    /// Whether trying again later can succeed (a broker or network hiccup), as opposed to a
    /// mistake that will fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Publish { .. }
                | Error::PublishTimeout { .. }
                | Error::Stream { .. }
                | Error::Consumer { .. }
                | Error::History { .. }
                | Error::DeadLetter { .. }
        )
    }
}
