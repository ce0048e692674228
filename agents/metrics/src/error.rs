//! Errors of the metrics agent's I/O. All of them are passing trouble with the broker: the task
//! that meets one waits and starts over.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the event stream {stream}: {message}")]
    ReadStream { stream: String, message: String },
    #[error("subscribing to {subject}: {message}")]
    Subscribe { subject: String, message: String },
    #[error(transparent)]
    Core(#[from] baton_core::error::Error),
}
