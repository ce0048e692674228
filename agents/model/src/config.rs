//! The app and environment configuration: one YAML file for every app and environment, validated
//! as a whole before use, resolved into the [`ReleaseSpec`] a release carries, and versioned in
//! the `BATON_CONFIG` KV bucket ([`store`]).
//!
//! Validation walks the YAML tree itself (rather than letting serde stop at the first mistake) so
//! that a person sees every wrong field at once, each with its path
//! (`apps.web.checks[1].latency.percentile: must be in (0, 100]`).
//!
//! Resolution order, each layer replacing what the one before set (nested settings such as
//! `analysis` are merged field by field; lists such as `checks` and `canary.steps` are replaced
//! whole):
//!
//! 1. built-in defaults (port 8080, rolling 25%/0, step timeout 5m, analysis 30s/5s/1, …),
//! 2. the app's own settings (`apps.<app>`),
//! 3. the environment's defaults (`environments.<env>.strategy`, `rollback_on_failure`),
//! 4. the app's overrides for the environment (`apps.<app>.environments.<env>`),
//! 5. what the request overrides ([`Overrides`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use baton_proto::v1::{
    check, AnalysisParams, BlueGreenParams, BuildParams, CanaryParams, CanaryStep, Check,
    HttpCheck, LatencyCheck, MetricJudgement, PrometheusCheck, ReleaseSpec, RollingParams,
    SmokeCheck, Strategy, WebhookCheck,
};
use serde_yaml_ng::Value;

use crate::limits::{
    MAX_ANALYSIS_SECONDS, MAX_ARGV, MAX_CHECKS, MAX_FAILURE_LIMIT, MAX_HTTP_RETRIES,
    MAX_LATENCY_REQUESTS, MAX_PORT, MAX_REQUEST_TIMEOUT, MAX_SMOKE_TIMEOUT, MAX_SPEC_MILLIS,
    MAX_SPEC_SECONDS, MAX_STEPS, MAX_TEXT_BYTES as MAX_TEXT, MAX_URL_BYTES,
};
use crate::metric;
use crate::names::{validate_dns_label, NameError};
use crate::notify::{Channel, ChannelKind, Notifications, Route, Trigger, LINK_VARIABLES};

/// The fields every metric check (prometheus, webhook) has besides its source.
const JUDGEMENT_FIELDS: &[&str] = &[
    "condition",
    "aggregate",
    "error_limit",
    "on_error",
    "timeout",
];

#[cfg(test)]
mod tests;

/// The largest configuration file accepted: it is stored whole in one KV entry (NATS refuses
/// messages over 1 MB, and JSON escaping can double the text).
pub const MAX_FILE_BYTES: usize = 256 * 1024;

/// Each default below is the one definition of it: the agents, the CLI and the tests use these.
/// The port of the app's HTTP checks and metrics.
pub const DEFAULT_PORT: u32 = 8080;
/// A step's timeout (the deployer's wait for a step, the rollback agent's for a restore).
pub const DEFAULT_STEP_TIMEOUT_SECONDS: u32 = 300;
pub const DEFAULT_MAX_SURGE: &str = "25%";
pub const DEFAULT_MAX_UNAVAILABLE: &str = "0";
/// The design's canary: a small share first, then more with checks between the steps.
pub const DEFAULT_CANARY_WEIGHTS: [u32; 5] = [10, 25, 50, 75, 100];
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u32 = 300;
pub const DEFAULT_ANALYSIS_DURATION_SECONDS: u32 = 30;
pub const DEFAULT_ANALYSIS_INTERVAL_SECONDS: u32 = 5;
pub const DEFAULT_FAILURE_LIMIT: u32 = 1;
/// A command build's timeout.
pub const DEFAULT_BUILD_TIMEOUT_SECONDS: u32 = 900;
const DEFAULT_HTTP_STATUS: u32 = 200;
const DEFAULT_HTTP_TIMEOUT_MS: u32 = 2_000;
const DEFAULT_HTTP_RETRIES: u32 = 3;
const DEFAULT_HTTP_INTERVAL_MS: u32 = 1_000;
const DEFAULT_LATENCY_REQUESTS: u32 = 20;

/// A step's timeout as a spec carries it in seconds, 0 meaning the default.
pub fn step_timeout(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(if seconds == 0 {
        DEFAULT_STEP_TIMEOUT_SECONDS
    } else {
        seconds
    }))
}

/// A command build's timeout as a spec carries it in seconds, 0 meaning the default.
pub fn build_timeout(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(if seconds == 0 {
        DEFAULT_BUILD_TIMEOUT_SECONDS
    } else {
        seconds
    }))
}
const DEFAULT_LATENCY_PERCENTILE: f64 = 95.0;
const DEFAULT_SMOKE_TIMEOUT_MS: u32 = 30_000;
const DEFAULT_METRIC_TIMEOUT_MS: u32 = 5_000;
/// The kinds of a check, as the configuration names them.
const CHECK_KINDS: [&str; 5] = ["http", "latency", "smoke", "prometheus", "webhook"];

const SECRET_HINT: &str = "looks like a secret: secrets never go in the configuration (it is \
     stored in plain text and copied into every release event); put them in the agents' \
     credential files";

/// One thing wrong with a configuration, at a path such as `apps.web.port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration (never empty); displayed one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigErrors {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// An environment: where its releases go, and its defaults for apps.
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    /// Which agents (`--cluster`) serve it.
    pub cluster: String,
    pub namespace: String,
    pub rollback_on_failure: bool,
    pub strategy: Option<Strategy>,
}

/// An app: its settings, and its overrides per environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct App {
    pub settings: AppSettings,
    pub environments: BTreeMap<String, AppSettings>,
}

/// An app's settings as written: what is absent is taken from the layer below.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppSettings {
    pub container: Option<String>,
    pub port: Option<u32>,
    pub strategy: Option<Strategy>,
    pub max_surge: Option<String>,
    pub max_unavailable: Option<String>,
    pub canary_steps: Option<Vec<CanaryStep>>,
    pub scale_down_delay_seconds: Option<u32>,
    pub post_promotion_analysis: Option<bool>,
    pub auto_promote: Option<bool>,
    pub step_timeout_seconds: Option<u32>,
    pub deadline_margin_seconds: Option<u32>,
    pub analysis_duration_seconds: Option<u32>,
    pub analysis_interval_seconds: Option<u32>,
    pub failure_limit: Option<u32>,
    /// Check ports of 0 stand for the app's port.
    pub checks: Option<Vec<Check>>,
    pub build_argv: Option<Vec<String>>,
    pub build_timeout_seconds: Option<u32>,
    pub ingress: Option<String>,
    pub http_route: Option<String>,
}

impl AppSettings {
    /// Lays `top` over `self`: what `top` sets wins.
    fn overlay(&mut self, top: &AppSettings) {
        fn set<T: Clone>(under: &mut Option<T>, over: &Option<T>) {
            if over.is_some() {
                under.clone_from(over);
            }
        }
        set(&mut self.container, &top.container);
        set(&mut self.port, &top.port);
        set(&mut self.strategy, &top.strategy);
        set(&mut self.max_surge, &top.max_surge);
        set(&mut self.max_unavailable, &top.max_unavailable);
        set(&mut self.canary_steps, &top.canary_steps);
        set(
            &mut self.scale_down_delay_seconds,
            &top.scale_down_delay_seconds,
        );
        set(
            &mut self.post_promotion_analysis,
            &top.post_promotion_analysis,
        );
        set(&mut self.auto_promote, &top.auto_promote);
        set(&mut self.step_timeout_seconds, &top.step_timeout_seconds);
        set(
            &mut self.deadline_margin_seconds,
            &top.deadline_margin_seconds,
        );
        set(
            &mut self.analysis_duration_seconds,
            &top.analysis_duration_seconds,
        );
        set(
            &mut self.analysis_interval_seconds,
            &top.analysis_interval_seconds,
        );
        set(&mut self.failure_limit, &top.failure_limit);
        set(&mut self.checks, &top.checks);
        set(&mut self.build_argv, &top.build_argv);
        set(&mut self.build_timeout_seconds, &top.build_timeout_seconds);
        set(&mut self.ingress, &top.ingress);
        set(&mut self.http_route, &top.http_route);
    }
}

/// What a release request sets on top of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// The image to release (a tag or a digest); required.
    pub image: String,
    pub strategy: Option<Strategy>,
    pub commit: Option<String>,
    pub commit_time: Option<SystemTime>,
    /// The canary's steps for this release (`baton release --steps`): weights and pauses; each
    /// step's analysis is then the release's.
    pub canary_steps: Option<Vec<CanaryStep>>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    environments: BTreeMap<String, Environment>,
    apps: BTreeMap<String, App>,
    notifications: Notifications,
    revision: u64,
}

impl Config {
    pub fn environments(&self) -> &BTreeMap<String, Environment> {
        &self.environments
    }

    /// Who is told of which releases (the `notifications:` section; empty when absent).
    pub fn notifications(&self) -> &Notifications {
        &self.notifications
    }

    pub fn apps(&self) -> &BTreeMap<String, App> {
        &self.apps
    }

    /// The stored revision this configuration came from (0 when it was not read from the store);
    /// resolved specs carry it as `config_revision`.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = revision;
        self
    }

    /// The release spec of `app` in `env`: defaults, the app, the environment, the app's
    /// overrides for the environment, then `overrides` (see the module docs). The result passes
    /// [`crate::validate::release_spec`].
    pub fn resolve(
        &self,
        app: &str,
        env: &str,
        overrides: &Overrides,
    ) -> Result<ReleaseSpec, ConfigErrors> {
        let mut unknown = Vec::new();
        let a = self.apps.get(app);
        if a.is_none() {
            unknown.push(Problem {
                path: "app".into(),
                message: format!(
                    "no app {app:?} in the configuration (known: {})",
                    known(self.apps.keys())
                ),
            });
        }
        let e = self.environments.get(env);
        if e.is_none() {
            unknown.push(Problem {
                path: "environment".into(),
                message: format!(
                    "no environment {env:?} in the configuration (known: {})",
                    known(self.environments.keys())
                ),
            });
        }
        let (Some(a), Some(e)) = (a, e) else {
            return Err(ConfigErrors { problems: unknown });
        };
        let spec = self.build_spec(app, a, env, e, overrides);
        let mut problems = resolved_problems(&spec);
        if overrides.canary_steps.is_some() && spec.canary.is_none() {
            problems.push(Problem {
                path: "steps".into(),
                message: format!(
                    "only a canary release has steps, and {app} releases to {env} by {} (ask for --strategy canary)",
                    strategy_name(Strategy::try_from(spec.strategy).unwrap_or(Strategy::Rolling))
                ),
            });
        }
        if problems.is_empty() {
            if let Err(message) = crate::validate::release_spec(&spec) {
                problems.push(Problem {
                    path: String::new(),
                    message,
                });
            }
        }
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(ConfigErrors { problems })
        }
    }

    fn build_spec(
        &self,
        name: &str,
        app: &App,
        env_name: &str,
        env: &Environment,
        overrides: &Overrides,
    ) -> ReleaseSpec {
        let mut s = app.settings.clone();
        let env_layer = AppSettings {
            strategy: env.strategy,
            ..Default::default()
        };
        s.overlay(&env_layer);
        if let Some(o) = app.environments.get(env_name) {
            s.overlay(o);
        }
        if let Some(st) = overrides.strategy.filter(|s| *s != Strategy::Unspecified) {
            s.strategy = Some(st);
        }

        let strategy = s.strategy.unwrap_or(Strategy::Rolling);
        let port = s.port.unwrap_or(DEFAULT_PORT);
        let checks = s
            .checks
            .unwrap_or_default()
            .into_iter()
            .map(|mut c| {
                match &mut c.kind {
                    Some(check::Kind::Http(h)) if h.port == 0 => h.port = port,
                    Some(check::Kind::Latency(l)) if l.port == 0 => l.port = port,
                    _ => {}
                }
                c
            })
            .collect();
        let canary = (strategy == Strategy::Canary).then(|| CanaryParams {
            steps: overrides
                .canary_steps
                .clone()
                .or(s.canary_steps)
                .unwrap_or_else(|| {
                    DEFAULT_CANARY_WEIGHTS
                        .iter()
                        .map(|w| CanaryStep {
                            weight: *w,
                            ..Default::default()
                        })
                        .collect()
                }),
        });
        let blue_green = (strategy == Strategy::BlueGreen).then(|| BlueGreenParams {
            scale_down_delay_seconds: s
                .scale_down_delay_seconds
                .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECONDS),
            // On unless turned off: the switch is checked again with real traffic.
            post_promotion_analysis: s.post_promotion_analysis.unwrap_or(true),
            // The switch follows a passing analysis unless a person is to promote it.
            manual_promotion: !s.auto_promote.unwrap_or(true),
        });
        let build = s
            .build_argv
            .filter(|argv| !argv.is_empty())
            .map(|argv| BuildParams {
                argv,
                timeout_seconds: s
                    .build_timeout_seconds
                    .unwrap_or(DEFAULT_BUILD_TIMEOUT_SECONDS),
            });
        ReleaseSpec {
            app: name.to_owned(),
            env: env_name.to_owned(),
            cluster: env.cluster.clone(),
            namespace: env.namespace.clone(),
            image: overrides.image.clone(),
            container: s.container.unwrap_or_else(|| name.to_owned()),
            strategy: strategy as i32,
            rolling: Some(RollingParams {
                max_surge: s.max_surge.unwrap_or_else(|| DEFAULT_MAX_SURGE.into()),
                max_unavailable: s
                    .max_unavailable
                    .unwrap_or_else(|| DEFAULT_MAX_UNAVAILABLE.into()),
            }),
            canary,
            blue_green,
            checks,
            analysis: Some(AnalysisParams {
                duration_seconds: s
                    .analysis_duration_seconds
                    .unwrap_or(DEFAULT_ANALYSIS_DURATION_SECONDS),
                interval_seconds: s
                    .analysis_interval_seconds
                    .unwrap_or(DEFAULT_ANALYSIS_INTERVAL_SECONDS),
                failure_limit: s.failure_limit.unwrap_or(DEFAULT_FAILURE_LIMIT),
            }),
            rollback_on_failure: env.rollback_on_failure,
            step_timeout_seconds: s
                .step_timeout_seconds
                .unwrap_or(DEFAULT_STEP_TIMEOUT_SECONDS),
            port,
            commit: overrides.commit.clone().unwrap_or_default(),
            commit_time: overrides.commit_time.map(prost_types::Timestamp::from),
            build,
            ingress: s.ingress.unwrap_or_default(),
            http_route: s.http_route.unwrap_or_default(),
            config_revision: self.revision,
            deadline_margin_seconds: s
                .deadline_margin_seconds
                .unwrap_or(crate::deadline::DEFAULT_MARGIN_SECONDS),
        }
    }
}

impl Config {
    /// Checks that `spec` is exactly what this configuration resolves for the spec's app and
    /// environment, given only what a request may choose itself (the image, the strategy, the
    /// commit and its time): what an agent may run (build and smoke commands), contact (check
    /// URLs) and touch (cluster, namespace) comes from the configuration, never from a request.
    /// The error names every field that differs.
    pub fn verify(&self, spec: &ReleaseSpec) -> Result<(), SpecMismatch> {
        if spec.config_revision != self.revision {
            return Err(SpecMismatch::Revision {
                spec: spec.config_revision,
                config: self.revision,
            });
        }
        let overrides = Overrides {
            image: spec.image.clone(),
            strategy: Strategy::try_from(spec.strategy).ok(),
            commit: (!spec.commit.is_empty()).then(|| spec.commit.clone()),
            commit_time: spec.commit_time.and_then(|t| SystemTime::try_from(t).ok()),
            // A request may choose its canary's weights and pauses, never a step's analysis.
            canary_steps: spec
                .canary
                .as_ref()
                .map(|c| c.steps.clone())
                .filter(|steps| steps.iter().all(|st| st.analysis.is_none())),
        };
        let resolved = self
            .resolve(&spec.app, &spec.env, &overrides)
            .map_err(|e| SpecMismatch::Unresolvable(e.to_string()))?;
        let mut fields = Vec::new();
        macro_rules! compare {
            ($($field:ident),* $(,)?) => {
                $(if resolved.$field != spec.$field {
                    fields.push(stringify!($field));
                })*
            };
        }
        compare!(
            cluster,
            namespace,
            container,
            strategy,
            rolling,
            canary,
            blue_green,
            checks,
            analysis,
            rollback_on_failure,
            step_timeout_seconds,
            port,
            commit_time,
            build,
            ingress,
            http_route,
            deadline_margin_seconds,
        );
        if fields.is_empty() && resolved != *spec {
            fields.push("other fields");
        }
        match fields.is_empty() {
            true => Ok(()),
            false => Err(SpecMismatch::Fields(fields)),
        }
    }
}

/// Why a release spec is not the configuration's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecMismatch {
    /// The spec names a revision that is not this one.
    Revision { spec: u64, config: u64 },
    /// The configuration has no such app or environment, or can't resolve it.
    Unresolvable(String),
    /// These fields of the spec are not what the configuration says.
    Fields(Vec<&'static str>),
}

impl fmt::Display for SpecMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecMismatch::Revision { spec, config } => write!(
                f,
                "the spec names configuration revision {spec}, checked against revision {config}"
            ),
            SpecMismatch::Unresolvable(why) => {
                write!(f, "the configuration does not resolve it: {why}")
            }
            SpecMismatch::Fields(fields) => {
                write!(f, "its {} differ from the configuration", fields.join(", "))
            }
        }
    }
}

/// What only the combination of layers can get wrong.
fn resolved_problems(spec: &ReleaseSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(r) = &spec.rolling {
        if is_zero(&r.max_surge) && is_zero(&r.max_unavailable) {
            problems.push(Problem {
                path: "rolling".into(),
                message: "max_surge and max_unavailable cannot both be 0 (the rollout could \
                          never make progress)"
                    .into(),
            });
        }
    }
    // An interval longer than the duration leaves the health-checker one round, at the start
    // (`Settings::rounds`): the duration asked for would silently not be watched.
    let base = spec.analysis.unwrap_or_default();
    if base.duration_seconds > 0 && base.interval_seconds > base.duration_seconds {
        problems.push(Problem {
            path: "analysis".into(),
            message: format!(
                "interval ({}s) is longer than duration ({}s)",
                base.interval_seconds, base.duration_seconds
            ),
        });
    }
    // A canary step's own analysis replaces the release's field by field, where set (0 is
    // unset), as the health-checker's `for_step` does; the rule holds for what it merges to.
    let steps = spec.canary.as_ref().map_or(&[][..], |c| c.steps.as_slice());
    for (i, step) in steps.iter().enumerate() {
        let Some(own) = step.analysis else { continue };
        if own.duration_seconds == 0 && own.interval_seconds == 0 {
            continue;
        }
        let pick = |own: u32, base: u32, field: &str| {
            if own > 0 {
                (own, format!("{own}s"))
            } else {
                (base, format!("{base}s, from analysis.{field}"))
            }
        };
        let (duration, duration_text) =
            pick(own.duration_seconds, base.duration_seconds, "duration");
        let (interval, interval_text) =
            pick(own.interval_seconds, base.interval_seconds, "interval");
        if duration > 0 && interval > duration {
            problems.push(Problem {
                path: format!("canary.steps[{i}].analysis"),
                message: format!(
                    "interval ({interval_text}) is longer than duration ({duration_text})"
                ),
            });
        }
    }
    problems
}

fn is_zero(v: &str) -> bool {
    v.trim_end_matches('%').parse::<u32>() == Ok(0)
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The strategy names of the configuration (and of `--strategy`): `rolling`, `canary`,
/// `blue-green`.
pub fn parse_strategy(name: &str) -> Option<Strategy> {
    match name {
        "rolling" => Some(Strategy::Rolling),
        "canary" => Some(Strategy::Canary),
        "blue-green" => Some(Strategy::BlueGreen),
        _ => None,
    }
}

pub fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Rolling => "rolling",
        Strategy::Canary => "canary",
        Strategy::BlueGreen => "blue-green",
        Strategy::Unspecified => "unspecified",
    }
}

/// Parses and validates a configuration file; every problem is reported, not just the first.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ConfigErrors::one(
            "",
            format!(
                "the file is {} bytes, more than the limit of {MAX_FILE_BYTES}",
                text.len()
            ),
        ));
    }
    let mut value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigErrors::one("", format!("not valid YAML: {e}")))?;
    // `<<: *defaults` merge keys, as people write them to share settings between apps.
    value
        .apply_merge()
        .map_err(|e| ConfigErrors::one("", format!("YAML merge keys: {e}")))?;
    let mut w = Walk::default();
    w.reject_tags("", &mut value);
    let config = w.config(&value);
    // Every app must resolve in every environment: what only the layers together get wrong (a
    // canary strategy from an environment, both rolling limits 0) shows here, before use. Apps
    // and environments with problems of their own were left out of `config` already.
    let probe = Overrides {
        image: "registry.invalid/config-check:probe".into(),
        ..Default::default()
    };
    for (name, app) in &config.apps {
        let per_env: Vec<(&String, Vec<Problem>)> = config
            .environments
            .keys()
            .map(|env| {
                let found = match config.resolve(name, env, &probe) {
                    Ok(_) => Vec::new(),
                    Err(e) => e.problems,
                };
                (env, found)
            })
            .collect();
        let mut reported: Vec<&Problem> = Vec::new();
        for (_, found) in &per_env {
            for p in found {
                if reported.contains(&p) {
                    continue;
                }
                reported.push(p);
                let everywhere = per_env.iter().all(|(_, f)| f.contains(p));
                if everywhere {
                    w.err(join(&format!("apps.{name}"), &p.path), p.message.clone());
                    continue;
                }
                for (env, f) in &per_env {
                    if f.contains(p) {
                        let base = if app.environments.contains_key(*env) {
                            format!("apps.{name}.environments.{env}")
                        } else {
                            format!("apps.{name} (in environment {env})")
                        };
                        w.err(join(&base, &p.path), p.message.clone());
                    }
                }
            }
        }
    }
    if w.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors {
            problems: w.problems,
        })
    }
}

fn join(base: &str, field: &str) -> String {
    match (base.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (_, true) => base.to_owned(),
        _ => format!("{base}.{field}"),
    }
}

/// Whether a field name looks like it holds a secret.
pub fn looks_like_secret(key: &str) -> bool {
    let k: String = key
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "auth",
        "apikey",
        "accesskey",
        "privatekey",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

const ENV_FIELDS: &[&str] = &["cluster", "namespace", "rollback_on_failure", "strategy"];
const APP_FIELDS: &[&str] = &[
    "container",
    "port",
    "strategy",
    "rolling",
    "canary",
    "blue_green",
    "step_timeout",
    "deadline_margin",
    "analysis",
    "checks",
    "build",
    "ingress",
    "http_route",
];

/// A walk over the YAML tree that records every problem it meets and carries on.
#[derive(Default)]
struct Walk {
    problems: Vec<Problem>,
}

/// A mapping's known fields, by name, with their paths.
struct Fields<'a> {
    path: String,
    fields: Vec<(String, &'a Value)>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<(String, &'a Value)> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(k, v)| (join(&self.path, k), *v))
    }
}

impl Walk {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The entries of a mapping whose keys are names chosen by the user (apps, environments).
    fn named<'a>(&mut self, path: &str, v: &'a Value) -> Vec<(String, String, &'a Value)> {
        match v {
            Value::Null => Vec::new(),
            Value::Mapping(m) => m
                .iter()
                .filter_map(|(k, v)| match k {
                    Value::String(k) => Some((k.clone(), join(path, k), v)),
                    other => {
                        self.err(
                            path,
                            format!("names must be strings, not {}", describe(other)),
                        );
                        None
                    }
                })
                .collect(),
            other => {
                self.err(
                    path,
                    format!("must be a mapping of names, not {}", describe(other)),
                );
                Vec::new()
            }
        }
    }

    /// A mapping with fixed fields: unknown fields and secret-looking ones are problems.
    fn fields<'a>(&mut self, path: &str, v: &'a Value, allowed: &[&str]) -> Option<Fields<'a>> {
        let m = match v {
            Value::Null => {
                return Some(Fields {
                    path: path.to_owned(),
                    fields: Vec::new(),
                })
            }
            Value::Mapping(m) => m,
            other => {
                self.err(
                    path,
                    format!(
                        "must be a mapping with the fields {}, not {}",
                        allowed.join(", "),
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let mut fields = Vec::new();
        for (k, v) in m {
            let Value::String(k) = k else {
                self.err(
                    path,
                    format!("field names must be strings, not {}", describe(k)),
                );
                continue;
            };
            let field_path = join(path, k);
            if looks_like_secret(k) {
                self.err(field_path, SECRET_HINT);
            } else if allowed.contains(&k.as_str()) {
                fields.push((k.clone(), v));
            } else {
                self.err(
                    &field_path,
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                );
                self.secrets_inside(&field_path, v);
            }
        }
        Some(Fields {
            path: path.to_owned(),
            fields,
        })
    }

    /// Secret-looking keys anywhere under a value that is not otherwise read.
    fn secrets_inside(&mut self, path: &str, v: &Value) {
        match v {
            Value::Mapping(m) => {
                for (k, v) in m {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        _ => continue,
                    };
                    let p = join(path, &key);
                    if looks_like_secret(&key) {
                        self.err(&p, SECRET_HINT);
                    }
                    self.secrets_inside(&p, v);
                }
            }
            Value::Sequence(s) => {
                for (i, v) in s.iter().enumerate() {
                    self.secrets_inside(&format!("{path}[{i}]"), v);
                }
            }
            Value::Tagged(t) => self.secrets_inside(path, &t.value),
            _ => {}
        }
    }

    /// YAML tags (`!int 80`) are not part of the format: each is refused, then dropped so that
    /// the value under it is checked as usual (and not reported twice).
    fn reject_tags(&mut self, path: &str, v: &mut Value) {
        if let Value::Tagged(t) = v {
            self.err(
                path,
                format!("YAML tags such as {} are not supported", t.tag),
            );
            let inner = std::mem::replace(&mut t.value, Value::Null);
            *v = inner;
            self.reject_tags(path, v);
            return;
        }
        match v {
            Value::Mapping(m) => {
                for (k, v) in m.iter_mut() {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        other => describe(other),
                    };
                    self.reject_tags(&join(path, &key), v);
                }
            }
            Value::Sequence(s) => {
                for (i, v) in s.iter_mut().enumerate() {
                    self.reject_tags(&format!("{path}[{i}]"), v);
                }
            }
            _ => {}
        }
    }

    fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        self.text(path, v, false)
    }

    /// A string that may span lines (a query written as a YAML block).
    fn lines(&mut self, path: &str, v: &Value) -> Option<String> {
        self.text(path, v, true)
    }

    fn text(&mut self, path: &str, v: &Value, lines: bool) -> Option<String> {
        match v {
            Value::String(s) => {
                if s.len() > MAX_TEXT {
                    self.err(path, format!("longer than {MAX_TEXT} bytes"));
                    None
                } else if s
                    .chars()
                    .any(|c| c.is_control() && c != '\t' && !(lines && c == '\n'))
                {
                    self.err(path, "contains control characters");
                    None
                } else {
                    Some(s.clone())
                }
            }
            other => {
                self.err(path, format!("must be a string, not {}", describe(other)));
                None
            }
        }
    }

    fn dns_label(&mut self, path: &str, what: &'static str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        match label_problem(what, &s) {
            None => Some(s),
            Some(message) => {
                self.err(path, message);
                None
            }
        }
    }

    fn boolean(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.err(
                    path,
                    format!("must be true or false, not {}", describe(other)),
                );
                None
            }
        }
    }

    fn uint(&mut self, path: &str, v: &Value, min: u32, max: u32) -> Option<u32> {
        match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.err(
                    path,
                    format!(
                        "must be a whole number from {min} to {max}, not {}",
                        describe(v)
                    ),
                );
                None
            }
        }
    }

    fn port(&mut self, path: &str, v: &Value) -> Option<u32> {
        match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_PORT)).contains(&n) => u32::try_from(n).ok(),
            _ => {
                self.err(
                    path,
                    format!("must be a TCP port (1 to {MAX_PORT}), not {}", describe(v)),
                );
                None
            }
        }
    }

    fn number(&mut self, path: &str, v: &Value) -> Option<f64> {
        match v.as_f64() {
            Some(n) if n.is_finite() => Some(n),
            _ => {
                self.err(path, format!("must be a number, not {}", describe(v)));
                None
            }
        }
    }

    /// The text of a duration field, in milliseconds.
    fn duration_text(&mut self, path: &str, v: &Value, examples: &str) -> Option<u64> {
        match v {
            Value::String(s) => match parse_duration_ms(s) {
                Ok(ms) => Some(ms),
                Err(e) => {
                    self.err(path, e);
                    None
                }
            },
            other => {
                self.err(
                    path,
                    format!(
                        "must be a duration such as {examples}, not {}",
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    /// A duration in milliseconds, from `min_ms` to `max_ms`.
    fn millis(&mut self, path: &str, v: &Value, min_ms: u32, max_ms: u32) -> Option<u32> {
        let ms = self.duration_text(path, v, "500ms, 30s, 5m or 1h")?;
        let (min, max) = (u64::from(min_ms), u64::from(max_ms));
        if !(min..=max).contains(&ms) {
            let max_text = if max_ms == MAX_SPEC_MILLIS {
                format!("{max_ms}ms (the most a release spec carries)")
            } else {
                human_ms(max)
            };
            self.err(path, out_of_range(ms < min, min, 1, &max_text, v));
            return None;
        }
        u32::try_from(ms).ok()
    }

    /// A duration in whole seconds, from `min_s` to the most the release spec carries.
    fn seconds(&mut self, path: &str, v: &Value, min_s: u32) -> Option<u32> {
        self.seconds_in(path, v, min_s, MAX_SPEC_SECONDS)
    }

    /// A duration in whole seconds, from `min_s` to `max_s`.
    fn seconds_in(&mut self, path: &str, v: &Value, min_s: u32, max_s: u32) -> Option<u32> {
        let ms = self.duration_text(path, v, "30s, 5m or 1h")?;
        if ms % 1000 != 0 {
            self.err(path, "must be a whole number of seconds");
            return None;
        }
        let s = ms / 1000;
        if !(u64::from(min_s)..=u64::from(max_s)).contains(&s) {
            let max_text = if max_s == MAX_SPEC_SECONDS {
                format!("{max_s}s (the most a release spec carries)")
            } else {
                human_ms(u64::from(max_s) * 1000)
            };
            let min_ms = u64::from(min_s) * 1000;
            self.err(path, out_of_range(ms < min_ms, min_ms, 1000, &max_text, v));
            return None;
        }
        u32::try_from(s).ok()
    }

    /// A program and its arguments, run without a shell.
    fn argv(&mut self, path: &str, v: &Value) -> Option<Vec<String>> {
        let Value::Sequence(items) = v else {
            self.err(
                path,
                format!(
                    "must be a list of strings (a program and its arguments), not {}",
                    describe(v)
                ),
            );
            return None;
        };
        if items.is_empty() {
            self.err(path, "must not be empty: name a program to run");
            return None;
        }
        if items.len() > MAX_ARGV {
            self.err(path, format!("more than {MAX_ARGV} arguments"));
            return None;
        }
        let before = self.problems.len();
        let mut argv = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            // Numbers are fine as arguments; everything else must be a string.
            let s = match item {
                Value::Number(n) => Some(n.to_string()),
                other => self.string(&p, other),
            };
            if let Some(s) = s {
                if i == 0 && s.is_empty() {
                    self.err(&p, "the program must not be empty");
                } else if arg_carries_secret(&s) {
                    self.err(&p, SECRET_HINT);
                }
                argv.push(s);
            }
        }
        (self.problems.len() == before).then_some(argv)
    }

    fn http_path(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        if !s.starts_with('/') {
            self.err(path, format!("{s:?} must start with '/'"));
            return None;
        }
        if s.chars().any(char::is_whitespace) {
            self.err(path, format!("{s:?} must not contain spaces"));
            return None;
        }
        if s.contains('#') {
            self.err(
                path,
                format!("{s:?} must not contain '#' (a fragment is never sent to the pod)"),
            );
            return None;
        }
        Some(s)
    }

    fn strategy(&mut self, path: &str, v: &Value) -> Option<Strategy> {
        let s = self.string(path, v)?;
        match parse_strategy(&s) {
            Some(st) => Some(st),
            None => {
                self.err(
                    path,
                    format!("unknown strategy {s:?} (expected rolling, canary or blue-green)"),
                );
                None
            }
        }
    }

    fn config(&mut self, v: &Value) -> Config {
        let mut config = Config::default();
        if matches!(v, Value::Null) {
            self.err(
                "",
                "the file is empty: expected a mapping with environments and apps",
            );
            return config;
        }
        let Some(top) = self.fields("", v, &["environments", "apps", "notifications"]) else {
            return config;
        };
        let mut env_names = BTreeSet::new();
        match top.get("environments") {
            None => self.err("environments", "required: define at least one environment"),
            Some((path, v)) => {
                let envs = self.named(&path, v);
                if envs.is_empty() && matches!(v, Value::Null | Value::Mapping(_)) {
                    self.err(&path, "define at least one environment");
                }
                for (name, p, v) in envs {
                    env_names.insert(name.clone());
                    let label_ok = match label_problem("environment name", &name) {
                        None => true,
                        Some(m) => {
                            self.err(&p, m);
                            false
                        }
                    };
                    if let Some(env) = self.environment(&p, v) {
                        if label_ok {
                            config.environments.insert(name, env);
                        }
                    }
                }
            }
        }
        if let Some((path, v)) = top.get("apps") {
            for (name, p, v) in self.named(&path, v) {
                let label_ok = match label_problem("app name", &name) {
                    None => true,
                    Some(m) => {
                        self.err(&p, m);
                        false
                    }
                };
                if let Some(app) = self.app(&p, v, &env_names) {
                    if label_ok {
                        config.apps.insert(name, app);
                    }
                }
            }
        }
        if let Some((path, v)) = top.get("notifications") {
            let app_names: BTreeSet<String> = match top.get("apps").map(|(_, v)| v) {
                Some(Value::Mapping(m)) => m
                    .keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect(),
                _ => BTreeSet::new(),
            };
            config.notifications = self.notifications(&path, v, &app_names, &env_names);
        }
        config
    }

    /// The `notifications:` section: channels by name (a kind and a link; the URL is the
    /// notifier's secret), and routes naming channels, apps, environments and triggers that exist.
    fn notifications(
        &mut self,
        path: &str,
        v: &Value,
        apps: &BTreeSet<String>,
        envs: &BTreeSet<String>,
    ) -> Notifications {
        let mut out = Notifications::default();
        let Some(f) = self.fields(path, v, &["link", "channels", "routes"]) else {
            return out;
        };
        let default_link = f.get("link").and_then(|(p, v)| self.link(&p, v));
        if let Some((cpath, v)) = f.get("channels") {
            for (name, p, v) in self.named(&cpath, v) {
                let label_ok = match label_problem("channel name", &name) {
                    None => true,
                    Some(m) => {
                        self.err(&p, m);
                        false
                    }
                };
                let Some(cf) = self.fields(&p, v, &["kind", "link"]) else {
                    continue;
                };
                let kind = match cf.get("kind") {
                    None => {
                        self.err(join(&p, "kind"), "required: slack or cloudevents");
                        None
                    }
                    Some((kp, kv)) => {
                        self.string(&kp, kv)
                            .and_then(|k| match k.parse::<ChannelKind>() {
                                Ok(k) => Some(k),
                                Err(e) => {
                                    self.err(&kp, e);
                                    None
                                }
                            })
                    }
                };
                let link = match cf.get("link") {
                    Some((lp, lv)) => self.link(&lp, lv),
                    None => default_link.clone(),
                };
                if let (Some(kind), true) = (kind, label_ok) {
                    out.channels.insert(name, Channel { kind, link });
                }
            }
        }
        let Some((rpath, v)) = f.get("routes") else {
            if !out.channels.is_empty() {
                self.err(
                    join(path, "routes"),
                    "required with channels: say which releases go to which channel",
                );
            }
            return out;
        };
        let Value::Sequence(routes) = v else {
            self.err(
                &rpath,
                format!("must be a list of routes, not {}", describe(v)),
            );
            return out;
        };
        let defined: Vec<String> = match f.get("channels").map(|(_, v)| v) {
            Some(Value::Mapping(m)) => m
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        for (i, v) in routes.iter().enumerate() {
            let p = format!("{rpath}[{i}]");
            let Some(rf) = self.fields(&p, v, &["channel", "apps", "environments", "on"]) else {
                continue;
            };
            let before = self.problems.len();
            let channel = match rf.get("channel") {
                None => {
                    self.err(join(&p, "channel"), "required: the channel to tell");
                    None
                }
                Some((cp, cv)) => self.string(&cp, cv).and_then(|c| {
                    if defined.contains(&c) {
                        Some(c)
                    } else {
                        self.err(
                            &cp,
                            format!(
                                "names channel {c:?}, which is not defined (defined: {})",
                                known(defined.iter())
                            ),
                        );
                        None
                    }
                }),
            };
            let apps = rf
                .get("apps")
                .map(|(ap, av)| self.names_in(&ap, av, "app", apps))
                .unwrap_or_default();
            let environments = rf
                .get("environments")
                .map(|(ep, ev)| self.names_in(&ep, ev, "environment", envs))
                .unwrap_or_default();
            let triggers = match rf.get("on") {
                None => Trigger::ALL.to_vec(),
                Some((tp, tv)) => self.triggers(&tp, tv),
            };
            if let (Some(channel), true) = (channel, self.problems.len() == before) {
                out.routes.push(Route {
                    channel,
                    apps,
                    environments,
                    triggers,
                });
            }
        }
        out
    }

    fn link(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.url(path, v)?;
        if s.is_empty() {
            self.err(path, "must not be empty (leave the field out for no link)");
            return None;
        }
        match metric::variables_in(&s, &LINK_VARIABLES) {
            Ok(_) => Some(s),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// A non-empty list of names, each defined (in `defined`).
    fn names_in(
        &mut self,
        path: &str,
        v: &Value,
        what: &str,
        defined: &BTreeSet<String>,
    ) -> Vec<String> {
        self.choices(path, v, what, &format!("{what} names"), |name| {
            if defined.contains(name) {
                Ok(name.to_owned())
            } else {
                Err(format!(
                    "names {what} {name:?}, which is not defined (defined: {})",
                    known(defined.iter())
                ))
            }
        })
    }

    fn triggers(&mut self, path: &str, v: &Value) -> Vec<Trigger> {
        self.choices(path, v, "trigger", "triggers", |t| t.parse::<Trigger>())
    }

    /// A non-empty list of strings, each made a `T` by `pick` (its error names what is wrong),
    /// each once; `what` is one of them, `list_of` what the list holds.
    fn choices<T: PartialEq>(
        &mut self,
        path: &str,
        v: &Value,
        what: &str,
        list_of: &str,
        pick: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let Value::Sequence(items) = v else {
            self.err(
                path,
                format!("must be a list of {list_of}, not {}", describe(v)),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                path,
                format!("lists no {what}: leave the field out for every {what}"),
            );
        }
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            if let Some(text) = self.string(&p, item) {
                match pick(&text) {
                    Ok(t) if !out.contains(&t) => out.push(t),
                    Ok(_) => {}
                    Err(e) => self.err(&p, e),
                }
            }
        }
        out
    }

    fn environment(&mut self, path: &str, v: &Value) -> Option<Environment> {
        let before = self.problems.len();
        let f = self.fields(path, v, ENV_FIELDS)?;
        let cluster = match f.get("cluster") {
            Some((p, v)) => self.dns_label(&p, "cluster name", v),
            None => {
                self.err(
                    join(path, "cluster"),
                    "required: the cluster (the agents' --cluster) that serves this environment",
                );
                None
            }
        };
        let namespace = match f.get("namespace") {
            Some((p, v)) => self.dns_label(&p, "namespace", v),
            None => {
                self.err(join(path, "namespace"), "required");
                None
            }
        };
        let rollback_on_failure = f
            .get("rollback_on_failure")
            .and_then(|(p, v)| self.boolean(&p, v));
        let strategy = f.get("strategy").and_then(|(p, v)| self.strategy(&p, v));
        if self.problems.len() != before {
            return None;
        }
        Some(Environment {
            cluster: cluster?,
            namespace: namespace?,
            rollback_on_failure: rollback_on_failure.unwrap_or(true),
            strategy,
        })
    }

    fn app(&mut self, path: &str, v: &Value, env_names: &BTreeSet<String>) -> Option<App> {
        let before = self.problems.len();
        let mut allowed = APP_FIELDS.to_vec();
        allowed.push("environments");
        let f = self.fields(path, v, &allowed)?;
        let settings = self.settings(&f);
        let mut environments = BTreeMap::new();
        if let Some((p, v)) = f.get("environments") {
            for (env, ep, v) in self.named(&p, v) {
                if !env_names.contains(&env) {
                    self.err(
                        &ep,
                        format!("no such environment (defined: {})", known(env_names.iter())),
                    );
                }
                if let Some(of) = self.fields(&ep, v, APP_FIELDS) {
                    let s = self.settings(&of);
                    environments.insert(env, s);
                }
            }
        }
        (self.problems.len() == before).then_some(App {
            settings,
            environments,
        })
    }

    fn settings(&mut self, f: &Fields<'_>) -> AppSettings {
        let mut s = AppSettings {
            container: f
                .get("container")
                .and_then(|(p, v)| self.dns_label(&p, "container name", v)),
            port: f.get("port").and_then(|(p, v)| self.port(&p, v)),
            strategy: f.get("strategy").and_then(|(p, v)| self.strategy(&p, v)),
            step_timeout_seconds: f
                .get("step_timeout")
                .and_then(|(p, v)| self.seconds(&p, v, 1)),
            deadline_margin_seconds: f
                .get("deadline_margin")
                .and_then(|(p, v)| self.seconds(&p, v, 1)),
            ingress: f
                .get("ingress")
                .and_then(|(p, v)| self.dns_label(&p, "ingress name", v)),
            http_route: f
                .get("http_route")
                .and_then(|(p, v)| self.dns_label(&p, "HTTPRoute name", v)),
            ..Default::default()
        };
        if let Some((p, v)) = f.get("rolling") {
            if let Some(r) = self.fields(&p, v, &["max_surge", "max_unavailable"]) {
                s.max_surge = r
                    .get("max_surge")
                    .and_then(|(p, v)| int_or_percent(self, &p, v));
                s.max_unavailable = r
                    .get("max_unavailable")
                    .and_then(|(p, v)| int_or_percent(self, &p, v));
            }
        }
        if let Some((p, v)) = f.get("canary") {
            s.canary_steps = self.canary(&p, v);
        }
        if let Some((p, v)) = f.get("blue_green") {
            if let Some(b) = self.fields(
                &p,
                v,
                &[
                    "scale_down_delay",
                    "post_promotion_analysis",
                    "auto_promote",
                ],
            ) {
                s.scale_down_delay_seconds = b
                    .get("scale_down_delay")
                    .and_then(|(p, v)| self.seconds(&p, v, 0));
                s.post_promotion_analysis = b
                    .get("post_promotion_analysis")
                    .and_then(|(p, v)| self.boolean(&p, v));
                s.auto_promote = b.get("auto_promote").and_then(|(p, v)| self.boolean(&p, v));
            }
        }
        if let Some((p, v)) = f.get("analysis") {
            if let Some(a) = self.fields(&p, v, &["duration", "interval", "failure_limit"]) {
                // Not 0: the spec's 0 is "unset", which the health-checker reads as its own
                // default, not as no analysis.
                s.analysis_duration_seconds = a
                    .get("duration")
                    .and_then(|(p, v)| self.seconds_in(&p, v, 1, MAX_ANALYSIS_SECONDS));
                s.analysis_interval_seconds = a
                    .get("interval")
                    .and_then(|(p, v)| self.seconds_in(&p, v, 1, MAX_ANALYSIS_SECONDS));
                s.failure_limit = a
                    .get("failure_limit")
                    .and_then(|(p, v)| self.uint(&p, v, 0, MAX_FAILURE_LIMIT));
            }
        }
        if let Some((p, v)) = f.get("checks") {
            s.checks = self.checks(&p, v);
        }
        if let Some((p, v)) = f.get("build") {
            if let Some(b) = self.fields(&p, v, &["argv", "timeout"]) {
                match b.get("argv") {
                    Some((p, v)) => s.build_argv = self.argv(&p, v),
                    None => self.err(
                        join(&p, "argv"),
                        "required: the build command (a program and its arguments)",
                    ),
                }
                s.build_timeout_seconds =
                    b.get("timeout").and_then(|(p, v)| self.seconds(&p, v, 1));
            }
        }
        s
    }

    fn canary(&mut self, path: &str, v: &Value) -> Option<Vec<CanaryStep>> {
        let f = self.fields(path, v, &["steps"])?;
        let Some((path, v)) = f.get("steps") else {
            self.err(join(path, "steps"), "required: the canary's steps");
            return None;
        };
        let Value::Sequence(items) = v else {
            self.err(
                &path,
                format!("must be a list of steps, not {}", describe(v)),
            );
            return None;
        };
        if items.is_empty() {
            self.err(&path, "must not be empty");
            return None;
        }
        if items.len() > MAX_STEPS {
            self.err(&path, format!("more than {MAX_STEPS} steps"));
            return None;
        }
        let before = self.problems.len();
        let mut steps = Vec::new();
        let mut last: Option<u32> = None;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(sf) = self.fields(&p, item, &["weight", "pause", "analysis"]) else {
                continue;
            };
            let mut step = CanaryStep::default();
            match sf.get("weight") {
                None => self.err(
                    join(&p, "weight"),
                    "required: the share of traffic, 1 to 100",
                ),
                Some((wp, wv)) => {
                    if let Some(w) = self.uint(&wp, wv, 1, 100) {
                        if let Some(prev) = last.filter(|prev| w <= *prev) {
                            self.err(
                                &wp,
                                format!(
                                    "{w} is not above the previous step's {prev}: weights must increase"
                                ),
                            );
                        }
                        last = Some(w);
                        step.weight = w;
                    }
                }
            }
            if let Some((ap, av)) = sf.get("analysis") {
                if let Some(a) = self.fields(&ap, av, &["duration", "interval", "failure_limit"]) {
                    // Not 0: a step's 0 means "the app's", not no analysis.
                    step.analysis = Some(AnalysisParams {
                        duration_seconds: a
                            .get("duration")
                            .and_then(|(p, v)| self.seconds_in(&p, v, 1, MAX_ANALYSIS_SECONDS))
                            .unwrap_or(0),
                        interval_seconds: a
                            .get("interval")
                            .and_then(|(p, v)| self.seconds_in(&p, v, 1, MAX_ANALYSIS_SECONDS))
                            .unwrap_or(0),
                        failure_limit: a
                            .get("failure_limit")
                            .and_then(|(p, v)| self.uint(&p, v, 0, MAX_FAILURE_LIMIT))
                            .unwrap_or(0),
                    });
                }
            }
            if let Some((pp, pv)) = sf.get("pause") {
                if pv.as_str() == Some("until-promoted") {
                    step.pause_until_promoted = true;
                } else if let Value::String(_) = pv {
                    if let Some(s) = self.seconds(&pp, pv, 0) {
                        step.pause_seconds = s;
                    }
                } else {
                    self.err(
                        &pp,
                        format!(
                            "must be a duration such as 5m, or until-promoted, not {}",
                            describe(pv)
                        ),
                    );
                }
            }
            steps.push(step);
        }
        (self.problems.len() == before).then_some(steps)
    }

    fn checks(&mut self, path: &str, v: &Value) -> Option<Vec<Check>> {
        let items = match v {
            Value::Null => return Some(Vec::new()),
            Value::Sequence(items) => items,
            other => {
                self.err(
                    path,
                    format!("must be a list of checks, not {}", describe(other)),
                );
                return None;
            }
        };
        if items.len() > MAX_CHECKS {
            self.err(path, format!("more than {MAX_CHECKS} checks"));
            return None;
        }
        let before = self.problems.len();
        let mut checks = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let allowed: Vec<&str> = std::iter::once("name").chain(CHECK_KINDS).collect();
            let Some(cf) = self.fields(&p, item, &allowed) else {
                continue;
            };
            let name = match cf.get("name") {
                None => {
                    self.err(join(&p, "name"), "required");
                    None
                }
                Some((np, nv)) => self.check_name(&np, nv).inspect(|n| {
                    if let Some(first) = names.get(n) {
                        self.err(&np, format!("{n:?} is already the name of {path}[{first}]"));
                    } else {
                        names.insert(n.clone(), i);
                    }
                }),
            };
            let kinds: Vec<&str> = CHECK_KINDS
                .into_iter()
                .filter(|k| cf.get(k).is_some())
                .collect();
            let kind = match kinds.as_slice() {
                [] => {
                    self.err(
                        &p,
                        "needs one of http, latency, smoke, prometheus or webhook",
                    );
                    None
                }
                [_] => {
                    if let Some((kp, kv)) = cf.get("http") {
                        self.http(&kp, kv).map(check::Kind::Http)
                    } else if let Some((kp, kv)) = cf.get("latency") {
                        self.latency(&kp, kv).map(check::Kind::Latency)
                    } else if let Some((kp, kv)) = cf.get("smoke") {
                        self.smoke(&kp, kv).map(check::Kind::Smoke)
                    } else if let Some((kp, kv)) = cf.get("prometheus") {
                        self.prometheus(&kp, kv).map(check::Kind::Prometheus)
                    } else if let Some((kp, kv)) = cf.get("webhook") {
                        self.webhook(&kp, kv).map(check::Kind::Webhook)
                    } else {
                        None
                    }
                }
                many => {
                    self.err(
                        &p,
                        format!("has {}: a check has exactly one kind", many.join(" and ")),
                    );
                    None
                }
            };
            if let (Some(name), Some(kind)) = (name, kind) {
                checks.push(Check {
                    name,
                    kind: Some(kind),
                });
            }
        }
        (self.problems.len() == before).then_some(checks)
    }

    fn check_name(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Some(s)
        } else {
            self.err(
                path,
                format!("{s:?} is not a check name: use 1 to 63 letters, digits, '-', '_' or '.'"),
            );
            None
        }
    }

    fn http(&mut self, path: &str, v: &Value) -> Option<HttpCheck> {
        let before = self.problems.len();
        let f = self.fields(
            path,
            v,
            &[
                "path",
                "expect_status",
                "body_contains",
                "timeout",
                "retries",
                "interval",
                "url",
                "port",
            ],
        )?;
        let check = HttpCheck {
            path: f
                .get("path")
                .and_then(|(p, v)| self.http_path(&p, v))
                .unwrap_or_else(|| "/".into()),
            expect_status: f
                .get("expect_status")
                .and_then(|(p, v)| self.uint(&p, v, 100, 599))
                .unwrap_or(DEFAULT_HTTP_STATUS),
            body_contains: f
                .get("body_contains")
                .and_then(|(p, v)| self.string(&p, v))
                .unwrap_or_default(),
            timeout_ms: f
                .get("timeout")
                .and_then(|(p, v)| self.millis(&p, v, 1, millis_of(MAX_REQUEST_TIMEOUT)))
                .unwrap_or(DEFAULT_HTTP_TIMEOUT_MS),
            retries: f
                .get("retries")
                .and_then(|(p, v)| self.uint(&p, v, 0, MAX_HTTP_RETRIES))
                .unwrap_or(DEFAULT_HTTP_RETRIES),
            // The health-checker bounds the pause between retries as it bounds a request.
            interval_ms: f
                .get("interval")
                .and_then(|(p, v)| self.millis(&p, v, 1, millis_of(MAX_REQUEST_TIMEOUT)))
                .unwrap_or(DEFAULT_HTTP_INTERVAL_MS),
            url: f
                .get("url")
                .and_then(|(p, v)| self.url(&p, v))
                .unwrap_or_default(),
            port: f
                .get("port")
                .and_then(|(p, v)| self.port(&p, v))
                .unwrap_or(0),
        };
        (self.problems.len() == before).then_some(check)
    }

    fn url(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        if s.is_empty() {
            return Some(s);
        }
        let Some(rest) = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
        else {
            self.err(path, format!("{s:?} must be an http:// or https:// URL"));
            return None;
        };
        if s.len() > MAX_URL_BYTES {
            self.err(
                path,
                format!(
                    "is {} bytes long: a check's URL may have at most {MAX_URL_BYTES}",
                    s.len()
                ),
            );
            return None;
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            self.err(path, format!("has credentials in it, which {SECRET_HINT}"));
            return None;
        }
        if authority.is_empty() || s.chars().any(char::is_whitespace) {
            self.err(path, format!("{s:?} is not a URL with a host"));
            return None;
        }
        Some(s)
    }

    fn latency(&mut self, path: &str, v: &Value) -> Option<LatencyCheck> {
        let before = self.problems.len();
        let f = self.fields(
            path,
            v,
            &[
                "path",
                "requests",
                "percentile",
                "threshold",
                "max_error_rate",
                "port",
            ],
        )?;
        let percentile = match f.get("percentile") {
            None => DEFAULT_LATENCY_PERCENTILE,
            Some((p, v)) => match self.number(&p, v) {
                Some(n) if n > 0.0 && n <= 100.0 => n,
                Some(n) => {
                    self.err(&p, format!("must be in (0, 100], not {n}"));
                    0.0
                }
                None => 0.0,
            },
        };
        let max_error_rate = match f.get("max_error_rate") {
            None => 0.0,
            Some((p, v)) => match self.number(&p, v) {
                Some(n) if (0.0..=1.0).contains(&n) => n,
                Some(n) => {
                    self.err(
                        &p,
                        format!("must be in [0, 1] (a share of requests), not {n}"),
                    );
                    0.0
                }
                None => 0.0,
            },
        };
        let threshold_ms = match f.get("threshold") {
            None => {
                self.err(
                    join(path, "threshold"),
                    "required: the latency the percentile must stay under, such as 250ms",
                );
                0
            }
            Some((p, v)) => self.millis(&p, v, 1, MAX_SPEC_MILLIS).unwrap_or(0),
        };
        let check = LatencyCheck {
            path: f
                .get("path")
                .and_then(|(p, v)| self.http_path(&p, v))
                .unwrap_or_else(|| "/".into()),
            requests: f
                .get("requests")
                .and_then(|(p, v)| self.uint(&p, v, 1, MAX_LATENCY_REQUESTS))
                .unwrap_or(DEFAULT_LATENCY_REQUESTS),
            percentile,
            threshold_ms,
            max_error_rate,
            port: f
                .get("port")
                .and_then(|(p, v)| self.port(&p, v))
                .unwrap_or(0),
        };
        (self.problems.len() == before).then_some(check)
    }

    fn prometheus(&mut self, path: &str, v: &Value) -> Option<PrometheusCheck> {
        let before = self.problems.len();
        let f = self.fields(path, v, &[&["address", "query"], JUDGEMENT_FIELDS].concat())?;
        let address = match f.get("address") {
            None => {
                self.err(
                    join(path, "address"),
                    "required: the Prometheus server's URL, such as http://prometheus:9090",
                );
                None
            }
            Some((p, v)) => self.url(&p, v),
        };
        let query = match f.get("query") {
            None => {
                self.err(join(path, "query"), "required: the PromQL query to judge");
                None
            }
            Some((p, v)) => self
                .lines(&p, v)
                .and_then(|q| match metric::check_query(&q) {
                    Ok(()) => Some(q),
                    Err(e) => {
                        self.err(&p, e);
                        None
                    }
                }),
        };
        let judgement = self.judgement(path, &f);
        if self.problems.len() != before {
            return None;
        }
        Some(PrometheusCheck {
            address: address?,
            query: query?,
            judgement,
        })
    }

    fn webhook(&mut self, path: &str, v: &Value) -> Option<WebhookCheck> {
        let before = self.problems.len();
        let f = self.fields(path, v, &[&["url", "field"], JUDGEMENT_FIELDS].concat())?;
        let url = match f.get("url") {
            None => {
                self.err(
                    join(path, "url"),
                    "required: where the release's context is POSTed",
                );
                None
            }
            Some((p, v)) => self.url(&p, v).filter(|u| !u.is_empty()),
        };
        let field = match f.get("field") {
            None => {
                self.err(
                    join(path, "field"),
                    "required: the answer's JSON field to judge, such as result.score",
                );
                None
            }
            Some((p, v)) => self
                .string(&p, v)
                .and_then(|s| match metric::field_path(&s) {
                    Ok(_) => Some(s),
                    Err(e) => {
                        self.err(&p, e);
                        None
                    }
                }),
        };
        let judgement = self.judgement(path, &f);
        if self.problems.len() != before {
            return None;
        }
        Some(WebhookCheck {
            url: url?,
            field: field?,
            judgement,
        })
    }

    /// The condition, aggregate, error handling and timeout of a metric check.
    fn judgement(&mut self, path: &str, f: &Fields<'_>) -> Option<MetricJudgement> {
        let condition = match f.get("condition") {
            None => {
                self.err(
                    join(path, "condition"),
                    "required: what the value must meet, such as \"result < 0.01\"",
                );
                None
            }
            Some((p, v)) => self
                .string(&p, v)
                .and_then(|c| match metric::Condition::parse(&c) {
                    Ok(parsed) => Some(parsed.to_string()),
                    Err(e) => {
                        self.err(&p, e);
                        None
                    }
                }),
        };
        let aggregate = f.get("aggregate").and_then(|(p, v)| {
            self.string(&p, v)
                .and_then(|a| match metric::Aggregate::parse(&a) {
                    Ok(parsed) => Some(parsed),
                    Err(e) => {
                        self.err(&p, e);
                        None
                    }
                })
        });
        let error_limit = f
            .get("error_limit")
            .and_then(|(p, v)| self.uint(&p, v, 0, metric::MAX_ERROR_LIMIT))
            .unwrap_or(metric::DEFAULT_ERROR_LIMIT);
        let inconclusive_on_error = match f.get("on_error") {
            None => false,
            Some((p, v)) => match self.string(&p, v).as_deref() {
                Some("fail") => false,
                Some("inconclusive") => true,
                Some(other) => {
                    self.err(&p, format!("{other:?} is not fail or inconclusive"));
                    false
                }
                None => false,
            },
        };
        let timeout_ms = f
            .get("timeout")
            .and_then(|(p, v)| self.millis(&p, v, 1, millis_of(MAX_REQUEST_TIMEOUT)))
            .unwrap_or(DEFAULT_METRIC_TIMEOUT_MS);
        Some(MetricJudgement {
            condition: condition?,
            aggregate: match aggregate.unwrap_or_default() {
                metric::Aggregate::Each => String::new(),
                other => other.name().to_owned(),
            },
            error_limit,
            inconclusive_on_error,
            timeout_ms,
        })
    }

    fn smoke(&mut self, path: &str, v: &Value) -> Option<SmokeCheck> {
        let before = self.problems.len();
        let f = self.fields(path, v, &["argv", "timeout"])?;
        let argv = match f.get("argv") {
            None => {
                self.err(
                    join(path, "argv"),
                    "required: the command to run (a program and its arguments)",
                );
                None
            }
            Some((p, v)) => self.argv(&p, v),
        };
        let timeout_ms = f
            .get("timeout")
            .and_then(|(p, v)| self.millis(&p, v, 1, millis_of(MAX_SMOKE_TIMEOUT)))
            .unwrap_or(DEFAULT_SMOKE_TIMEOUT_MS);
        if self.problems.len() != before {
            return None;
        }
        Some(SmokeCheck {
            argv: argv?,
            timeout_ms,
        })
    }
}

fn int_or_percent(w: &mut Walk, path: &str, v: &Value) -> Option<String> {
    let bad = |w: &mut Walk| {
        w.err(
            path,
            format!(
                "must be a whole number or a percentage from 0% to 100% (such as 1 or \"25%\"), not {}",
                describe(v)
            ),
        );
        None
    };
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(n) if n <= 10_000 => Some(n.to_string()),
            _ => bad(w),
        },
        Value::String(s) => {
            let (digits, percent) = match s.strip_suffix('%') {
                Some(d) => (d, true),
                None => (s.as_str(), false),
            };
            let ok = !digits.is_empty()
                && digits.len() <= 5
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits.parse::<u32>().is_ok_and(|n| !percent || n <= 100);
            if ok {
                // Normalised ("007%" → "7%") so that specs compare equal.
                digits.parse::<u32>().ok().map(|n| {
                    if percent {
                        format!("{n}%")
                    } else {
                        n.to_string()
                    }
                })
            } else {
                bad(w)
            }
        }
        _ => bad(w),
    }
}

fn arg_carries_secret(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    lower.split_once('=').is_some_and(|(k, v)| {
        !v.is_empty() && !v.starts_with('{') && looks_like_secret(k) && !k.contains(' ')
    })
}

fn label_problem(what: &'static str, value: &str) -> Option<String> {
    match validate_dns_label(what, value) {
        Ok(()) => None,
        Err(NameError::Empty { .. }) => Some(format!("{what} must not be empty")),
        Err(NameError::TooLong { .. }) => Some("not a DNS label: longer than 63 characters".into()),
        Err(_) => Some(
            "not a DNS label: use lowercase letters, digits and '-', starting with a letter and \
             ending with a letter or digit"
                .into(),
        ),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() <= 40 => format!("{s:?}"),
        Value::String(_) => "a long string".into(),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a sum of them (`1m30s`), into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a duration such as 500ms, 30s, 5m or 1h");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

/// A duration as people write it in the file: `500ms`, `1m30s`, `24h`, `0s`.
fn human_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    [(h, "h"), (m, "m"), (s, "s"), (milli, "ms")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// A limit of the spec as a milliseconds field carries it.
fn millis_of(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(MAX_SPEC_MILLIS)
}

/// What a duration outside its range is told: the range, in the units of the file. `unit_ms` is
/// the field's resolution (1 for milliseconds, 1000 for seconds).
fn out_of_range(too_short: bool, min_ms: u64, unit_ms: u64, max_text: &str, v: &Value) -> String {
    let min_text = human_ms(min_ms);
    if too_short && min_ms == unit_ms {
        format!("must be longer than 0: from {min_text} to {max_text}")
    } else {
        format!("must be from {min_text} to {max_text}, not {}", describe(v))
    }
}
