//! Scripted release histories for the table tests: each release's events with chosen times.

use baton_core::event::Event;
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};

use crate::history::History;

/// The events of one release, in the order they are fed.
pub struct Script {
    pub id: ReleaseId,
    env: String,
    app: String,
    pub events: Vec<(EventSubject, Event)>,
}

fn timestamp(ms: i64) -> baton_proto::Timestamp {
    baton_proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

impl Script {
    /// A deployment requested at `at_ms` (and its build started at once).
    pub fn release(env: &str, app: &str, at_ms: i64) -> Script {
        let spec = ReleaseSpec {
            app: app.into(),
            env: env.into(),
            namespace: app.into(),
            image: "web:v1".into(),
            strategy: Strategy::Rolling as i32,
            rollback_on_failure: true,
            ..Default::default()
        };
        Script::new(env, app)
            .push(
                at_ms,
                Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
            )
            .push(at_ms, Payload::BuildStarted(BuildStarted::default()))
    }

    /// A manual rollback requested at `at_ms`.
    pub fn manual_rollback(env: &str, app: &str, at_ms: i64) -> Script {
        Script::new(env, app).push(
            at_ms,
            Payload::RollbackRequested(RollbackRequested {
                app: app.into(),
                env: env.into(),
                reason: "bad release".into(),
                ..Default::default()
            }),
        )
    }

    fn new(env: &str, app: &str) -> Script {
        Script {
            id: ReleaseId::generate(),
            env: env.into(),
            app: app.into(),
            events: Vec::new(),
        }
    }

    fn push(mut self, at_ms: i64, payload: Payload) -> Script {
        let n = self.events.len().to_string();
        let mut event = Event::new(
            self.id,
            EventKey::Named(&n),
            payload,
            Source {
                agent: "test".into(),
                cluster: "c".into(),
                instance: "i".into(),
            },
            "alice",
            "",
        );
        event.envelope.time = Some(timestamp(at_ms));
        let subject = EventSubject::new(
            EnvName::new(self.env.as_str()).unwrap(),
            AppName::new(self.app.as_str()).unwrap(),
            self.id,
            event.event_type,
        );
        self.events.push((subject, event));
        self
    }

    /// Sets the commit time of the spec in the request.
    pub fn commit_at(mut self, at_ms: i64) -> Script {
        if let Some(Payload::ReleaseRequested(r)) = self.events[0].1.envelope.payload.as_mut() {
            if let Some(spec) = r.spec.as_mut() {
                spec.commit = "abc123".into();
                spec.commit_time = Some(timestamp(at_ms));
            }
        }
        self
    }

    fn deploy_started(self) -> Script {
        let at = self.events[0].1.time_ms();
        self.push(
            at,
            Payload::DeployStarted(DeployStarted {
                strategy: Strategy::Rolling as i32,
                ..Default::default()
            }),
        )
    }

    pub fn succeed(self, end_ms: i64) -> Script {
        self.deploy_started().push(
            end_ms,
            Payload::ReleaseSucceeded(ReleaseSucceeded {
                image_ref: "web@sha256:00".into(),
            }),
        )
    }

    pub fn fail(self, failed_ms: i64, end_ms: i64) -> Script {
        self.deploy_started()
            .push(
                failed_ms,
                Payload::DeployFailed(DeployFailed {
                    step: 1,
                    reason: "pods crash-loop".into(),
                    kind: FailureKind::CrashLoop as i32,
                    cluster_changed: true,
                }),
            )
            .push(
                end_ms,
                Payload::ReleaseFailed(ReleaseFailed {
                    reason: "rollback failed".into(),
                }),
            )
    }

    pub fn roll_back(self, failed_ms: i64, end_ms: i64) -> Script {
        self.deploy_started()
            .push(
                failed_ms,
                Payload::AnalysisFailed(AnalysisFailed {
                    step: 1,
                    reason: "health check failed".into(),
                    ..Default::default()
                }),
            )
            .push(
                failed_ms,
                Payload::RollbackStarted(RollbackStarted::default()),
            )
            .push(
                end_ms,
                Payload::ReleaseRolledBack(ReleaseRolledBack {
                    reason: "health check failed".into(),
                }),
            )
    }

    pub fn in_flight(self) -> Script {
        let at = self.events[0].1.time_ms();
        self.deploy_started().push(
            at,
            Payload::DeployStepStarted(DeployStepStarted {
                step: 1,
                weight: 100,
                ..Default::default()
            }),
        )
    }

    /// Ends the release (a manual rollback: done) with `release.rolled_back`.
    pub fn rolled_back(self, end_ms: i64) -> Script {
        self.push(
            end_ms,
            Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: "rolled back on request".into(),
            }),
        )
    }

    /// Ends the release (a manual rollback: not done) with `release.failed`.
    pub fn failed(self, end_ms: i64) -> Script {
        self.push(
            end_ms,
            Payload::ReleaseFailed(ReleaseFailed {
                reason: "previous revision is gone".into(),
            }),
        )
    }

    /// `deploy.started` with `strategy` at `at_ms`.
    pub fn deploy(self, at_ms: i64, strategy: Strategy) -> Script {
        self.push(
            at_ms,
            Payload::DeployStarted(DeployStarted {
                strategy: strategy as i32,
                ..Default::default()
            }),
        )
    }

    /// `deploy.step_started` of `step` with `weight` at `at_ms`.
    pub fn step(self, step: u32, weight: u32, at_ms: i64) -> Script {
        self.push(
            at_ms,
            Payload::DeployStepStarted(DeployStepStarted {
                step,
                weight,
                ..Default::default()
            }),
        )
    }

    /// `deploy.step_ready` of `step` at `at_ms`.
    pub fn ready(self, step: u32, weight: u32, at_ms: i64) -> Script {
        self.push(
            at_ms,
            Payload::DeployStepReady(DeployStepReady {
                step,
                weight,
                ..Default::default()
            }),
        )
    }

    /// `deploy.failed` at `step` at `at_ms`.
    pub fn deploy_failed(self, step: u32, at_ms: i64) -> Script {
        self.push(
            at_ms,
            Payload::DeployFailed(DeployFailed {
                step,
                reason: "pods crash-loop".into(),
                kind: FailureKind::CrashLoop as i32,
                cluster_changed: true,
            }),
        )
    }

    pub fn analysis_started(self, step: u32, at_ms: i64) -> Script {
        self.push(
            at_ms,
            Payload::AnalysisStarted(AnalysisStarted {
                step,
                ..Default::default()
            }),
        )
    }

    /// `analysis.passed` (or `analysis.failed` when not `passed`) of `step` at `at_ms`.
    pub fn verdict(self, step: u32, passed: bool, at_ms: i64) -> Script {
        let payload = if passed {
            Payload::AnalysisPassed(AnalysisPassed {
                step,
                ..Default::default()
            })
        } else {
            Payload::AnalysisFailed(AnalysisFailed {
                step,
                reason: "health check failed".into(),
                ..Default::default()
            })
        };
        self.push(at_ms, payload)
    }

    pub fn rollback_started(self, at_ms: i64) -> Script {
        self.push(at_ms, Payload::RollbackStarted(RollbackStarted::default()))
    }

    pub fn rollback_completed(self, at_ms: i64) -> Script {
        self.push(
            at_ms,
            Payload::RollbackCompleted(RollbackCompleted::default()),
        )
    }

    /// Ends the release with `release.succeeded`.
    pub fn succeeded(self, end_ms: i64) -> Script {
        self.push(
            end_ms,
            Payload::ReleaseSucceeded(ReleaseSucceeded {
                image_ref: "web@sha256:00".into(),
            }),
        )
    }

    /// The same release with `strategy` in its spec.
    pub fn with_strategy(mut self, strategy: Strategy) -> Script {
        if let Some(Payload::ReleaseRequested(r)) = self.events[0].1.envelope.payload.as_mut() {
            if let Some(spec) = r.spec.as_mut() {
                spec.strategy = strategy as i32;
            }
        }
        self
    }

    pub fn feed(&self, history: &mut History) {
        for (subject, event) in &self.events {
            history.apply(subject, event);
        }
    }
}
