//! Table tests of the release fold: every status, every transition, duplicates and disorder.

use std::collections::HashSet;

use baton_proto::v1::{envelope::Payload, *};

use crate::event::{Event, EventType};
use crate::fold::{fold, Status};
use crate::names::ReleaseId;

fn ev(rid: ReleaseId, n: u32, payload: Payload) -> Event {
    Event::numbered(rid, n, payload)
}

fn spec() -> ReleaseSpec {
    ReleaseSpec {
        app: "web".into(),
        env: "staging".into(),
        namespace: "web".into(),
        image: "127.0.0.1:5000/web:v2".into(),
        strategy: Strategy::Rolling as i32,
        rollback_on_failure: true,
        ..Default::default()
    }
}

/// The payloads of a history, named so tables read like the stream.
mod p {
    use super::*;
    pub fn requested() -> Payload {
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec()) })
    }
    pub fn queued(behind: ReleaseId) -> Payload {
        Payload::ReleaseQueued(ReleaseQueued {
            blocking_release_id: behind.to_string(),
        })
    }
    pub fn build_started() -> Payload {
        Payload::BuildStarted(BuildStarted {
            image: "web:v2".into(),
            backend: "resolve".into(),
        })
    }
    pub fn build_ok() -> Payload {
        Payload::BuildSucceeded(BuildSucceeded {
            image_ref: "127.0.0.1:5000/web@sha256:00".into(),
            digest: "sha256:00".into(),
            log_object: String::new(),
        })
    }
    pub fn build_failed() -> Payload {
        Payload::BuildFailed(BuildFailed {
            reason: "image not found".into(),
            log_object: String::new(),
        })
    }
    pub fn deploy_started() -> Payload {
        Payload::DeployStarted(DeployStarted {
            strategy: Strategy::Canary as i32,
            previous_revision: "3".into(),
            previous_image: "web@sha256:11".into(),
            workload: "web".into(),
            replicas: 3,
        })
    }
    pub fn step(step: u32, weight: u32) -> Payload {
        Payload::DeployStepStarted(DeployStepStarted {
            step,
            weight,
            ..Default::default()
        })
    }
    pub fn ready(step: u32, weight: u32) -> Payload {
        Payload::DeployStepReady(DeployStepReady {
            step,
            weight,
            pods: vec![],
        })
    }
    pub fn analysis(step: u32) -> Payload {
        Payload::AnalysisStarted(AnalysisStarted {
            step,
            checks: vec!["http".into()],
        })
    }
    pub fn passed(step: u32) -> Payload {
        Payload::AnalysisPassed(AnalysisPassed {
            step,
            measurements: vec![],
        })
    }
    pub fn analysis_failed(step: u32) -> Payload {
        Payload::AnalysisFailed(AnalysisFailed {
            step,
            measurements: vec![],
            reason: "http 500".into(),
        })
    }
    pub fn deploy_failed(step: u32) -> Payload {
        Payload::DeployFailed(DeployFailed {
            step,
            reason: "crash loop".into(),
            kind: FailureKind::CrashLoop as i32,
            cluster_changed: true,
        })
    }
    pub fn paused(step: u32) -> Payload {
        Payload::ReleasePaused(ReleasePaused {
            step,
            reason: "asked".into(),
            ..Default::default()
        })
    }
    pub fn resumed(step: u32) -> Payload {
        Payload::ReleaseResumed(ReleaseResumed { step })
    }
    pub fn completed() -> Payload {
        Payload::DeployCompleted(DeployCompleted {
            revision: "4".into(),
            image_ref: "web@sha256:00".into(),
        })
    }
    pub fn succeeded() -> Payload {
        Payload::ReleaseSucceeded(ReleaseSucceeded {
            image_ref: "web@sha256:00".into(),
        })
    }
    pub fn rollback_requested() -> Payload {
        Payload::RollbackRequested(RollbackRequested {
            app: "web".into(),
            env: "staging".into(),
            reason: "bad release".into(),
            ..Default::default()
        })
    }
    pub fn rollback_started() -> Payload {
        Payload::RollbackStarted(RollbackStarted {
            reason: "analysis failed".into(),
            ..Default::default()
        })
    }
    pub fn rollback_done() -> Payload {
        Payload::RollbackCompleted(RollbackCompleted {
            restored_revision: "5".into(),
            restored_image: "x".into(),
            ..Default::default()
        })
    }
    pub fn rollback_failed() -> Payload {
        Payload::RollbackFailed(RollbackFailed {
            reason: "no previous revision".into(),
        })
    }
    pub fn rolled_back() -> Payload {
        Payload::ReleaseRolledBack(ReleaseRolledBack {
            reason: "analysis failed".into(),
        })
    }
    pub fn failed() -> Payload {
        Payload::ReleaseFailed(ReleaseFailed {
            reason: "build failed".into(),
        })
    }
    pub fn abort() -> Payload {
        Payload::ReleaseAbortRequested(ReleaseAbortRequested {
            reason: "stop".into(),
        })
    }
    pub fn promote(full: bool) -> Payload {
        Payload::ReleasePromoteRequested(ReleasePromoteRequested { full })
    }
    pub fn pause_req() -> Payload {
        Payload::ReleasePauseRequested(ReleasePauseRequested {
            reason: String::new(),
        })
    }
    pub fn resume_req() -> Payload {
        Payload::ReleaseResumeRequested(ReleaseResumeRequested {})
    }
}

fn history(rid: ReleaseId, payloads: Vec<Payload>) -> Vec<Event> {
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| ev(rid, i as u32, p))
        .collect()
}

/// (name, history, expected status). Each row extends a realistic release.
fn table(rid: ReleaseId) -> Vec<(&'static str, Vec<Payload>, Status)> {
    use p::*;
    let other = ReleaseId::generate();
    let base = || vec![requested(), build_started(), build_ok(), deploy_started()];
    let with = |mut v: Vec<Payload>, more: Vec<Payload>| {
        v.extend(more);
        v
    };
    let _ = rid;
    vec![
        ("nothing yet", vec![], Status::Pending),
        ("requested", vec![requested()], Status::Pending),
        (
            "queued behind another release",
            vec![requested(), queued(other)],
            Status::Queued,
        ),
        (
            "queued while its build ran",
            vec![requested(), build_started(), build_ok(), queued(other)],
            Status::Queued,
        ),
        (
            "building",
            vec![requested(), build_started()],
            Status::Building,
        ),
        (
            "built, waiting for the deployer",
            vec![requested(), build_started(), build_ok()],
            Status::Building,
        ),
        (
            "queue left when the deploy starts",
            with(vec![queued(other)], base()),
            Status::Deploying { step: 0 },
        ),
        ("deploy started", base(), Status::Deploying { step: 0 }),
        (
            "step 0 rolling out",
            with(base(), vec![step(0, 100)]),
            Status::Deploying { step: 0 },
        ),
        (
            "step 0 ready",
            with(base(), vec![step(0, 100), ready(0, 100)]),
            Status::Deploying { step: 0 },
        ),
        (
            "step 0 analysing",
            with(base(), vec![step(0, 10), ready(0, 10), analysis(0)]),
            Status::Analysing { step: 0 },
        ),
        (
            "step 0 passed",
            with(
                base(),
                vec![step(0, 10), ready(0, 10), analysis(0), passed(0)],
            ),
            Status::Deploying { step: 0 },
        ),
        (
            "step 1 analysing",
            with(
                base(),
                vec![
                    step(0, 10),
                    ready(0, 10),
                    analysis(0),
                    passed(0),
                    step(1, 25),
                    ready(1, 25),
                    analysis(1),
                ],
            ),
            Status::Analysing { step: 1 },
        ),
        (
            "paused after step 1",
            with(
                base(),
                vec![step(0, 10), passed(0), step(1, 25), pause_req(), paused(1)],
            ),
            Status::Paused { step: 1 },
        ),
        (
            "paused and resumed",
            with(
                base(),
                vec![
                    step(0, 10),
                    step(1, 25),
                    paused(1),
                    resume_req(),
                    resumed(1),
                ],
            ),
            Status::Deploying { step: 1 },
        ),
        (
            "paused twice, resumed once",
            with(base(), vec![step(1, 25), paused(1), resumed(1), paused(1)]),
            Status::Paused { step: 1 },
        ),
        (
            "promote and abort requests are recorded, not obeyed, by the fold",
            with(base(), vec![step(0, 10), promote(true), abort()]),
            Status::Deploying { step: 0 },
        ),
        (
            "succeeded",
            with(
                base(),
                vec![
                    step(0, 100),
                    ready(0, 100),
                    analysis(0),
                    passed(0),
                    completed(),
                    succeeded(),
                ],
            ),
            Status::Succeeded,
        ),
        (
            "deploy failed, rollback not begun",
            with(base(), vec![step(0, 100), deploy_failed(0)]),
            Status::Deploying { step: 0 },
        ),
        (
            "analysis failed, rolling back",
            with(
                base(),
                vec![
                    step(0, 100),
                    ready(0, 100),
                    analysis(0),
                    analysis_failed(0),
                    rollback_started(),
                ],
            ),
            Status::RollingBack,
        ),
        (
            "rollback completed, not yet ended",
            with(
                base(),
                vec![
                    step(0, 100),
                    deploy_failed(0),
                    rollback_started(),
                    rollback_done(),
                ],
            ),
            Status::RollingBack,
        ),
        (
            "rolled back",
            with(
                base(),
                vec![
                    step(0, 100),
                    deploy_failed(0),
                    rollback_started(),
                    rollback_done(),
                    rolled_back(),
                ],
            ),
            Status::RolledBack,
        ),
        (
            "build failed",
            vec![requested(), build_started(), build_failed()],
            Status::Building,
        ),
        (
            "build failed, release failed",
            vec![requested(), build_started(), build_failed(), failed()],
            Status::Failed,
        ),
        (
            "rollback failed",
            with(
                base(),
                vec![
                    step(0, 100),
                    deploy_failed(0),
                    rollback_started(),
                    rollback_failed(),
                ],
            ),
            Status::RollingBack,
        ),
        (
            "rollback failed, release failed",
            with(
                base(),
                vec![
                    step(0, 100),
                    deploy_failed(0),
                    rollback_started(),
                    rollback_failed(),
                    failed(),
                ],
            ),
            Status::Failed,
        ),
        (
            "manual rollback requested",
            vec![rollback_requested()],
            Status::Pending,
        ),
        (
            "manual rollback running",
            vec![rollback_requested(), rollback_started()],
            Status::RollingBack,
        ),
        (
            "manual rollback done",
            vec![
                rollback_requested(),
                rollback_started(),
                rollback_done(),
                rolled_back(),
            ],
            Status::RolledBack,
        ),
    ]
}

#[test]
fn every_row_folds_to_its_status() {
    let rid = ReleaseId::generate();
    for (name, payloads, expected) in table(rid) {
        let events = history(rid, payloads);
        assert_eq!(fold(&events).status(), expected, "{name}");
    }
}

#[test]
fn the_table_covers_every_status() {
    let rid = ReleaseId::generate();
    let covered: HashSet<&str> = table(rid).into_iter().map(|(_, _, s)| s.name()).collect();
    let all = [
        "pending",
        "queued",
        "building",
        "deploying",
        "analysing",
        "paused",
        "rolling_back",
        "succeeded",
        "failed",
        "rolled_back",
    ];
    for s in all {
        assert!(covered.contains(s), "no row ends in {s}");
    }
}

#[test]
fn duplicated_events_change_nothing() {
    let rid = ReleaseId::generate();
    for (name, payloads, _) in table(rid) {
        let events = history(rid, payloads);
        let doubled: Vec<Event> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
        let once = fold(&events);
        let twice = fold(&doubled);
        assert_eq!(once.status(), twice.status(), "{name}");
        assert_eq!(once.events, twice.events, "{name}");
        assert_eq!(once, twice, "{name}");
    }
}

#[test]
fn out_of_order_events_give_the_same_status() {
    let rid = ReleaseId::generate();
    for (name, payloads, expected) in table(rid) {
        let events = history(rid, payloads);
        let mut reversed = events.clone();
        reversed.reverse();
        assert_eq!(fold(&reversed).status(), expected, "{name} reversed");
        for k in 0..events.len() {
            let mut rotated = events.clone();
            rotated.rotate_left(k);
            assert_eq!(fold(&rotated).status(), expected, "{name} rotated by {k}");
        }
        // A late step event after the release moved on must not move it back.
        let mut late = events.clone();
        if late.len() > 2 {
            let e = late.remove(1);
            late.push(e);
            assert_eq!(fold(&late).status(), expected, "{name} with a late event");
        }
    }
}

#[test]
fn the_first_terminal_event_wins() {
    let rid = ReleaseId::generate();
    let events = history(
        rid,
        vec![
            p::requested(),
            p::succeeded(),
            p::failed(),
            p::rolled_back(),
        ],
    );
    let state = fold(&events);
    assert_eq!(state.status(), Status::Succeeded);
    assert_eq!(state.ended_at_ms, Some(1_001_000));
}

#[test]
fn another_release_events_are_ignored() {
    let rid = ReleaseId::generate();
    let mut events = history(rid, vec![p::requested(), p::build_started()]);
    events.extend(history(ReleaseId::generate(), vec![p::succeeded()]));
    let state = fold(&events);
    assert_eq!(state.status(), Status::Building);
    assert_eq!(state.events, 2);
}

#[test]
fn facts_and_times_are_kept() {
    let rid = ReleaseId::generate();
    let events = history(
        rid,
        vec![
            p::requested(),
            p::build_started(),
            p::build_ok(),
            p::deploy_started(),
            p::step(0, 10),
            p::ready(0, 10),
            p::analysis(0),
            p::analysis_failed(0),
            p::rollback_started(),
            p::rollback_done(),
            p::rolled_back(),
        ],
    );
    let s = fold(&events);
    assert_eq!(s.release_id, Some(rid));
    assert_eq!(s.spec.as_ref().map(|s| s.app.as_str()), Some("web"));
    assert_eq!(s.actor, "alice");
    assert_eq!(s.image_ref.as_deref(), Some("127.0.0.1:5000/web@sha256:00"));
    assert_eq!(s.previous_revision.as_deref(), Some("3"));
    assert_eq!(s.previous_image.as_deref(), Some("web@sha256:11"));
    assert_eq!(s.strategy, Some(Strategy::Canary));
    assert_eq!(s.current_step(), Some(0));
    assert_eq!(s.current_weight(), Some(10));
    assert!(s.cluster_changed);
    let failure = s.failure.clone().unwrap();
    assert_eq!(
        (failure.stage, failure.step, failure.reason.as_str()),
        (EventType::AnalysisFailed, Some(0), "http 500")
    );
    assert_eq!(s.requested_at_ms, Some(1_000_000));
    assert_eq!(s.started_at_ms, Some(1_001_000));
    assert_eq!(s.ended_at_ms, Some(1_010_000));
    assert_eq!(s.duration_ms(0), Some(10_000));
    assert_eq!(s.terminal_reason.as_deref(), Some("analysis failed"));
}

#[test]
fn a_second_request_of_the_same_release_changes_nothing() {
    let rid = ReleaseId::generate();
    let mut other = spec();
    other.namespace = "kube-system".into();
    other.image = "evil:latest".into();
    let events = vec![
        ev(rid, 0, p::requested()),
        ev(rid, 1, p::build_started()),
        ev(
            rid,
            2,
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(other) }),
        ),
    ];
    let state = fold(&events);
    assert_eq!(state.spec, Some(spec()));
    assert!(state.duplicate_request);
    assert_eq!(state.status(), Status::Building);
}

#[test]
fn progress_is_timed_by_the_agents_events_and_not_by_commands() {
    let rid = ReleaseId::generate();
    let events = vec![
        ev(rid, 0, p::requested()),
        ev(rid, 5, p::build_started()),
        ev(
            rid,
            9,
            Payload::ReleasePauseRequested(ReleasePauseRequested::default()),
        ),
    ];
    let state = fold(&events);
    assert_eq!(state.last_progress_ms, Some(events[1].time_ms()));
}
