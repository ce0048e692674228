//! The configuration's versions in the `BATON_CONFIG` KV bucket, under one key: each apply is a
//! new revision (the KV revision, i.e. the stream sequence), the bucket keeps the last 64, and a
//! rollback stores an old revision's text again as a new one. Only validated text is ever stored.
//!
//! Only KV calls that work against nats-server 2.9 are used (`get_key_value`, `entry`, `create`,
//! `update`, `history`); `create_key_value` reads the account info, which async-nats cannot parse
//! from that server.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{self, Operation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{parse, Config, ConfigErrors};
use crate::bus::{Bus, CONFIG_BUCKET};

/// The one key the configuration lives under.
pub const CONFIG_KEY: &str = "config";
const TIMEOUT: Duration = Duration::from_secs(10);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the configuration is not valid:\n{0}")]
    Invalid(ConfigErrors),
    #[error("configuration bucket {bucket}: {message}")]
    Bucket { bucket: String, message: String },
    #[error("reading the configuration from {bucket}: {message}")]
    Read { bucket: String, message: String },
    #[error("storing the configuration in {bucket}: {message}")]
    Write { bucket: String, message: String },
    #[error(
        "the configuration was changed by someone else while this was applied (revision {seen} is no longer current); look at `baton config history` and try again"
    )]
    Conflict { seen: u64 },
    #[error("no configuration revision {revision} (stored revisions: {known})")]
    UnknownRevision { revision: u64, known: String },
    #[error("configuration revision {revision} cannot be read: {message}")]
    Corrupt { revision: u64, message: String },
    #[error("{what} took longer than {}s", TIMEOUT.as_secs())]
    Timeout { what: &'static str },
}

impl StoreError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Bucket { .. }
                | StoreError::Read { .. }
                | StoreError::Write { .. }
                | StoreError::Timeout { .. }
                | StoreError::Conflict { .. }
        )
    }
}

/// What is stored per revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub yaml: String,
    pub applied_by: String,
    /// RFC 3339, UTC.
    pub applied_at: String,
    /// Hex SHA-256 of `yaml`.
    pub sha256: String,
}

/// One stored revision, without its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    pub applied_by: String,
    pub applied_at: String,
    pub sha256: String,
}

/// The outcome of an apply or a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The revision now current.
    pub revision: u64,
    /// False when the text was already current, so nothing was stored.
    pub changed: bool,
}

/// Hex SHA-256 of a configuration text.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

async fn timed<T>(what: &'static str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| StoreError::Timeout { what })
}

async fn bucket(bus: &Bus) -> Result<kv::Store> {
    // Bounded by the bus itself (it asks again while the bucket elects a leader).
    bus.kv(CONFIG_BUCKET).await.map_err(|e| StoreError::Bucket {
        bucket: CONFIG_BUCKET.into(),
        message: format!("{e} (has `baton bus apply` been run?)"),
    })
}

fn read_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Read {
        bucket: CONFIG_BUCKET.into(),
        message: e.to_string(),
    }
}

fn decode(revision: u64, value: &[u8]) -> Result<Document> {
    let doc: Document = serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        revision,
        message: format!("not a configuration document: {e}"),
    })?;
    if sha256_hex(&doc.yaml) != doc.sha256 {
        return Err(StoreError::Corrupt {
            revision,
            message: "its sha256 does not match its text".into(),
        });
    }
    Ok(doc)
}

/// The latest stored document and its revision.
async fn latest(store: &kv::Store) -> Result<Option<(u64, Document)>> {
    let entry = timed("reading the configuration", store.entry(CONFIG_KEY))
        .await?
        .map_err(read_err)?;
    match entry {
        Some(e) if e.operation == Operation::Put => {
            Ok(Some((e.revision, decode(e.revision, &e.value)?)))
        }
        _ => Ok(None),
    }
}

/// Stores `text` as a new revision if it is valid and differs from the current one.
async fn store_text(store: &kv::Store, text: &str, applied_by: &str) -> Result<Applied> {
    parse(text).map_err(StoreError::Invalid)?;
    let sha256 = sha256_hex(text);
    let current = latest(store).await?;
    if let Some((revision, doc)) = &current {
        if doc.sha256 == sha256 {
            return Ok(Applied {
                revision: *revision,
                changed: false,
            });
        }
    }
    let doc = Document {
        yaml: text.to_owned(),
        applied_by: applied_by.to_owned(),
        applied_at: rfc3339(SystemTime::now()),
        sha256,
    };
    let value = serde_json::to_vec(&doc)
        .map_err(|e| StoreError::Write {
            bucket: CONFIG_BUCKET.into(),
            message: e.to_string(),
        })?
        .into();
    // Optimistic concurrency: the write succeeds only if nobody stored a revision since we read.
    let write_err = |message: String| StoreError::Write {
        bucket: CONFIG_BUCKET.into(),
        message,
    };
    let revision = match &current {
        Some((seen, _)) => timed(
            "storing the configuration",
            store.update(CONFIG_KEY, value, *seen),
        )
        .await?
        .map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict { seen: *seen },
            _ => write_err(e.to_string()),
        })?,
        None => timed("storing the configuration", store.create(CONFIG_KEY, value))
            .await?
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => StoreError::Conflict { seen: 0 },
                _ => write_err(e.to_string()),
            })?,
    };
    tracing::info!(revision, applied_by, "configuration stored");
    Ok(Applied {
        revision,
        changed: true,
    })
}

/// Validates `text` and stores it as the new revision; a text identical to the current one is
/// not stored again (`changed: false`). An invalid text is never stored.
pub async fn apply(bus: &Bus, text: &str, applied_by: &str) -> Result<Applied> {
    // Validate before touching the bus, so a bad file is refused even when NATS is unreachable.
    parse(text).map_err(StoreError::Invalid)?;
    let store = bucket(bus).await?;
    store_text(&store, text, applied_by).await
}

/// The current configuration: its revision, the parsed configuration (carrying the revision) and
/// its text; `None` when nothing was applied yet.
pub async fn current(bus: &Bus) -> Result<Option<(u64, Config, String)>> {
    let store = bucket(bus).await?;
    let Some((revision, doc)) = latest(&store).await? else {
        return Ok(None);
    };
    let config = parse(&doc.yaml).map_err(|e| StoreError::Corrupt {
        revision,
        message: format!("it no longer validates:\n{e}"),
    })?;
    Ok(Some((revision, config.with_revision(revision), doc.yaml)))
}

/// Every stored revision, oldest first, with its text: the key's messages read from the
/// bucket's stream through its leader (a KV history is a consumer, which could land on a server
/// that is down).
async fn documents(bus: &Bus) -> Result<Vec<(u64, Document)>> {
    let mut reader = bus
        .read_stream(
            &format!("KV_{CONFIG_BUCKET}"),
            &format!("$KV.{CONFIG_BUCKET}.{CONFIG_KEY}"),
        )
        .await
        .map_err(read_err)?;
    let mut docs = Vec::new();
    while let Some(message) = reader.next_now().await.map_err(read_err)? {
        if crate::bus::is_kv_put(&message) {
            docs.push((
                message.sequence,
                decode(message.sequence, &message.payload)?,
            ));
        }
    }
    Ok(docs)
}

/// The stored revisions, oldest first (the bucket keeps the last 64).
pub async fn history(bus: &Bus) -> Result<Vec<Revision>> {
    // A clear error when the bucket is missing.
    bucket(bus).await?;
    Ok(documents(bus)
        .await?
        .into_iter()
        .map(|(revision, d)| Revision {
            revision,
            applied_by: d.applied_by,
            applied_at: d.applied_at,
            sha256: d.sha256,
        })
        .collect())
}

async fn find(bus: &Bus, revision: u64) -> Result<(Revision, String)> {
    let docs = documents(bus).await?;
    let known = if docs.is_empty() {
        "none".to_owned()
    } else {
        docs.iter()
            .map(|(r, _)| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (revision, doc) = docs
        .into_iter()
        .find(|(r, _)| *r == revision)
        .ok_or(StoreError::UnknownRevision { revision, known })?;
    Ok((
        Revision {
            revision,
            applied_by: doc.applied_by,
            applied_at: doc.applied_at,
            sha256: doc.sha256,
        },
        doc.yaml,
    ))
}

/// A stored revision and its text.
pub async fn at_revision(bus: &Bus, revision: u64) -> Result<(Revision, String)> {
    find(bus, revision).await
}

/// The configuration of one stored revision, read by its sequence alone — one message, however
/// long the history: what an agent checks a release's spec against.
pub async fn config_at(bus: &Bus, revision: u64) -> Result<Config> {
    let unknown = || StoreError::UnknownRevision {
        revision,
        known: "see `baton config history`".into(),
    };
    if revision == 0 {
        return Err(unknown());
    }
    // A handle only (no request): the gets below are answered even while the bucket's stream
    // elects a leader, when its info is not.
    let stream = timed(
        "opening the configuration bucket",
        bus.jetstream()
            .get_stream_no_info(format!("KV_{CONFIG_BUCKET}")),
    )
    .await?
    .map_err(|e| StoreError::Bucket {
        bucket: CONFIG_BUCKET.into(),
        message: e.to_string(),
    })?;
    let message = timed("reading the configuration", stream.direct_get(revision)).await?;
    let message = match message {
        Ok(m) => m,
        // Any replica answers a direct get, and one still catching up (just restarted) may not
        // have the revision yet: only the leader's "not found" is final.
        Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
            match timed(
                "reading the configuration",
                stream.get_raw_message(revision),
            )
            .await?
            {
                Ok(m) => m,
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    return Err(unknown())
                }
                Err(e) => return Err(read_err(e)),
            }
        }
        Err(e) => return Err(read_err(e)),
    };
    let deleted = message
        .headers
        .get("KV-Operation")
        .is_some_and(|op| op.as_str() != "PUT");
    if message.subject.as_str() != format!("$KV.{CONFIG_BUCKET}.{CONFIG_KEY}") || deleted {
        return Err(unknown());
    }
    let doc = decode(revision, &message.payload)?;
    let config = parse(&doc.yaml).map_err(|e| StoreError::Corrupt {
        revision,
        message: format!("it no longer validates:\n{e}"),
    })?;
    Ok(config.with_revision(revision))
}

/// Makes revision `revision`'s text current again, as a new revision (validated again first:
/// the rules may have grown stricter since). Nothing is stored when it is already current.
pub async fn rollback(bus: &Bus, revision: u64, applied_by: &str) -> Result<Applied> {
    let (_, text) = find(bus, revision).await?;
    let store = bucket(bus).await?;
    store_text(&store, &text, applied_by).await
}

pub use baton_model::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn rfc3339_timestamps_are_utc_dates() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ];
        for (secs, want) in table {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
    }
}
