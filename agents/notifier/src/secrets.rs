//! The channels' webhook URLs: secrets, kept out of the configuration (which is copied into every
//! release event). The notifier is given one file (`--secrets`), a YAML mapping of channel name to
//! URL, typically a Kubernetes Secret mounted into its pod:
//!
//! ```yaml
//! web-team: https://hooks.slack.com/services/T000/B000/XXXX
//! audit: https://audit.example.com/baton/events
//! ```
//!
//! The file is read again whenever it changes (a Secret's update reaches the mounted file), so a
//! URL added or rotated is used without a restart. A file that no longer parses keeps the URLs
//! last read, and says so in the log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use baton_core::names::validate_dns_label;

/// The largest secrets file read.
const MAX_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read the secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secrets file {path} {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The URLs of the file, parsed and checked: every name a channel name, every value an http(s)
/// URL with a host.
pub fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, String>, SecretsError> {
    let bad = |message: String| SecretsError::Invalid {
        path: path.to_owned(),
        message,
    };
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| bad(format!("is not valid YAML: {e}")))?;
    let map = match value {
        serde_yaml_ng::Value::Null => return Ok(BTreeMap::new()),
        serde_yaml_ng::Value::Mapping(m) => m,
        _ => {
            return Err(bad(
                "must be a mapping of channel names to webhook URLs".into()
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let Some(name) = k.as_str() else {
            return Err(bad("has a channel name that is not a string".into()));
        };
        validate_dns_label("channel name", name).map_err(|e| bad(format!("names {e}")))?;
        // The URL itself is never written into an error or a log: it is the secret.
        let Some(url) = v.as_str() else {
            return Err(bad(format!(
                "gives channel {name} a value that is not a URL string"
            )));
        };
        let url = url.trim();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        let host = rest.and_then(|r| r.split(['/', '?', '#']).next());
        match host {
            Some(h) if !h.is_empty() && !url.chars().any(char::is_whitespace) => {}
            _ => {
                return Err(bad(format!(
                "gives channel {name} a value that is not an http:// or https:// URL with a host"
            )))
            }
        }
        out.insert(name.to_owned(), url.to_owned());
    }
    Ok(out)
}

fn read(path: &Path) -> Result<(BTreeMap<String, String>, Option<SystemTime>), SecretsError> {
    let err = |source| SecretsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_BYTES {
        return Err(SecretsError::Invalid {
            path: path.to_owned(),
            message: format!(
                "is {} bytes, more than the limit of {MAX_BYTES}",
                meta.len()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    Ok((parse(path, &text)?, meta.modified().ok()))
}

/// The secrets file, read at start and again when it changes.
#[derive(Debug)]
pub struct Secrets {
    path: PathBuf,
    state: Mutex<(BTreeMap<String, String>, Option<SystemTime>)>,
}

impl Secrets {
    /// Reads the file: a missing or bad one is an error at start, so the notifier refuses to run
    /// without its URLs rather than failing every message later.
    pub fn load(path: &Path) -> Result<Secrets, SecretsError> {
        let state = read(path)?;
        Ok(Secrets {
            path: path.to_owned(),
            state: Mutex::new(state),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The channels with a URL.
    pub fn channels(&self) -> Vec<String> {
        self.refresh();
        self.state
            .lock()
            .map(|s| s.0.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The URL of a channel, from the file as it is now.
    pub fn url(&self, channel: &str) -> Option<String> {
        self.refresh();
        self.state.lock().ok()?.0.get(channel).cloned()
    }

    fn refresh(&self) {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if modified.is_none() || modified == state.1 {
            return;
        }
        match read(&self.path) {
            Ok(fresh) => {
                tracing::info!(path = %self.path.display(), channels = fresh.0.len(), "secrets file read again");
                *state = fresh;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the secrets file changed but cannot be used; keeping the URLs read before");
                state.1 = modified;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_never_shown_in_errors() {
        let p = Path::new("/run/secrets/webhooks.yaml");
        let ok = parse(
            p,
            "web-team: https://hooks.slack.com/services/T/B/X\naudit: http://127.0.0.1:9000/in\n",
        )
        .unwrap();
        assert_eq!(ok["audit"], "http://127.0.0.1:9000/in");
        let cases = [
            ("[a]", "must be a mapping"),
            ("Web: https://x.example.com", "not a DNS label"),
            ("web: 3", "not a URL string"),
            ("web: ftp://secret-host/x", "not an http:// or https:// URL"),
            ("web: https://", "with a host"),
            ("web: [", "not valid YAML"),
        ];
        for (text, expected) in cases {
            let e = parse(p, text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert!(e.contains("/run/secrets/webhooks.yaml"), "{e}");
            assert!(!e.contains("secret-host"), "the URL leaked: {e}");
        }
        assert!(parse(p, "").unwrap().is_empty());
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_urls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhooks.yaml");
        std::fs::write(&path, "a: https://a.example.com/1\n").unwrap();
        let s = Secrets::load(&path).unwrap();
        assert_eq!(s.url("a").as_deref(), Some("https://a.example.com/1"));
        assert_eq!(s.url("b"), None);
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::write(
            &path,
            "a: https://a.example.com/2\nb: https://b.example.com\n",
        )
        .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(s.url("a").as_deref(), Some("https://a.example.com/2"));
        assert_eq!(s.channels(), ["a", "b"]);
        std::fs::write(&path, "a: [").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(s.url("b").as_deref(), Some("https://b.example.com"));
        assert!(Secrets::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string()
            .contains("cannot read the secrets file"));
    }
}
