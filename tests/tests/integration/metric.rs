//! Metric analysis against a real Prometheus (Debian's `prometheus`), which scrapes the simulated
//! pods' `/metrics` every second; it finds them by file-based discovery, kept up to date from a
//! watch of the test's namespace (Debian builds Prometheus without Kubernetes discovery). The
//! health-checker's latency check drives the traffic that moves the counters; the canary is
//! judged by its error rate as Prometheus computes it — with the queries the README and
//! `examples/` ship, read from them as written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType;
use baton_proto::v1::{envelope::Payload, Measurement};
use baton_sandbox::PrometheusServer;
use baton_tests::docs::{shipped_prometheus_checks, ShippedCheck};
use baton_tests::harness::trial;
use baton_tests::release::{Baton, PORT};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_healthy_canary_is_promoted_on_every_shipped_query_as_written,
        a_canary_failing_a_share_of_requests_is_rolled_back_on_the_shipped_error_rate_while_its_health_checks_pass,
        prometheus_stopped_mid_analysis_fails_the_step_as_configured,
        an_inconclusive_analysis_holds_the_release_for_a_person_who_promotes_or_aborts,
        a_webhook_is_sent_the_release_and_its_answer_decides_the_step,
    ]
}

const END: Duration = Duration::from_secs(240);

/// A shipped check as written, named for the test and asking the test's Prometheus at
/// `{address}` (the one thing a user changes), as one YAML list item.
fn as_test_check(shipped: &ShippedCheck) -> Result<String> {
    let mut check = shipped.check.clone();
    check["name"] = shipped.test_name().into();
    check["prometheus"]["address"] = "{address}".into();
    Ok(serde_yaml_ng::to_string(&vec![check])?)
}

/// The error rate `examples/baton.yaml` ships.
fn example_error_rate() -> Result<String> {
    shipped_prometheus_checks()?
        .into_iter()
        .find(|s| s.place == "example-baton" && s.name() == "error-rate")
        .context("examples/baton.yaml ships no error-rate check")?
        .query()
}

/// The analysis of the example's app `web`: rounds 5 s apart, so that its `error_limit` of 4
/// covers the first scrapes of a fresh canary as it would in production.
const EXAMPLE_ANALYSIS: &str = "{duration: 30s, interval: 5s, failure_limit: 1}";

/// A Baton whose app `web` is a canary judged by its health, a latency check that
/// drives traffic (and tolerates any error share), and the metric `checks` (YAML list items,
/// `{address}` replaced by the address of the test's Prometheus).
async fn start(prefix: &str, analysis: &str, checks: &str) -> Result<(Baton, PrometheusServer)> {
    let baton = Baton::start(prefix).await?;
    let ns = baton.ns.name.clone();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let prometheus = PrometheusServer::start(
        &baton.bus.sandbox.dir().join("prometheus"),
        baton.cluster.client().await?,
        &[&ns],
        u16::try_from(PORT)?,
        &http,
    )
    .await?;
    let checks = checks.replace("{address}", prometheus.url());
    baton
        .apply_config(&canary_config(
            &ns,
            analysis,
            &format!(
                "- name: health\n  http: {{path: /health, retries: 10, interval: 100ms}}\n\
                 - name: traffic\n  latency: {{path: /health, requests: 40, threshold: 1s, max_error_rate: 1}}\n\
                 {checks}"
            ),
        ))
        .await?;
    Ok((baton, prometheus))
}

/// App `web` as a two-step canary (50%, then all) with `analysis` and `checks` (YAML list items).
fn canary_config(ns: &str, analysis: &str, checks: &str) -> String {
    let cluster = baton_tests::CLUSTER;
    let checks: String = checks.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        r#"environments:
  test:
    cluster: {cluster}
    namespace: {ns}
apps:
  web:
    container: app
    port: {PORT}
    rolling: {{max_surge: "1", max_unavailable: "0"}}
    step_timeout: 90s
    strategy: canary
    canary: {{steps: [{{weight: 50}}, {{weight: 100}}]}}
    analysis: {analysis}
    checks:
{checks}"#
    )
}

/// The measurements of the release's analysis verdicts.
fn measurements(events: &[baton_core::event::Event]) -> Vec<Measurement> {
    events
        .iter()
        .filter_map(|e| match e.payload() {
            Some(Payload::AnalysisPassed(p)) => Some(p.measurements.clone()),
            Some(Payload::AnalysisFailed(f)) => Some(f.measurements.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Releases `web` at a new image of `tag` whose `/health` behaves as `health`, and waits until it
/// ends as `expected`; its events and the reason its analysis failed (if it did).
async fn release_ending(
    baton: &Baton,
    tag: &str,
    health: &str,
    expected: EventType,
) -> Result<(String, Vec<baton_core::event::Event>, String)> {
    let (image, _) = baton.push(tag, &[("BATON_SIM_HEALTH", health)]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    let events = baton.wait_for_end(rid, END).await?;
    let last = events.last().map(|e| e.event_type);
    let reason = reason_of(&events);
    ensure!(
        last == Some(expected),
        "the release ended with {last:?}, not {expected}: {reason}"
    );
    Ok((image, events, reason))
}

fn reason_of(events: &[baton_core::event::Event]) -> String {
    events
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::AnalysisFailed(f)) => Some(f.reason.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The shipped checks (those `keep` keeps) as written, asking the test's Prometheus.
fn shipped_checks(keep: impl Fn(&ShippedCheck) -> bool) -> Result<(Vec<ShippedCheck>, String)> {
    let shipped: Vec<ShippedCheck> = shipped_prometheus_checks()?
        .into_iter()
        .filter(keep)
        .collect();
    let mut yaml = String::new();
    for s in &shipped {
        yaml.push_str(&as_test_check(s)?);
    }
    Ok((shipped, yaml))
}

async fn a_healthy_canary_is_promoted_on_every_shipped_query_as_written() -> Result<()> {
    let (shipped, checks) = shipped_checks(|_| true)?;
    let places: Vec<String> = shipped.iter().map(ShippedCheck::test_name).collect();
    ensure!(
        places.iter().any(|p| p == "readme-error-rate")
            && places.iter().any(|p| p == "example-baton-error-rate"),
        "the README's and the example's error rates are not among the shipped queries: {places:?}"
    );
    let (baton, prometheus) = start("prom-ok", EXAMPLE_ANALYSIS, &checks).await?;
    let (_, events, _) = release_ending(&baton, "v2", "ok", EventType::ReleaseSucceeded).await?;
    // Each query was measured — values, not only tolerated errors — and met its condition.
    let all = measurements(&events);
    for name in &places {
        let judged: Vec<&Measurement> = all
            .iter()
            .filter(|m| &m.check == name && m.unit == "value")
            .collect();
        ensure!(
            !judged.is_empty() && judged.iter().all(|m| m.ok),
            "{name}'s measurements: {judged:?}"
        );
    }
    prometheus.stop().await?;
    Ok(())
}

async fn a_canary_failing_a_share_of_requests_is_rolled_back_on_the_shipped_error_rate_while_its_health_checks_pass(
) -> Result<()> {
    let (shipped, checks) = shipped_checks(|s| s.name() == "error-rate")?;
    let names: Vec<String> = shipped.iter().map(ShippedCheck::test_name).collect();
    ensure!(names.len() >= 2, "the shipped error rates: {names:?}");
    let (baton, prometheus) = start("prom-flaky", EXAMPLE_ANALYSIS, &checks).await?;
    let before = baton.deployed_image().await?;
    let (_, events, reason) =
        release_ending(&baton, "v2", "flaky:0.3", EventType::ReleaseRolledBack).await?;
    ensure!(
        names.iter().any(|n| reason.contains(&format!("check {n}"))),
        "the analysis failed for another reason: {reason}"
    );
    // Each shipped error rate measured the failures; the pods' own checks passed: only the
    // metrics said no (besides the rounds' summary).
    let all = measurements(&events);
    for name in &names {
        ensure!(
            all.iter()
                .any(|m| &m.check == name && m.unit == "value" && !m.ok),
            "{name} never measured the failures: {all:?}"
        );
    }
    let failing: Vec<&Measurement> = all
        .iter()
        .filter(|m| !m.ok && m.check != "analysis")
        .collect();
    ensure!(
        failing.iter().all(|m| names.contains(&m.check)),
        "failing measurements: {failing:?}"
    );
    ensure!(
        all.iter().any(|m| m.check == "health" && m.ok)
            && all.iter().any(|m| m.check == "pod-health" && m.ok),
        "the health checks did not pass: {all:?}"
    );
    ensure!(
        baton.deployed_image().await? == before,
        "the stable Deployment is not back to its image"
    );
    prometheus.stop().await?;
    Ok(())
}

async fn prometheus_stopped_mid_analysis_fails_the_step_as_configured() -> Result<()> {
    // Up to 8 rounds without data are tolerated while Prometheus finds the canary; once it is
    // gone, 9 errors in a row fail the step (the analysis' 31 rounds leave room for both).
    let query = example_error_rate()?;
    let (baton, mut prometheus) = start(
        "prom-down",
        "{duration: 60s, interval: 2s, failure_limit: 0}",
        &format!(
            "- name: error-rate\n  prometheus:\n    address: {{address}}\n    query: {}\n    condition: result < 0.1\n    error_limit: 8\n",
            serde_json::to_string(&query)?
        ),
    )
    .await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    baton
        .wait_for_event(rid, EventType::AnalysisStarted, END)
        .await?;
    // Prometheus has the canary's error rate (the analysis reads it too), then it dies.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let query = query
        .replace("{{namespace}}", &baton.ns.name)
        .replace("{{pods}}", "web-canary-.*")
        .replace("{{window}}", "10s");
    let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", prometheus.url()))?;
    url.query_pairs_mut().append_pair("query", &query);
    baton_tests::eventually("the canary's error rate in Prometheus", END, || {
        let request = http.get(url.clone()).send();
        async move {
            let answer: serde_json::Value = request.await?.json().await?;
            let value = answer["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            Ok(value.filter(|v| v.is_finite()).map(|_| ()))
        }
    })
    .await?;
    prometheus.kill9().await?;
    let events = baton.wait_for_end(rid, END).await?;
    let last = events.last().map(|e| e.event_type);
    ensure!(
        last == Some(EventType::ReleaseRolledBack),
        "the release ended with {last:?}"
    );
    let reason = reason_of(&events);
    ensure!(
        reason.contains("check error-rate")
            && reason.contains("errors in a row, more than the limit of 8")
            && reason.contains("cannot connect"),
        "the analysis failed for another reason: {reason}"
    );
    Ok(())
}

async fn an_inconclusive_analysis_holds_the_release_for_a_person_who_promotes_or_aborts(
) -> Result<()> {
    // A Prometheus that never answers (nothing listens there), and `on_error: inconclusive`:
    // past 2 errors in a row each step's analysis ends without a verdict.
    let baton = Baton::start("prom-inconclusive").await?;
    let query = serde_json::to_string(&example_error_rate()?)?;
    let gone = format!("http://127.0.0.1:{}", baton_sandbox::process::free_port()?);
    baton
        .apply_config(&canary_config(
            &baton.ns.name,
            "{duration: 30s, interval: 1s, failure_limit: 0}",
            &format!(
                r#"  - name: health
    http: {{path: /health, retries: 10, interval: 100ms}}
  - name: error-rate
    prometheus:
      address: {gone}
      query: {query}
      condition: result < 0.1
      error_limit: 2
      on_error: inconclusive"#
            ),
        ))
        .await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    let id = rid.to_string();
    let held = |n: usize| {
        let baton = &baton;
        async move {
            baton_tests::eventually(&format!("hold {n} of {rid}"), END, || async move {
                let events = baton.events(rid).await?;
                let paused = events
                    .iter()
                    .filter(|e| e.event_type == EventType::ReleasePaused)
                    .count();
                Ok((paused >= n).then_some(events))
            })
            .await
        }
    };

    // Step 0 (50%): no verdict, so the release holds — no deadline ends it, no rollback.
    let events = held(1).await?;
    let inconclusive: Vec<(u32, String)> = events
        .iter()
        .filter_map(|e| match e.payload() {
            Some(Payload::AnalysisInconclusive(a)) => Some((a.step, a.reason.clone())),
            _ => None,
        })
        .collect();
    ensure!(
        inconclusive.len() == 1 && inconclusive[0].0 == 0,
        "{inconclusive:?}"
    );
    ensure!(
        inconclusive[0].1.contains("error-rate") && inconclusive[0].1.contains("cannot connect"),
        "{inconclusive:?}"
    );
    ensure!(
        !events
            .iter()
            .any(|e| e.event_type == EventType::AnalysisFailed
                || e.event_type == EventType::RollbackStarted),
        "an inconclusive analysis failed the release"
    );
    let out = baton.baton(&["status", &id, "--output", "json"]).await?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        s["status"] == "paused" && s["hold"]["kind"] == "inconclusive",
        "{s}"
    );
    ensure!(
        s["waiting_for"]
            .as_str()
            .unwrap_or("")
            .contains("baton promote"),
        "{s}"
    );
    // A person's `resume` is pointed at promote or abort.
    let out = baton.baton(&["resume", &id]).await?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("inconclusive analysis"),
        "resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Promoted: step 0 counts as passed and step 1 (100%) starts; its analysis is inconclusive
    // too (Prometheus is still gone), and this time the person aborts.
    let out = baton.baton(&["promote", &id]).await?;
    ensure!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = held(2).await?;
    ensure!(
        events
            .iter()
            .any(|e| matches!(e.payload(), Some(Payload::DeployStepReady(r)) if r.step == 1)),
        "step 1 did not start after the promotion"
    );
    let out = baton
        .baton(&["abort", &id, "--reason", "no metrics, no release"])
        .await?;
    ensure!(
        out.status.success(),
        "abort: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = baton.wait_for_end(rid, END).await?;
    let last = events.last().map(|e| e.event_type);
    ensure!(
        last == Some(EventType::ReleaseRolledBack),
        "the aborted release ended with {last:?}"
    );
    Ok(())
}

/// A judge: answers every POST with `{"result": {"score": <score>}}` and keeps the bodies.
struct Judge {
    url: String,
    score: Arc<Mutex<f64>>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Judge {
    async fn start() -> Result<Judge> {
        let score = Arc::new(Mutex::new(1.0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (score.clone(), bodies.clone());
        let app = axum::Router::new().route(
            "/judge",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (s, b) = (s.clone(), b.clone());
                async move {
                    let parsed = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    b.lock().unwrap_or_else(|p| p.into_inner()).push(parsed);
                    let score = *s.lock().unwrap_or_else(|p| p.into_inner());
                    (
                        [("content-type", "application/json")],
                        serde_json::json!({ "result": { "score": score } }).to_string(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/judge", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Judge {
            url,
            score,
            bodies,
            server,
        })
    }

    fn set_score(&self, score: f64) {
        *self.score.lock().unwrap_or_else(|p| p.into_inner()) = score;
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Judge {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn a_webhook_is_sent_the_release_and_its_answer_decides_the_step() -> Result<()> {
    let baton = Baton::start("webhook").await?;
    let judge = Judge::start().await?;
    let ns = baton.ns.name.clone();
    baton
        .apply_config(&canary_config(
            &ns,
            "{duration: 2s, interval: 1s, failure_limit: 0}",
            &format!(
                "- name: judge\n  webhook: {{url: \"{}\", field: result.score, condition: \">= 0.9\", error_limit: 0}}",
                judge.url
            ),
        ))
        .await?;
    // Accepted: the judge's score meets the condition.
    let (image, events, _) =
        release_ending(&baton, "v2", "ok", EventType::ReleaseSucceeded).await?;
    let rid = events.first().context("no events")?.release_id;
    let bodies = judge.bodies();
    let first = bodies.first().context("the judge was never asked")?;
    ensure!(
        first["release_id"] == rid.to_string()
            && first["app"] == "web"
            && first["env"] == "test"
            && first["namespace"] == ns.as_str()
            && first["track"] == "canary"
            && first["strategy"] == "canary"
            && first["check"] == "judge"
            && first["image"] == image.as_str()
            && first["pods"][0]["name"]
                .as_str()
                .is_some_and(|p| p.starts_with("web-canary-")),
        "the judge was sent {first:#}"
    );
    // Refused: the same judge now scores 0.2, and the next release is rolled back on it.
    judge.set_score(0.2);
    let (_, _, reason) = release_ending(&baton, "v3", "ok", EventType::ReleaseRolledBack).await?;
    ensure!(
        reason.contains("check judge") && reason.contains("0.2 < 0.9"),
        "the analysis failed for another reason: {reason}"
    );
    Ok(())
}
