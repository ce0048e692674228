//! One release at a time per workload, and the queue of a workload's open releases, in the KV
//! bucket `BATON_LOCKS`:
//!
//! - `lock.<cluster>.<namespace>.<app>` holds the id of the release that may drive the app's
//!   Deployment(s) in that namespace of that cluster. Keyed by the workload, not by the
//!   environment: two environments that name one namespace can never drive one Deployment at once.
//! - `queue.<cluster>.<namespace>.<app>` holds the ids of the workload's open releases in the order
//!   they were requested (a JSON list), so ending a release and choosing the next one read only
//!   what is open, never the history of every past release.
//!
//! Every change is a compare-and-set on the entry's revision, so agents racing on one workload
//! (several deployer replicas, the rollback agent) never lose each other's writes.

use async_nats::jetstream::kv;

use crate::names::ReleaseId;

pub type Result<T, E = LockError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[error("lock {key}: {message}")]
pub struct LockError {
    pub key: String,
    pub message: String,
}

impl LockError {
    fn new(key: &str, message: impl ToString) -> Self {
        LockError {
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// The workload a release drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub cluster: String,
    pub namespace: String,
    pub app: String,
}

impl Workload {
    pub fn new(cluster: &str, namespace: &str, app: &str) -> Workload {
        Workload {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            app: app.to_owned(),
        }
    }

    /// The workload of a release spec, on `cluster` when the spec names none.
    pub fn of_spec(spec: &baton_proto::v1::ReleaseSpec, cluster: &str) -> Workload {
        let cluster = if spec.cluster.is_empty() {
            cluster
        } else {
            &spec.cluster
        };
        Workload::new(cluster, &spec.namespace, &spec.app)
    }

    /// The workload a release drives — its spec's, or a manual rollback's — if it names one.
    pub fn of_state(state: &crate::fold::ReleaseState, cluster: &str) -> Option<Workload> {
        if let Some(spec) = &state.spec {
            return Some(Workload::of_spec(spec, cluster));
        }
        let r = state.rollback_request.as_ref()?;
        let cluster = if r.cluster.is_empty() {
            cluster
        } else {
            &r.cluster
        };
        (!r.namespace.is_empty()).then(|| Workload::new(cluster, &r.namespace, &r.app))
    }

    pub fn lock_key(&self) -> String {
        format!("lock.{}.{}.{}", self.cluster, self.namespace, self.app)
    }

    pub fn queue_key(&self) -> String {
        format!("queue.{}.{}.{}", self.cluster, self.namespace, self.app)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} in cluster {}",
            self.namespace, self.app, self.cluster
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// This release holds it (now or already).
    Held,
    /// Another release holds it.
    HeldBy(String),
}

/// How many times a compare-and-set is tried before giving up for now (the caller retries).
const CAS_ATTEMPTS: usize = 8;

/// Takes the lock for `release`, unless another release holds it.
pub async fn acquire(store: &kv::Store, key: &str, release: ReleaseId) -> Result<Lock> {
    let me = release.to_string();
    for _ in 0..CAS_ATTEMPTS {
        match store.create(key, me.clone().into()).await {
            Ok(_) => return Ok(Lock::Held),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(LockError::new(key, e)),
        }
        match holder(store, key).await? {
            Some(holder) if holder == me => return Ok(Lock::Held),
            Some(holder) => return Ok(Lock::HeldBy(holder)),
            // Deleted between our create and read: try again.
            None => continue,
        }
    }
    Err(LockError::new(
        key,
        "the lock keeps changing; giving up for now",
    ))
}

/// The release holding the lock, if any.
pub async fn holder(store: &kv::Store, key: &str) -> Result<Option<String>> {
    Ok(
        match store.entry(key).await.map_err(|e| LockError::new(key, e))? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Some(String::from_utf8_lossy(&entry.value).into_owned())
            }
            _ => None,
        },
    )
}

/// Frees the lock if `holder` holds it (a no-op otherwise): when `holder` ends, or has ended
/// without freeing it.
pub async fn release(store: &kv::Store, key: &str, holder: &str) -> Result<bool> {
    match store.entry(key).await.map_err(|e| LockError::new(key, e))? {
        Some(entry)
            if entry.operation == kv::Operation::Put
                && entry.value.as_ref() == holder.as_bytes() =>
        {
            store
                .delete_expect_revision(key, Some(entry.revision))
                .await
                .map_err(|e| LockError::new(key, e))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The open releases of a workload, in request order.
pub async fn queue(store: &kv::Store, key: &str) -> Result<Vec<ReleaseId>> {
    Ok(read_queue(store, key).await?.0)
}

async fn read_queue(store: &kv::Store, key: &str) -> Result<(Vec<ReleaseId>, Option<u64>)> {
    match store.entry(key).await.map_err(|e| LockError::new(key, e))? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            Ok((parse_queue(key, &entry.value)?, Some(entry.revision)))
        }
        Some(entry) => Ok((Vec::new(), Some(entry.revision))),
        None => Ok((Vec::new(), None)),
    }
}

/// The release ids a queue's value lists (ids that don't parse are skipped).
fn parse_queue(key: &str, value: &[u8]) -> Result<Vec<ReleaseId>> {
    let ids: Vec<String> = serde_json::from_slice(value)
        .map_err(|e| LockError::new(key, format!("not a list of release ids: {e}")))?;
    Ok(ids
        .iter()
        .filter_map(|id| ReleaseId::parse(id).ok())
        .collect())
}

/// Changes the queue with `change` (which says whether it changed anything), by
/// compare-and-set.
async fn update_queue(
    store: &kv::Store,
    key: &str,
    change: impl Fn(&mut Vec<ReleaseId>) -> bool,
) -> Result<Vec<ReleaseId>> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut ids, revision) = read_queue(store, key).await?;
        if !change(&mut ids) {
            return Ok(ids);
        }
        let text: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let value = serde_json::to_vec(&text).map_err(|e| LockError::new(key, e))?;
        let written = match revision {
            Some(revision) => store
                .update(key, value.into(), revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => store
                .create(key, value.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(ids),
            // Someone else changed it meanwhile: read again.
            Err(e) => tracing::debug!(%key, error = %e, "queue changed meanwhile; again"),
        }
    }
    Err(LockError::new(
        key,
        "the queue keeps changing; giving up for now",
    ))
}

/// Every open release of every workload: those in a queue and those holding a lock (what
/// `baton list` shows), each once, in no particular order. The bucket's stream is read message
/// by message (it keeps one per key: its value, or the marker of its deletion), not through a
/// watch — a consumer, which could land on a server that is down — and not through the bucket's
/// handle, which only a leader gives.
pub async fn open_releases(bus: &crate::bus::Bus) -> Result<Vec<ReleaseId>> {
    let prefix = format!("$KV.{}.", crate::bus::LOCKS_BUCKET);
    let mut reader = bus
        .read_stream(
            &format!("KV_{}", crate::bus::LOCKS_BUCKET),
            &format!("{prefix}>"),
        )
        .await
        .map_err(|e| LockError::new("*", e))?;
    let mut open = std::collections::BTreeSet::new();
    while let Some(message) = reader
        .next_now()
        .await
        .map_err(|e| LockError::new("*", e))?
    {
        let Some(key) = message.subject.as_str().strip_prefix(&prefix) else {
            continue;
        };
        if !crate::bus::is_kv_put(&message) {
            continue;
        }
        if key.starts_with("queue.") {
            open.extend(parse_queue(key, &message.payload)?);
        } else if key.starts_with("lock.") {
            if let Ok(id) = ReleaseId::parse(&String::from_utf8_lossy(&message.payload)) {
                open.insert(id);
            }
        }
    }
    Ok(open.into_iter().collect())
}

/// Adds `release` at the end of the workload's queue (once).
pub async fn enqueue(store: &kv::Store, key: &str, release: ReleaseId) -> Result<Vec<ReleaseId>> {
    update_queue(store, key, |ids| {
        if ids.contains(&release) {
            false
        } else {
            ids.push(release);
            true
        }
    })
    .await
}

/// Takes `release` out of the workload's queue (it ended).
pub async fn dequeue(store: &kv::Store, key: &str, release: ReleaseId) -> Result<Vec<ReleaseId>> {
    update_queue(store, key, |ids| {
        let before = ids.len();
        ids.retain(|id| *id != release);
        ids.len() != before
    })
    .await
}
