//! Table tests of the analysis' decisions.

use std::time::Duration;

use baton_core::event::Event;
use baton_core::fold::fold;
use baton_core::names::ReleaseId;
use baton_proto::v1::{envelope::Payload, *};

use super::*;

fn ev(rid: ReleaseId, n: u32, payload: Payload) -> Event {
    Event::numbered(rid, n, payload)
}

fn spec() -> ReleaseSpec {
    ReleaseSpec {
        app: "web".into(),
        env: "staging".into(),
        namespace: "web".into(),
        image: "127.0.0.1:5000/web:v2".into(),
        strategy: Strategy::Canary as i32,
        ..Default::default()
    }
}

fn requested() -> Payload {
    Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec()) })
}

fn step_started(step: u32) -> Payload {
    Payload::DeployStepStarted(DeployStepStarted {
        step,
        weight: 10,
        ..Default::default()
    })
}

fn step_ready(step: u32) -> Payload {
    Payload::DeployStepReady(DeployStepReady {
        step,
        weight: 10,
        pods: vec![],
    })
}

#[test]
fn a_step_is_analysed_once_and_never_for_a_release_that_is_over() {
    use Payload as P;
    let table: Vec<(&str, Vec<Payload>, u32, bool)> = vec![
        (
            "fresh step",
            vec![requested(), step_started(1), step_ready(1)],
            1,
            true,
        ),
        (
            "started but no verdict (crash mid-analysis)",
            vec![
                requested(),
                step_ready(1),
                P::AnalysisStarted(AnalysisStarted {
                    step: 1,
                    checks: vec![],
                }),
            ],
            1,
            true,
        ),
        (
            "passed already",
            vec![
                requested(),
                step_ready(1),
                P::AnalysisPassed(AnalysisPassed {
                    step: 1,
                    measurements: vec![],
                }),
            ],
            1,
            false,
        ),
        (
            "failed already",
            vec![
                requested(),
                step_ready(1),
                P::AnalysisFailed(AnalysisFailed {
                    step: 1,
                    measurements: vec![],
                    reason: "x".into(),
                }),
            ],
            1,
            false,
        ),
        (
            "an earlier step passed, this one is new",
            vec![
                requested(),
                P::AnalysisPassed(AnalysisPassed {
                    step: 1,
                    measurements: vec![],
                }),
                step_ready(2),
            ],
            2,
            true,
        ),
        (
            "succeeded",
            vec![
                requested(),
                step_ready(1),
                P::ReleaseSucceeded(ReleaseSucceeded::default()),
            ],
            1,
            false,
        ),
        (
            "rolled back",
            vec![
                requested(),
                step_ready(1),
                P::ReleaseRolledBack(ReleaseRolledBack::default()),
            ],
            1,
            false,
        ),
        (
            "rolling back",
            vec![
                requested(),
                step_ready(1),
                P::RollbackStarted(RollbackStarted::default()),
            ],
            1,
            false,
        ),
        (
            "deploy failed",
            vec![
                requested(),
                step_ready(1),
                P::DeployFailed(DeployFailed {
                    step: 1,
                    ..Default::default()
                }),
            ],
            1,
            false,
        ),
        ("no request in the stream", vec![step_ready(1)], 1, false),
        (
            "a release for this cluster",
            vec![
                Payload::ReleaseRequested(ReleaseRequested {
                    spec: Some(ReleaseSpec {
                        cluster: "eu".into(),
                        ..spec()
                    }),
                }),
                step_ready(1),
            ],
            1,
            true,
        ),
        (
            "a release for another cluster",
            vec![
                Payload::ReleaseRequested(ReleaseRequested {
                    spec: Some(ReleaseSpec {
                        cluster: "us".into(),
                        ..spec()
                    }),
                }),
                step_ready(1),
            ],
            1,
            false,
        ),
    ];
    for (name, payloads, step, analyse) in table {
        let rid = ReleaseId::generate();
        let events: Vec<Event> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| ev(rid, i as u32, p))
            .collect();
        let decision = decide(&fold(&events), step, "eu");
        assert_eq!(
            decision == Decision::Analyse,
            analyse,
            "{name}: {decision:?}"
        );
    }
}

#[test]
fn the_step_begins_at_its_step_started_event_else_at_its_step_ready() {
    let rid = ReleaseId::generate();
    let events = vec![
        ev(rid, 0, requested()),
        ev(rid, 1, step_started(1)),
        ev(rid, 2, step_ready(1)),
        ev(rid, 5, step_ready(2)),
        ev(rid, 7, step_ready(2)),
    ];
    let state = baton_core::fold::fold(&events);
    assert_eq!(step_began_ms(&state, 1), Some(1_001_000));
    assert_eq!(step_began_ms(&state, 2), Some(1_005_000));
    assert_eq!(step_began_ms(&state, 3), None);
}

#[test]
fn analysis_settings_have_defaults_and_limits() {
    let params = |d, i, f| AnalysisParams {
        duration_seconds: d,
        interval_seconds: i,
        failure_limit: f,
    };
    let table = [
        (None, Some((10, 2, 0, 6))),
        (Some(params(0, 0, 0)), Some((10, 2, 0, 6))),
        (Some(params(60, 5, 2)), Some((60, 5, 2, 13))),
        (Some(params(3, 10, 0)), Some((3, 10, 0, 1))),
        (Some(params(1, 1, 0)), Some((1, 1, 0, 2))),
        (Some(params(86_401, 2, 0)), None),
    ];
    for (p, want) in table {
        let got = Settings::from_params(p.as_ref()).ok().map(|s| {
            (
                s.duration.as_secs(),
                s.interval.as_secs(),
                s.failure_limit,
                s.rounds(),
            )
        });
        assert_eq!(got, want, "{p:?}");
    }
}

fn http(h: HttpCheck) -> Check {
    Check {
        name: "health".into(),
        kind: Some(check::Kind::Http(h)),
    }
}

fn latency(l: LatencyCheck) -> Check {
    Check {
        name: "speed".into(),
        kind: Some(check::Kind::Latency(l)),
    }
}

fn smoke(argv: &[&str]) -> Check {
    Check {
        name: "smoke".into(),
        kind: Some(check::Kind::Smoke(SmokeCheck {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            timeout_ms: 0,
        })),
    }
}

fn plan_of(checks: Vec<Check>, port: u32) -> Result<Plan, String> {
    plan(&ReleaseSpec {
        checks,
        port,
        ..spec()
    })
}

#[test]
fn checks_get_their_defaults() {
    let p = plan_of(
        vec![
            http(HttpCheck::default()),
            latency(LatencyCheck {
                percentile: 95.0,
                threshold_ms: 200,
                ..Default::default()
            }),
            smoke(&["true"]),
        ],
        0,
    )
    .unwrap();
    assert_eq!(p.check_names(), ["pod-health", "health", "speed", "smoke"]);
    assert_eq!(
        p.checks[0].kind,
        CheckKind::Http(HttpPlan {
            path: "/health".into(),
            port: 8080,
            expect_status: 200,
            body_contains: None,
            timeout: Duration::from_secs(2),
            attempts: 1,
            retry_interval: Duration::from_millis(500),
            url: None,
        })
    );
    let CheckKind::Latency(l) = &p.checks[1].kind else {
        panic!("not latency")
    };
    assert_eq!(
        (l.requests, l.port, l.timeout),
        (20, 8080, Duration::from_secs(2))
    );
    let CheckKind::Smoke(s) = &p.checks[2].kind else {
        panic!("not smoke")
    };
    assert_eq!(s.timeout, Duration::from_secs(30));
}

#[test]
fn the_port_is_the_checks_else_the_specs_else_8080() {
    let port_of = |check_port, spec_port| {
        let p = plan_of(
            vec![http(HttpCheck {
                port: check_port,
                ..Default::default()
            })],
            spec_port,
        )
        .unwrap();
        match &p.checks[0].kind {
            CheckKind::Http(h) => h.port,
            _ => 0,
        }
    };
    assert_eq!(port_of(0, 0), 8080);
    assert_eq!(port_of(0, 9000), 9000);
    assert_eq!(port_of(7000, 9000), 7000);
}

#[test]
fn unnamed_checks_are_named_after_their_kind_and_position() {
    let mut c = smoke(&["true"]);
    c.name.clear();
    let p = plan_of(vec![http(HttpCheck::default()), c], 0).unwrap();
    assert_eq!(p.check_names(), ["pod-health", "health", "smoke-2"]);
}

#[test]
fn checks_that_cannot_run_are_refused_with_the_field() {
    let table: Vec<(Vec<Check>, &str)> = vec![
        (
            vec![Check {
                name: "x".into(),
                kind: None,
            }],
            "has no kind",
        ),
        (
            vec![http(HttpCheck {
                expect_status: 700,
                ..Default::default()
            })],
            "not an HTTP status",
        ),
        (
            vec![http(HttpCheck {
                port: 70_000,
                ..Default::default()
            })],
            "not a TCP port",
        ),
        (
            vec![http(HttpCheck {
                path: "health".into(),
                ..Default::default()
            })],
            "must start with '/'",
        ),
        (
            vec![http(HttpCheck {
                path: "/a b".into(),
                ..Default::default()
            })],
            "spaces",
        ),
        (
            vec![http(HttpCheck {
                retries: 11,
                ..Default::default()
            })],
            "more than 10 retries",
        ),
        (
            vec![http(HttpCheck {
                timeout_ms: 61_000,
                ..Default::default()
            })],
            "timeout_ms",
        ),
        (
            vec![http(HttpCheck {
                url: "ftp://x".into(),
                ..Default::default()
            })],
            "not an http",
        ),
        (
            vec![http(HttpCheck {
                url: "http://".into(),
                ..Default::default()
            })],
            "no host",
        ),
        (
            vec![latency(LatencyCheck {
                percentile: 0.0,
                threshold_ms: 5,
                ..Default::default()
            })],
            "percentile",
        ),
        (
            vec![latency(LatencyCheck {
                percentile: 95.0,
                ..Default::default()
            })],
            "threshold_ms",
        ),
        (
            vec![latency(LatencyCheck {
                percentile: 95.0,
                threshold_ms: 5,
                max_error_rate: 1.5,
                ..Default::default()
            })],
            "max_error_rate",
        ),
        (
            vec![latency(LatencyCheck {
                percentile: 95.0,
                threshold_ms: 5,
                requests: 5000,
                ..Default::default()
            })],
            "requests",
        ),
        (vec![smoke(&[])], "needs an argv"),
        (vec![smoke(&[""])], "needs an argv"),
        (vec![smoke(&["a\0b"])], "NUL"),
        (
            vec![http(HttpCheck::default()), http(HttpCheck::default())],
            "already named",
        ),
        (
            vec![Check {
                name: POD_HEALTH.into(),
                ..smoke(&["true"])
            }],
            "already named",
        ),
    ];
    for (checks, why) in table {
        let err = plan_of(checks.clone(), 0).expect_err(why);
        assert!(
            err.contains(why),
            "{checks:?}: {err:?} does not say {why:?}"
        );
        assert!(err.starts_with("spec.checks["), "{err}");
    }
}

fn pod(name: &str, ip: &str) -> PodRef {
    PodRef {
        name: name.into(),
        ip: ip.into(),
        image: "web:v2".into(),
    }
}

#[test]
fn pods_of_a_step_are_validated() {
    let ready = |pods| DeployStepReady {
        step: 1,
        weight: 10,
        pods,
    };
    let good = pod_targets(&ready(vec![
        pod("web-1", "127.0.0.5"),
        pod("web-2", "fd00::1"),
    ]))
    .unwrap();
    assert_eq!(good[0].label(), "web-1@127.0.0.5");
    assert_eq!(good[0].url(8080, "/health"), "http://127.0.0.5:8080/health");
    assert_eq!(good[1].url(80, "/"), "http://[fd00::1]:80/");
    let table = [
        (vec![], "lists no pods"),
        (vec![pod("", "127.0.0.5")], "not a pod name"),
        (vec![pod("Web", "127.0.0.5")], "not a pod name"),
        (vec![pod("web-1", "")], "not an IP address"),
        (vec![pod("web-1", "127.0.0.5:80")], "not an IP address"),
        (vec![pod("web-1", "0.0.0.0")], "not a pod IP"),
        (
            vec![pod("web-1", "127.0.0.5"), pod("web-1", "127.0.0.6")],
            "listed twice",
        ),
    ];
    for (pods, why) in table {
        let err = pod_targets(&ready(pods.clone())).expect_err(why);
        assert!(err.contains(why), "{pods:?}: {err}");
    }
}

#[test]
fn percentiles_are_nearest_rank() {
    let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
    let table: Vec<(&[f64], f64, Option<f64>)> = vec![
        (&twenty, 95.0, Some(19.0)),
        (&twenty, 99.0, Some(20.0)),
        (&twenty, 100.0, Some(20.0)),
        (&twenty, 50.0, Some(10.0)),
        (&twenty, 5.0, Some(1.0)),
        (&twenty, 0.1, Some(1.0)),
        (&[3.0, 1.0, 2.0], 50.0, Some(2.0)),
        (&[7.0], 95.0, Some(7.0)),
        (&[], 95.0, None),
        (&twenty, 0.0, None),
        (&twenty, 101.0, None),
        (&[10.0, 300.0, 20.0, 30.0], 75.0, Some(30.0)),
        (&[10.0, 300.0, 20.0, 30.0], 76.0, Some(300.0)),
    ];
    for (samples, p, want) in table {
        assert_eq!(percentile(samples, p), want, "p{p} of {samples:?}");
    }
}

fn http_plan() -> HttpPlan {
    HttpPlan {
        path: "/health".into(),
        port: 8080,
        expect_status: 200,
        body_contains: None,
        timeout: Duration::from_secs(2),
        attempts: 3,
        retry_interval: Duration::from_millis(10),
        url: None,
    }
}

fn answer(status: u16, body_matched: bool) -> HttpAttempt {
    HttpAttempt {
        status: Some(status),
        body_matched,
        elapsed_ms: 3.0,
        error: None,
    }
}

fn no_answer(error: &str) -> HttpAttempt {
    HttpAttempt {
        status: None,
        body_matched: false,
        elapsed_ms: 2000.0,
        error: Some(error.into()),
    }
}

#[test]
fn an_http_check_passes_when_one_attempt_gets_the_expected_answer() {
    let with_body = HttpPlan {
        body_contains: Some("ok".into()),
        ..http_plan()
    };
    let table = [
        (
            http_plan(),
            vec![answer(200, true)],
            true,
            200.0,
            "status 200 in 3 ms (1 attempt)",
        ),
        (
            http_plan(),
            vec![answer(500, true), answer(200, true)],
            true,
            200.0,
            "status 200",
        ),
        (
            http_plan(),
            vec![answer(500, true), answer(500, true)],
            false,
            500.0,
            "status 500, expected 200 (2 attempts)",
        ),
        (
            http_plan(),
            vec![no_answer("connection refused")],
            false,
            0.0,
            "no answer: connection refused",
        ),
        (
            with_body.clone(),
            vec![answer(200, false)],
            false,
            200.0,
            "body does not contain \"ok\"",
        ),
        (
            with_body,
            vec![answer(200, true)],
            true,
            200.0,
            "status 200",
        ),
        (http_plan(), vec![], false, 0.0, "no request"),
    ];
    for (plan, attempts, ok, value, detail) in table {
        let m = http_measurement("health", "web-1@127.0.0.5".into(), &plan, &attempts);
        assert_eq!(
            (m.ok, m.value, m.unit.as_str()),
            (ok, value, "status"),
            "{attempts:?}"
        );
        assert!(
            m.detail.contains(detail),
            "{:?} does not say {detail:?}",
            m.detail
        );
        assert_eq!(m.target, "web-1@127.0.0.5");
    }
}

fn latency_plan(threshold_ms: u32, max_error_rate: f64) -> LatencyPlan {
    LatencyPlan {
        path: "/health".into(),
        port: 8080,
        requests: 20,
        percentile: 95.0,
        threshold_ms,
        max_error_rate,
        timeout: Duration::from_secs(2),
    }
}

#[test]
fn a_latency_check_judges_the_percentile_and_the_error_share() {
    let fast: Vec<Sample> = (1..=20)
        .map(|i| Sample {
            elapsed_ms: f64::from(i),
            ok: true,
        })
        .collect();
    let mut slow_tail = fast.clone();
    slow_tail[19].elapsed_ms = 900.0;
    slow_tail[18].elapsed_ms = 800.0;
    let mut one_error = fast.clone();
    one_error[0].ok = false;
    // (samples, threshold, max error rate) → (latency ok, p value, errors ok, error share)
    let table = [
        (&fast, 100, 0.0, (true, 19.0, true, 0.0)),
        (&fast, 10, 0.0, (false, 19.0, true, 0.0)),
        (&slow_tail, 100, 0.0, (false, 800.0, true, 0.0)),
        (&one_error, 100, 0.0, (true, 19.0, false, 0.05)),
        (&one_error, 100, 0.05, (true, 19.0, true, 0.05)),
    ];
    for (samples, threshold, rate, want) in table {
        let [lat, err] = latency_measurements(
            "speed",
            "web-1@127.0.0.5",
            &latency_plan(threshold, rate),
            samples,
        );
        assert_eq!(
            (lat.ok, lat.value, err.ok, err.value),
            want,
            "{threshold} {rate}"
        );
        assert_eq!((lat.unit.as_str(), err.unit.as_str()), ("ms", "ratio"));
        assert!(lat.detail.starts_with("p95 "), "{}", lat.detail);
    }
    let [lat, err] = latency_measurements("speed", "t", &latency_plan(100, 1.0), &[]);
    assert!(!lat.ok && !err.ok, "no requests is no evidence");
}

#[test]
fn a_smoke_test_passes_on_exit_zero_only() {
    let plan = SmokePlan {
        argv: vec!["./smoke".into(), "--fast".into()],
        timeout: Duration::from_secs(1),
    };
    let table = [
        (
            SmokeRun::Exited {
                code: Some(0),
                output: String::new(),
            },
            true,
            0.0,
            "exit 0",
        ),
        (
            SmokeRun::Exited {
                code: Some(1),
                output: "boom\n".into(),
            },
            false,
            1.0,
            "exit 1: boom",
        ),
        (
            SmokeRun::Exited {
                code: None,
                output: String::new(),
            },
            false,
            -1.0,
            "signal",
        ),
        (
            SmokeRun::TimedOut { after_ms: 1000 },
            false,
            -1.0,
            "timeout of 1000 ms",
        ),
        (
            SmokeRun::NotStarted("no such file".into()),
            false,
            -1.0,
            "could not start: no such file",
        ),
    ];
    for (run, ok, value, detail) in table {
        let m = smoke_measurement("smoke", &plan, &run);
        assert_eq!(
            (m.ok, m.value, m.unit.as_str(), m.target.as_str()),
            (ok, value, "exit", "./smoke")
        );
        assert!(m.detail.contains(detail), "{:?}", m.detail);
    }
}

#[test]
fn pod_health_needs_a_ready_pod_that_has_not_restarted_since_the_step_began() {
    let target = PodTarget {
        name: "web-1".into(),
        ip: "127.0.0.5".parse().unwrap(),
        image: String::new(),
    };
    let healthy = PodObservation {
        ip: Some("127.0.0.5".into()),
        phase: "Running".into(),
        ready: true,
        created_ms: Some(900),
        ..Default::default()
    };
    let began = Some(1_000);
    /// (case, what the cluster says, restarts when first seen, healthy?, detail)
    type Row<'a> = (&'a str, Option<PodObservation>, Option<u32>, bool, &'a str);
    let table: Vec<Row> = vec![
        (
            "healthy",
            Some(healthy.clone()),
            None,
            true,
            "ready, restarts 0",
        ),
        ("gone", None, None, false, "no longer exists"),
        (
            "not ready",
            Some(PodObservation {
                ready: false,
                ..healthy.clone()
            }),
            None,
            false,
            "not ready",
        ),
        (
            "crash loop",
            Some(PodObservation {
                ready: false,
                restarts: 3,
                waiting: vec![("app".into(), "CrashLoopBackOff".into())],
                last_termination_ms: Some(1_500),
                ..healthy.clone()
            }),
            None,
            false,
            "container app is waiting in CrashLoopBackOff",
        ),
        (
            "image pull",
            Some(PodObservation {
                waiting: vec![("app".into(), "ImagePullBackOff".into())],
                ..healthy.clone()
            }),
            None,
            false,
            "ImagePullBackOff",
        ),
        (
            "restarted before the step, stable since",
            Some(PodObservation {
                restarts: 2,
                last_termination_ms: Some(500),
                ..healthy.clone()
            }),
            Some(2),
            true,
            "restarts 2",
        ),
        (
            "restarted during the analysis",
            Some(PodObservation {
                restarts: 3,
                last_termination_ms: Some(500),
                ..healthy.clone()
            }),
            Some(2),
            false,
            "restarted since the step began",
        ),
        (
            "restarted after the step began, before the analysis",
            Some(PodObservation {
                restarts: 1,
                last_termination_ms: Some(1_200),
                ..healthy.clone()
            }),
            None,
            false,
            "restarted since the step began (restarts 1)",
        ),
        (
            "created in the step and restarted",
            Some(PodObservation {
                restarts: 1,
                created_ms: Some(1_100),
                ..healthy.clone()
            }),
            None,
            false,
            "restarted",
        ),
        (
            "deleted",
            Some(PodObservation {
                terminating: true,
                ..healthy.clone()
            }),
            None,
            false,
            "being deleted",
        ),
        (
            "replaced",
            Some(PodObservation {
                ip: Some("127.0.0.9".into()),
                ..healthy.clone()
            }),
            None,
            false,
            "IP is now 127.0.0.9",
        ),
        (
            "ended",
            Some(PodObservation {
                phase: "Failed".into(),
                ready: false,
                ..healthy.clone()
            }),
            None,
            false,
            "phase Failed",
        ),
        (
            "still creating is only not ready",
            Some(PodObservation {
                ready: false,
                waiting: vec![("app".into(), "ContainerCreating".into())],
                ..healthy
            }),
            None,
            false,
            "not ready",
        ),
    ];
    for (name, observed, baseline, ok, detail) in table {
        let m = pod_measurement(&target, observed.as_ref(), began, baseline);
        assert_eq!(m.ok, ok, "{name}: {}", m.detail);
        assert!(
            m.detail.contains(detail),
            "{name}: {:?} does not say {detail:?}",
            m.detail
        );
        assert_eq!(
            (m.check.as_str(), m.target.as_str(), m.unit.as_str()),
            (POD_HEALTH, "web-1@127.0.0.5", "restarts")
        );
    }
}

fn m(check: &str, target: &str, ok: bool) -> Measurement {
    measurement(
        check,
        target.into(),
        ok,
        1.0,
        "status",
        if ok {
            "fine".into()
        } else {
            "status 500".into()
        },
    )
}

fn settings(duration: u64, limit: u32) -> Settings {
    Settings {
        duration: Duration::from_secs(duration),
        interval: Duration::from_secs(2),
        failure_limit: limit,
    }
}

#[test]
fn failed_rounds_beyond_the_limit_fail_at_once() {
    // rounds as (ok?) per round → (rounds run until stop, verdict failed?)
    let table: Vec<(u32, Vec<bool>, u32, bool)> = vec![
        (0, vec![true; 6], 6, false),
        (0, vec![false], 1, true),
        (0, vec![true, true, false], 3, true),
        (1, vec![true, false, true, true, true, true], 6, false),
        (1, vec![false, true, false], 3, true),
        (2, vec![false, false, true, true, true, true], 6, false),
    ];
    for (limit, rounds, stopped_after, failed) in table {
        let mut tally = Tally::new(settings(10, limit));
        assert_eq!(tally.total_rounds(), 6);
        for ok in &rounds {
            let outcome = tally.record(
                vec![
                    m("health", "web-1@127.0.0.5", *ok),
                    m("health", "web-2@127.0.0.6", true),
                ],
                None,
            );
            assert_eq!(outcome == RoundOutcome::Failed, !ok);
            if tally.exceeded() {
                break;
            }
        }
        assert_eq!(
            tally.rounds_run(),
            stopped_after,
            "limit {limit}, {rounds:?}"
        );
        let verdict = tally.verdict(1);
        let (measurements, failed_now) = match &verdict {
            Verdict::Passed { measurements } => (measurements, false),
            Verdict::Failed {
                measurements,
                reason,
            } => {
                assert!(
                    reason.contains("check health on web-1@127.0.0.5: status 500"),
                    "{reason}"
                );
                assert!(
                    reason.ends_with(&format!(
                        "rounds failed, more than the failure limit of {limit})"
                    )),
                    "{reason}"
                );
                (measurements, true)
            }
            Verdict::Inconclusive { reason } | Verdict::Undecided { reason, .. } => {
                panic!("inconclusive: {reason}")
            }
        };
        assert_eq!(failed_now, failed, "limit {limit}, {rounds:?}");
        // The summary, then one per target however many rounds ran, the failing one first.
        assert_eq!(measurements.len(), 3);
        assert_eq!(measurements[0].unit, "rounds");
        assert_eq!(measurements[0].value, f64::from(stopped_after));
        assert!(
            measurements[0]
                .detail
                .starts_with(&format!("{stopped_after} of 6 rounds run")),
            "{}",
            measurements[0].detail
        );
        assert_eq!(measurements[2].target, "web-2@127.0.0.6");
        assert!(
            measurements[2].detail.ends_with(&format!(
                "[ok in {stopped_after} of {stopped_after} rounds]"
            )),
            "{}",
            measurements[2].detail
        );
        let failures = rounds
            .iter()
            .take(stopped_after as usize)
            .filter(|ok| !**ok)
            .count();
        if failures > 0 {
            assert_eq!(measurements[1].target, "web-1@127.0.0.5");
            assert!(!measurements[1].ok);
            assert!(
                measurements[1].detail.starts_with("status 500"),
                "{}",
                measurements[1].detail
            );
            assert!(
                measurements[1]
                    .detail
                    .ends_with(&format!("[failed {failures} of {stopped_after} rounds]")),
                "{}",
                measurements[1].detail
            );
        }
    }
}

#[test]
fn rounds_that_cannot_read_the_cluster_give_no_verdict() {
    let mut tally = Tally::new(settings(4, 0));
    assert_eq!(
        tally.record(vec![m("health", "a", true)], Some("apiserver down".into())),
        RoundOutcome::Inconclusive
    );
    assert_eq!(
        tally.record(vec![m("health", "a", true)], Some("apiserver down".into())),
        RoundOutcome::Inconclusive
    );
    assert_eq!(
        tally.record(vec![m("health", "a", true)], None),
        RoundOutcome::Passed
    );
    match tally.verdict(1) {
        Verdict::Inconclusive { reason } => assert!(
            reason.contains("2 of 3 rounds could not read the pods: apiserver down"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // A failure is a failure even when the cluster could not be read in the same round.
    let mut tally = Tally::new(settings(4, 0));
    assert_eq!(
        tally.record(vec![m("health", "a", false)], Some("apiserver down".into())),
        RoundOutcome::Failed
    );
    assert!(matches!(tally.verdict(1), Verdict::Failed { .. }));
    // A minority of unreadable rounds does not stop a pass.
    let mut tally = Tally::new(settings(4, 0));
    tally.record(vec![m("health", "a", true)], Some("blip".into()));
    tally.record(vec![m("health", "a", true)], None);
    tally.record(vec![m("health", "a", true)], None);
    assert!(matches!(tally.verdict(1), Verdict::Passed { .. }));
}

#[test]
fn verdicts_stay_bounded_however_many_pods_and_rounds() {
    let mut tally = Tally::new(settings(3600, 10_000));
    for _ in 0..50 {
        let round: Vec<Measurement> = (0..500)
            .map(|i| {
                let mut x = m(
                    "health",
                    &format!("web-{i}@127.0.{}.{}", i / 256, i % 256),
                    i % 7 != 0,
                );
                x.detail = "d".repeat(1000);
                x
            })
            .collect();
        tally.record(round, None);
    }
    let Verdict::Passed { measurements } = tally.verdict(3) else {
        panic!("limit not exceeded")
    };
    assert!(measurements.len() <= MAX_MEASUREMENTS);
    // Failing targets come first, so the cap keeps them.
    assert!(measurements[1..].iter().take(50).all(|m| !m.ok));
    let size = AnalysisFailed {
        step: 3,
        measurements,
        reason: String::new(),
    }
    .encoded_len();
    assert!(size <= MAX_VERDICT_BYTES, "{size} bytes");
}

#[test]
fn long_texts_are_cut_on_character_boundaries() {
    assert_eq!(truncate("abc", 3), "abc");
    assert_eq!(truncate("abcd", 3), "ab…");
    assert_eq!(truncate("ééééé", 4), "ééé…");
    assert_eq!(truncate("a\nb", 5), "a b");
}

#[test]
fn a_canary_step_may_have_an_analysis_of_its_own() {
    use baton_proto::v1::{AnalysisParams, CanaryParams, CanaryStep, Strategy};
    let spec = ReleaseSpec {
        strategy: Strategy::Canary as i32,
        analysis: Some(AnalysisParams {
            duration_seconds: 30,
            interval_seconds: 5,
            failure_limit: 1,
        }),
        canary: Some(CanaryParams {
            steps: vec![
                CanaryStep {
                    weight: 10,
                    analysis: Some(AnalysisParams {
                        duration_seconds: 120,
                        interval_seconds: 0,
                        failure_limit: 3,
                    }),
                    ..Default::default()
                },
                CanaryStep {
                    weight: 100,
                    ..Default::default()
                },
            ],
        }),
        ..Default::default()
    };
    let own = for_step(&spec, 0).analysis.unwrap();
    assert_eq!(
        (
            own.duration_seconds,
            own.interval_seconds,
            own.failure_limit
        ),
        (120, 5, 3)
    );
    let base = for_step(&spec, 1).analysis.unwrap();
    assert_eq!(
        (
            base.duration_seconds,
            base.interval_seconds,
            base.failure_limit
        ),
        (30, 5, 1)
    );
}

fn prometheus_check(query: &str, condition: &str, aggregate: &str, on_error: bool) -> Check {
    Check {
        name: "error-rate".into(),
        kind: Some(check::Kind::Prometheus(PrometheusCheck {
            address: "http://127.0.0.1:9090/".into(),
            query: query.into(),
            judgement: Some(MetricJudgement {
                condition: condition.into(),
                aggregate: aggregate.into(),
                error_limit: 2,
                inconclusive_on_error: on_error,
                timeout_ms: 0,
            }),
        })),
    }
}

fn metric_plan_of(c: Check) -> MetricPlan {
    let spec = ReleaseSpec {
        checks: vec![c],
        ..spec()
    };
    match plan(&spec).unwrap().checks.remove(0).kind {
        CheckKind::Metric(m) => m,
        other => panic!("{other:?}"),
    }
}

#[test]
fn metric_checks_are_planned_with_their_defaults_and_refused_when_they_cannot_run() {
    let m = metric_plan_of(prometheus_check("up", "result < 0.01", "", false));
    assert_eq!(
        m.source,
        MetricSource::Prometheus {
            address: "http://127.0.0.1:9090".into(),
            query: "up".into()
        }
    );
    assert_eq!(m.timeout, DEFAULT_METRIC_TIMEOUT);
    assert_eq!(m.aggregate, Aggregate::Each);
    for (c, needle) in [
        (prometheus_check("up", "result ~ 1", "", false), "condition"),
        (prometheus_check("up", "< 1", "median", false), "aggregate"),
        (
            prometheus_check("up{{{secret}}}", "< 1", "", false),
            "{{secret}}",
        ),
        (prometheus_check(" ", "< 1", "", false), "needs a query"),
    ] {
        let spec = ReleaseSpec {
            checks: vec![c],
            ..spec()
        };
        let e = plan(&spec).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn a_metric_reading_is_judged_per_series_or_aggregated_and_errors_count_in_a_row() {
    let each = metric_plan_of(prometheus_check("q", "result < 0.1", "", false));
    let mut errors = 0;
    let reading = Ok(vec![
        ("{pod=\"a\"}".to_owned(), 0.05),
        ("{pod=\"b\"}".to_owned(), 0.4),
    ]);
    let (ms, stop) = metric_measurements("error-rate", &each, &reading, &mut errors);
    assert!(stop.is_none());
    assert_eq!(ms.len(), 2);
    assert!(ms[0].ok && !ms[1].ok, "{ms:?}");
    assert_eq!(ms[1].target, "{pod=\"b\"}");
    assert_eq!(ms[1].detail, "0.4 >= 0.1 (must be result < 0.1)");

    let max = metric_plan_of(prometheus_check("q", "result < 0.5", "max", false));
    let (ms, _) = metric_measurements("error-rate", &max, &reading, &mut errors);
    assert_eq!(ms.len(), 1);
    assert!(ms[0].ok && ms[0].value == 0.4, "{ms:?}");
    assert_eq!(ms[0].target, "max(http://127.0.0.1:9090)");

    // NaN (0/0: no traffic yet) and an empty result are no data: errors, tolerated up to the
    // limit (2), then the round fails.
    let nan = Ok(vec![("{}".to_owned(), f64::NAN)]);
    let empty = Ok(vec![]);
    let down = Err("cannot connect: connection refused".to_owned());
    let mut errors = 0;
    for (i, r) in [&nan, &empty].into_iter().enumerate() {
        let (ms, stop) = metric_measurements("error-rate", &each, r, &mut errors);
        assert!(ms[0].ok && stop.is_none(), "{i}: {ms:?}");
        assert_eq!(ms[0].unit, "errors");
    }
    let (ms, stop) = metric_measurements("error-rate", &each, &down, &mut errors);
    assert!(!ms[0].ok && stop.is_none(), "{ms:?}");
    assert!(
        ms[0]
            .detail
            .contains("3 errors in a row, more than the limit of 2: cannot connect"),
        "{}",
        ms[0].detail
    );
    // A good reading starts the count again.
    let _ = metric_measurements("error-rate", &each, &reading, &mut errors);
    assert_eq!(errors, 0);

    // on_error: inconclusive ends the analysis without a verdict instead.
    let lenient = metric_plan_of(prometheus_check("q", "result < 0.1", "", true));
    let mut errors = 2;
    let (ms, stop) = metric_measurements("error-rate", &lenient, &down, &mut errors);
    assert!(ms[0].ok, "{ms:?}");
    assert!(stop.unwrap().contains("connection refused"));
}

#[test]
fn a_query_s_variables_come_from_the_release_and_its_step() {
    let pods = [PodTarget {
        name: "web-canary-5d9f-x1".into(),
        ip: "10.0.0.7".parse().unwrap(),
        image: "img".into(),
    }];
    let ctx = ReleaseContext::new(&spec(), "r-1", 2, &pods, Duration::from_secs(2));
    assert_eq!(
        ctx.query(r#"rate(x{pod=~"{{pods}}",namespace="{{namespace}}",track="{{track}}"}[{{window}}]) # {{app}} {{env}} {{release_id}} {{step}}"#),
        r#"rate(x{pod=~"web-canary-5d9f-x1",namespace="web",track="canary"}[10s]) # web staging r-1 2"#
    );
    let body = ctx.webhook_body("score");
    assert_eq!(body["app"], "web");
    assert_eq!(body["step"], 2);
    assert_eq!(body["track"], "canary");
    assert_eq!(body["check"], "score");
    assert_eq!(body["strategy"], "canary");
    assert_eq!(body["pods"][0]["ip"], "10.0.0.7");
    let green = ReleaseSpec {
        strategy: Strategy::BlueGreen as i32,
        ..spec()
    };
    let pods = [PodTarget {
        name: "web-green-7c-1".into(),
        ..pods[0].clone()
    }];
    let ctx = ReleaseContext::new(&green, "r-1", 0, &pods, Duration::from_secs(30));
    assert_eq!(ctx.query("{{track}} {{window}}"), "green 30s");
}

#[test]
fn an_undecided_analysis_keeps_what_it_measured() {
    let mut tally = Tally::new(settings(4, 0));
    tally.record(vec![m("health", "a", true)], None);
    tally.record(vec![m("error-rate", "prometheus", false)], None);
    match tally.undecided(2, "error-rate: 5 errors in a row".into()) {
        Verdict::Undecided {
            measurements,
            reason,
        } => {
            assert_eq!(reason, "error-rate: 5 errors in a row");
            assert_eq!(measurements[0].unit, "rounds");
            assert!(measurements
                .iter()
                .any(|m| m.check == "error-rate" && !m.ok));
            assert!(measurements.iter().any(|m| m.check == "health" && m.ok));
        }
        other => panic!("{other:?}"),
    }
}
