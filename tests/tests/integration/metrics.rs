//! The metrics agent as a real process against a real nats-server: a scripted set of releases,
//! published by the owners of their events with chosen times, gives exact figures through
//! `baton metrics` and `baton history`; a restarted agent rebuilds the same figures from the
//! stream; bad requests and a missing agent get clear errors; every query of the Grafana dashboard
//! reads metrics the agent exports, and a real Prometheus scraping it runs them all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use baton_core::bus::Bus;
use baton_core::event::Event;
use baton_core::ids::EventKey;
use baton_core::names::ReleaseId;
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};
use baton_sandbox::PrometheusServer;
use baton_tests::harness::trial;
use baton_tests::{dashboard, eventually, sample_spec, target_bin, AgentProcess, BusEnv};
use libtest_mimic::Trial;
use serde_json::Value;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        scripted_releases_give_exact_figures_and_a_restarted_agent_gives_the_same,
        the_history_lists_releases_newest_first_with_their_status,
        a_bad_request_gets_a_clear_error_and_the_agent_keeps_answering,
        without_a_metrics_agent_the_cli_says_so_and_exits_1,
        the_metrics_agent_keeps_answering_long_after_it_started,
        every_query_of_the_dashboard_names_a_metric_the_agents_export_and_prometheus_runs_it,
    ]
}

const S: i64 = 1000;
const MIN: i64 = 60 * S;
const H: i64 = 60 * MIN;

/// The owners' connections: each event is published by the only user allowed to.
struct Owners {
    cli: Bus,
    builder: Bus,
    deployer: Bus,
    health: Bus,
    rollback: Bus,
}

impl Owners {
    async fn connect(env: &BusEnv) -> Result<Owners> {
        Ok(Owners {
            cli: env.bus("cli").await?,
            builder: env.bus("builder").await?,
            deployer: env.bus("deployer").await?,
            health: env.bus("health-checker").await?,
            rollback: env.bus("rollback").await?,
        })
    }
}

fn timestamp(ms: i64) -> baton_proto::Timestamp {
    baton_proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// One release being told on the bus.
struct Release<'a> {
    owners: &'a Owners,
    id: ReleaseId,
    env: &'static str,
    app: &'static str,
    published: usize,
}

impl<'a> Release<'a> {
    async fn publish(
        &mut self,
        bus: &Bus,
        at_ms: i64,
        key: EventKey<'_>,
        payload: Payload,
    ) -> Result<()> {
        let mut event = Event::new(self.id, key, payload, bus.source(), "alice", "");
        event.envelope.time = Some(timestamp(at_ms));
        let subject = EventSubject::new(
            self.env.parse()?,
            self.app.parse()?,
            self.id,
            event.event_type,
        );
        let (_, duplicate) = bus.publish(&subject, &event).await?;
        ensure!(!duplicate, "{subject} was published twice");
        self.published += 1;
        Ok(())
    }

    /// `release.requested` (with a commit time when given) and the build.
    async fn request(
        owners: &'a Owners,
        env: &'static str,
        app: &'static str,
        at_ms: i64,
        commit_ms: Option<i64>,
    ) -> Result<Release<'a>> {
        let mut r = Release {
            owners,
            id: ReleaseId::generate(),
            env,
            app,
            published: 0,
        };
        let mut spec = sample_spec(env, app, &format!("{app}:v1"));
        if let Some(commit) = commit_ms {
            spec.commit = "0123abc".into();
            spec.commit_time = Some(timestamp(commit));
        }
        r.publish(
            &owners.cli,
            at_ms,
            EventKey::Once,
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        )
        .await?;
        r.publish(
            &owners.builder,
            at_ms + S,
            EventKey::Once,
            Payload::BuildStarted(BuildStarted {
                image: format!("{app}:v1"),
                backend: "resolve".into(),
            }),
        )
        .await?;
        r.publish(
            &owners.builder,
            at_ms + 2 * S,
            EventKey::Once,
            Payload::BuildSucceeded(BuildSucceeded {
                image_ref: format!("{app}@sha256:{}", "a".repeat(64)),
                digest: format!("sha256:{}", "a".repeat(64)),
                log_object: String::new(),
            }),
        )
        .await?;
        let deployer = &owners.deployer;
        r.publish(
            deployer,
            at_ms + 3 * S,
            EventKey::Once,
            Payload::DeployStarted(DeployStarted {
                strategy: Strategy::Rolling as i32,
                workload: app.into(),
                replicas: 2,
                ..Default::default()
            }),
        )
        .await?;
        r.publish(
            deployer,
            at_ms + 4 * S,
            EventKey::Step(1),
            Payload::DeployStepStarted(DeployStepStarted {
                step: 1,
                weight: 100,
                ..Default::default()
            }),
        )
        .await?;
        Ok(r)
    }

    async fn succeed(mut self, end_ms: i64) -> Result<usize> {
        let o = self.owners;
        self.publish(
            &o.deployer,
            end_ms,
            EventKey::Once,
            Payload::ReleaseSucceeded(ReleaseSucceeded {
                image_ref: format!("{}@sha256:{}", self.app, "a".repeat(64)),
            }),
        )
        .await?;
        Ok(self.published)
    }

    /// The deployment fails and nothing is rolled back: `release.failed`.
    async fn fail(mut self, failed_ms: i64, end_ms: i64) -> Result<usize> {
        let o = self.owners;
        self.publish(
            &o.deployer,
            failed_ms,
            EventKey::Once,
            Payload::DeployFailed(DeployFailed {
                step: 1,
                reason: "new pods crash-loop".into(),
                kind: FailureKind::CrashLoop as i32,
                cluster_changed: true,
            }),
        )
        .await?;
        self.publish(
            &o.rollback,
            end_ms,
            EventKey::Once,
            Payload::ReleaseFailed(ReleaseFailed {
                reason: "new pods crash-loop; rollback_on_failure is off".into(),
            }),
        )
        .await?;
        Ok(self.published)
    }

    /// The analysis fails and the rollback agent restores the previous revision.
    async fn roll_back(mut self, failed_ms: i64, end_ms: i64) -> Result<usize> {
        let o = self.owners;
        self.publish(
            &o.health,
            failed_ms,
            EventKey::Step(1),
            Payload::AnalysisFailed(AnalysisFailed {
                step: 1,
                reason: "health check failed: 500 from 2 of 2 pods".into(),
                ..Default::default()
            }),
        )
        .await?;
        self.publish(
            &o.rollback,
            failed_ms + S,
            EventKey::Once,
            Payload::RollbackStarted(RollbackStarted {
                reason: "analysis failed".into(),
                ..Default::default()
            }),
        )
        .await?;
        self.publish(
            &o.rollback,
            end_ms,
            EventKey::Once,
            Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: "health check failed".into(),
            }),
        )
        .await?;
        Ok(self.published)
    }
}

/// A manual rollback of `app` in `env`, requested at `at_ms` and done at `end_ms`.
async fn manual_rollback(
    owners: &Owners,
    env: &'static str,
    app: &'static str,
    at_ms: i64,
    end_ms: i64,
) -> Result<usize> {
    let mut r = Release {
        owners,
        id: ReleaseId::generate(),
        env,
        app,
        published: 0,
    };
    r.publish(
        &owners.cli,
        at_ms,
        EventKey::Once,
        Payload::RollbackRequested(RollbackRequested {
            app: app.into(),
            env: env.into(),
            namespace: app.into(),
            reason: "the last release broke checkout".into(),
            ..Default::default()
        }),
    )
    .await?;
    r.publish(
        &owners.rollback,
        at_ms + S,
        EventKey::Once,
        Payload::RollbackStarted(RollbackStarted::default()),
    )
    .await?;
    r.publish(
        &owners.rollback,
        end_ms,
        EventKey::Once,
        Payload::ReleaseRolledBack(ReleaseRolledBack {
            reason: "rolled back on request".into(),
        }),
    )
    .await?;
    Ok(r.published)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The start of the script: three days ago, on a whole second.
fn base() -> i64 {
    (now_ms() - 3 * 24 * H) / S * S
}

/// The first part of the script: staging/web, told before the agent starts.
///
/// | release | outcome | figures |
/// |---|---|---|
/// | A | succeeded after 10 min, commit 1 h before the request | lead 4200 s, deploy 600 s |
/// | B | analysis failed at +5 min, rolled back at +7 min | restore 120 s |
/// | C | deploy failed at +1 min, failed at +2 min | restored by D: 3840 s |
async fn script_before(o: &Owners, base: i64) -> Result<usize> {
    let mut n = 0;
    n += Release::request(o, "staging", "web", base, Some(base - H))
        .await?
        .succeed(base + 10 * MIN)
        .await?;
    n += Release::request(o, "staging", "web", base + H, None)
        .await?
        .roll_back(base + H + 5 * MIN, base + H + 7 * MIN)
        .await?;
    n += Release::request(o, "staging", "web", base + 2 * H, None)
        .await?
        .fail(base + 2 * H + MIN, base + 2 * H + 2 * MIN)
        .await?;
    Ok(n)
}

/// The rest, told while the agent runs.
///
/// | release | outcome | figures |
/// |---|---|---|
/// | D staging/web | succeeded at +5 min, commit 30 min before the request | lead 2100 s, deploy 300 s |
/// | E prod/api | succeeded at +1 min, no commit time | deploy 60 s |
/// | F prod/api | deploy failed at +30 s, failed at +40 s | restored by M: 3620 s |
/// | M prod/api | manual rollback, done at +50 s | a rollback, not a deployment |
/// | G staging/web | in flight | |
async fn script_after(o: &Owners, base: i64) -> Result<usize> {
    let mut n = 0;
    n += Release::request(
        o,
        "staging",
        "web",
        base + 3 * H,
        Some(base + 2 * H + 30 * MIN),
    )
    .await?
    .succeed(base + 3 * H + 5 * MIN)
    .await?;
    n += Release::request(o, "prod", "api", base + 4 * H, None)
        .await?
        .succeed(base + 4 * H + MIN)
        .await?;
    n += Release::request(o, "prod", "api", base + 5 * H, None)
        .await?
        .fail(base + 5 * H + 30 * S, base + 5 * H + 40 * S)
        .await?;
    n += manual_rollback(o, "prod", "api", base + 6 * H, base + 6 * H + 50 * S).await?;
    let g = Release::request(o, "staging", "web", base + 7 * H, None).await?;
    n += g.published;
    Ok(n)
}

/// Runs `baton` with the bus's environment: (exit code, stdout, stderr).
async fn baton(env: &BusEnv, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(target_bin("baton")?)
            .args(args)
            .envs(env.process_env())
            .output(),
    )
    .await
    .with_context(|| format!("baton {args:?} did not end within 30s"))??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// `baton <args> --output json`, which must succeed.
async fn baton_json(env: &BusEnv, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (code, out, err) = baton(env, &all).await?;
    ensure!(code == 0, "baton {all:?} exited {code}: {err}");
    serde_json::from_str(&out).with_context(|| format!("baton {all:?} printed {out:?}"))
}

/// The figures of a report without its instants (which move with the clock).
fn figures(mut report: Value) -> Value {
    if let Some(o) = report.as_object_mut() {
        o.remove("from");
        o.remove("to");
    }
    report
}

/// The metrics agent, once it has folded the whole script.
async fn start_with_everything_told(env: &BusEnv) -> Result<AgentProcess> {
    let owners = Owners::connect(env).await?;
    let base = base();
    let mut events = script_before(&owners, base).await?;
    // The agent starts after part of the history was told: it reads it from the stream…
    let agent = AgentProcess::start(env, "metrics", &[], env.sandbox.dir()).await?;
    // …and follows what comes next live.
    events += script_after(&owners, base).await?;
    agent
        .wait_metric(
            "baton_history_events_total",
            events as f64,
            Duration::from_secs(30),
        )
        .await?;
    Ok(agent)
}

/// The value of one series in the exposition.
fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The sample lines of the duration histograms.
fn histogram_lines(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| {
            [
                "baton_release_duration_seconds",
                "baton_step_duration_seconds",
                "baton_analysis_duration_seconds",
                "baton_failure_to_rollback_seconds",
            ]
            .iter()
            .any(|h| l.starts_with(h))
        })
        .map(str::to_owned)
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

async fn scripted_releases_give_exact_figures_and_a_restarted_agent_gives_the_same() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut agent = start_with_everything_told(&env).await?;

    let report = baton_json(&env, &["metrics", "--window", "30d"]).await?;
    let expect = |path: &str, value: Value| -> Result<()> {
        let got = report.pointer(path).cloned().unwrap_or(Value::Null);
        let same = match (got.as_f64(), value.as_f64()) {
            (Some(a), Some(b)) => close(a, b),
            _ => got == value,
        };
        ensure!(
            same,
            "{path} is {got}, expected {value}; the report:\n{report:#}"
        );
        Ok(())
    };
    expect("/window_seconds", 2_592_000.into())?;
    expect("/releases/ended", 6.into())?;
    expect("/releases/succeeded", 3.into())?;
    expect("/releases/failed", 2.into())?;
    expect("/releases/rolled_back", 1.into())?;
    expect("/releases/in_flight", 1.into())?;
    expect("/manual_rollbacks/completed", 1.into())?;
    expect("/deployment_frequency/deployments", 3.into())?;
    expect("/deployment_frequency/per_day", 0.1.into())?;
    expect("/lead_time/count", 2.into())?;
    expect("/lead_time/mean_seconds", 3150.0.into())?;
    expect("/lead_time/median_seconds", 3150.0.into())?;
    expect("/change_failure_rate", 0.5.into())?;
    expect("/success_rate", 0.5.into())?;
    expect("/rollback_rate", (2.0 / 6.0).into())?;
    // B: 120 s; C, restored by D: 3840 s; F, restored by the manual rollback M: 3620 s.
    expect("/time_to_restore/count", 3.into())?;
    expect(
        "/time_to_restore/mean_seconds",
        ((120.0 + 3840.0 + 3620.0) / 3.0).into(),
    )?;
    expect("/time_to_restore/median_seconds", 3620.0.into())?;
    expect("/time_to_restore/unrestored", 0.into())?;
    expect("/deployment_time/count", 3.into())?;
    expect("/deployment_time/mean_seconds", 320.0.into())?;
    expect("/deployment_time/median_seconds", 300.0.into())?;

    // Filtered to one environment.
    let prod = baton_json(&env, &["metrics", "--env", "prod", "--window", "7d"]).await?;
    ensure!(prod["releases"]["ended"] == 2, "prod: {prod:#}");
    ensure!(prod["change_failure_rate"] == 0.5, "prod: {prod:#}");
    ensure!(prod["rollback_rate"] == 0.5, "prod: {prod:#}");
    ensure!(
        prod["time_to_restore"]["median_seconds"] == 3620.0,
        "prod: {prod:#}"
    );
    ensure!(
        prod["deployment_frequency"]["per_day"]
            .as_f64()
            .is_some_and(|f| close(f, 1.0 / 7.0)),
        "prod: {prod:#}"
    );
    // A window that ends before the script began holds none of it.
    let hour = baton_json(&env, &["metrics", "--window", "1h"]).await?;
    ensure!(
        hour["releases"]["ended"] == 0 && hour["change_failure_rate"].is_null(),
        "1h: {hour:#}"
    );

    // The same figures on /metrics, per environment and app.
    let web = r#"{env="staging",app="web"}"#;
    for (series, value) in [
        (format!("baton_change_failure_rate{web}"), 0.5),
        (
            format!("baton_time_to_restore_seconds{web}"),
            (120.0 + 3840.0) / 2.0,
        ),
        (format!("baton_lead_time_seconds{web}"), 3150.0),
        (
            format!("baton_deployment_frequency_per_day{web}"),
            2.0 / 30.0,
        ),
        (format!("baton_releases_in_flight{web}"), 1.0),
        (
            r#"baton_releases_total{env="staging",app="web",status="rolled_back"}"#.into(),
            1.0,
        ),
        (
            r#"baton_releases_total{env="prod",app="api",status="failed"}"#.into(),
            1.0,
        ),
        (r#"baton_rollback_rate{env="prod",app="api"}"#.into(), 0.5),
    ] {
        let got = agent.metric(&series).await?;
        ensure!(close(got, value), "{series} is {got}, expected {value}");
    }

    // The durations are histograms: B's rollback took 2 min from its failure; C and F failed
    // with no rollback, so they have none.
    let text = agent.metrics().await?;
    let web = r#"env="staging",app="web",strategy="rolling""#;
    for (series, value) in [
        (
            format!(r#"baton_release_duration_seconds_count{{{web},outcome="succeeded"}}"#),
            2.0,
        ),
        (
            format!(r#"baton_release_duration_seconds_sum{{{web},outcome="succeeded"}}"#),
            900.0,
        ),
        (
            format!(r#"baton_failure_to_rollback_seconds_sum{{{web},outcome="rolled_back"}}"#),
            120.0,
        ),
        (
            format!(
                r#"baton_failure_to_rollback_seconds_bucket{{le="120.0",{web},outcome="rolled_back"}}"#
            ),
            1.0,
        ),
    ] {
        let got = value_of(&text, &series);
        ensure!(
            got == Some(value),
            "{series} is {got:?}, expected {value}:\n{text}"
        );
    }
    ensure!(
        !text.contains("baton_failure_to_rollback_seconds_count{env=\"prod\""),
        "a failure with no rollback has a failure-to-rollback figure:\n{text}"
    );
    let timings = histogram_lines(&text);
    let events = agent.metric("baton_history_events_total").await?;

    // Killed without warning and started again, it rebuilds everything from the stream.
    agent.process.kill9().await?;
    let agent = AgentProcess::start(&env, "metrics", &[], env.sandbox.dir()).await?;
    let again = baton_json(&env, &["metrics", "--window", "30d"]).await?;
    ensure!(
        figures(again.clone()) == figures(report.clone()),
        "the report after a restart differs:\nbefore {report:#}\nafter {again:#}"
    );
    // The same histograms, observation for observation.
    agent
        .wait_metric(
            "baton_history_events_total",
            events,
            Duration::from_secs(30),
        )
        .await?;
    let after = histogram_lines(&agent.metrics().await?);
    ensure!(
        after == timings && !timings.is_empty(),
        "the histograms after a restart differ:\nbefore {timings:#?}\nafter {after:#?}"
    );
    let (code, text, err) = baton(&env, &["metrics", "--window", "30d"]).await?;
    ensure!(code == 0, "baton metrics exited {code}: {err}");
    for line in [
        "Delivery metrics for every app and environment, last 30d",
        "6 (3 succeeded, 2 failed, 1 rolled back); 1 in flight",
        "0.10 per day (3 deployments)",
        "change failure rate     50.0%",
        "rollback rate           33.3%",
        "time to restore         mean 42m 7s, median 1h 0m (3 restores)",
    ] {
        ensure!(text.contains(line), "{line:?} not in the report:\n{text}");
    }
    drop(agent);
    Ok(())
}

async fn the_history_lists_releases_newest_first_with_their_status() -> Result<()> {
    let env = BusEnv::start().await?;
    let _agent = start_with_everything_told(&env).await?;

    let all = baton_json(&env, &["history"]).await?;
    let list = all.as_array().context("history is not a list")?;
    let seen: Vec<(String, String, String)> = list
        .iter()
        .map(|r| {
            let s = |f: &str| r[f].as_str().unwrap_or("-").to_owned();
            (format!("{}/{}", s("env"), s("app")), s("kind"), s("status"))
        })
        .collect();
    let expected = [
        ("staging/web", "release", "deploying"),
        ("prod/api", "rollback", "rolled_back"),
        ("prod/api", "release", "failed"),
        ("prod/api", "release", "succeeded"),
        ("staging/web", "release", "succeeded"),
        ("staging/web", "release", "failed"),
        ("staging/web", "release", "rolled_back"),
        ("staging/web", "release", "succeeded"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, k, s)| (a.to_string(), k.to_string(), s.to_string()))
        .collect();
    ensure!(seen == expected, "history is {seen:#?}");
    // Each release says what it was and how long it took.
    let oldest = &list[7];
    ensure!(oldest["duration_seconds"] == 600.0, "{oldest:#}");
    ensure!(
        oldest["image"] == "web:v1" && oldest["strategy"] == "rolling",
        "{oldest:#}"
    );
    ensure!(
        oldest["commit"] == "0123abc" && oldest["actor"] == "alice",
        "{oldest:#}"
    );
    ensure!(
        list[6]["failure_reason"] == "health check failed: 500 from 2 of 2 pods",
        "{:#}",
        list[6]
    );
    ensure!(
        list[0]["ended_at"].is_null() && list[0]["step"] == 1,
        "{:#}",
        list[0]
    );

    let staging = baton_json(&env, &["history", "--env", "staging", "--limit", "2"]).await?;
    let statuses: Vec<&str> = staging
        .as_array()
        .context("not a list")?
        .iter()
        .filter_map(|r| r["status"].as_str())
        .collect();
    ensure!(
        statuses == ["deploying", "succeeded"],
        "staging: {statuses:?}"
    );

    let (code, text, err) = baton(&env, &["history", "--app", "api"]).await?;
    ensure!(code == 0, "baton history exited {code}: {err}");
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() == 4, "history table:\n{text}");
    ensure!(
        lines[0].starts_with("RELEASE") && lines[0].contains("STATUS"),
        "{text}"
    );
    ensure!(
        lines[1].contains("rolled back")
            && lines[1].contains("(manual rollback)")
            && !lines[1].contains("rolled back on request"),
        "{text}"
    );
    ensure!(
        lines[2].contains("failed") && lines[2].contains("new pods crash-loop"),
        "{text}"
    );
    ensure!(
        lines[3].contains("succeeded") && lines[3].contains("1m 0s"),
        "{text}"
    );
    Ok(())
}

async fn a_bad_request_gets_a_clear_error_and_the_agent_keeps_answering() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut agent = AgentProcess::start(&env, "metrics", &[], env.sandbox.dir()).await?;
    // One release, so the agent has something to count (and its /metrics to count in).
    let owners = Owners::connect(&env).await?;
    let n = Release::request(&owners, "staging", "web", base(), None)
        .await?
        .succeed(base() + MIN)
        .await?;
    agent
        .wait_metric(
            "baton_history_events_total",
            n as f64,
            Duration::from_secs(30),
        )
        .await?;
    let cli = env.bus("cli").await?;
    let ask = |subject: &'static str, body: &'static [u8]| {
        let client = cli.client().clone();
        async move {
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(subject, body.into()),
            )
            .await
            .context("no answer within 10s")??;
            let v: Value = serde_json::from_slice(&reply.payload)?;
            anyhow::Ok(v)
        }
    };
    for (subject, body, why) in [
        (
            "baton.v1.api.metrics.report",
            &b"not json"[..],
            "not valid JSON for metrics.report",
        ),
        (
            "baton.v1.api.metrics.report",
            &b"{\"window_seconds\":0}"[..],
            "window_seconds: 0 is outside",
        ),
        (
            "baton.v1.api.metrics.report",
            &b"{\"window_seconds\":60,\"env\":\"Prod!\"}"[..],
            "is not a DNS label",
        ),
        (
            "baton.v1.api.releases.list",
            &b"{\"limit\":-1}"[..],
            "invalid value",
        ),
        (
            "baton.v1.api.releases.list",
            &b"{\"limit\":5,\"sort\":\"asc\"}"[..],
            "unknown field `sort`",
        ),
    ] {
        let answer = ask(subject, body).await?;
        let error = answer["error"].as_str().unwrap_or_default();
        ensure!(error.contains(why), "{subject} {body:?}: answer {answer}");
    }
    // Still running, and a good request is answered.
    ensure!(
        agent.process.is_running(),
        "the agent died on a bad request"
    );
    let good = ask("baton.v1.api.releases.list", b"{\"limit\":5}").await?;
    ensure!(
        good.as_array().is_some_and(|l| l.len() == 1) && good[0]["status"] == "succeeded",
        "a good request got {good}"
    );
    let refused = agent
        .metric(r#"baton_api_requests_total{query="metrics.report",outcome="bad_request"}"#)
        .await?;
    ensure!(refused == 3.0, "the agent counts {refused} refused reports");

    // The CLI refuses what it can check itself, before asking.
    for (args, why) in [
        (
            &["metrics", "--window", "30x"][..],
            "--window: \"30x\" is not a window",
        ),
        (
            &["metrics", "--window", "400d"][..],
            "longer than the longest window, 366d",
        ),
        (
            &["metrics", "--env", "Prod"][..],
            "--env: environment name \"Prod\" is not a DNS label",
        ),
        (
            &["history", "--limit", "0"][..],
            "--limit: 0 is outside 1..=1000",
        ),
    ] {
        let (code, _, err) = baton(&env, args).await?;
        ensure!(
            code == 1 && err.contains(why),
            "baton {args:?} exited {code}: {err}"
        );
    }

    // It stops cleanly on SIGTERM.
    agent.process.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = agent
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .context("the metrics agent did not stop after SIGTERM")?;
    ensure!(
        status.success(),
        "the metrics agent exited with {status}:\n{}",
        agent.process.log_tail(20)
    );
    Ok(())
}

async fn without_a_metrics_agent_the_cli_says_so_and_exits_1() -> Result<()> {
    let env = BusEnv::start().await?;
    for (args, subject) in [
        (&["metrics"][..], "baton.v1.api.metrics.report"),
        (
            &["history", "--output", "json"][..],
            "baton.v1.api.releases.list",
        ),
    ] {
        let (code, out, err) = baton(&env, args).await?;
        let expected = format!("the metrics agent is not running (no answer on {subject})");
        ensure!(code == 1, "baton {args:?} exited {code}: {out}{err}");
        ensure!(err.contains(&expected), "baton {args:?} said: {err}");
        ensure!(out.is_empty(), "baton {args:?} printed {out:?}");
    }
    Ok(())
}

async fn the_metrics_agent_keeps_answering_long_after_it_started() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut agent = AgentProcess::start(&env, "metrics", &[], env.sandbox.dir()).await?;
    // Its reader, keeper and responder are background tasks of the agent: they live as long as
    // it does (past any start-up or shutdown timeout of theirs, 20 s and more).
    tokio::time::sleep(Duration::from_secs(25)).await;
    let (code, out, err) = baton(&env, &["history", "--output", "json"]).await?;
    ensure!(
        code == 0,
        "baton history exited {code} 25 s after the agent started: {err}"
    );
    ensure!(out.trim() == "[]", "baton history printed {out}");
    ensure!(agent.process.is_running(), "the agent died");
    Ok(())
}

/// What the first script lacks for the dashboard: a canary whose step gets ready and whose
/// analysis passes, a release whose rollback fails, and a message the agent dead-letters.
async fn script_for_the_dashboard(o: &Owners, env: &BusEnv, base: i64) -> Result<usize> {
    let mut n = 0;
    let mut h = Release::request(o, "prod", "web", base + 8 * H, None).await?;
    let at = base + 8 * H;
    h.publish(
        &o.deployer,
        at + 10 * S,
        EventKey::Step(1),
        Payload::DeployStepReady(DeployStepReady {
            step: 1,
            weight: 100,
            ..Default::default()
        }),
    )
    .await?;
    h.publish(
        &o.health,
        at + 10 * S,
        EventKey::Step(1),
        Payload::AnalysisStarted(AnalysisStarted {
            step: 1,
            checks: vec!["http".into()],
        }),
    )
    .await?;
    h.publish(
        &o.health,
        at + 70 * S,
        EventKey::Step(1),
        Payload::AnalysisPassed(AnalysisPassed {
            step: 1,
            ..Default::default()
        }),
    )
    .await?;
    n += h.succeed(at + 80 * S).await?;

    let at = base + 9 * H;
    let mut stuck = Release::request(o, "prod", "web", at, None).await?;
    stuck
        .publish(
            &o.deployer,
            at + 20 * S,
            EventKey::Once,
            Payload::DeployFailed(DeployFailed {
                step: 1,
                reason: "new pods crash-loop".into(),
                kind: FailureKind::CrashLoop as i32,
                cluster_changed: true,
            }),
        )
        .await?;
    stuck
        .publish(
            &o.rollback,
            at + 21 * S,
            EventKey::Once,
            Payload::RollbackStarted(RollbackStarted::default()),
        )
        .await?;
    stuck
        .publish(
            &o.rollback,
            at + 50 * S,
            EventKey::Once,
            Payload::RollbackFailed(RollbackFailed {
                reason: "the previous revision is gone".into(),
            }),
        )
        .await?;
    stuck
        .publish(
            &o.rollback,
            at + 51 * S,
            EventKey::Once,
            Payload::ReleaseFailed(ReleaseFailed {
                reason: "rollback failed".into(),
            }),
        )
        .await?;
    n += stuck.published;

    // Not an event at all: dead-lettered (the dashboard shows dead letters).
    let cli = env.bus("cli").await?;
    let subject = format!(
        "baton.v1.events.prod.web.{}.release.requested",
        ReleaseId::generate()
    );
    cli.jetstream()
        .publish(subject, b"\x00\xff not protobuf"[..].into())
        .await?
        .await?;
    Ok(n)
}

async fn every_query_of_the_dashboard_names_a_metric_the_agents_export_and_prometheus_runs_it(
) -> Result<()> {
    let board = dashboard::load()?;
    // The notifier's panels are checked against the notifier (notify::).
    let queries = dashboard::queries_of(&board, dashboard::Exporter::Metrics);
    ensure!(
        queries.len() > 20,
        "only {} queries in the dashboard",
        queries.len()
    );
    let env = BusEnv::start().await?;
    let agent = start_with_everything_told(&env).await?;
    let owners = Owners::connect(&env).await?;
    let before = agent.metric("baton_history_events_total").await?;
    let more = script_for_the_dashboard(&owners, &env, base()).await?;
    agent
        .wait_metric(
            "baton_history_events_total",
            before + more as f64,
            Duration::from_secs(30),
        )
        .await?;
    agent
        .wait_metric(
            r#"baton_events_handled_total{consumer="metrics-all",outcome="dead_letter"}"#,
            1.0,
            Duration::from_secs(30),
        )
        .await?;

    // Every metric a query names has series on the agent's /metrics (declared is not enough).
    let scrape = reqwest::get(format!("http://{}/metrics", agent.http)).await?;
    let content_type = scrape
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        content_type == "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "/metrics is served as {content_type:?}"
    );
    let text = scrape.text().await?;
    ensure!(text.ends_with("# EOF\n"), "/metrics does not end in # EOF");
    let exported = dashboard::exported_names(&text);
    let missing = dashboard::missing(&board, dashboard::Exporter::Metrics, &exported);
    ensure!(
        missing.is_empty(),
        "the dashboard reads metrics the agent does not export:\n{}\nit exports: {exported:?}",
        missing
            .iter()
            .map(|(name, q)| format!("  {name} in {q}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let names: std::collections::BTreeSet<String> = queries
        .iter()
        .flat_map(|q| dashboard::metric_names(q))
        .collect();
    for expected in [
        "baton_release_duration_seconds",
        "baton_step_duration_seconds",
        "baton_analysis_duration_seconds",
        "baton_failure_to_rollback_seconds",
        "baton_release_current_step",
        "baton_deployment_frequency_per_day",
    ] {
        ensure!(
            names.contains(expected),
            "the dashboard shows no {expected}: {names:?}"
        );
    }

    // A real Prometheus (Debian's 2.x) reads the agent's OpenMetrics text, and every query, with
    // the dashboard's variables set, runs and finds series: label names and values included.
    let dir = env.sandbox.dir().join("prometheus");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let prometheus =
        PrometheusServer::start_static(&dir, "baton", &[agent.http.to_string()], &http).await?;
    let query = |q: String| {
        let http = http.clone();
        let url = reqwest::Url::parse(&format!("{}/api/v1/query", prometheus.url()));
        async move {
            let mut url = url?;
            url.query_pairs_mut().append_pair("query", &q);
            let answer: Value = http.get(url).send().await?.json().await?;
            anyhow::Ok(answer)
        }
    };
    // Rates need two scrapes (one a second) of the same figures.
    eventually(
        "Prometheus to hold three scrapes of the agent",
        Duration::from_secs(60),
        || async move {
            let a = query("count_over_time(baton_up[1m])".into()).await?;
            let n = a
                .pointer("/data/result/0/value/1")
                .and_then(Value::as_str)
                .and_then(|v| v.parse::<f64>().ok());
            Ok(n.filter(|n| *n >= 3.0))
        },
    )
    .await?;
    let variables = [
        ("env", ".*"),
        ("app", ".*"),
        ("window", "1h"),
        ("__rate_interval", "1m"),
        ("__interval", "1m"),
        ("__range", "1h"),
    ];
    let mut empty = Vec::new();
    for q in &queries {
        let promql = dashboard::with_variables(q, &variables);
        let answer = query(promql.clone()).await?;
        ensure!(
            answer["status"] == "success",
            "Prometheus refused {promql}: {answer}"
        );
        let found = answer
            .pointer("/data/result")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty());
        if !found {
            empty.push(promql);
        }
    }
    ensure!(
        empty.is_empty(),
        "queries that found nothing in Prometheus:\n{}",
        empty.join("\n")
    );
    prometheus.stop().await?;
    drop(agent);
    Ok(())
}
