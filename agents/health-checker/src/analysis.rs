//! The analysis' decisions, pure: whether a step is to be analysed, the checks resolved from the
//! release spec (defaults and limits), what each observation means as a [`Measurement`], the
//! percentile maths, the counting of failed rounds, and the verdict with its bounded measurements.
//!
//! No I/O here (no tokio, async-nats or kube): `checks` observes, this module judges.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use baton_core::fold::ReleaseState;
use baton_core::metric::{Aggregate, Condition};
use baton_proto::v1::{
    check, AnalysisFailed, AnalysisParams, DeployStepReady, Measurement, ReleaseSpec,
};
use prost::Message;

/// The check every analysis runs, whatever the spec says: the new pods exist, are ready, have not
/// restarted since the step began and are not stuck in a crash loop or an image pull.
pub const POD_HEALTH: &str = "pod-health";
// The defaults the deadlines count with: one definition.
pub use baton_core::deadline::{
    DEFAULT_ANALYSIS_DURATION_SECONDS as DEFAULT_DURATION_SECONDS,
    DEFAULT_ANALYSIS_INTERVAL_SECONDS as DEFAULT_INTERVAL_SECONDS,
};
// The limits `baton config validate` enforces too: one definition, so the two never drift.
pub use baton_core::config::DEFAULT_PORT;
pub use baton_core::limits::{
    MAX_ANALYSIS_SECONDS as MAX_DURATION_SECONDS, MAX_HTTP_RETRIES as MAX_RETRIES,
    MAX_LATENCY_REQUESTS, MAX_REQUEST_TIMEOUT, MAX_SMOKE_TIMEOUT, MAX_URL_BYTES,
};
pub const DEFAULT_HTTP_PATH: &str = "/health";
pub const DEFAULT_EXPECT_STATUS: u16 = 200;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_LATENCY_REQUESTS: u32 = 20;
pub const DEFAULT_SMOKE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_METRIC_TIMEOUT: Duration = Duration::from_secs(5);
/// The most series of a query's result judged one by one: more is a query that forgot to
/// aggregate.
pub const MAX_SERIES: usize = 100;
/// More new pods than this in one step is more than one analysis should probe every interval.
pub const MAX_PODS: usize = 1000;
/// At most this many measurements in a verdict (the first is the summary of the rounds).
pub const MAX_MEASUREMENTS: usize = 200;
/// A verdict stays well under the 128 KiB an agent accepts for an event.
pub const MAX_VERDICT_BYTES: usize = 96 * 1024;
const MAX_CHECK_NAME: usize = 100;
const MAX_TARGET: usize = 256;
const MAX_DETAIL: usize = 300;
const MAX_REASON: usize = 1000;
/// Container waiting reasons that mean the pod will not serve: the app crashes or cannot start.
const BAD_WAITING: [&str; 5] = [
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
];

/// What to do with a `deploy.step_ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Analyse,
    /// Nothing to do, and why (logged).
    Skip(String),
}

/// Decides from the release's folded history whether step `step` is still to be analysed by the
/// agent serving `cluster`. A step with a verdict is never analysed again (a redelivery publishes
/// nothing new); a step that was started but has no verdict (the agent died mid-analysis) is
/// analysed again. A release whose spec names another cluster is that cluster's to judge.
pub fn decide(state: &ReleaseState, step: u32, cluster: &str) -> Decision {
    let Some(spec) = &state.spec else {
        return Decision::Skip(
            "the release has no release.requested in the stream, so no checks to run".into(),
        );
    };
    if !spec.cluster.is_empty() && spec.cluster != cluster {
        return Decision::Skip(format!("the release is for cluster {}", spec.cluster));
    }
    if state.analyses_passed.contains(&step) {
        return Decision::Skip(format!("step {step} already passed its analysis"));
    }
    if !baton_core::control::analysed(spec, step) {
        return Decision::Skip(format!(
            "step {step} is not analysed (post-promotion analysis is off)"
        ));
    }
    if state.analyses_failed.contains(&step) {
        return Decision::Skip(format!("step {step} already failed its analysis"));
    }
    if state.analyses_inconclusive.contains(&step) {
        return Decision::Skip(format!(
            "step {step}'s analysis was inconclusive: a person decides"
        ));
    }
    if let Some(terminal) = state.terminal {
        return Decision::Skip(format!("the release has ended ({terminal})"));
    }
    if state.rollback_started {
        return Decision::Skip("the release is rolling back".into());
    }
    if let Some(failure) = &state.failure {
        return Decision::Skip(format!(
            "the release has already failed ({}: {})",
            failure.stage, failure.reason
        ));
    }
    Decision::Analyse
}

/// When step `step` began, in milliseconds since the epoch (a fact of the fold): pod restarts
/// after this time count against the step.
pub fn step_began_ms(state: &ReleaseState, step: u32) -> Option<i64> {
    state.step_began_ms(step)
}

/// How long, how often, and how many failed rounds are tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub duration: Duration,
    pub interval: Duration,
    pub failure_limit: u32,
}

impl Settings {
    /// The spec's analysis parameters with their defaults (0 means "not set", as in proto3).
    pub fn from_params(params: Option<&AnalysisParams>) -> Result<Settings, String> {
        let params = params.cloned().unwrap_or_default();
        let duration = non_zero(params.duration_seconds, DEFAULT_DURATION_SECONDS);
        let interval = non_zero(params.interval_seconds, DEFAULT_INTERVAL_SECONDS);
        if duration > MAX_DURATION_SECONDS {
            return Err(format!(
                "spec.analysis.duration_seconds {duration} is more than {MAX_DURATION_SECONDS}"
            ));
        }
        if interval > MAX_DURATION_SECONDS {
            return Err(format!(
                "spec.analysis.interval_seconds {interval} is more than {MAX_DURATION_SECONDS}"
            ));
        }
        Ok(Settings {
            duration: Duration::from_secs(u64::from(duration)),
            interval: Duration::from_secs(u64::from(interval)),
            failure_limit: params.failure_limit,
        })
    }

    /// Rounds at 0, interval, 2 × interval … up to and including the end of the duration.
    pub fn rounds(&self) -> u32 {
        let interval = self.interval.as_secs().max(1);
        u32::try_from(self.duration.as_secs() / interval)
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }
}

fn non_zero(value: u32, default: u32) -> u32 {
    if value == 0 {
        default
    } else {
        value
    }
}

fn duration_ms(
    value: u32,
    default: Duration,
    max: Duration,
    field: &str,
) -> Result<Duration, String> {
    if value == 0 {
        return Ok(default);
    }
    let d = Duration::from_millis(u64::from(value));
    if d > max {
        return Err(format!(
            "{field} {value} ms is more than {} ms",
            max.as_millis()
        ));
    }
    Ok(d)
}

fn port(check_port: u32, spec_port: u32, field: &str) -> Result<u16, String> {
    let chosen = [check_port, spec_port]
        .into_iter()
        .find(|&p| p != 0)
        .unwrap_or(DEFAULT_PORT);
    u16::try_from(chosen).map_err(|_| format!("{field} {chosen} is not a TCP port"))
}

/// An HTTP check, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpPlan {
    pub path: String,
    pub port: u16,
    pub expect_status: u16,
    pub body_contains: Option<String>,
    pub timeout: Duration,
    /// 1 + retries.
    pub attempts: u32,
    pub retry_interval: Duration,
    /// Checked too, besides the new pods.
    pub url: Option<String>,
}

/// A latency check, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyPlan {
    pub path: String,
    pub port: u16,
    pub requests: u32,
    pub percentile: f64,
    pub threshold_ms: u32,
    pub max_error_rate: f64,
    pub timeout: Duration,
}

/// A smoke test, resolved: an argv run without a shell.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokePlan {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

/// Where a metric check's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricSource {
    /// An instant query (its variables still to fill in) to a Prometheus server's HTTP API.
    Prometheus { address: String, query: String },
    /// A POST of the release's context; `field` is the path of the value in the JSON answer.
    Webhook { url: String, field: Vec<String> },
}

/// A metric check, resolved: a value read every round and judged by a condition.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPlan {
    pub source: MetricSource,
    pub condition: Condition,
    pub aggregate: Aggregate,
    /// Consecutive errors tolerated.
    pub error_limit: u32,
    /// Past the limit: end the analysis without a verdict instead of failing the round.
    pub inconclusive_on_error: bool,
    pub timeout: Duration,
}

impl MetricPlan {
    /// What measurements name as the target of a value that is not one series': the server or
    /// the URL.
    pub fn target(&self) -> &str {
        match &self.source {
            MetricSource::Prometheus { address, .. } => address,
            MetricSource::Webhook { url, .. } => url,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Http(HttpPlan),
    Latency(LatencyPlan),
    Smoke(SmokePlan),
    Metric(MetricPlan),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCheck {
    pub name: String,
    pub kind: CheckKind,
}

/// The whole analysis of a step: its timing and its checks (pod health comes on top).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub settings: Settings,
    pub checks: Vec<PlannedCheck>,
}

impl Plan {
    /// The names announced in `analysis.started`: pod health first, then the spec's checks.
    pub fn check_names(&self) -> Vec<String> {
        std::iter::once(POD_HEALTH.to_owned())
            .chain(self.checks.iter().map(|c| c.name.clone()))
            .collect()
    }
}

/// The spec as one step's analysis sees it: a canary step's own analysis parameters, where set,
/// replace the release's.
pub fn for_step(spec: &ReleaseSpec, step: u32) -> ReleaseSpec {
    let mut spec = spec.clone();
    let is_canary = spec.strategy == baton_proto::v1::Strategy::Canary as i32;
    let own = spec
        .canary
        .as_ref()
        .and_then(|c| c.steps.get(step as usize))
        .and_then(|s| s.analysis);
    if let (true, Some(own)) = (is_canary, own) {
        let base = spec.analysis.get_or_insert_with(Default::default);
        if own.duration_seconds > 0 {
            base.duration_seconds = own.duration_seconds;
        }
        if own.interval_seconds > 0 {
            base.interval_seconds = own.interval_seconds;
        }
        if own.failure_limit > 0 {
            base.failure_limit = own.failure_limit;
        }
    }
    spec
}

/// Resolves the spec's checks and analysis parameters, with defaults, refusing what cannot run.
pub fn plan(spec: &ReleaseSpec) -> Result<Plan, String> {
    let settings = Settings::from_params(spec.analysis.as_ref())?;
    let mut checks = Vec::with_capacity(spec.checks.len());
    let mut names = std::collections::HashSet::new();
    names.insert(POD_HEALTH.to_owned());
    for (i, c) in spec.checks.iter().enumerate() {
        let field = format!("spec.checks[{i}]");
        let kind_name = match &c.kind {
            Some(check::Kind::Http(_)) => "http",
            Some(check::Kind::Latency(_)) => "latency",
            Some(check::Kind::Smoke(_)) => "smoke",
            Some(check::Kind::Prometheus(_)) => "prometheus",
            Some(check::Kind::Webhook(_)) => "webhook",
            None => {
                return Err(format!(
                    "{field}: check has no kind (http, latency, smoke, prometheus or webhook)"
                ))
            }
        };
        let name = if c.name.is_empty() {
            format!("{kind_name}-{}", i + 1)
        } else {
            c.name.clone()
        };
        if name.chars().count() > MAX_CHECK_NAME || name.chars().any(char::is_control) {
            return Err(format!(
                "{field}: the name must be at most {MAX_CHECK_NAME} characters of visible text"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("{field}: another check is already named {name:?}"));
        }
        let kind = match &c.kind {
            Some(check::Kind::Http(h)) => {
                if h.retries > MAX_RETRIES {
                    return Err(format!("{field}: more than {MAX_RETRIES} retries"));
                }
                let expect_status = if h.expect_status == 0 {
                    DEFAULT_EXPECT_STATUS
                } else {
                    u16::try_from(h.expect_status)
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                        .ok_or_else(|| {
                            format!(
                                "{field}: expect_status {} is not an HTTP status",
                                h.expect_status
                            )
                        })?
                };
                let url = (!h.url.is_empty()).then(|| h.url.clone());
                if let Some(url) = &url {
                    url_shape(url).map_err(|e| format!("{field}: url: {e}"))?;
                }
                CheckKind::Http(HttpPlan {
                    path: request_path(&h.path, DEFAULT_HTTP_PATH)
                        .map_err(|e| format!("{field}: {e}"))?,
                    port: port(h.port, spec.port, &format!("{field}: port"))?,
                    expect_status,
                    body_contains: (!h.body_contains.is_empty()).then(|| h.body_contains.clone()),
                    timeout: duration_ms(
                        h.timeout_ms,
                        DEFAULT_REQUEST_TIMEOUT,
                        MAX_REQUEST_TIMEOUT,
                        &format!("{field}: timeout_ms"),
                    )?,
                    attempts: h.retries + 1,
                    retry_interval: duration_ms(
                        h.interval_ms,
                        DEFAULT_RETRY_INTERVAL,
                        MAX_REQUEST_TIMEOUT,
                        &format!("{field}: interval_ms"),
                    )?,
                    url,
                })
            }
            Some(check::Kind::Latency(l)) => {
                if !(l.percentile > 0.0 && l.percentile <= 100.0) {
                    return Err(format!(
                        "{field}: percentile {} is not in (0, 100]",
                        l.percentile
                    ));
                }
                if !(0.0..=1.0).contains(&l.max_error_rate) {
                    return Err(format!(
                        "{field}: max_error_rate {} is not in [0, 1]",
                        l.max_error_rate
                    ));
                }
                if l.threshold_ms == 0 {
                    return Err(format!("{field}: a latency check needs threshold_ms"));
                }
                let requests = non_zero(l.requests, DEFAULT_LATENCY_REQUESTS);
                if requests > MAX_LATENCY_REQUESTS {
                    return Err(format!(
                        "{field}: more than {MAX_LATENCY_REQUESTS} requests per pod"
                    ));
                }
                // A request may take twice the threshold before it is cut off: slow enough to be
                // measured as slow, not so long that a hung pod stalls the round.
                let timeout = Duration::from_millis(u64::from(l.threshold_ms) * 2)
                    .clamp(DEFAULT_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT);
                CheckKind::Latency(LatencyPlan {
                    path: request_path(&l.path, DEFAULT_HTTP_PATH)
                        .map_err(|e| format!("{field}: {e}"))?,
                    port: port(l.port, spec.port, &format!("{field}: port"))?,
                    requests,
                    percentile: l.percentile,
                    threshold_ms: l.threshold_ms,
                    max_error_rate: l.max_error_rate,
                    timeout,
                })
            }
            Some(check::Kind::Smoke(s)) => {
                if s.argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(format!(
                        "{field}: a smoke check needs an argv with a program"
                    ));
                }
                if s.argv.iter().any(|a| a.contains('\0')) {
                    return Err(format!("{field}: argv contains a NUL byte"));
                }
                CheckKind::Smoke(SmokePlan {
                    argv: s.argv.clone(),
                    timeout: duration_ms(
                        s.timeout_ms,
                        DEFAULT_SMOKE_TIMEOUT,
                        MAX_SMOKE_TIMEOUT,
                        &format!("{field}: timeout_ms"),
                    )?,
                })
            }
            Some(check::Kind::Prometheus(p)) => {
                url_shape(&p.address).map_err(|e| format!("{field}: address: {e}"))?;
                if p.query.trim().is_empty() {
                    return Err(format!("{field}: a prometheus check needs a query"));
                }
                baton_core::metric::check_query(&p.query)
                    .map_err(|e| format!("{field}: query {e}"))?;
                let source = MetricSource::Prometheus {
                    address: p.address.trim_end_matches('/').to_owned(),
                    query: p.query.clone(),
                };
                CheckKind::Metric(metric_plan(&field, source, p.judgement.as_ref())?)
            }
            Some(check::Kind::Webhook(w)) => {
                url_shape(&w.url).map_err(|e| format!("{field}: url: {e}"))?;
                let path = baton_core::metric::field_path(&w.field)
                    .map_err(|e| format!("{field}: field {e}"))?;
                let source = MetricSource::Webhook {
                    url: w.url.clone(),
                    field: path.into_iter().map(str::to_owned).collect(),
                };
                CheckKind::Metric(metric_plan(&field, source, w.judgement.as_ref())?)
            }
            None => return Err(format!("{field}: check has no kind")),
        };
        checks.push(PlannedCheck { name, kind });
    }
    Ok(Plan { settings, checks })
}

fn metric_plan(
    field: &str,
    source: MetricSource,
    judgement: Option<&baton_proto::v1::MetricJudgement>,
) -> Result<MetricPlan, String> {
    let j = judgement.ok_or_else(|| format!("{field}: a metric check needs a condition"))?;
    let condition =
        Condition::parse(&j.condition).map_err(|e| format!("{field}: condition: {e}"))?;
    let aggregate =
        Aggregate::parse(&j.aggregate).map_err(|e| format!("{field}: aggregate: {e}"))?;
    if j.error_limit > baton_core::metric::MAX_ERROR_LIMIT {
        return Err(format!(
            "{field}: error_limit {} is more than {}",
            j.error_limit,
            baton_core::metric::MAX_ERROR_LIMIT
        ));
    }
    Ok(MetricPlan {
        source,
        condition,
        aggregate,
        error_limit: j.error_limit,
        inconclusive_on_error: j.inconclusive_on_error,
        timeout: duration_ms(
            j.timeout_ms,
            DEFAULT_METRIC_TIMEOUT,
            MAX_REQUEST_TIMEOUT,
            &format!("{field}: timeout_ms"),
        )?,
    })
}

fn request_path(path: &str, default: &str) -> Result<String, String> {
    if path.is_empty() {
        return Ok(default.to_owned());
    }
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    if path.chars().any(|c| c.is_control() || c.is_whitespace()) || path.contains('#') {
        return Err(format!(
            "path {path:?} contains spaces, control characters or '#'"
        ));
    }
    Ok(path.to_owned())
}

/// The shape of a check's URL: http or https, a host, no spaces. The HTTP client parses it fully.
fn url_shape(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{url:?} contains spaces or control characters"));
    }
    if url.len() > MAX_URL_BYTES {
        return Err(format!("longer than {MAX_URL_BYTES} bytes"));
    }
    Ok(())
}

/// A new pod of the step, as the deployer listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    pub name: String,
    pub ip: IpAddr,
    pub image: String,
}

impl PodTarget {
    /// How measurements name the pod: `name@ip`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.ip)
    }

    /// `http://<ip>:<port><path>` (IPv6 in brackets).
    pub fn url(&self, port: u16, path: &str) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("http://{ip}:{port}{path}"),
            IpAddr::V6(ip) => format!("http://[{ip}]:{port}{path}"),
        }
    }
}

/// The pods of a `deploy.step_ready`, validated: at least one, each with a pod name and an IP.
pub fn pod_targets(ready: &DeployStepReady) -> Result<Vec<PodTarget>, String> {
    if ready.pods.is_empty() {
        return Err(format!(
            "deploy.step_ready of step {} lists no pods",
            ready.step
        ));
    }
    if ready.pods.len() > MAX_PODS {
        return Err(format!(
            "deploy.step_ready of step {} lists {} pods, more than {MAX_PODS}",
            ready.step,
            ready.pods.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    ready
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let valid_name = !p.name.is_empty()
                && p.name.len() <= 253
                && p.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && p.name.as_bytes()[0].is_ascii_alphanumeric();
            if !valid_name {
                return Err(format!("pods[{i}]: {:?} is not a pod name", p.name));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(format!("pods[{i}]: pod {} is listed twice", p.name));
            }
            let ip: IpAddr = p.ip.parse().map_err(|_| {
                format!(
                    "pods[{i}]: {:?} of pod {} is not an IP address",
                    p.ip, p.name
                )
            })?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(format!("pods[{i}]: {ip} of pod {} is not a pod IP", p.name));
            }
            Ok(PodTarget {
                name: p.name.clone(),
                ip,
                image: p.image.clone(),
            })
        })
        .collect()
}

/// The shortest `{{window}}`: `rate()` over less than a few scrapes has no data.
pub const MIN_WINDOW: Duration = Duration::from_secs(10);

/// What a metric check knows of the release: the variables of a query, and the JSON a webhook
/// is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseContext {
    vars: Vec<(&'static str, String)>,
    pods: Vec<(String, String)>,
    image: String,
    strategy: String,
}

impl ReleaseContext {
    /// From the release's spec, its id, the step and its new pods, and the analysis' interval
    /// (`{{window}}`, at least [`MIN_WINDOW`]).
    pub fn new(
        spec: &ReleaseSpec,
        release_id: &str,
        step: u32,
        pods: &[PodTarget],
        interval: Duration,
    ) -> ReleaseContext {
        let strategy = baton_proto::v1::Strategy::try_from(spec.strategy)
            .unwrap_or(baton_proto::v1::Strategy::Unspecified);
        let track = match strategy {
            baton_proto::v1::Strategy::Canary => "canary".to_owned(),
            // The new colour, from its pods' names (`<app>-<colour>-…`).
            baton_proto::v1::Strategy::BlueGreen => pods
                .first()
                .and_then(|p| p.name.strip_prefix(&format!("{}-", spec.app)))
                .and_then(|rest| ["blue", "green"].into_iter().find(|c| rest.starts_with(c)))
                .unwrap_or("preview")
                .to_owned(),
            _ => "stable".to_owned(),
        };
        let window = interval.max(MIN_WINDOW).as_secs();
        let vars = vec![
            ("app", spec.app.clone()),
            ("namespace", spec.namespace.clone()),
            ("env", spec.env.clone()),
            ("track", track),
            (
                "pods",
                baton_core::metric::regex_alternation(pods.iter().map(|p| p.name.as_str())),
            ),
            ("window", format!("{window}s")),
            ("release_id", release_id.to_owned()),
            ("step", step.to_string()),
        ];
        ReleaseContext {
            vars,
            pods: pods
                .iter()
                .map(|p| (p.name.clone(), p.ip.to_string()))
                .collect(),
            image: spec.image.clone(),
            strategy: baton_core::config::strategy_name(strategy).to_owned(),
        }
    }

    fn var(&self, name: &str) -> String {
        self.vars
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// A query with its variables filled in.
    pub fn query(&self, template: &str) -> String {
        baton_core::metric::render(template, |name| self.var(name))
    }

    /// What a webhook check POSTs: the release, the step and its new pods.
    pub fn webhook_body(&self, check: &str) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        for (name, value) in &self.vars {
            if *name == "pods" || *name == "window" {
                continue;
            }
            body.insert((*name).to_owned(), serde_json::Value::String(value.clone()));
        }
        body.insert(
            "step".into(),
            serde_json::json!(self.var("step").parse::<u32>().unwrap_or(0)),
        );
        body.insert("check".into(), serde_json::json!(check));
        body.insert("image".into(), serde_json::json!(self.image));
        body.insert("strategy".into(), serde_json::json!(self.strategy));
        body.insert(
            "pods".into(),
            serde_json::Value::Array(
                self.pods
                    .iter()
                    .map(|(name, ip)| serde_json::json!({ "name": name, "ip": ip }))
                    .collect(),
            ),
        );
        serde_json::Value::Object(body)
    }
}

/// The nearest-rank percentile (`p` in (0, 100]) of `samples`: the smallest value with at least
/// p% of the samples at or below it. `None` for no samples or a `p` out of range.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // p × n / 100 is exact for the usual percentiles; the epsilon keeps 95 × 20 / 100 at 19.
    let rank = ((p * n as f64) / 100.0 - 1e-9).ceil();
    let index = if rank < 1.0 {
        0
    } else {
        (rank as usize).min(n) - 1
    };
    sorted.get(index).copied()
}

/// One try of an HTTP check.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpAttempt {
    /// `None` when no answer came (refused, timed out…).
    pub status: Option<u16>,
    /// Whether the body contained the expected text (true when none is expected).
    pub body_matched: bool,
    pub elapsed_ms: f64,
    pub error: Option<String>,
}

impl HttpAttempt {
    fn passes(&self, plan: &HttpPlan) -> bool {
        self.status == Some(plan.expect_status) && self.body_matched && self.error.is_none()
    }
}

/// The measurement of an HTTP check on one target, from its attempts in this round: it passes
/// when one attempt got the expected status (and body).
pub fn http_measurement(
    check: &str,
    target: String,
    plan: &HttpPlan,
    attempts: &[HttpAttempt],
) -> Measurement {
    let n = attempts.len();
    let tries = if n == 1 {
        "1 attempt".to_owned()
    } else {
        format!("{n} attempts")
    };
    let passing = attempts.iter().find(|a| a.passes(plan));
    let (ok, value, detail) = match (passing, attempts.last()) {
        (Some(a), _) => (
            true,
            f64::from(a.status.unwrap_or(0)),
            format!(
                "status {} in {:.0} ms ({tries})",
                a.status.unwrap_or(0),
                a.elapsed_ms
            ),
        ),
        (None, None) => (false, 0.0, "no request was made".to_owned()),
        (None, Some(last)) => {
            let why = match (last.status, &last.error) {
                (_, Some(error)) => format!("no answer: {error}"),
                (Some(s), None) if s != plan.expect_status => {
                    format!("status {s}, expected {}", plan.expect_status)
                }
                _ => format!(
                    "body does not contain {:?}",
                    plan.body_contains.as_deref().unwrap_or_default()
                ),
            };
            (
                false,
                f64::from(last.status.unwrap_or(0)),
                format!("{why} ({tries})"),
            )
        }
    };
    measurement(check, target, ok, value, "status", detail)
}

/// One request of a latency check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub elapsed_ms: f64,
    /// A 2xx answer.
    pub ok: bool,
}

/// The two measurements of a latency check on one target: the percentile against the threshold
/// (ms), and the share of failed requests against the tolerated rate (ratio). Failed requests
/// count in the percentile with the time they took: a request cut off at its timeout was slow.
pub fn latency_measurements(
    check: &str,
    target: &str,
    plan: &LatencyPlan,
    samples: &[Sample],
) -> [Measurement; 2] {
    let n = samples.len();
    let label = percentile_label(plan.percentile);
    let times: Vec<f64> = samples.iter().map(|s| s.elapsed_ms).collect();
    let latency = match percentile(&times, plan.percentile) {
        Some(v) => {
            let ok = v <= f64::from(plan.threshold_ms);
            let cmp = if ok { "<=" } else { ">" };
            measurement(
                check,
                target.to_owned(),
                ok,
                round2(v),
                "ms",
                format!(
                    "{label} {v:.0} ms {cmp} {} ms over {n} requests",
                    plan.threshold_ms
                ),
            )
        }
        None => measurement(
            check,
            target.to_owned(),
            false,
            0.0,
            "ms",
            "no requests were made".into(),
        ),
    };
    let errors = samples.iter().filter(|s| !s.ok).count();
    let rate = if n == 0 {
        1.0
    } else {
        errors as f64 / n as f64
    };
    let ok = n > 0 && rate <= plan.max_error_rate;
    let cmp = if ok { "<=" } else { ">" };
    let error_share = measurement(
        check,
        target.to_owned(),
        ok,
        round2(rate),
        "ratio",
        format!(
            "{errors} of {n} requests failed ({:.0}% {cmp} {:.0}%)",
            rate * 100.0,
            plan.max_error_rate * 100.0
        ),
    );
    [latency, error_share]
}

fn percentile_label(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("p{p:.0}")
    } else {
        format!("p{p}")
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// One series of a metric's reading: its labels as text (`{pod="web-1"}`) and its value.
pub type Series = (String, f64);

/// The measurements of a metric check in one round, from its reading (the series, or why there
/// are none). `errors` counts the check's consecutive errors (a failed query, no data, an
/// unreachable server), across rounds: up to the plan's limit they are recorded and tolerated;
/// past it they fail the round, or — with `inconclusive_on_error` — end the analysis without a
/// verdict, which is the `Some(reason)` returned.
pub fn metric_measurements(
    check: &str,
    plan: &MetricPlan,
    reading: &Result<Vec<Series>, String>,
    errors: &mut u32,
) -> (Vec<Measurement>, Option<String>) {
    let target = plan.target();
    let values: Result<Vec<Series>, String> = match reading {
        Err(e) => Err(e.clone()),
        Ok(series) => {
            let defined: Vec<Series> = series
                .iter()
                .filter(|(_, v)| v.is_finite())
                .cloned()
                .collect();
            if defined.is_empty() {
                Err(if series.is_empty() {
                    "no data: the result is empty".to_owned()
                } else {
                    "no data: every value is NaN or infinite".to_owned()
                })
            } else if defined.len() > MAX_SERIES && plan.aggregate == Aggregate::Each {
                Err(format!(
                    "{} series, more than {MAX_SERIES}: aggregate them (aggregate: max, or in the query)",
                    defined.len()
                ))
            } else {
                Ok(defined)
            }
        }
    };
    let series = match values {
        Ok(series) => series,
        Err(why) => {
            *errors = errors.saturating_add(1);
            let n = *errors;
            let counted = |ok: bool, detail: String| {
                vec![measurement(
                    check,
                    target.to_owned(),
                    ok,
                    f64::from(n),
                    "errors",
                    detail,
                )]
            };
            if n <= plan.error_limit {
                let detail = format!("error {n} in a row, {} tolerated: {why}", plan.error_limit);
                return (counted(true, detail), None);
            }
            let detail = format!(
                "{n} errors in a row, more than the limit of {}: {why}",
                plan.error_limit
            );
            if plan.inconclusive_on_error {
                let reason = format!("check {check} on {target}: {detail}");
                return (counted(true, detail), Some(reason));
            }
            return (counted(false, detail), None);
        }
    };
    *errors = 0;
    let judged: Vec<(String, f64)> = match plan.aggregate {
        Aggregate::Each => series,
        aggregate => {
            let values: Vec<f64> = series.iter().map(|(_, v)| *v).collect();
            aggregate
                .apply(&values)
                .into_iter()
                .map(|v| (format!("{}({target})", aggregate.name()), v))
                .collect()
        }
    };
    let measurements = judged
        .into_iter()
        .map(|(label, value)| {
            let ok = plan.condition.holds(value);
            let target = if label.is_empty() || label == "{}" {
                target.to_owned()
            } else {
                label
            };
            measurement(
                check,
                target,
                ok,
                value,
                "value",
                format!(
                    "{} (must be {})",
                    plan.condition.explain(value),
                    plan.condition
                ),
            )
        })
        .collect();
    (measurements, None)
}

/// How a smoke test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmokeRun {
    /// It exited (`code` is `None` when a signal ended it); `output` is the tail of its output.
    Exited {
        code: Option<i32>,
        output: String,
    },
    TimedOut {
        after_ms: u64,
    },
    /// It could not be started.
    NotStarted(String),
}

/// The measurement of a smoke test: it passes when it exited 0.
pub fn smoke_measurement(check: &str, plan: &SmokePlan, run: &SmokeRun) -> Measurement {
    let target = plan.argv.first().cloned().unwrap_or_default();
    let (ok, value, detail) = match run {
        SmokeRun::Exited {
            code: Some(0),
            output,
        } => (true, 0.0, with_output("exit 0".into(), output)),
        SmokeRun::Exited {
            code: Some(code),
            output,
        } => (
            false,
            f64::from(*code),
            with_output(format!("exit {code}"), output),
        ),
        SmokeRun::Exited { code: None, output } => {
            (false, -1.0, with_output("ended by a signal".into(), output))
        }
        SmokeRun::TimedOut { after_ms } => (
            false,
            -1.0,
            format!("killed after its timeout of {after_ms} ms"),
        ),
        SmokeRun::NotStarted(why) => (false, -1.0, format!("could not start: {why}")),
    };
    measurement(check, target, ok, value, "exit", detail)
}

fn with_output(head: String, output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        head
    } else {
        format!("{head}: {output}")
    }
}

/// What the cluster says of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodObservation {
    pub ip: Option<String>,
    pub phase: String,
    pub ready: bool,
    pub terminating: bool,
    /// Restarts of all its containers.
    pub restarts: u32,
    pub created_ms: Option<i64>,
    /// When a container last terminated (before its latest restart).
    pub last_termination_ms: Option<i64>,
    /// (container, reason) of containers waiting to start.
    pub waiting: Vec<(String, String)>,
}

/// The pod-health measurement of one pod. `baseline` is its restart count when the analysis
/// first saw it; `step_began_ms` when the step began. A restart counts when the count grew since
/// the baseline, or when the last termination (or the pod itself) is younger than the step.
pub fn pod_measurement(
    target: &PodTarget,
    observed: Option<&PodObservation>,
    step_began_ms: Option<i64>,
    baseline: Option<u32>,
) -> Measurement {
    let label = target.label();
    let Some(pod) = observed else {
        return measurement(
            POD_HEALTH,
            label,
            false,
            0.0,
            "restarts",
            "the pod no longer exists".into(),
        );
    };
    let mut problems = Vec::new();
    if pod.terminating {
        problems.push("the pod is being deleted".to_owned());
    }
    if let Some(ip) = pod.ip.as_deref().filter(|ip| !ip.is_empty()) {
        if ip.parse::<IpAddr>().ok() != Some(target.ip) {
            problems.push(format!("the pod's IP is now {ip}"));
        }
    }
    for (container, reason) in &pod.waiting {
        if BAD_WAITING.contains(&reason.as_str()) {
            problems.push(format!("container {container} is waiting in {reason}"));
        }
    }
    if restarted(pod, step_began_ms, baseline) {
        problems.push(format!(
            "restarted since the step began (restarts {})",
            pod.restarts
        ));
    }
    if pod.phase == "Failed" || pod.phase == "Succeeded" {
        problems.push(format!("the pod has ended (phase {})", pod.phase));
    }
    if !pod.ready {
        problems.push("not ready".to_owned());
    }
    let ok = problems.is_empty();
    let detail = if ok {
        format!("ready, restarts {}", pod.restarts)
    } else {
        problems.join("; ")
    };
    measurement(
        POD_HEALTH,
        label,
        ok,
        f64::from(pod.restarts),
        "restarts",
        detail,
    )
}

fn restarted(pod: &PodObservation, step_began_ms: Option<i64>, baseline: Option<u32>) -> bool {
    if baseline.is_some_and(|b| pod.restarts > b) {
        return true;
    }
    if pod.restarts == 0 {
        return false;
    }
    let Some(began) = step_began_ms else {
        return false;
    };
    pod.last_termination_ms.is_some_and(|t| t >= began)
        || pod.created_ms.is_some_and(|t| t >= began)
}

/// A measurement with its fields kept short enough for an event.
pub fn measurement(
    check: &str,
    target: String,
    ok: bool,
    value: f64,
    unit: &str,
    detail: String,
) -> Measurement {
    Measurement {
        check: truncate(check, MAX_CHECK_NAME),
        target: truncate(&target, MAX_TARGET),
        ok,
        value: if value.is_finite() { value } else { 0.0 },
        unit: unit.to_owned(),
        detail: truncate(&detail, MAX_DETAIL),
    }
}

/// At most `max` characters, one line, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// How one round went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    Passed,
    Failed,
    /// Nothing failed, but the pods could not be read from the cluster.
    Inconclusive,
}

/// The verdict of an analysis.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed {
        measurements: Vec<Measurement>,
    },
    Failed {
        measurements: Vec<Measurement>,
        reason: String,
    },
    /// Most rounds could not read the cluster: no verdict, try the analysis again later.
    Inconclusive {
        reason: String,
    },
    /// A metric check ran past its error limit with `on_error: inconclusive`: no verdict, and a
    /// person decides (`analysis.inconclusive`).
    Undecided {
        measurements: Vec<Measurement>,
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    /// The first failing measurement, else the latest.
    shown: Measurement,
    rounds: u32,
    failed: u32,
}

/// Counts rounds and keeps, per (check, target, unit), one measurement: bounded however long the
/// analysis runs.
#[derive(Debug, Clone)]
pub struct Tally {
    settings: Settings,
    total_rounds: u32,
    rounds_run: u32,
    failed_rounds: u32,
    inconclusive_rounds: u32,
    entries: Vec<Entry>,
    index: HashMap<(String, String, String), usize>,
    /// The failing measurements of the latest failed round.
    last_failures: Vec<Measurement>,
    last_cluster_error: Option<String>,
}

impl Tally {
    pub fn new(settings: Settings) -> Tally {
        Tally {
            settings,
            total_rounds: settings.rounds(),
            rounds_run: 0,
            failed_rounds: 0,
            inconclusive_rounds: 0,
            entries: Vec::new(),
            index: HashMap::new(),
            last_failures: Vec::new(),
            last_cluster_error: None,
        }
    }

    /// Records a round's measurements; `cluster_error` says the pods could not be read.
    pub fn record(
        &mut self,
        measurements: Vec<Measurement>,
        cluster_error: Option<String>,
    ) -> RoundOutcome {
        self.rounds_run += 1;
        let failures: Vec<Measurement> = measurements.iter().filter(|m| !m.ok).cloned().collect();
        for m in measurements {
            let key = (m.check.clone(), m.target.clone(), m.unit.clone());
            match self.index.get(&key) {
                Some(&i) => {
                    let entry = &mut self.entries[i];
                    entry.rounds += 1;
                    if !m.ok {
                        entry.failed += 1;
                    }
                    // Keep the first failure: it says when and why it went wrong.
                    if entry.failed == 0 || (!m.ok && entry.failed == 1) {
                        entry.shown = m;
                    }
                }
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push(Entry {
                        failed: u32::from(!m.ok),
                        shown: m,
                        rounds: 1,
                    });
                }
            }
        }
        if !failures.is_empty() {
            self.failed_rounds += 1;
            self.last_failures = failures;
            RoundOutcome::Failed
        } else if let Some(e) = cluster_error {
            self.inconclusive_rounds += 1;
            self.last_cluster_error = Some(e);
            RoundOutcome::Inconclusive
        } else {
            RoundOutcome::Passed
        }
    }

    /// More failed rounds than the limit: the analysis has failed, stop now.
    pub fn exceeded(&self) -> bool {
        self.failed_rounds > self.settings.failure_limit
    }

    pub fn rounds_run(&self) -> u32 {
        self.rounds_run
    }

    pub fn total_rounds(&self) -> u32 {
        self.total_rounds
    }

    /// The verdict from the rounds run so far.
    pub fn verdict(self, step: u32) -> Verdict {
        let failed = self.exceeded();
        if !failed && self.inconclusive_rounds.saturating_mul(2) > self.rounds_run {
            return Verdict::Inconclusive {
                reason: format!(
                    "{} of {} rounds could not read the pods: {}",
                    self.inconclusive_rounds,
                    self.rounds_run,
                    self.last_cluster_error
                        .as_deref()
                        .unwrap_or("unknown error")
                ),
            };
        }
        let reason = failed.then(|| self.reason());
        let measurements = self.assembled(step, !failed, reason.as_deref().unwrap_or_default());
        match reason {
            Some(reason) => Verdict::Failed {
                measurements,
                reason,
            },
            None => Verdict::Passed { measurements },
        }
    }

    /// No verdict: a metric check could not be judged (`reason`); what was measured so far.
    pub fn undecided(self, step: u32, reason: String) -> Verdict {
        let measurements = self.assembled(step, true, &reason);
        Verdict::Undecided {
            measurements,
            reason,
        }
    }

    /// The rounds' summary and one measurement per (check, target, unit), failing ones first,
    /// within the verdict's size.
    fn assembled(self, step: u32, ok: bool, reason: &str) -> Vec<Measurement> {
        let summary = measurement(
            "analysis",
            "rounds".into(),
            ok,
            f64::from(self.rounds_run),
            "rounds",
            format!(
                "{} of {} rounds run, {} failed (limit {})",
                self.rounds_run, self.total_rounds, self.failed_rounds, self.settings.failure_limit
            ),
        );
        // Failing entries first, so the cap never drops why it failed.
        let (bad, good): (Vec<Entry>, Vec<Entry>) =
            self.entries.into_iter().partition(|e| e.failed > 0);
        let mut measurements = vec![summary];
        for entry in bad.into_iter().chain(good) {
            let mut m = entry.shown;
            if entry.failed > 0 {
                m.ok = false;
            }
            let note = if entry.failed > 0 {
                format!(" [failed {} of {} rounds]", entry.failed, entry.rounds)
            } else {
                format!(" [ok in {} of {} rounds]", entry.rounds, entry.rounds)
            };
            m.detail = truncate(&format!("{}{note}", m.detail), MAX_DETAIL + note.len());
            measurements.push(m);
        }
        measurements.truncate(MAX_MEASUREMENTS);
        let fits = |m: &[Measurement], reason: &str| {
            AnalysisFailed {
                step,
                measurements: m.to_vec(),
                reason: reason.to_owned(),
            }
            .encoded_len()
                <= MAX_VERDICT_BYTES
        };
        while measurements.len() > 1 && !fits(&measurements, reason) {
            measurements.pop();
        }
        measurements
    }

    fn reason(&self) -> String {
        let mut reason = String::new();
        for (i, m) in self.last_failures.iter().take(3).enumerate() {
            if i > 0 {
                reason.push_str("; ");
            }
            let _ = write!(reason, "check {} on {}: {}", m.check, m.target, m.detail);
        }
        if self.last_failures.len() > 3 {
            let _ = write!(reason, "; and {} more", self.last_failures.len() - 3);
        }
        let _ = write!(
            reason,
            " ({} of {} rounds failed, more than the failure limit of {})",
            self.failed_rounds, self.rounds_run, self.settings.failure_limit
        );
        truncate(&reason, MAX_REASON)
    }
}

#[cfg(test)]
#[path = "analysis_tests.rs"]
mod tests;
