//! One simulated pod, from binding to deletion: pulls, container runs and restarts, readiness
//! probes, and the status a kubelet would post.
//!
//! The worker is a small state machine stepped every [`TICK`] (and on every change of the pod
//! object). Status is a strategic merge patch on `pods/status`, as the kubelet sends it: server-
//! side apply would be the project's habit, but on a 1.20 API server the kubelet's way is the one
//! whose list semantics (conditions merged by type, container statuses replaced) are certain.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::app::Servers;
use super::behaviour::{backoff, merge_env, Behaviour};
use super::ip::IpLease;
use super::{call_api, jittered, now_time, NodeError, Shared};
use crate::registry::ImageReference;

const TICK: Duration = Duration::from_millis(200);
/// Probes may ask for long timeouts; a stuck probe mustn't stall the pod's worker for long.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed pull, `ErrImagePull` shows for this long (or half the back-off, if shorter)
/// before `ImagePullBackOff`, as a kubelet alternates them.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(2);
/// Status patches are tried once per tick; repeated failures back off up to this.
const MAX_PATCH_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the pod until it is deleted (finishing a graceful deletion itself) or `cancel` fires.
pub(super) async fn run(shared: Arc<Shared>, pod: watch::Receiver<Pod>, cancel: CancellationToken) {
    let (namespace, name) = {
        let p = pod.borrow();
        (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    };
    let span = tracing::info_span!("pod", %namespace, %name);
    run_inner(shared, pod, cancel).instrument(span).await;
}

async fn run_inner(
    shared: Arc<Shared>,
    mut pod_rx: watch::Receiver<Pod>,
    cancel: CancellationToken,
) {
    let mut sim = PodSim::new(shared, &pod_rx.borrow_and_update());
    tracing::info!(uid = %sim.uid, terminal = sim.terminal, "pod bound to simulated node");
    let mut deletion_failures = 0u32;
    loop {
        let deleting = pod_rx.borrow().metadata.deletion_timestamp.is_some();
        if deleting {
            if sim.finish_deletion(&cancel).await {
                return;
            }
            deletion_failures += 1;
            let delay = jittered(backoff(TICK, MAX_PATCH_BACKOFF, deletion_failures));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => continue,
            }
        }
        if !sim.terminal {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = sim.step(&cancel) => {}
            }
            if sim.sync_status(&cancel).await == Sync::Gone {
                tracing::info!("pod is gone");
                break;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = pod_rx.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(TICK) => {}
        }
    }
    sim.stop_all().await;
    tracing::debug!("pod worker stopped");
}

#[derive(Debug, PartialEq, Eq)]
enum Sync {
    Done,
    Gone,
}

struct PodSim {
    shared: Arc<Shared>,
    api: Api<Pod>,
    name: String,
    uid: String,
    /// `name_namespace(uid)`, as the kubelet names pods in messages.
    pod_ref: String,
    restart_policy: String,
    /// Already Succeeded or Failed when we first saw it: nothing to run, only deletion to finish.
    terminal: bool,
    /// Every TCP port the pod declares; its address must have them all free.
    ports: Vec<u16>,
    lease: Option<IpLease>,
    lease_failures: u32,
    next_lease_try: Instant,
    start_time: String,
    init_statuses: Vec<Value>,
    containers: Vec<ContainerSim>,
    /// Condition type → (status, lastTransitionTime).
    conditions: Vec<(&'static str, bool, String)>,
    last_sent: Option<Value>,
    patch_failures: u32,
    next_patch: Instant,
}

impl PodSim {
    fn new(shared: Arc<Shared>, pod: &Pod) -> Self {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(now_time, |t| super::kube_time(t.0));
        let containers: Vec<ContainerSim> = spec.containers.iter().map(ContainerSim::new).collect();
        let mut ports: Vec<u16> = containers
            .iter()
            .flat_map(|c| c.ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let init_statuses = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| init_status(c, &start_time))
            .collect();
        let now = Instant::now();
        Self {
            api: Api::namespaced(shared.client.clone(), &namespace),
            shared,
            pod_ref: format!("{name}_{namespace}({uid})"),
            name,
            uid,
            restart_policy: spec.restart_policy.unwrap_or_else(|| "Always".to_string()),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
            ports,
            lease: None,
            lease_failures: 0,
            next_lease_try: now,
            conditions: vec![
                ("Initialized", true, start_time.clone()),
                ("ContainersReady", false, start_time.clone()),
                ("Ready", false, start_time.clone()),
            ],
            start_time,
            init_statuses,
            containers,
            last_sent: None,
            patch_failures: 0,
            next_patch: now,
        }
    }

    async fn step(&mut self, cancel: &CancellationToken) {
        if self.lease.is_none() {
            if Instant::now() < self.next_lease_try {
                return;
            }
            match IpLease::acquire(&self.ports) {
                Ok(lease) => {
                    tracing::debug!(ip = %lease.ip(), "pod address assigned");
                    self.lease = Some(lease);
                }
                Err(error) => {
                    self.lease_failures += 1;
                    let opts = &self.shared.opts;
                    let delay = backoff(
                        opts.crash_backoff_base,
                        opts.crash_backoff_max,
                        self.lease_failures,
                    );
                    self.next_lease_try = Instant::now() + delay;
                    tracing::warn!(%error, ports = ?self.ports, "no loopback address for pod");
                    return;
                }
            }
        }
        let Some(ip) = self.lease.as_ref().map(IpLease::ip) else {
            return;
        };
        let ctx = Ctx {
            shared: &self.shared,
            ip,
            pod_ref: &self.pod_ref,
            restart_policy: &self.restart_policy,
            cancel,
        };
        for container in &mut self.containers {
            container.step(&ctx).await;
        }
    }

    /// Posts the status if it changed since the last successful post.
    async fn sync_status(&mut self, cancel: &CancellationToken) -> Sync {
        let now = Instant::now();
        if now < self.next_patch {
            return Sync::Done;
        }
        let status = self.status(now);
        if self.last_sent.as_ref() == Some(&status) {
            return Sync::Done;
        }
        let patch = Patch::Strategic(json!({ "status": status }));
        let params = PatchParams::default();
        let result =
            super::call_api_attempts(1, "patch status of pod", &self.pod_ref, cancel, || {
                self.api.patch_status(&self.name, &params, &patch)
            })
            .await;
        match result {
            Ok(_) => {
                tracing::debug!(phase = %status["phase"], "pod status posted");
                self.last_sent = Some(status);
                self.patch_failures = 0;
            }
            Err(error) if error.is_not_found() => return Sync::Gone,
            Err(error) => {
                self.patch_failures += 1;
                self.next_patch =
                    now + jittered(backoff(TICK, MAX_PATCH_BACKOFF, self.patch_failures));
                if !cancel.is_cancelled() {
                    tracing::warn!(%error, failures = self.patch_failures, "posting pod status failed");
                }
            }
        }
        Sync::Done
    }

    /// The pod status, recording condition transitions.
    fn status(&mut self, now: Instant) -> Value {
        let containers: Vec<Value> = self.containers.iter().map(|c| c.status(now)).collect();
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| !c.ready())
            .map(|c| c.name.as_str())
            .collect();
        let all_ready = unready.is_empty();
        let phase = self.phase();
        let now_text = now_time();
        for (type_, status, since) in &mut self.conditions {
            let desired = match *type_ {
                "ContainersReady" | "Ready" => all_ready,
                _ => true,
            };
            if *status != desired {
                *status = desired;
                *since = now_text.clone();
            }
        }
        let conditions: Vec<Value> = self
            .conditions
            .iter()
            .map(|(type_, status, since)| {
                let (reason, message) = match (*status, phase) {
                    (true, _) => (Value::Null, Value::Null),
                    (false, "Succeeded" | "Failed") => (json!("PodCompleted"), Value::Null),
                    (false, _) => (
                        json!("ContainersNotReady"),
                        json!(format!(
                            "containers with unready status: [{}]",
                            unready.join(" ")
                        )),
                    ),
                };
                json!({
                    "type": type_,
                    "status": if *status { "True" } else { "False" },
                    "lastProbeTime": null,
                    "lastTransitionTime": since,
                    "reason": reason,
                    "message": message,
                })
            })
            .collect();
        let mut status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": containers,
        });
        if let Some(lease) = &self.lease {
            status["podIP"] = json!(lease.ip().to_string());
            status["podIPs"] = json!([{ "ip": lease.ip().to_string() }]);
        }
        if !self.init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(self.init_statuses);
        }
        status
    }

    /// As the kubelet decides it: Pending until every container has run, Running after (also
    /// while crash-looping), Succeeded/Failed once all containers exited for good.
    fn phase(&self) -> &'static str {
        let exit_codes: Option<Vec<i64>> = self
            .containers
            .iter()
            .map(|c| match &c.run {
                Run::Terminated(t) => Some(t["exitCode"].as_i64().unwrap_or(1)),
                _ => None,
            })
            .collect();
        match exit_codes {
            Some(codes) if !codes.is_empty() => {
                if codes.iter().all(|&c| c == 0) {
                    "Succeeded"
                } else {
                    "Failed"
                }
            }
            _ if self.containers.iter().all(|c| c.has_run) => "Running",
            _ => "Pending",
        }
    }

    /// Stops everything, gives the address back and deletes the pod with no grace period, as
    /// the kubelet does once its containers are gone. False when the delete must be retried.
    async fn finish_deletion(&mut self, cancel: &CancellationToken) -> bool {
        self.stop_all().await;
        self.lease = None;
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let result = call_api("delete pod", &self.pod_ref, cancel, || {
            self.api.delete(&self.name, &params)
        })
        .await;
        match result {
            Ok(_) => {
                tracing::info!("terminating pod deleted");
                true
            }
            // Gone already, or the name now belongs to another pod.
            Err(error) if error.is_not_found() || error.is_conflict() => true,
            // Shutting down, or the watch saw the pod go (often before our delete returned).
            Err(NodeError::Cancelled { .. }) => true,
            Err(error) => {
                if !cancel.is_cancelled() {
                    tracing::warn!(%error, "deleting terminating pod failed; will retry");
                }
                false
            }
        }
    }

    async fn stop_all(&mut self) {
        for container in &mut self.containers {
            if let Run::Running(running) = std::mem::replace(&mut container.run, Run::NotStarted) {
                running.servers.stop().await;
            }
        }
    }
}

/// What a container step needs from its pod.
struct Ctx<'a> {
    shared: &'a Shared,
    ip: Ipv4Addr,
    pod_ref: &'a str,
    restart_policy: &'a str,
    cancel: &'a CancellationToken,
}

struct ContainerSim {
    name: String,
    image: String,
    ports: Vec<u16>,
    named_ports: Vec<(String, u16)>,
    /// The pod spec's literal env values (`valueFrom` is ignored).
    env: Vec<(String, String)>,
    readiness: Option<Probe>,
    pull: Pull,
    run: Run,
    restart_count: i32,
    /// Crashes and failed starts, for the back-off.
    failures: u32,
    has_run: bool,
    last_terminated: Option<Value>,
}

enum Pull {
    Pending {
        failures: u32,
        next_try: Instant,
        error: Option<PullError>,
    },
    Done {
        image_id: String,
        env: Vec<(String, String)>,
    },
}

struct PullError {
    message: String,
    at: Instant,
    backoff: Duration,
}

enum Run {
    /// Not created yet: the image is being pulled.
    NotStarted,
    /// The env can't be acted on; as the kubelet's `CreateContainerConfigError`, it stays so.
    ConfigError(String),
    /// Waiting to start again after a crash or a failed start.
    BackOff {
        reason: &'static str,
        message: String,
        until: Instant,
    },
    Running(Box<Running>),
    /// Exited and not restarted, per the pod's restart policy.
    Terminated(Value),
}

struct Running {
    id: String,
    started_at: String,
    started: Instant,
    behaviour: Behaviour,
    servers: Servers,
    probe: ProbeState,
}

struct ProbeState {
    next_at: Instant,
    successes: u32,
    failures: u32,
    ready: bool,
}

impl ContainerSim {
    fn new(container: &Container) -> Self {
        let tcp_ports = container
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    u16::try_from(p.container_port).ok().filter(|&n| n > 0)?,
                ))
            });
        let (mut ports, mut named_ports) = (Vec::new(), Vec::new());
        for (name, port) in tcp_ports {
            if !ports.contains(&port) {
                ports.push(port);
            }
            if let Some(name) = name {
                named_ports.push((name, port));
            }
        }
        Self {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            ports,
            named_ports,
            env: container
                .env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect(),
            readiness: container.readiness_probe.clone(),
            pull: Pull::Pending {
                failures: 0,
                next_try: Instant::now(),
                error: None,
            },
            run: Run::NotStarted,
            restart_count: 0,
            failures: 0,
            has_run: false,
            last_terminated: None,
        }
    }

    async fn step(&mut self, ctx: &Ctx<'_>) {
        self.pull(ctx).await;
        let now = Instant::now();
        match &mut self.run {
            Run::NotStarted => self.start(ctx).await,
            Run::BackOff { until, .. } if now >= *until => self.start(ctx).await,
            Run::Running(running) => {
                if running
                    .behaviour
                    .exits_after()
                    .is_some_and(|after| running.started.elapsed() >= after)
                {
                    self.exit(ctx, 1, "Error").await;
                } else if let Some(probe) = &self.readiness {
                    if now >= running.probe.next_at {
                        let ok = run_probe(ctx, probe, &self.named_ports).await;
                        running.probe.record(probe, ok);
                        running.probe.next_at = Instant::now() + probe_period(probe);
                    }
                }
            }
            Run::BackOff { .. } | Run::ConfigError(_) | Run::Terminated(_) => {}
        }
    }

    async fn pull(&mut self, ctx: &Ctx<'_>) {
        let Pull::Pending {
            failures,
            next_try,
            error,
        } = &mut self.pull
        else {
            return;
        };
        if Instant::now() < *next_try {
            return;
        }
        let image = &self.image;
        let message = match ctx.shared.registry.inspect(image).await {
            Ok(Some(info)) => {
                tracing::info!(container = %self.name, %image, digest = %info.digest, "image pulled");
                let image_id = image_id(image, &info.digest, ctx.shared.registry.host());
                self.pull = Pull::Done {
                    image_id,
                    env: info.env,
                };
                return;
            }
            Ok(None) => format!(
                "rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": \
                 failed to resolve reference \"{image}\": {image}: not found"
            ),
            Err(e) => format!(
                "rpc error: code = Unknown desc = failed to pull and unpack image \"{image}\": {}",
                error_chain(&e)
            ),
        };
        *failures += 1;
        let opts = &ctx.shared.opts;
        let delay = backoff(opts.crash_backoff_base, opts.crash_backoff_max, *failures);
        let at = Instant::now();
        *next_try = at + delay;
        tracing::warn!(container = %self.name, %image, %message, retry_in = ?delay, "image pull failed");
        *error = Some(PullError {
            message,
            at,
            backoff: delay,
        });
    }

    async fn start(&mut self, ctx: &Ctx<'_>) {
        let Pull::Done { env: image_env, .. } = &self.pull else {
            return;
        };
        let env = merge_env(image_env, &self.env);
        let behaviour = match Behaviour::from_env(&env) {
            Ok(behaviour) => behaviour,
            Err(error) => {
                tracing::warn!(container = %self.name, %error, "container env is invalid; not starting it");
                self.run = Run::ConfigError(error.to_string());
                return;
            }
        };
        let started = Instant::now();
        let servers = Servers::start(
            ctx.ip,
            &self.ports,
            behaviour.clone(),
            self.image.clone(),
            started,
            ctx.cancel,
        )
        .await;
        match servers {
            Ok(servers) => {
                if self.has_run {
                    self.restart_count += 1;
                }
                self.has_run = true;
                let initial_delay = self.readiness.as_ref().map_or(Duration::ZERO, |p| {
                    Duration::from_secs(
                        u64::try_from(p.initial_delay_seconds.unwrap_or(0)).unwrap_or(0),
                    )
                });
                tracing::info!(container = %self.name, ip = %ctx.ip, ports = ?self.ports, ?behaviour, "container started");
                self.run = Run::Running(Box::new(Running {
                    id: container_id(),
                    started_at: now_time(),
                    started,
                    behaviour,
                    servers,
                    probe: ProbeState {
                        next_at: started + initial_delay,
                        successes: 0,
                        failures: 0,
                        ready: false,
                    },
                }));
            }
            Err(error) => {
                self.failures += 1;
                let opts = &ctx.shared.opts;
                let delay = backoff(
                    opts.crash_backoff_base,
                    opts.crash_backoff_max,
                    self.failures,
                );
                tracing::warn!(container = %self.name, %error, retry_in = ?delay, "container failed to start");
                self.run = Run::BackOff {
                    reason: "RunContainerError",
                    message: format!(
                        "failed to start container \"{}\": listen on {}: {error}",
                        self.name, ctx.ip
                    ),
                    until: Instant::now() + delay,
                };
            }
        }
    }

    /// The running container exits with `code`; restarted after a back-off unless the restart
    /// policy says otherwise.
    async fn exit(&mut self, ctx: &Ctx<'_>, code: i32, reason: &str) {
        let Run::Running(running) = std::mem::replace(&mut self.run, Run::NotStarted) else {
            return;
        };
        running.servers.stop().await;
        let terminated = json!({
            "exitCode": code,
            "reason": reason,
            "startedAt": running.started_at,
            "finishedAt": now_time(),
            "containerID": running.id,
        });
        let restart = match ctx.restart_policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            tracing::info!(container = %self.name, code, "container exited");
            self.run = Run::Terminated(terminated);
            return;
        }
        self.failures += 1;
        let opts = &ctx.shared.opts;
        let delay = backoff(
            opts.crash_backoff_base,
            opts.crash_backoff_max,
            self.failures,
        );
        tracing::info!(container = %self.name, code, restart_in = ?delay, "container crashed");
        self.last_terminated = Some(terminated);
        self.run = Run::BackOff {
            reason: "CrashLoopBackOff",
            message: format!(
                "back-off {} restarting failed container={} pod={}",
                go_duration(delay),
                self.name,
                ctx.pod_ref
            ),
            until: Instant::now() + delay,
        };
    }

    fn ready(&self) -> bool {
        match &self.run {
            Run::Running(running) => {
                running.behaviour.is_ready(running.started.elapsed())
                    && (self.readiness.is_none() || running.probe.ready)
            }
            _ => false,
        }
    }

    fn status(&self, now: Instant) -> Value {
        let waiting = |reason: &str, message: Option<&str>| {
            let mut waiting = json!({ "reason": reason });
            if let Some(message) = message {
                waiting["message"] = json!(message);
            }
            json!({ "waiting": waiting })
        };
        let state = match (&self.pull, &self.run) {
            (_, Run::Running(running)) => json!({ "running": { "startedAt": running.started_at } }),
            (_, Run::Terminated(terminated)) => json!({ "terminated": terminated }),
            (
                _,
                Run::BackOff {
                    reason, message, ..
                },
            ) => waiting(reason, Some(message)),
            (_, Run::ConfigError(message)) => waiting("CreateContainerConfigError", Some(message)),
            (
                Pull::Pending {
                    error: Some(error), ..
                },
                Run::NotStarted,
            ) => {
                let shown = ERR_IMAGE_PULL_SHOWN.min(error.backoff / 2);
                if now < error.at + shown {
                    waiting("ErrImagePull", Some(&error.message))
                } else {
                    waiting(
                        "ImagePullBackOff",
                        Some(&format!("Back-off pulling image \"{}\"", self.image)),
                    )
                }
            }
            (_, Run::NotStarted) => waiting("ContainerCreating", None),
        };
        let image_id = match &self.pull {
            Pull::Done { image_id, .. } => image_id.as_str(),
            Pull::Pending { .. } => "",
        };
        let container_id = match &self.run {
            Run::Running(running) => Some(json!(running.id)),
            Run::Terminated(t) => Some(t["containerID"].clone()),
            _ => self
                .last_terminated
                .as_ref()
                .map(|t| t["containerID"].clone()),
        };
        let mut status = json!({
            "name": self.name,
            "image": self.image,
            "imageID": image_id,
            "ready": self.ready(),
            "started": matches!(self.run, Run::Running(_)),
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_terminated.as_ref().map_or_else(|| json!({}), |t| json!({ "terminated": t })),
        });
        if let Some(id) = container_id {
            status["containerID"] = id;
        }
        status
    }
}

impl ProbeState {
    fn record(&mut self, probe: &Probe, ok: bool) {
        let threshold = |t: Option<i32>, default: u32| {
            t.and_then(|t| u32::try_from(t).ok())
                .unwrap_or(default)
                .max(1)
        };
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= threshold(probe.success_threshold, 1) {
                self.ready = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= threshold(probe.failure_threshold, 3) {
                self.ready = false;
            }
        }
    }
}

/// The probe period, at least a second as the API requires (default 10s).
fn probe_period(probe: &Probe) -> Duration {
    Duration::from_secs(
        probe
            .period_seconds
            .map_or(10, |p| u64::try_from(p.max(1)).unwrap_or(1)),
    )
}

fn probe_timeout(probe: &Probe) -> Duration {
    Duration::from_secs(
        probe
            .timeout_seconds
            .map_or(1, |t| u64::try_from(t.max(1)).unwrap_or(1)),
    )
    .min(MAX_PROBE_TIMEOUT)
}

fn resolve_port(port: &IntOrString, named: &[(String, u16)]) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => match name.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => named.iter().find(|(n, _)| n == name).map(|&(_, p)| p),
        },
    }
}

/// Runs a readiness probe against the simulated app, over the network as the kubelet does.
async fn run_probe(ctx: &Ctx<'_>, probe: &Probe, named_ports: &[(String, u16)]) -> bool {
    let timeout = probe_timeout(probe);
    if let Some(http) = &probe.http_get {
        let Some(port) = resolve_port(&http.port, named_ports) else {
            return false;
        };
        let scheme = http
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let path = http.path.as_deref().unwrap_or("/");
        let slash = if path.starts_with('/') { "" } else { "/" };
        let url = format!("{scheme}://{}:{port}{slash}{path}", ctx.ip);
        let mut request = ctx
            .shared
            .probe_http
            .get(&url)
            .timeout(timeout)
            .header("user-agent", "kube-probe/1.20");
        for header in http.http_headers.iter().flatten() {
            request = request.header(header.name.as_str(), header.value.as_str());
        }
        let result = tokio::select! {
            () = ctx.cancel.cancelled() => return false,
            result = request.send() => result,
        };
        return match result {
            Ok(response) => {
                let ok = (200..400).contains(&response.status().as_u16());
                if !ok {
                    tracing::debug!(%url, status = %response.status(), "readiness probe failed");
                }
                ok
            }
            Err(error) => {
                tracing::debug!(%url, %error, "readiness probe failed");
                false
            }
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = resolve_port(&tcp.port, named_ports) else {
            return false;
        };
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ctx.ip, port))).await,
            Ok(Ok(_))
        );
    }
    // exec and grpc probes have nothing to run against; they pass.
    true
}

fn init_status(container: &Container, start_time: &str) -> Value {
    let id = container_id();
    json!({
        "name": container.name,
        "image": container.image.clone().unwrap_or_default(),
        "imageID": "",
        "containerID": id,
        "ready": true,
        "restartCount": 0,
        "state": { "terminated": {
            "exitCode": 0,
            "reason": "Completed",
            "startedAt": start_time,
            "finishedAt": start_time,
            "containerID": id,
        }},
        "lastState": {},
    })
}

/// `docker-pullable://HOST/NAME@DIGEST`, as dockershim reports it.
fn image_id(image: &str, digest: &str, registry_host: &str) -> String {
    let (host, name) = match ImageReference::parse(image) {
        Ok(parsed) => (
            parsed.host.unwrap_or_else(|| registry_host.to_string()),
            parsed.name,
        ),
        Err(_) => (registry_host.to_string(), image.to_string()),
    };
    format!("docker-pullable://{host}/{name}@{digest}")
}

fn container_id() -> String {
    format!("baton-sim://{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// Go's `time.Duration` text for whole seconds, as in kubelet messages: `10s`, `1m20s`, `5m0s`.
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) if d.subsec_millis() == 0 => format!("{s}s"),
        (0, 0, _) => format!("{:.1}s", d.as_secs_f64()),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_read_like_kubelet_messages() {
        let cases = [
            (1_000, "1s"),
            (10_000, "10s"),
            (80_000, "1m20s"),
            (300_000, "5m0s"),
            (1_500, "1.5s"),
        ];
        for (ms, text) in cases {
            assert_eq!(go_duration(Duration::from_millis(ms)), text);
        }
    }

    #[test]
    fn image_ids_name_the_registry_repository_and_digest() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let cases = [
            (
                "127.0.0.1:5000/shop/web:v1".to_string(),
                "127.0.0.1:5000/shop/web",
            ),
            ("shop/web:v1".to_string(), "127.0.0.1:5000/shop/web"),
            (format!("localhost:5000/web@{d}"), "localhost:5000/web"),
        ];
        for (image, repository) in cases {
            assert_eq!(
                image_id(&image, &d, "127.0.0.1:5000"),
                format!("docker-pullable://{repository}@{d}")
            );
        }
    }

    #[test]
    fn probe_settings_follow_kubelet_defaults_and_clamps() {
        let probe = |period: Option<i32>, timeout: Option<i32>| Probe {
            period_seconds: period,
            timeout_seconds: timeout,
            ..Probe::default()
        };
        assert_eq!(probe_period(&probe(None, None)), Duration::from_secs(10));
        assert_eq!(probe_period(&probe(Some(0), None)), Duration::from_secs(1));
        assert_eq!(probe_period(&probe(Some(-5), None)), Duration::from_secs(1));
        assert_eq!(probe_timeout(&probe(None, None)), Duration::from_secs(1));
        assert_eq!(probe_timeout(&probe(None, Some(600))), MAX_PROBE_TIMEOUT);
    }

    #[test]
    fn readiness_needs_enough_successes_and_is_lost_after_enough_failures() {
        let probe = Probe {
            success_threshold: Some(2),
            failure_threshold: Some(2),
            ..Probe::default()
        };
        let mut state = ProbeState {
            next_at: Instant::now(),
            successes: 0,
            failures: 0,
            ready: false,
        };
        let steps = [
            (true, false),
            (true, true),
            (false, true),
            (true, true),
            (false, true),
            (false, false),
            (true, false),
        ];
        for (i, (ok, ready)) in steps.into_iter().enumerate() {
            state.record(&probe, ok);
            assert_eq!(state.ready, ready, "after step {i}");
        }
    }

    #[test]
    fn probe_ports_resolve_by_number_or_name() {
        let named = vec![("http".to_string(), 8080)];
        assert_eq!(resolve_port(&IntOrString::Int(9000), &named), Some(9000));
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &named),
            Some(8080)
        );
        assert_eq!(
            resolve_port(&IntOrString::String("8081".into()), &named),
            Some(8081)
        );
        assert_eq!(
            resolve_port(&IntOrString::String("grpc".into()), &named),
            None
        );
        assert_eq!(resolve_port(&IntOrString::Int(70000), &named), None);
    }
}
