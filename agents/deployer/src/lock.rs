//! One release in flight per app and environment: the KV bucket `BATON_LOCKS` holds, under the
//! key `<env>.<app>`, the id of the release that may drive the workload.

use async_nats::jetstream::kv;
use baton_core::names::ReleaseId;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// This release holds it (now or already).
    Held,
    /// Another release holds it.
    HeldBy(String),
}

pub fn key(env: &str, app: &str) -> String {
    format!("{env}.{app}")
}

fn err(key: &str, message: impl ToString) -> Error {
    Error::Lock {
        key: key.to_owned(),
        message: message.to_string(),
    }
}

/// Takes the lock for `release`, unless another release holds it.
pub async fn acquire(store: &kv::Store, key: &str, release: ReleaseId) -> Result<Lock> {
    let me = release.to_string();
    for _ in 0..5 {
        match store.create(key, me.clone().into()).await {
            Ok(_) => return Ok(Lock::Held),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(key, e)),
        }
        match store.entry(key).await.map_err(|e| err(key, e))? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let holder = String::from_utf8_lossy(&entry.value).into_owned();
                return Ok(if holder == me {
                    Lock::Held
                } else {
                    Lock::HeldBy(holder)
                });
            }
            // Deleted between our create and read: try again.
            _ => continue,
        }
    }
    Err(err(key, "the lock keeps changing; giving up for now"))
}

/// Frees the lock if `release` holds it (a no-op otherwise).
pub async fn release(store: &kv::Store, key: &str, release: ReleaseId) -> Result<bool> {
    match store.entry(key).await.map_err(|e| err(key, e))? {
        Some(entry)
            if entry.operation == kv::Operation::Put
                && entry.value.as_ref() == release.to_string().as_bytes() =>
        {
            store
                .delete_expect_revision(key, Some(entry.revision))
                .await
                .map_err(|e| err(key, e))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Frees the lock held by `holder` — used when the holder has ended without freeing it.
pub async fn release_stale(store: &kv::Store, key: &str, holder: &str) -> Result<()> {
    if let Some(entry) = store.entry(key).await.map_err(|e| err(key, e))? {
        if entry.operation == kv::Operation::Put && entry.value.as_ref() == holder.as_bytes() {
            store
                .delete_expect_revision(key, Some(entry.revision))
                .await
                .map_err(|e| err(key, e))?;
        }
    }
    Ok(())
}
