//! Release histories for tests: events built step by step, each a second after the one before,
//! as the agents would publish them. Used by the model's tests and by the CLI's.

use baton_proto::v1::envelope::Payload;
use baton_proto::v1::*;

use crate::control::Progress;
use crate::event::Event;
use crate::ids::EventKey;
use crate::names::ReleaseId;

/// The time the histories end near (ms since the epoch).
pub const NOW: i64 = 1_000_000;

/// A release's history being written.
pub struct History {
    pub rid: ReleaseId,
    pub events: Vec<Event>,
}

impl History {
    pub fn new(strategy: Strategy, steps: &[(u32, u32, bool)]) -> History {
        let mut h = History {
            rid: ReleaseId::generate(),
            events: Vec::new(),
        };
        let spec = ReleaseSpec {
            app: "web".into(),
            env: "test".into(),
            namespace: "web".into(),
            image: "web:v2".into(),
            strategy: strategy as i32,
            rollback_on_failure: true,
            canary: Some(CanaryParams {
                steps: steps
                    .iter()
                    .map(|(w, p, u)| CanaryStep {
                        weight: *w,
                        pause_seconds: *p,
                        pause_until_promoted: *u,
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        h.add(
            "alice",
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        );
        h
    }

    pub fn canary() -> History {
        History::new(
            Strategy::Canary,
            &[
                (10, 0, false),
                (50, 0, true),
                (75, 60, false),
                (100, 0, false),
            ],
        )
    }

    /// Adds an event at NOW - 100 s + its position.
    pub fn add(&mut self, actor: &str, payload: Payload) -> &mut Self {
        let n = self.events.len();
        let mut e = Event::new(
            self.rid,
            EventKey::Named(&n.to_string()),
            payload,
            Source::default(),
            actor,
            "",
        );
        let ms = NOW - 100_000 + n as i64 * 1000;
        e.envelope.time = Some(prost_types::Timestamp {
            seconds: ms / 1000,
            nanos: 0,
        });
        self.events.push(e);
        self
    }

    pub fn built(&mut self) -> &mut Self {
        self.add(
            "builder",
            Payload::BuildStarted(BuildStarted {
                image: "web:v2".into(),
                backend: "resolve".into(),
            }),
        )
        .add(
            "builder",
            Payload::BuildSucceeded(BuildSucceeded {
                image_ref: "web@sha256:00".into(),
                digest: "sha256:00".into(),
                log_object: String::new(),
            }),
        )
    }

    pub fn started(&mut self) -> &mut Self {
        self.built().add(
            "deployer",
            Payload::DeployStarted(DeployStarted {
                strategy: Strategy::Canary as i32,
                replicas: 2,
                ..Default::default()
            }),
        )
    }

    pub fn step(&mut self, step: u32, weight: u32) -> &mut Self {
        self.add(
            "deployer",
            Payload::DeployStepStarted(DeployStepStarted {
                step,
                weight,
                ..Default::default()
            }),
        )
    }

    pub fn ready(&mut self, step: u32, weight: u32) -> &mut Self {
        self.add(
            "deployer",
            Payload::DeployStepReady(DeployStepReady {
                step,
                weight,
                pods: vec![],
            }),
        )
    }

    pub fn analysing(&mut self, step: u32) -> &mut Self {
        self.add(
            "health-checker",
            Payload::AnalysisStarted(AnalysisStarted {
                step,
                checks: vec!["health".into()],
            }),
        )
    }

    pub fn passed(&mut self, step: u32) -> &mut Self {
        self.add(
            "health-checker",
            Payload::AnalysisPassed(AnalysisPassed {
                step,
                measurements: vec![Measurement {
                    check: "health".into(),
                    target: "web-canary-1@127.0.1.1".into(),
                    ok: true,
                    value: 200.0,
                    unit: "status".into(),
                    detail: String::new(),
                }],
            }),
        )
    }

    /// A step deployed, analysed and passed.
    pub fn done(&mut self, step: u32, weight: u32) -> &mut Self {
        self.step(step, weight)
            .ready(step, weight)
            .analysing(step)
            .passed(step)
    }

    /// A `release.paused`; its actor is the one who caused it (bob, in these tests).
    pub fn paused(&mut self, step: u32, reason: &str) -> &mut Self {
        self.add(
            "bob",
            Payload::ReleasePaused(ReleasePaused {
                step,
                reason: reason.into(),
                // The deployer's gates are not worded "paused by …".
                gate: !reason.starts_with("paused by "),
            }),
        )
    }

    pub fn resumed(&mut self, step: u32) -> &mut Self {
        self.add("deployer", Payload::ReleaseResumed(ReleaseResumed { step }))
    }

    pub fn progress(&self) -> Progress {
        Progress::of(self.rid, &self.events)
    }
}
