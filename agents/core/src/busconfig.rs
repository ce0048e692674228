//! The bus definitions in `bus-config/` (streams, consumers, KV buckets, object stores) and
//! applying them to a server: create what is missing, update what differs, touch nothing else.
//! Applying the same definitions twice changes nothing the second time.
//!
//! Stream files are JetStream's own stream configuration JSON. Consumer files list, per agent, the
//! event types it reacts to; each becomes one durable pull consumer (nats-server 2.9 allows one
//! filter subject per consumer) with the settings of `consumers/defaults.json`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use async_nats::jetstream::{self, consumer, object_store, stream};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::event::{EventType, Role};
use crate::subject;

/// The definitions compiled into every Baton binary (the same files as in `bus-config/`).
const EMBEDDED: &[(&str, &str)] = &[
    (
        "streams/BATON_EVENTS.json",
        include_str!("../../../bus-config/streams/BATON_EVENTS.json"),
    ),
    (
        "streams/BATON_DLQ.json",
        include_str!("../../../bus-config/streams/BATON_DLQ.json"),
    ),
    (
        "streams/BATON_NOTIFY.json",
        include_str!("../../../bus-config/streams/BATON_NOTIFY.json"),
    ),
    (
        "consumers/notifier.json",
        include_str!("../../../bus-config/consumers/notifier.json"),
    ),
    (
        "consumers/defaults.json",
        include_str!("../../../bus-config/consumers/defaults.json"),
    ),
    (
        "consumers/builder.json",
        include_str!("../../../bus-config/consumers/builder.json"),
    ),
    (
        "consumers/deployer.json",
        include_str!("../../../bus-config/consumers/deployer.json"),
    ),
    (
        "consumers/health-checker.json",
        include_str!("../../../bus-config/consumers/health-checker.json"),
    ),
    (
        "consumers/rollback.json",
        include_str!("../../../bus-config/consumers/rollback.json"),
    ),
    (
        "consumers/metrics.json",
        include_str!("../../../bus-config/consumers/metrics.json"),
    ),
    (
        "kv/BATON_LOCKS.json",
        include_str!("../../../bus-config/kv/BATON_LOCKS.json"),
    ),
    (
        "kv/BATON_CONFIG.json",
        include_str!("../../../bus-config/kv/BATON_CONFIG.json"),
    ),
    (
        "objects/BATON_LOGS.json",
        include_str!("../../../bus-config/objects/BATON_LOGS.json"),
    ),
    (
        "replicas.json",
        include_str!("../../../bus-config/replicas.json"),
    ),
];

/// How many copies of every stream and bucket: one on a single server, a quorum-replicated
/// three on a cluster (`replicas.json`). A definition that sets its own `num_replicas` (streams)
/// or `replicas` (buckets) keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    pub single_server: usize,
    pub cluster: usize,
}

impl Replicas {
    /// The number for a server that is (or is not) part of a cluster.
    pub fn for_server(&self, clustered: bool) -> usize {
        if clustered {
            self.cluster
        } else {
            self.single_server
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentConsumersFile {
    agent: String,
    stream: String,
    events: Vec<String>,
    /// Consumers of an agent bound to one cluster are per cluster (`<agent>-<cluster>-<type>`):
    /// a deployer serving cluster A must never take, and drop, a message meant for cluster B.
    #[serde(default)]
    per_cluster: bool,
    /// Settings of some of the consumers that differ from `defaults.json`, by event type.
    #[serde(default)]
    overrides: BTreeMap<String, Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvDef {
    pub bucket: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub history: i64,
    #[serde(default)]
    pub max_age_seconds: u64,
    #[serde(default = "file_storage")]
    pub storage: String,
    /// Copies of the bucket; `replicas.json` decides when absent.
    #[serde(default)]
    pub replicas: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDef {
    pub bucket: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub max_age_seconds: u64,
    #[serde(default = "file_storage")]
    pub storage: String,
    /// Copies of the store; `replicas.json` decides when absent.
    #[serde(default)]
    pub replicas: Option<usize>,
}

fn one() -> i64 {
    1
}
fn file_storage() -> String {
    "file".into()
}

/// One durable consumer: which agent owns it, on which stream, and its full configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerDef {
    pub agent: Role,
    pub stream: String,
    pub durable: String,
    /// Instantiated once per cluster (see [`ConsumerDef::for_cluster`]).
    pub per_cluster: bool,
    /// The end of the durable name: the event type with dashes, or `all`.
    pub suffix: String,
    /// `None` for a consumer of every event.
    pub event_type: Option<EventType>,
    pub config: Value,
}

impl ConsumerDef {
    /// This consumer for one cluster: `<agent>-<cluster>-<type>`. Shared consumers are returned
    /// as they are.
    pub fn for_cluster(&self, cluster: &str) -> ConsumerDef {
        if !self.per_cluster {
            return self.clone();
        }
        let mut def = self.clone();
        def.durable = format!("{}-{cluster}-{}", self.agent, self.suffix);
        def.config["durable_name"] = Value::String(def.durable.clone());
        let what = self.event_type.map_or("every event", |t| t.as_str());
        def.config["description"] = Value::String(format!(
            "{} in cluster {cluster} reacts to {what}",
            self.agent
        ));
        def
    }

    pub fn pull_config(&self) -> Result<consumer::pull::Config> {
        serde_json::from_value(self.config.clone()).map_err(|e| Error::Definition {
            path: format!("consumer {}", self.durable),
            message: e.to_string(),
        })
    }
}

/// Everything `bus-config/` defines.
#[derive(Debug, Clone)]
pub struct Definitions {
    /// Stream name → the JSON of its configuration as written.
    pub streams: BTreeMap<String, Value>,
    pub consumers: Vec<ConsumerDef>,
    pub kv: Vec<KvDef>,
    pub objects: Vec<ObjectDef>,
    pub replicas: Replicas,
}

impl Definitions {
    /// The definitions built into this binary.
    pub fn embedded() -> Result<Self> {
        Self::from_files(
            EMBEDDED
                .iter()
                .map(|(p, c)| (p.to_string(), c.to_string()))
                .collect(),
        )
    }

    /// The definitions in a `bus-config/` folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let replicas = dir.join("replicas.json");
        let text = std::fs::read_to_string(&replicas).map_err(|e| Error::Definition {
            path: replicas.display().to_string(),
            message: e.to_string(),
        })?;
        files.push(("replicas.json".to_string(), text));
        for sub in ["streams", "consumers", "kv", "objects"] {
            let path = dir.join(sub);
            let entries = std::fs::read_dir(&path).map_err(|e| Error::Definition {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::Definition {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "json") {
                    let text = std::fs::read_to_string(&p).map_err(|e| Error::Definition {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })?;
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    files.push((format!("{sub}/{name}"), text));
                }
            }
        }
        Self::from_files(files)
    }

    fn from_files(mut files: Vec<(String, String)>) -> Result<Self> {
        files.sort();
        let bad = |path: &str, message: String| Error::Definition {
            path: path.to_owned(),
            message,
        };
        let mut streams = BTreeMap::new();
        let mut defaults = None;
        let mut agent_files = Vec::new();
        let mut kv = Vec::new();
        let mut objects = Vec::new();
        let mut replicas = None;
        for (path, text) in &files {
            let value: Value = serde_json::from_str(text).map_err(|e| bad(path, e.to_string()))?;
            if path == "replicas.json" {
                let r: Replicas =
                    serde_json::from_value(value).map_err(|e| bad(path, e.to_string()))?;
                if r.single_server != 1 || !(1..=5).contains(&r.cluster) {
                    return Err(bad(
                        path,
                        "single_server must be 1 and cluster 1 to 5 (JetStream's limits)".into(),
                    ));
                }
                replicas = Some(r);
                continue;
            }
            match path.split_once('/').map(|(dir, _)| dir) {
                Some("streams") => {
                    // Must be a valid JetStream stream configuration (whose replicas may be
                    // left to replicas.json).
                    let mut check = value.clone();
                    if let Value::Object(map) = &mut check {
                        map.entry("num_replicas").or_insert_with(|| Value::from(1));
                    }
                    let config: stream::Config =
                        serde_json::from_value(check).map_err(|e| bad(path, e.to_string()))?;
                    if config.name.is_empty() {
                        return Err(bad(path, "stream has no name".into()));
                    }
                    streams.insert(config.name, value);
                }
                Some("consumers") if path.ends_with("/defaults.json") => defaults = Some(value),
                Some("consumers") => {
                    let f: AgentConsumersFile =
                        serde_json::from_value(value).map_err(|e| bad(path, e.to_string()))?;
                    agent_files.push((path.clone(), f));
                }
                Some("kv") => {
                    kv.push(serde_json::from_value(value).map_err(|e| bad(path, e.to_string()))?)
                }
                Some("objects") => objects
                    .push(serde_json::from_value(value).map_err(|e| bad(path, e.to_string()))?),
                _ => {
                    return Err(bad(
                        path,
                        "not a streams/, consumers/, kv/ or objects/ file".into(),
                    ))
                }
            }
        }
        let defaults = match defaults {
            Some(Value::Object(map)) => map,
            _ => {
                return Err(bad(
                    "consumers/defaults.json",
                    "missing, or not a JSON object".into(),
                ))
            }
        };
        let mut consumers = Vec::new();
        for (path, f) in agent_files {
            let agent: Role = f.agent.parse().map_err(|e: String| bad(&path, e))?;
            if let Some(unknown) = f.overrides.keys().find(|k| !f.events.contains(k)) {
                return Err(bad(
                    &path,
                    format!("overrides name {unknown}, which is not one of its events"),
                ));
            }
            if !streams.contains_key(&f.stream) {
                return Err(bad(&path, format!("stream {} is not defined", f.stream)));
            }
            for event in &f.events {
                let (event_type, filter, suffix) = if event == ">" {
                    (None, subject::all_events(), "all".to_owned())
                } else {
                    let t: EventType = event.parse().map_err(|e| bad(&path, format!("{e}")))?;
                    (
                        Some(t),
                        subject::events_of_type(t),
                        t.as_str().replace('.', "-"),
                    )
                };
                let durable = format!("{agent}-{suffix}");
                let mut config: Map<String, Value> = defaults.clone();
                if let Some(over) = f.overrides.get(event) {
                    config.extend(over.clone());
                }
                config.insert("durable_name".into(), Value::String(durable.clone()));
                config.insert("filter_subject".into(), Value::String(filter));
                config.insert(
                    "description".into(),
                    Value::String(format!(
                        "{agent} reacts to {}",
                        event_type.map_or("every event", |t| t.as_str())
                    )),
                );
                let def = ConsumerDef {
                    agent,
                    stream: f.stream.clone(),
                    durable,
                    per_cluster: f.per_cluster,
                    suffix,
                    event_type,
                    config: Value::Object(config),
                };
                def.pull_config()?;
                consumers.push(def);
            }
        }
        let replicas = replicas.ok_or_else(|| bad("replicas.json", "missing".into()))?;
        Ok(Definitions {
            streams,
            consumers,
            kv,
            objects,
            replicas,
        })
    }

    /// The consumers an agent serving `cluster` runs.
    pub fn consumers_for(&self, role: Role, cluster: &str) -> Vec<ConsumerDef> {
        self.consumers
            .iter()
            .filter(|c| c.agent == role)
            .map(|c| c.for_cluster(cluster))
            .collect()
    }

    /// Every consumer: the shared ones, and the per-cluster ones for each of `clusters`.
    pub fn concrete_consumers(&self, clusters: &[String]) -> Vec<ConsumerDef> {
        let mut out = Vec::new();
        for c in &self.consumers {
            if c.per_cluster {
                out.extend(clusters.iter().map(|cl| c.for_cluster(cl)));
            } else {
                out.push(c.clone());
            }
        }
        out
    }
}

/// What applying did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated { fields: Vec<String> },
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: &'static str,
    pub name: String,
    pub action: Action,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            Action::Created => write!(f, "created   {} {}", self.kind, self.name),
            Action::Updated { fields } => write!(
                f,
                "updated   {} {} ({})",
                self.kind,
                self.name,
                fields.join(", ")
            ),
            Action::Unchanged => write!(f, "unchanged {} {}", self.kind, self.name),
        }
    }
}

/// The outcome of `apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub changes: Vec<Change>,
}

impl ApplyReport {
    pub fn changed(&self) -> usize {
        self.changes
            .iter()
            .filter(|c| c.action != Action::Unchanged)
            .count()
    }
}

fn is_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The keys of `desired` whose values differ in `actual`.
fn differing(desired: &Value, actual: &Value) -> Vec<String> {
    let (Value::Object(d), Value::Object(a)) = (desired, actual) else {
        return vec!["<config>".into()];
    };
    d.iter()
        .filter(|(k, v)| a.get(*k).unwrap_or(&Value::Null) != *v)
        .map(|(k, _)| k.clone())
        .collect()
}

fn to_value<T: serde::Serialize>(kind: &'static str, name: &str, v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Apply {
        kind,
        name: name.to_owned(),
        message: e.to_string(),
    })
}

/// Creates or updates every definition on the server; per-cluster consumers for each of
/// `clusters` (agents also create their own at start). Streams and buckets get the replicas of
/// `replicas.json` for the server they are applied to: a cluster's or a single server's.
pub async fn apply(
    js: &jetstream::Context,
    defs: &Definitions,
    clusters: &[String],
) -> Result<ApplyReport> {
    let clustered = js.client().server_info().cluster.is_some();
    let replicas = defs.replicas.for_server(clustered);
    let mut report = ApplyReport::default();
    for (name, desired) in &defs.streams {
        let mut desired = desired.clone();
        if let Value::Object(map) = &mut desired {
            map.entry("num_replicas")
                .or_insert_with(|| Value::from(replicas));
        }
        let action = placed(|| apply_stream(js, name, &desired)).await?;
        report.changes.push(Change {
            kind: "stream",
            name: name.clone(),
            action,
        });
    }
    for c in &defs.concrete_consumers(clusters) {
        let action = apply_consumer(js, c).await?;
        report.changes.push(Change {
            kind: "consumer",
            name: format!("{}/{}", c.stream, c.durable),
            action,
        });
    }
    for k in &defs.kv {
        let action = placed(|| apply_kv(js, k, k.replicas.unwrap_or(replicas))).await?;
        report.changes.push(Change {
            kind: "kv bucket",
            name: k.bucket.clone(),
            action,
        });
    }
    for o in &defs.objects {
        let action = placed(|| apply_object_store(js, o, o.replicas.unwrap_or(replicas))).await?;
        report.changes.push(Change {
            kind: "object store",
            name: o.bucket.clone(),
            action,
        });
    }
    Ok(report)
}

/// How long `apply` waits for a cluster that cannot place replicas yet.
const PLACEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `apply` of one object again while the servers say "no suitable peers for placement"
/// (JetStream 10005): a cluster just started has a meta leader before it knows every peer, so a
/// replicated stream can't be placed for a moment (e.g. the bus-apply Job beside a starting
/// StatefulSet). Each object's apply is idempotent; any other error is returned at once.
async fn placed<F, Fut>(mut apply: F) -> Result<Action>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Action>>,
{
    let started = std::time::Instant::now();
    loop {
        match apply().await {
            Err(e)
                if e.to_string().contains("no suitable peers for placement")
                    && started.elapsed() < PLACEMENT_WAIT =>
            {
                tracing::info!(error = %e, "the cluster cannot place replicas yet; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

async fn apply_stream(js: &jetstream::Context, name: &str, desired: &Value) -> Result<Action> {
    let err = |message: String| Error::Apply {
        kind: "stream",
        name: name.to_owned(),
        message,
    };
    let config: stream::Config =
        serde_json::from_value(desired.clone()).map_err(|e| err(e.to_string()))?;
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| err(e.to_string()))?;
            let fields = differing(desired, &to_value("stream", name, &info.config)?);
            if fields.is_empty() {
                return Ok(Action::Unchanged);
            }
            js.update_stream(config)
                .await
                .map_err(|e| err(format!("cannot update {}: {e}", fields.join(", "))))?;
            Ok(Action::Updated { fields })
        }
        Err(e) if is_not_found(&e.kind()) => {
            js.create_stream(config)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok(Action::Created)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

async fn apply_consumer(js: &jetstream::Context, def: &ConsumerDef) -> Result<Action> {
    let err = |message: String| Error::Apply {
        kind: "consumer",
        name: def.durable.clone(),
        message,
    };
    let stream = js
        .get_stream(&def.stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    let existing = stream.consumer_info(&def.durable).await;
    let config = def.pull_config()?;
    match existing {
        Ok(info) => {
            let fields = differing(
                &def.config,
                &to_value("consumer", &def.durable, &info.config)?,
            );
            if fields.is_empty() {
                return Ok(Action::Unchanged);
            }
            // nats-server 2.9 updates a durable's editable fields when it is created again.
            stream
                .create_consumer(config)
                .await
                .map_err(|e| err(format!("cannot update {}: {e}", fields.join(", "))))?;
            Ok(Action::Updated { fields })
        }
        Err(_) => {
            stream
                .create_consumer(config)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok(Action::Created)
        }
    }
}

fn storage(kind: &'static str, name: &str, s: &str) -> Result<stream::StorageType> {
    match s {
        "file" => Ok(stream::StorageType::File),
        "memory" => Ok(stream::StorageType::Memory),
        other => Err(Error::Apply {
            kind,
            name: name.to_owned(),
            message: format!("unknown storage {other:?}"),
        }),
    }
}

/// Brings an existing KV or object-store stream's settings to what is defined.
async fn update_backing_stream(
    js: &jetstream::Context,
    kind: &'static str,
    name: &str,
    stream_name: &str,
    set: impl FnOnce(&mut stream::Config) -> Vec<String>,
) -> Result<Action> {
    let err = |message: String| Error::Apply {
        kind,
        name: name.to_owned(),
        message,
    };
    let mut s = js
        .get_stream(stream_name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut config = s
        .info()
        .await
        .map_err(|e| err(e.to_string()))?
        .config
        .clone();
    let fields = set(&mut config);
    if fields.is_empty() {
        return Ok(Action::Unchanged);
    }
    js.update_stream(config)
        .await
        .map_err(|e| err(format!("cannot update {}: {e}", fields.join(", "))))?;
    Ok(Action::Updated { fields })
}

async fn apply_kv(js: &jetstream::Context, def: &KvDef, replicas: usize) -> Result<Action> {
    let name = def.bucket.as_str();
    let storage_type = storage("kv bucket", name, &def.storage)?;
    let max_age = std::time::Duration::from_secs(def.max_age_seconds);
    if js.get_stream(format!("KV_{name}")).await.is_ok() {
        return update_backing_stream(js, "kv bucket", name, &format!("KV_{name}"), |c| {
            let mut fields = Vec::new();
            if c.max_messages_per_subject != def.history {
                c.max_messages_per_subject = def.history;
                fields.push("history".into());
            }
            if c.description.as_deref().unwrap_or("") != def.description {
                c.description = Some(def.description.clone());
                fields.push("description".into());
            }
            if c.max_age != max_age {
                c.max_age = max_age;
                fields.push("max_age".into());
            }
            if c.num_replicas != replicas {
                c.num_replicas = replicas;
                fields.push("num_replicas".into());
            }
            fields
        })
        .await;
    }
    // The bucket's stream, as JetStream's KV layout defines it. (async-nats' create_key_value
    // first reads the account info, which it cannot parse from nats-server 2.9.)
    js.create_stream(stream::Config {
        name: format!("KV_{name}"),
        description: Some(def.description.clone()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: def.history,
        max_age,
        storage: storage_type,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Apply {
        kind: "kv bucket",
        name: name.to_owned(),
        message: e.to_string(),
    })?;
    Ok(Action::Created)
}

async fn apply_object_store(
    js: &jetstream::Context,
    def: &ObjectDef,
    replicas: usize,
) -> Result<Action> {
    let name = def.bucket.as_str();
    let storage_type = storage("object store", name, &def.storage)?;
    let max_age = std::time::Duration::from_secs(def.max_age_seconds);
    if js.get_stream(format!("OBJ_{name}")).await.is_ok() {
        return update_backing_stream(js, "object store", name, &format!("OBJ_{name}"), |c| {
            let mut fields = Vec::new();
            if c.description.as_deref().unwrap_or("") != def.description {
                c.description = Some(def.description.clone());
                fields.push("description".into());
            }
            if c.max_age != max_age {
                c.max_age = max_age;
                fields.push("max_age".into());
            }
            if c.num_replicas != replicas {
                c.num_replicas = replicas;
                fields.push("num_replicas".into());
            }
            fields
        })
        .await;
    }
    js.create_object_store(object_store::Config {
        bucket: def.bucket.clone(),
        description: Some(def.description.clone()),
        max_age,
        storage: storage_type,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Apply {
        kind: "object store",
        name: name.to_owned(),
        message: e.to_string(),
    })?;
    Ok(Action::Created)
}

/// Makes sure an agent's durable consumers exist (creating missing ones); changing existing ones
/// is `baton bus apply`'s job, so a difference is only logged.
pub async fn ensure_consumers(
    js: &jetstream::Context,
    defs: &Definitions,
    role: Role,
    cluster: &str,
) -> Result<Vec<ConsumerDef>> {
    let mine = defs.consumers_for(role, cluster);
    for def in &mine {
        let err = |message: String| Error::Consumer {
            stream: def.stream.clone(),
            consumer: def.durable.clone(),
            message,
        };
        let stream = js
            .get_stream(&def.stream)
            .await
            .map_err(|e| err(format!("stream unavailable: {e}")))?;
        match stream.consumer_info(&def.durable).await {
            Ok(info) => {
                let fields = differing(
                    &def.config,
                    &to_value("consumer", &def.durable, &info.config)?,
                );
                if !fields.is_empty() {
                    tracing::warn!(consumer = %def.durable, ?fields, "consumer differs from its definition; run `baton bus apply`");
                }
            }
            Err(_) => {
                stream
                    .create_consumer(def.pull_config()?)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                tracing::info!(consumer = %def.durable, "created durable consumer");
            }
        }
    }
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_definitions_parse_and_name_one_consumer_per_event_type() {
        let defs = Definitions::embedded().unwrap();
        assert!(defs.streams.contains_key("BATON_EVENTS"));
        assert!(defs.streams.contains_key("BATON_DLQ"));
        let builder = defs.consumers_for(Role::Builder, "c1");
        assert_eq!(builder.len(), 1);
        assert_eq!(builder[0].durable, "builder-release-requested");
        assert_eq!(
            builder[0].config["filter_subject"],
            "baton.v1.events.*.*.*.release.requested"
        );
        assert_eq!(builder[0].config["ack_policy"], "explicit");
        let metrics = defs.consumers_for(Role::Metrics, "c1");
        assert_eq!(metrics[0].durable, "metrics-all");
        assert_eq!(metrics[0].event_type, None);
        for role in Role::AGENTS {
            assert!(
                !defs.consumers_for(role, "c1").is_empty(),
                "{role} has no consumers"
            );
        }
        // Every consumer name is unique.
        let mut names: Vec<_> = defs.consumers.iter().map(|c| c.durable.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), defs.consumers.len());
    }

    #[test]
    fn cluster_bound_agents_have_consumers_of_their_own_per_cluster() {
        let defs = Definitions::embedded().unwrap();
        let a = defs.consumers_for(Role::Deployer, "eu-west");
        let b = defs.consumers_for(Role::Deployer, "us-east");
        assert!(a
            .iter()
            .any(|c| c.durable == "deployer-eu-west-build-succeeded"));
        assert!(b
            .iter()
            .any(|c| c.durable == "deployer-us-east-build-succeeded"));
        assert_eq!(a[0].config["durable_name"], a[0].durable.as_str());
        // The builder and metrics agents share one consumer across clusters.
        assert_eq!(
            defs.consumers_for(Role::Builder, "eu-west"),
            defs.consumers_for(Role::Builder, "us-east")
        );
        let all = defs.concrete_consumers(&["x".into(), "y".into()]);
        assert_eq!(
            all.len(),
            defs.consumers
                .iter()
                .map(|c| if c.per_cluster { 2 } else { 1 })
                .sum::<usize>()
        );
    }

    #[test]
    fn the_folder_and_the_embedded_copy_agree() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bus-config");
        let from_dir = Definitions::load(&dir).unwrap();
        let embedded = Definitions::embedded().unwrap();
        assert_eq!(from_dir.streams, embedded.streams);
        assert_eq!(from_dir.consumers, embedded.consumers);
        assert_eq!(from_dir.kv.len(), embedded.kv.len());
        assert_eq!(from_dir.objects.len(), embedded.objects.len());
    }

    #[test]
    fn bad_definitions_are_refused_naming_the_file() {
        let cases = [
            (vec![("streams/x.json", "{ not json")], "streams/x.json"),
            (
                vec![
                    ("consumers/defaults.json", "{}"),
                    (
                        "consumers/a.json",
                        r#"{"agent":"nobody","stream":"S","events":[]}"#,
                    ),
                ],
                "unknown role",
            ),
            (
                vec![
                    ("consumers/defaults.json", "{}"),
                    (
                        "consumers/b.json",
                        r#"{"agent":"builder","stream":"NOPE","events":[]}"#,
                    ),
                ],
                "not defined",
            ),
            (
                vec![("kv/k.json", r#"{"bucket":"K","histroy":3}"#)],
                "histroy",
            ),
        ];
        for (files, why) in cases {
            let files = files
                .into_iter()
                .map(|(p, c)| (p.to_string(), c.to_string()))
                .collect();
            let err = Definitions::from_files(files).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn differing_compares_only_the_keys_defined() {
        let desired = serde_json::json!({"a": 1, "b": "x"});
        let actual = serde_json::json!({"a": 1, "b": "y", "c": true});
        assert_eq!(differing(&desired, &actual), vec!["b".to_string()]);
        assert!(differing(&serde_json::json!({"a": 1}), &actual).is_empty());
    }
}
