//! Simulated nodes: Baton's own kubelet stand-in (as the Kubernetes project's kwok is).
//!
//! [`NodeSimulator`] registers Ready nodes with a real control plane, takes the pods the
//! scheduler binds to them, "pulls" their images from the sandbox [`Registry`], gives each pod
//! its own loopback address and serves HTTP there as the app would, with behaviour chosen by the
//! container's env (see [`behaviour`]). It reports pod status as a kubelet does, and finishes
//! graceful deletions so pods don't hang in Terminating.
//!
//! Back-offs are compressed for the sandbox: crash-loop and image-pull back-off start at
//! [`NodeOptions::crash_backoff_base`] (1s) and cap at [`NodeOptions::crash_backoff_max`] (30s),
//! where a kubelet uses 10s and 5min, so tests see several restarts within seconds.

pub(crate) mod app;
pub(crate) mod behaviour;
#[cfg(test)]
mod e2e_tests;
pub(crate) mod ip;
mod pod;
mod register;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt as _;
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Every call to the API server is bounded by this.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts for one API write before giving up (with back-off between them).
const API_ATTEMPTS: u32 = 6;
/// How long shutdown waits for pod workers to stop their servers.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often nodes refresh their Ready condition. Harmless, since the node lifecycle controller
/// is off in the sandbox, but it keeps `kubectl get nodes` honest.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(20);

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid node options: {reason}")]
    InvalidOptions { reason: String },

    #[error("{action} {object} failed")]
    Kube {
        action: &'static str,
        object: String,
        source: kube::Error,
    },

    #[error("{action} {object} timed out after {timeout:?}")]
    Timeout {
        action: &'static str,
        object: String,
        timeout: Duration,
    },

    #[error("node {name} did not become ready and untainted: {reason}")]
    NotReady { name: String, reason: String },

    #[error("building the http client for readiness probes")]
    ProbeClient { source: reqwest::Error },

    #[error("{action} {object} cancelled by shutdown")]
    Cancelled {
        action: &'static str,
        object: String,
    },
}

impl NodeError {
    /// Whether trying again may succeed: timeouts, conflicts, throttling, server-side and
    /// connection errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::NotReady { .. } => true,
            Self::Kube { source, .. } => kube_error_is_retryable(source),
            Self::InvalidOptions { .. } | Self::ProbeClient { .. } | Self::Cancelled { .. } => {
                false
            }
        }
    }

    /// The API server's answer was 404.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Kube { source: kube::Error::Api(status), .. } if status.is_not_found())
    }

    /// The API server's answer was 409 (a failed precondition on delete, or a conflict).
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self, Self::Kube { source: kube::Error::Api(status), .. } if status.code == 409)
    }
}

fn kube_error_is_retryable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 409 || status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How many nodes to register.
    pub count: usize,
    /// Nodes are named `<prefix>-<i>`, from 0.
    pub name_prefix: String,
    /// First crash-loop and image-pull back-off. The kubelet's is 10s; 1s by default so the
    /// sandbox shows restarts quickly.
    pub crash_backoff_base: Duration,
    /// Longest back-off. The kubelet's is 5min; 30s by default.
    pub crash_backoff_max: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            count: 3,
            name_prefix: "baton-node".to_string(),
            crash_backoff_base: Duration::from_secs(1),
            crash_backoff_max: Duration::from_secs(30),
        }
    }
}

impl NodeOptions {
    /// Appends a random suffix to the prefix, for simulators sharing one control plane.
    pub fn with_unique_prefix(mut self) -> Self {
        self.name_prefix = format!(
            "{}-{}",
            self.name_prefix,
            hex::encode(rand::random::<[u8; 3]>())
        );
        self
    }

    fn node_names(&self) -> Vec<String> {
        (0..self.count)
            .map(|i| format!("{}-{i}", self.name_prefix))
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(NodeError::InvalidOptions { reason });
        if self.count == 0 {
            return invalid("count must be at least 1".to_string());
        }
        // A node name is a DNS subdomain; keep room for the index.
        let longest = format!("{}-{}", self.name_prefix, self.count - 1);
        let valid = !self.name_prefix.is_empty()
            && longest.len() <= 253
            && longest.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return invalid(format!(
                "name prefix {:?} does not make valid node names (lowercase dns labels)",
                self.name_prefix
            ));
        }
        if self.crash_backoff_base.is_zero() || self.crash_backoff_max < self.crash_backoff_base {
            return invalid(format!(
                "back-off must satisfy 0 < base ({:?}) <= max ({:?})",
                self.crash_backoff_base, self.crash_backoff_max
            ));
        }
        Ok(())
    }
}

/// Simulated nodes and their pods; stop them with [`NodeSimulator::shutdown`] (dropping it
/// cancels everything too, without waiting).
pub struct NodeSimulator {
    names: Vec<String>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// What every pod worker needs.
pub(crate) struct Shared {
    pub client: kube::Client,
    pub registry: Registry,
    pub opts: NodeOptions,
    pub probe_http: reqwest::Client,
}

impl NodeSimulator {
    /// Registers the nodes, waits until each is Ready and untainted, then starts taking pods.
    pub async fn start(
        client: kube::Client,
        registry: Registry,
        opts: NodeOptions,
    ) -> Result<Self> {
        opts.validate()?;
        crate::registry::ensure_crypto_provider();
        let probe_http = reqwest::Client::builder()
            .no_proxy()
            // A fresh connection per probe, as the kubelet does, so a restarted app is noticed.
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|source| NodeError::ProbeClient { source })?;
        let names = opts.node_names();
        let cancel = CancellationToken::new();

        let nodes: Api<Node> = Api::all(client.clone());
        let since = now_time();
        let registered = futures::future::join_all(
            names
                .iter()
                .map(|name| register::register(&nodes, name, &since, &cancel)),
        )
        .await;
        for result in registered {
            result?;
        }
        tracing::info!(nodes = ?names, "simulated nodes are ready");

        let shared = Arc::new(Shared {
            client,
            registry,
            opts,
            probe_http,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(register::heartbeat(
            nodes,
            names.clone(),
            since,
            HEARTBEAT_PERIOD,
            cancel.clone(),
        ));
        tasks.spawn(watch_pods(shared, names.clone(), cancel.clone()));
        Ok(Self {
            names,
            cancel,
            tasks,
        })
    }

    pub fn node_names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Stops watching, stops every pod's servers and gives their addresses back. Node and pod
    /// objects are left as they are.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let joined = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!("node simulator tasks did not stop in time; aborting them");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

impl Drop for NodeSimulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Worker {
    node: String,
    cancel: CancellationToken,
    pod: watch::Sender<Pod>,
    /// Tells this worker from a later one for a pod that came back with the same uid.
    generation: u64,
}

/// Watches the pods bound to our nodes and keeps one worker per pod (by uid).
async fn watch_pods(shared: Arc<Shared>, nodes: Vec<String>, cancel: CancellationToken) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let streams = nodes.iter().map(|node| {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let node = node.clone();
        watcher(api.clone(), config)
            .default_backoff()
            .map(move |event| (node.clone(), event))
            .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut tasks: JoinSet<(String, u64)> = JoinSet::new();
    let mut relisting: HashMap<String, HashSet<String>> = HashMap::new();
    // Pods whose worker finished their deletion: later updates (before the Delete event) must
    // not start a new worker.
    let mut finished: HashSet<String> = HashSet::new();
    let mut generation = 0u64;

    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                match joined {
                    Ok((uid, done)) => {
                        // Still in the map: the worker ended by itself, having deleted the pod.
                        if workers.get(&uid).is_some_and(|w| w.generation == done) {
                            workers.remove(&uid);
                            finished.insert(uid);
                        }
                    }
                    Err(error) => tracing::error!(%error, "pod worker failed"),
                }
            }
            event = events.next() => {
                let Some((node, event)) = event else { break };
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        let Some(uid) = pod.metadata.uid.clone() else { continue };
                        if let Some(seen) = relisting.get_mut(&node) {
                            seen.insert(uid.clone());
                        }
                        if let Some(worker) = workers.get(&uid) {
                            worker.pod.send_replace(pod);
                            continue;
                        }
                        if finished.contains(&uid) {
                            continue;
                        }
                        generation += 1;
                        let worker_cancel = cancel.child_token();
                        let (tx, rx) = watch::channel(pod);
                        let task = pod::run(Arc::clone(&shared), rx, worker_cancel.clone());
                        let done = generation;
                        let task_uid = uid.clone();
                        tasks.spawn(async move {
                            task.await;
                            (task_uid, done)
                        });
                        workers.insert(uid, Worker { node, cancel: worker_cancel, pod: tx, generation });
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        let Some(uid) = pod.metadata.uid.as_ref() else { continue };
                        finished.remove(uid);
                        if let Some(worker) = workers.remove(uid) {
                            worker.cancel.cancel();
                        }
                    }
                    Ok(watcher::Event::Init) => {
                        relisting.insert(node, HashSet::new());
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down never get a Delete event.
                        let seen = relisting.remove(&node).unwrap_or_default();
                        finished.retain(|uid| seen.contains(uid));
                        workers.retain(|uid, worker| {
                            let keep = worker.node != node || seen.contains(uid);
                            if !keep {
                                worker.cancel.cancel();
                            }
                            keep
                        });
                    }
                    Err(error) => tracing::warn!(%node, %error, "pod watch failed; retrying"),
                }
            }
        }
    }

    for worker in workers.values() {
        worker.cancel.cancel();
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, "pod worker failed");
        }
    }
}

/// Runs an API call with a timeout, retrying retryable failures with back-off. The sandbox
/// doesn't depend on `baton-core` (where agents' retry policy lives), and only needs this.
pub(crate) async fn call_api<T, F, Fut>(
    action: &'static str,
    object: &str,
    cancel: &CancellationToken,
    f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    call_api_attempts(API_ATTEMPTS, action, object, cancel, f).await
}

/// [`call_api`] with a given number of attempts (at least one).
pub(crate) async fn call_api_attempts<T, F, Fut>(
    attempts: u32,
    action: &'static str,
    object: &str,
    cancel: &CancellationToken,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = tokio::select! {
            () = cancel.cancelled() => {
                return Err(NodeError::Cancelled { action, object: object.to_string() });
            }
            result = tokio::time::timeout(API_TIMEOUT, f()) => match result {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) => NodeError::Kube { action, object: object.to_string(), source },
                Err(_) => NodeError::Timeout { action, object: object.to_string(), timeout: API_TIMEOUT },
            },
        };
        if !error.is_retryable() || attempt >= attempts {
            return Err(error);
        }
        let delay = jittered(behaviour::backoff(
            Duration::from_millis(100),
            Duration::from_secs(3),
            attempt,
        ));
        tracing::debug!(action, object, attempt, ?delay, error = %error, "retrying api call");
        tokio::select! {
            () = cancel.cancelled() => return Err(error),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Between half and all of `delay`, so simulators don't retry in lockstep.
pub(crate) fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Kubernetes' time format (seconds, UTC).
pub(crate) fn kube_time(at: k8s_openapi::jiff::Timestamp) -> String {
    k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", at)
        .unwrap_or_else(|_| at.to_string())
}

pub(crate) fn now_time() -> String {
    kube_time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let ok = NodeOptions::default();
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.node_names(),
            ["baton-node-0", "baton-node-1", "baton-node-2"]
        );
        let cases = [
            NodeOptions {
                count: 0,
                ..Default::default()
            },
            NodeOptions {
                name_prefix: String::new(),
                ..Default::default()
            },
            NodeOptions {
                name_prefix: "Node".into(),
                ..Default::default()
            },
            NodeOptions {
                name_prefix: "a_b".into(),
                ..Default::default()
            },
            NodeOptions {
                name_prefix: "a".repeat(62),
                ..Default::default()
            },
            NodeOptions {
                crash_backoff_base: Duration::ZERO,
                ..Default::default()
            },
            NodeOptions {
                crash_backoff_max: Duration::from_millis(10),
                ..Default::default()
            },
        ];
        for opts in cases {
            let err = opts.validate().expect_err("invalid");
            assert!(
                err.to_string().starts_with("invalid node options: "),
                "{err}"
            );
        }
        let unique = NodeOptions::default().with_unique_prefix();
        assert!(unique.validate().is_ok());
        assert_ne!(
            unique.name_prefix,
            NodeOptions::default().with_unique_prefix().name_prefix
        );
    }

    #[test]
    fn kube_times_have_second_precision_in_utc() {
        let at: k8s_openapi::jiff::Timestamp =
            "2024-03-01T10:20:30.456Z".parse().expect("timestamp");
        assert_eq!(kube_time(at), "2024-03-01T10:20:30Z");
    }
}
