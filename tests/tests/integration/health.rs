//! The health-checker as a real process against real pods: the sandbox's simulated apps answer
//! its HTTP checks on their own IPs, the control plane reports their health, and its verdicts
//! land in the event stream with the measurements that explain them.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::ReleaseId;
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::Api;
use libtest_mimic::Trial;

use baton_tests::cluster::{deployment, shared, ClusterInfo, TestNamespace};
use baton_tests::harness::trial;
use baton_tests::{eventually, sample_spec, AgentProcess, BusEnv, CLUSTER};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        healthy_pods_pass_the_analysis_with_a_measurement_of_every_check_on_every_pod,
        failing_health_fails_the_analysis_in_its_first_round_naming_the_check_and_the_pod,
        a_pod_that_turns_bad_mid_analysis_fails_it_in_a_later_round,
        a_latency_threshold_breach_fails_the_analysis_with_the_percentile_measured,
        a_smoke_test_that_exits_1_fails_the_analysis,
        crash_looping_pods_fail_the_pod_health_check,
        a_redelivered_step_ready_publishes_no_second_verdict,
        a_release_for_another_cluster_is_left_to_that_clusters_health_checker,
        an_analysis_cut_short_by_sigterm_runs_again_on_the_next_agent,
    ]
}

use baton_tests::release::PORT;
const ENV: &str = "staging";

/// A test's app on the shared cluster, the bus, and the health-checker running against both.
struct Fixture {
    cluster: ClusterInfo,
    ns: TestNamespace,
    env: BusEnv,
    agent: AgentProcess,
}

impl Fixture {
    async fn start(prefix: &str) -> Result<Fixture> {
        let cluster = shared()?;
        let ns = TestNamespace::create(&cluster, prefix).await?;
        let env = BusEnv::start().await?;
        let kubeconfig = cluster.kubeconfig.display().to_string();
        let agent = AgentProcess::start(
            &env,
            "health-checker",
            &[("KUBECONFIG", &kubeconfig)],
            env.sandbox.dir(),
        )
        .await?;
        Ok(Fixture {
            cluster,
            ns,
            env,
            agent,
        })
    }

    /// The image `<registry>/<namespace>:<tag>` behaving as `sim` says.
    async fn image(&self, tag: &str, sim: &[(&str, &str)]) -> Result<String> {
        let env: Vec<(String, String)> = sim
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.cluster
            .registry()?
            .push_image(&self.ns.name, tag, &env)
            .await?;
        Ok(format!("{}/{}:{tag}", self.cluster.registry, self.ns.name))
    }

    /// Creates a Deployment `app` of `replicas` pods and returns its pods once `ready` says so.
    async fn app(
        &self,
        app: &str,
        image: &str,
        replicas: i32,
        ready: impl Fn(&[Pod]) -> bool,
    ) -> Result<Vec<PodRef>> {
        let client = self.cluster.client().await?;
        Api::<Deployment>::namespaced(client.clone(), &self.ns.name)
            .create(
                &PostParams::default(),
                &deployment(app, image, replicas, PORT, &[]),
            )
            .await?;
        let pods: Api<Pod> = Api::namespaced(client, &self.ns.name);
        let listed = eventually(
            &format!("the pods of {app}"),
            Duration::from_secs(120),
            || async {
                let list = pods
                    .list(&ListParams::default().labels(&format!("app={app}")))
                    .await?;
                let with_ip = list.items.len() == replicas as usize
                    && list.items.iter().all(|p| ip_of(p).is_some());
                Ok((with_ip && ready(&list.items)).then_some(list.items))
            },
        )
        .await?;
        listed
            .iter()
            .map(|p| {
                Ok(PodRef {
                    name: p.metadata.name.clone().context("pod without a name")?,
                    ip: ip_of(p).context("pod without an IP")?,
                    image: image.to_owned(),
                })
            })
            .collect()
    }

    /// Publishes `release.requested` (as the CLI) for `app` in the test's namespace.
    async fn request(
        &self,
        app: &str,
        image: &str,
        checks: Vec<Check>,
        analysis: AnalysisParams,
    ) -> Result<ReleaseId> {
        let rid = ReleaseId::generate();
        let spec = ReleaseSpec {
            namespace: self.ns.name.clone(),
            checks,
            analysis: Some(analysis),
            port: PORT as u32,
            cluster: CLUSTER.into(),
            ..sample_spec(ENV, app, image)
        };
        let spec = self.env.configured(spec).await?;
        let payload = Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) });
        self.publish("cli", app, rid, EventKey::Once, payload)
            .await?;
        Ok(rid)
    }

    /// Publishes `deploy.step_ready` (as the deployer) listing `pods`.
    async fn step_ready(
        &self,
        app: &str,
        rid: ReleaseId,
        key: EventKey<'_>,
        pods: &[PodRef],
    ) -> Result<()> {
        let payload = Payload::DeployStepReady(DeployStepReady {
            step: 1,
            weight: 100,
            pods: pods.to_vec(),
        });
        self.publish("deployer", app, rid, key, payload).await
    }

    async fn publish(
        &self,
        user: &str,
        app: &str,
        rid: ReleaseId,
        key: EventKey<'_>,
        payload: Payload,
    ) -> Result<()> {
        let bus = self.env.bus(user).await?;
        let event = Event::new(rid, key, payload, bus.source(), "alice", "");
        let subject = EventSubject::new(ENV.parse()?, app.parse()?, rid, event.event_type);
        bus.publish(&subject, &event).await?;
        Ok(())
    }

    /// The release's events once the health-checker has given its verdict.
    async fn verdict(&self, rid: ReleaseId) -> Result<Vec<Event>> {
        let bus = self.env.bus("cli").await?;
        eventually("a verdict", Duration::from_secs(120), || async {
            let events = bus.release_history(rid).await?;
            let judged = events.iter().any(|e| {
                matches!(
                    e.event_type,
                    EventType::AnalysisPassed | EventType::AnalysisFailed
                )
            });
            Ok(judged.then_some(events))
        })
        .await
        .with_context(|| format!("health-checker log:\n{}", self.agent.process.log_tail(30)))
    }
}

fn ip_of(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

fn available(pods: &[Pod]) -> bool {
    pods.iter().all(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

fn http_check(name: &str, h: HttpCheck) -> Check {
    Check {
        name: name.into(),
        kind: Some(check::Kind::Http(h)),
    }
}

fn health() -> HttpCheck {
    HttpCheck {
        path: "/health".into(),
        ..Default::default()
    }
}

fn analysis(duration_seconds: u32, interval_seconds: u32) -> AnalysisParams {
    AnalysisParams {
        duration_seconds,
        interval_seconds,
        failure_limit: 0,
    }
}

fn count(events: &[Event], t: EventType) -> usize {
    events.iter().filter(|e| e.event_type == t).count()
}

fn passed(events: &[Event]) -> Result<&AnalysisPassed> {
    events
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::AnalysisPassed(p)) => Some(p),
            _ => None,
        })
        .with_context(|| format!("no analysis.passed in {:?}", types(events)))
}

fn failed(events: &[Event]) -> Result<&AnalysisFailed> {
    events
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::AnalysisFailed(f)) => Some(f),
            _ => None,
        })
        .with_context(|| format!("no analysis.failed in {:?}", types(events)))
}

fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

fn find<'a>(
    ms: &'a [Measurement],
    check: &str,
    target: &str,
    unit: &str,
) -> Result<&'a Measurement> {
    ms.iter()
        .find(|m| m.check == check && m.target == target && m.unit == unit)
        .with_context(|| format!("no {check} measurement of {target} in {unit}: {ms:#?}"))
}

/// The summary measurement: how many rounds of how many ran.
fn rounds(ms: &[Measurement]) -> Result<(f64, String)> {
    let m = find(ms, "analysis", "rounds", "rounds")?;
    Ok((m.value, m.detail.clone()))
}

fn target(pod: &PodRef) -> String {
    format!("{}@{}", pod.name, pod.ip)
}

async fn healthy_pods_pass_the_analysis_with_a_measurement_of_every_check_on_every_pod(
) -> Result<()> {
    let f = Fixture::start("hc-pass").await?;
    let image = f.image("ok", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let pods = f.app("web", &image, 2, available).await?;
    let checks = vec![
        http_check(
            "health",
            HttpCheck {
                body_contains: "ok".into(),
                retries: 1,
                ..health()
            },
        ),
        Check {
            name: "speed".into(),
            kind: Some(check::Kind::Latency(LatencyCheck {
                path: "/health".into(),
                requests: 10,
                percentile: 95.0,
                threshold_ms: 1000,
                max_error_rate: 0.0,
                port: 0,
            })),
        },
        Check {
            name: "env".into(),
            kind: Some(check::Kind::Smoke(SmokeCheck {
                argv: vec!["printenv".into(), "BATON_POD_IPS".into()],
                timeout_ms: 10_000,
            })),
        },
    ];
    let rid = f.request("web", &image, checks, analysis(2, 1)).await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let started = events
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::AnalysisStarted(s)) => Some(s),
            _ => None,
        })
        .context("no analysis.started")?;
    ensure!(
        started.step == 1 && started.checks == ["pod-health", "health", "speed", "env"],
        "analysis.started {started:?}"
    );
    let verdict = passed(&events)?;
    ensure!(count(&events, EventType::AnalysisFailed) == 0);
    let ms = &verdict.measurements;
    ensure!(verdict.step == 1);
    let (ran, detail) = rounds(ms)?;
    ensure!(ran == 3.0, "{detail}");
    for pod in &pods {
        let t = target(pod);
        let h = find(ms, "health", &t, "status")?;
        ensure!(h.ok && h.value == 200.0, "{h:?}");
        let p = find(ms, "pod-health", &t, "restarts")?;
        ensure!(p.ok && p.value == 0.0, "{p:?}");
        let l = find(ms, "speed", &t, "ms")?;
        ensure!(
            l.ok && l.value < 1000.0 && l.detail.starts_with("p95"),
            "{l:?}"
        );
        let e = find(ms, "speed", &t, "ratio")?;
        ensure!(e.ok && e.value == 0.0, "{e:?}");
    }
    // The smoke test saw the pods' IPs in its environment (printenv prints them).
    let smoke = find(ms, "env", "printenv", "exit")?;
    ensure!(smoke.ok && smoke.value == 0.0, "{smoke:?}");
    for pod in &pods {
        ensure!(smoke.detail.contains(&pod.ip), "{smoke:?} lacks {}", pod.ip);
    }
    Ok(())
}

async fn failing_health_fails_the_analysis_in_its_first_round_naming_the_check_and_the_pod(
) -> Result<()> {
    let f = Fixture::start("hc-fail").await?;
    let image = f.image("sick", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let pods = f.app("web", &image, 2, available).await?;
    // A minute of analysis at 2 s intervals: 31 rounds, of which the first must be enough.
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health())],
            analysis(60, 2),
        )
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let verdict = failed(&events)?;
    ensure!(count(&events, EventType::AnalysisPassed) == 0);
    ensure!(
        pods.iter().any(|p| verdict.reason.contains(&format!(
            "check health on {}: status 500, expected 200",
            target(p)
        ))),
        "reason {:?} names no pod",
        verdict.reason
    );
    let (ran, detail) = rounds(&verdict.measurements)?;
    ensure!(
        ran == 1.0 && detail.starts_with("1 of 31 rounds run, 1 failed"),
        "{detail}"
    );
    for pod in &pods {
        let h = find(&verdict.measurements, "health", &target(pod), "status")?;
        ensure!(!h.ok && h.value == 500.0, "{h:?}");
        // The pods themselves are fine: ready, never restarted.
        let p = find(
            &verdict.measurements,
            "pod-health",
            &target(pod),
            "restarts",
        )?;
        ensure!(p.ok, "{p:?}");
    }
    Ok(())
}

async fn a_pod_that_turns_bad_mid_analysis_fails_it_in_a_later_round() -> Result<()> {
    let f = Fixture::start("hc-later").await?;
    let image = f
        .image("later", &[("BATON_SIM_FAIL_AFTER_MS", "25000")])
        .await?;
    let pods = f.app("web", &image, 1, available).await?;
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health())],
            analysis(120, 2),
        )
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let verdict = failed(&events)?;
    let (ran, detail) = rounds(&verdict.measurements)?;
    ensure!(
        ran > 1.0 && ran < 61.0,
        "expected earlier rounds to pass and the analysis to stop before its end: {detail}"
    );
    let h = find(&verdict.measurements, "health", &target(&pods[0]), "status")?;
    ensure!(
        !h.ok && h.detail.ends_with(&format!("[failed 1 of {ran} rounds]")),
        "{h:?}"
    );
    Ok(())
}

async fn a_latency_threshold_breach_fails_the_analysis_with_the_percentile_measured() -> Result<()>
{
    let f = Fixture::start("hc-slow").await?;
    let image = f
        .image(
            "slow",
            &[("BATON_SIM_HEALTH", "ok"), ("BATON_SIM_LATENCY_MS", "300")],
        )
        .await?;
    let pods = f.app("web", &image, 1, available).await?;
    let speed = Check {
        name: "speed".into(),
        kind: Some(check::Kind::Latency(LatencyCheck {
            path: "/health".into(),
            requests: 8,
            percentile: 95.0,
            threshold_ms: 100,
            max_error_rate: 0.0,
            port: 0,
        })),
    };
    let rid = f
        .request("web", &image, vec![speed], analysis(10, 2))
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let verdict = failed(&events)?;
    let t = target(&pods[0]);
    let latency = find(&verdict.measurements, "speed", &t, "ms")?;
    ensure!(
        !latency.ok && latency.value >= 300.0 && latency.detail.contains("> 100 ms"),
        "{latency:?}"
    );
    // Slow is not broken: every request was answered.
    let errors = find(&verdict.measurements, "speed", &t, "ratio")?;
    ensure!(errors.ok && errors.value == 0.0, "{errors:?}");
    ensure!(
        verdict.reason.contains(&format!("check speed on {t}: p95")),
        "{}",
        verdict.reason
    );
    Ok(())
}

async fn a_smoke_test_that_exits_1_fails_the_analysis() -> Result<()> {
    let f = Fixture::start("hc-smoke").await?;
    let image = f.image("ok", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let pods = f.app("web", &image, 1, available).await?;
    let smoke = Check {
        name: "smoke".into(),
        kind: Some(check::Kind::Smoke(SmokeCheck {
            argv: vec!["false".into()],
            timeout_ms: 10_000,
        })),
    };
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health()), smoke],
            analysis(10, 2),
        )
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let verdict = failed(&events)?;
    let m = find(&verdict.measurements, "smoke", "false", "exit")?;
    ensure!(!m.ok && m.value == 1.0, "{m:?}");
    ensure!(
        verdict.reason.contains("check smoke on false: exit 1"),
        "{}",
        verdict.reason
    );
    // The app itself answered well: only the smoke test failed.
    let h = find(&verdict.measurements, "health", &target(&pods[0]), "status")?;
    ensure!(h.ok, "{h:?}");
    Ok(())
}

async fn crash_looping_pods_fail_the_pod_health_check() -> Result<()> {
    let f = Fixture::start("hc-crash").await?;
    let image = f.image("crash", &[("BATON_SIM_CRASH", "1")]).await?;
    // The step begins (as the deployer says) before its pods exist.
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health())],
            analysis(30, 2),
        )
        .await?;
    let started = Payload::DeployStepStarted(DeployStepStarted {
        step: 1,
        weight: 100,
        ..Default::default()
    });
    f.publish("deployer", "web", rid, EventKey::Step(1), started)
        .await?;
    // Never ready: take the pods once they have an IP and have crashed at least once.
    let pods = f
        .app("web", &image, 1, |pods| {
            pods.iter().all(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.restart_count >= 1))
            })
        })
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;

    let verdict = failed(&events)?;
    let p = find(
        &verdict.measurements,
        "pod-health",
        &target(&pods[0]),
        "restarts",
    )?;
    ensure!(
        !p.ok && p.value >= 1.0 && p.detail.contains("restarted since the step began"),
        "{p:?}"
    );
    ensure!(
        verdict
            .reason
            .contains(&format!("check pod-health on {}", target(&pods[0]))),
        "{}",
        verdict.reason
    );
    Ok(())
}

async fn a_redelivered_step_ready_publishes_no_second_verdict() -> Result<()> {
    let f = Fixture::start("hc-again").await?;
    let image = f.image("ok", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let pods = f.app("web", &image, 1, available).await?;
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health())],
            analysis(1, 1),
        )
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let events = f.verdict(rid).await?;
    passed(&events)?;

    // The same step again, as a second event (the same id would be dropped by the stream).
    f.step_ready("web", rid, EventKey::Named("again"), &pods)
        .await?;
    let handled = format!(
        "baton_events_handled_total{{consumer=\"health-checker-{CLUSTER}-deploy-step_ready\",outcome=\"ack\"}}"
    );
    f.agent
        .wait_metric(&handled, 2.0, Duration::from_secs(60))
        .await?;
    let events = f.env.bus("cli").await?.release_history(rid).await?;
    ensure!(
        count(&events, EventType::DeployStepReady) == 2,
        "{:?}",
        types(&events)
    );
    ensure!(
        count(&events, EventType::AnalysisStarted) == 1
            && count(&events, EventType::AnalysisPassed) == 1
            && count(&events, EventType::AnalysisFailed) == 0,
        "{:?}",
        types(&events)
    );
    // Not merely dropped as a duplicate by the stream: the agent did not analyse the step again.
    for t in ["analysis.started", "analysis.passed"] {
        let published = f
            .agent
            .metric(&format!("baton_events_published_total{{type=\"{t}\"}}"))
            .await?;
        ensure!(
            published == 1.0,
            "the agent published {t} {published} times"
        );
    }
    Ok(())
}

async fn a_release_for_another_cluster_is_left_to_that_clusters_health_checker() -> Result<()> {
    let f = Fixture::start("hc-other").await?;
    let image = f.image("ok", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = ReleaseId::generate();
    let spec = ReleaseSpec {
        namespace: f.ns.name.clone(),
        checks: vec![http_check("health", health())],
        cluster: "elsewhere".into(),
        ..sample_spec(ENV, "web", &image)
    };
    let payload = Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) });
    f.publish("cli", "web", rid, EventKey::Once, payload)
        .await?;
    let pod = PodRef {
        name: "web-elsewhere".into(),
        ip: "127.0.0.1".into(),
        image: image.clone(),
    };
    f.step_ready("web", rid, EventKey::Step(1), &[pod]).await?;
    let handled = format!(
        "baton_events_handled_total{{consumer=\"health-checker-{CLUSTER}-deploy-step_ready\",outcome=\"ack\"}}"
    );
    f.agent
        .wait_metric(&handled, 1.0, Duration::from_secs(60))
        .await?;
    let events = f.env.bus("cli").await?.release_history(rid).await?;
    ensure!(
        types(&events) == ["release.requested", "deploy.step_ready"],
        "{:?}",
        types(&events)
    );
    Ok(())
}

async fn an_analysis_cut_short_by_sigterm_runs_again_on_the_next_agent() -> Result<()> {
    let mut f = Fixture::start("hc-term").await?;
    let image = f.image("ok", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let pods = f.app("web", &image, 1, available).await?;
    let rid = f
        .request(
            "web",
            &image,
            vec![http_check("health", health())],
            analysis(16, 2),
        )
        .await?;
    f.step_ready("web", rid, EventKey::Step(1), &pods).await?;
    let bus = f.env.bus("cli").await?;
    eventually("analysis.started", Duration::from_secs(60), || async {
        let events = bus.release_history(rid).await?;
        Ok((count(&events, EventType::AnalysisStarted) == 1).then_some(()))
    })
    .await?;

    f.agent.process.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = f
        .agent
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .context("the health-checker did not stop after SIGTERM")?;
    ensure!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(f.agent.process.log_path())?;
    // It stopped the analysis itself and returned the message, rather than being cut off
    // after the runtime's grace period.
    ensure!(
        log.contains("shutting down during the analysis of step 1; it will run again"),
        "{}",
        f.agent.process.log_tail(20)
    );
    let events = bus.release_history(rid).await?;
    ensure!(
        count(&events, EventType::AnalysisPassed) + count(&events, EventType::AnalysisFailed) == 0,
        "{:?}",
        types(&events)
    );

    // The next agent takes the step_ready over and runs the analysis from the start.
    let kubeconfig = f.cluster.kubeconfig.display().to_string();
    f.agent = AgentProcess::start(
        &f.env,
        "health-checker",
        &[("KUBECONFIG", &kubeconfig)],
        f.env.sandbox.dir(),
    )
    .await?;
    let events = f.verdict(rid).await?;
    let verdict = passed(&events)?;
    let (ran, detail) = rounds(&verdict.measurements)?;
    ensure!(ran == 9.0, "{detail}");
    ensure!(
        count(&events, EventType::AnalysisStarted) == 1,
        "{:?}",
        types(&events)
    );
    let restarted = f
        .agent
        .metric("baton_events_published_total{type=\"analysis.started\"}")
        .await?;
    ensure!(
        restarted == 1.0,
        "the second agent announced the analysis {restarted} times"
    );
    Ok(())
}
