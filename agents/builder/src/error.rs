//! Errors of the builder. A registry that cannot resolve an image is not an error of the agent:
//! it is the release's outcome (`build.failed` with the [`ResolveError`] as reason). Only trouble
//! with the bus makes the handler retry.

use std::path::PathBuf;

use baton_core::runtime::HandlerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read registry credentials {path}: {source}")]
    ReadAuth {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry credentials {path}: {message}")]
    AuthFile { path: PathBuf, message: String },
    #[error("--plain-http-registry {value:?} is not host[:port]")]
    PlainHttpRegistry { value: String },
    #[error("cannot set up the registry client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("storing the build log {key} in object store {bucket}: {message}")]
    StoreLog {
        bucket: String,
        key: String,
        message: String,
    },
    #[error(transparent)]
    Bus(#[from] baton_core::error::Error),
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::StoreLog { .. } => true,
            Error::Bus(e) => e.is_retryable(),
            Error::ReadAuth { .. }
            | Error::AuthFile { .. }
            | Error::PlainHttpRegistry { .. }
            | Error::HttpClient(_) => false,
        }
    }
}

impl Error {
    /// A short, stable word for what failed, used as a metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ReadAuth { .. } | Error::AuthFile { .. } => "credentials",
            Error::PlainHttpRegistry { .. } | Error::HttpClient(_) => "setup",
            Error::StoreLog { .. } => "store_log",
            Error::Bus(e) => e.category(),
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        let category = e.category();
        if e.is_retryable() {
            HandlerError::retry(category, e.to_string())
        } else {
            HandlerError::permanent(category, e.to_string())
        }
    }
}

/// Why an image could not be resolved to a digest. The message is the reason carried by
/// `build.failed`: it names the image and the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("image {image} not found in registry {registry}{}", detail(.code))]
    NotFound {
        image: String,
        registry: String,
        code: Option<String>,
    },
    #[error("registry {registry} unreachable: {message}")]
    Unreachable {
        registry: String,
        message: String,
        /// Connection refused, timeouts: may pass. A host name that does not exist will not.
        transient: bool,
    },
    #[error("registry {registry} refused access to image {image}: {message}")]
    Denied {
        image: String,
        registry: String,
        message: String,
    },
    #[error("registry {registry} failed to answer for image {image}: HTTP {status}{}", detail(.code))]
    Server {
        image: String,
        registry: String,
        status: u16,
        code: Option<String>,
    },
    #[error("registry {registry} gave an invalid answer for image {image}: {message}")]
    Invalid {
        image: String,
        registry: String,
        message: String,
    },
    #[error(
        "registry {registry} answered digest {actual} for image {image}, which pins {expected}"
    )]
    DigestMismatch {
        image: String,
        registry: String,
        expected: String,
        actual: String,
    },
}

fn detail(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
}

impl ResolveError {
    /// Whether asking again shortly may give another answer.
    pub fn is_transient(&self) -> bool {
        match self {
            ResolveError::Unreachable { transient, .. } => *transient,
            ResolveError::Server { status, .. } => *status >= 500 || *status == 429,
            ResolveError::NotFound { .. }
            | ResolveError::Denied { .. }
            | ResolveError::Invalid { .. }
            | ResolveError::DigestMismatch { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_image_and_the_registry() {
        let e = ResolveError::NotFound {
            image: "127.0.0.1:5000/web:v9".into(),
            registry: "127.0.0.1:5000".into(),
            code: Some("MANIFEST_UNKNOWN: manifest unknown".into()),
        };
        assert_eq!(
            e.to_string(),
            "image 127.0.0.1:5000/web:v9 not found in registry 127.0.0.1:5000 \
             (MANIFEST_UNKNOWN: manifest unknown)"
        );
        assert!(!e.is_transient());
        let e = ResolveError::Server {
            image: "i".into(),
            registry: "r".into(),
            status: 503,
            code: None,
        };
        assert_eq!(
            e.to_string(),
            "registry r failed to answer for image i: HTTP 503"
        );
        assert!(e.is_transient());
    }
}
