//! Golden fixtures: one encoded envelope per payload type, checked in under `fixtures/`.
//!
//! The test decodes each file and compares it with the message built here. If a schema change
//! renumbers or retypes a field, the old bytes no longer decode to the same message and this
//! fails — events already in the stream must stay readable. To add a fixture for a new message,
//! run `BATON_BLESS=1 cargo test -p baton-proto --test golden` once and check the file in; never
//! re-bless an existing one.

use std::path::PathBuf;

use baton_proto::v1::{envelope::Payload, *};
use baton_proto::{Message, Timestamp};

fn spec() -> ReleaseSpec {
    ReleaseSpec {
        app: "checkout".into(),
        env: "production".into(),
        cluster: "eu-west".into(),
        namespace: "shop".into(),
        image: "registry.example/shop/checkout:v2".into(),
        container: "app".into(),
        strategy: Strategy::Canary as i32,
        rolling: Some(RollingParams {
            max_surge: "25%".into(),
            max_unavailable: "0".into(),
        }),
        canary: Some(CanaryParams {
            steps: vec![
                CanaryStep {
                    weight: 10,
                    pause_seconds: 60,
                    pause_until_promoted: false,
                    ..Default::default()
                },
                CanaryStep {
                    weight: 50,
                    pause_seconds: 0,
                    pause_until_promoted: true,
                    ..Default::default()
                },
                CanaryStep {
                    weight: 100,
                    pause_seconds: 0,
                    pause_until_promoted: false,
                    ..Default::default()
                },
            ],
        }),
        blue_green: Some(BlueGreenParams {
            scale_down_delay_seconds: 300,
            post_promotion_analysis: true,
            // Added later: the older fixtures encode it unset.
            manual_promotion: false,
        }),
        checks: vec![
            Check {
                name: "health".into(),
                kind: Some(check::Kind::Http(HttpCheck {
                    path: "/health".into(),
                    expect_status: 200,
                    body_contains: "ok".into(),
                    timeout_ms: 2000,
                    retries: 3,
                    interval_ms: 500,
                    url: "http://checkout.example/health".into(),
                    port: 8080,
                })),
            },
            Check {
                name: "p95".into(),
                kind: Some(check::Kind::Latency(LatencyCheck {
                    path: "/".into(),
                    requests: 50,
                    percentile: 95.0,
                    threshold_ms: 250,
                    max_error_rate: 0.01,
                    port: 8080,
                })),
            },
            Check {
                name: "smoke".into(),
                kind: Some(check::Kind::Smoke(SmokeCheck {
                    argv: vec!["/usr/bin/true".into(), "--quiet".into()],
                    timeout_ms: 10_000,
                })),
            },
        ],
        analysis: Some(AnalysisParams {
            duration_seconds: 60,
            interval_seconds: 10,
            failure_limit: 2,
        }),
        rollback_on_failure: true,
        step_timeout_seconds: 300,
        port: 8080,
        commit: "9fceb02".into(),
        commit_time: Some(Timestamp {
            seconds: 1_780_000_000,
            nanos: 5,
        }),
        build: Some(BuildParams {
            argv: vec!["make".into(), "image".into()],
            timeout_seconds: 900,
        }),
        ingress: "checkout".into(),
        config_revision: 7,
        // Added later: the fixtures encode it unset.
        deadline_margin_seconds: 0,
        http_route: String::new(),
    }
}

fn measurements() -> Vec<Measurement> {
    vec![Measurement {
        check: "p95".into(),
        target: "checkout-abc@127.16.0.9".into(),
        ok: false,
        value: 812.5,
        unit: "ms".into(),
        detail: "p95 812.5ms over 250ms".into(),
    }]
}

/// Every payload type with every field set, by fixture name.
fn samples() -> Vec<(&'static str, Payload)> {
    let rid = "01890a5d-ac96-774b-bcce-b302099a8057";
    vec![
        (
            "release.requested",
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec()) }),
        ),
        (
            "release.abort_requested",
            Payload::ReleaseAbortRequested(ReleaseAbortRequested {
                reason: "bad".into(),
            }),
        ),
        (
            "release.pause_requested",
            Payload::ReleasePauseRequested(ReleasePauseRequested {
                reason: "look".into(),
            }),
        ),
        (
            "release.resume_requested",
            Payload::ReleaseResumeRequested(ReleaseResumeRequested {}),
        ),
        (
            "release.promote_requested",
            Payload::ReleasePromoteRequested(ReleasePromoteRequested { full: true }),
        ),
        (
            "rollback.requested",
            Payload::RollbackRequested(RollbackRequested {
                app: "checkout".into(),
                env: "production".into(),
                namespace: "shop".into(),
                cluster: "eu-west".into(),
                reason: "errors up".into(),
                target_release_id: rid.into(),
            }),
        ),
        (
            "build.started",
            Payload::BuildStarted(BuildStarted {
                image: "checkout:v2".into(),
                backend: "resolve".into(),
            }),
        ),
        (
            "build.succeeded",
            Payload::BuildSucceeded(BuildSucceeded {
                image_ref: "registry.example/shop/checkout@sha256:ab".into(),
                digest: "sha256:ab".into(),
                log_object: "build/1".into(),
            }),
        ),
        (
            "build.failed",
            Payload::BuildFailed(BuildFailed {
                reason: "not found".into(),
                log_object: "build/2".into(),
            }),
        ),
        (
            "deploy.started",
            Payload::DeployStarted(DeployStarted {
                strategy: Strategy::BlueGreen as i32,
                previous_revision: "3".into(),
                previous_image: "checkout@sha256:cd".into(),
                workload: "checkout".into(),
                replicas: 4,
            }),
        ),
        (
            "deploy.step_started",
            Payload::DeployStepStarted(DeployStepStarted {
                step: 2,
                weight: 50,
                ..Default::default()
            }),
        ),
        (
            "deploy.step_ready",
            Payload::DeployStepReady(DeployStepReady {
                step: 2,
                weight: 50,
                pods: vec![PodRef {
                    name: "checkout-1".into(),
                    ip: "127.16.0.9".into(),
                    image: "checkout@sha256:ab".into(),
                }],
            }),
        ),
        (
            "deploy.completed",
            Payload::DeployCompleted(DeployCompleted {
                revision: "4".into(),
                image_ref: "checkout@sha256:ab".into(),
            }),
        ),
        (
            "deploy.failed",
            Payload::DeployFailed(DeployFailed {
                step: 1,
                reason: "crash loop".into(),
                kind: FailureKind::CrashLoop as i32,
                cluster_changed: true,
            }),
        ),
        (
            "release.succeeded",
            Payload::ReleaseSucceeded(ReleaseSucceeded {
                image_ref: "checkout@sha256:ab".into(),
            }),
        ),
        (
            "release.queued",
            Payload::ReleaseQueued(ReleaseQueued {
                blocking_release_id: rid.into(),
            }),
        ),
        (
            "release.paused",
            Payload::ReleasePaused(ReleasePaused {
                step: 1,
                reason: "until promoted".into(),
                ..Default::default()
            }),
        ),
        (
            "release.resumed",
            Payload::ReleaseResumed(ReleaseResumed { step: 1 }),
        ),
        (
            "analysis.started",
            Payload::AnalysisStarted(AnalysisStarted {
                step: 1,
                checks: vec!["health".into(), "p95".into()],
            }),
        ),
        (
            "analysis.passed",
            Payload::AnalysisPassed(AnalysisPassed {
                step: 1,
                measurements: measurements(),
            }),
        ),
        (
            "analysis.failed",
            Payload::AnalysisFailed(AnalysisFailed {
                step: 1,
                measurements: measurements(),
                reason: "p95".into(),
            }),
        ),
        (
            "analysis.inconclusive",
            Payload::AnalysisInconclusive(AnalysisInconclusive {
                step: 1,
                measurements: measurements(),
                reason: "error-rate: 5 errors in a row".into(),
            }),
        ),
        (
            "rollback.started",
            Payload::RollbackStarted(RollbackStarted {
                reason: "analysis failed".into(),
                to_revision: "3".into(),
                to_image: "checkout@sha256:cd".into(),
            }),
        ),
        (
            "rollback.completed",
            Payload::RollbackCompleted(RollbackCompleted {
                restored_revision: "5".into(),
                restored_image: "checkout@sha256:cd".into(),
                ..Default::default()
            }),
        ),
        (
            "rollback.failed",
            Payload::RollbackFailed(RollbackFailed {
                reason: "no revision".into(),
            }),
        ),
        (
            "release.rolled_back",
            Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: "analysis failed".into(),
            }),
        ),
        (
            "release.failed",
            Payload::ReleaseFailed(ReleaseFailed {
                reason: "build failed".into(),
            }),
        ),
    ]
}

fn envelope(payload: Payload) -> Envelope {
    Envelope {
        id: "3f1c1f4e-6f0e-5d7a-9a55-0c3e6a8f1b22".into(),
        release_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
        causation_id: "01890a5d-ac96-774b-bcce-b302099a8058".into(),
        time: Some(Timestamp {
            seconds: 1_780_000_100,
            nanos: 123_000_000,
        }),
        source: Some(Source {
            agent: "deployer".into(),
            cluster: "eu-west".into(),
            instance: "deployer-0".into(),
        }),
        actor: "ci:github/shop".into(),
        payload: Some(payload),
    }
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[test]
fn every_payload_type_has_a_fixture_that_decodes_to_the_same_message() {
    let bless = std::env::var_os("BATON_BLESS").is_some();
    let samples = samples();
    assert_eq!(
        samples.len(),
        27,
        "one fixture per event type of the contract"
    );
    for (name, payload) in samples {
        let expected = envelope(payload);
        let path = fixtures_dir().join(format!("{name}.bin"));
        if bless && !path.exists() {
            std::fs::write(&path, expected.encode_to_vec()).unwrap();
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
        let decoded = Envelope::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            decoded, expected,
            "fixture {name} no longer decodes to the same message"
        );
        // And the encoding is stable, so the checked-in bytes are what the code writes today.
        assert_eq!(decoded.encode_to_vec(), bytes, "{name}: encoding changed");
    }
}

/// Fields added after the first fixtures, with a fixture of their own (older fixtures stay as
/// they were: they prove old events still decode).
fn later_samples() -> Vec<(&'static str, Payload)> {
    let selector: std::collections::HashMap<String, String> = [
        ("app".to_string(), "checkout".to_string()),
        ("baton.dev/colour".to_string(), "green".to_string()),
    ]
    .into();
    vec![
        (
            "deploy.step_started+action+selector",
            Payload::DeployStepStarted(DeployStepStarted {
                step: 1,
                weight: 100,
                action: "switch Service checkout to green".into(),
                selector: selector.clone(),
            }),
        ),
        (
            "release.paused+gate",
            Payload::ReleasePaused(ReleasePaused {
                step: 2,
                reason: "pause of 300s after step 2".into(),
                gate: true,
            }),
        ),
        (
            "rollback.completed+selector",
            Payload::RollbackCompleted(RollbackCompleted {
                restored_revision: "5".into(),
                restored_image: "checkout@sha256:cd".into(),
                selector,
            }),
        ),
        (
            "release.requested+blue_green_manual_promotion",
            Payload::ReleaseRequested(ReleaseRequested {
                spec: Some(ReleaseSpec {
                    strategy: Strategy::BlueGreen as i32,
                    canary: None,
                    blue_green: Some(BlueGreenParams {
                        scale_down_delay_seconds: 300,
                        post_promotion_analysis: true,
                        manual_promotion: true,
                    }),
                    ..spec()
                }),
            }),
        ),
    ]
}

#[test]
fn fields_added_later_have_fixtures_too() {
    let bless = std::env::var_os("BATON_BLESS").is_some();
    for (name, payload) in later_samples() {
        let expected = envelope(payload);
        let path = fixtures_dir().join(format!("{name}.bin"));
        if bless && !path.exists() {
            std::fs::write(&path, expected.encode_to_vec()).unwrap();
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
        let decoded = Envelope::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            decoded, expected,
            "fixture {name} no longer decodes to the same message"
        );
    }
}

#[test]
fn unknown_fields_from_a_newer_schema_are_skipped() {
    // A newer Baton may add fields; this version must still decode what it knows.
    let mut bytes = envelope(Payload::ReleaseResumed(ReleaseResumed { step: 3 })).encode_to_vec();
    // field 99, varint 1
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
    let decoded = Envelope::decode(bytes.as_slice()).unwrap();
    assert_eq!(
        decoded.payload,
        Some(Payload::ReleaseResumed(ReleaseResumed { step: 3 }))
    );
}
