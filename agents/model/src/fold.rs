//! The release fold (DESIGN.md §4): `ReleaseState = fold(events of one release)`.
//!
//! Pure: no I/O, no clock. The fold records *facts* (a step started, an analysis passed, a
//! rollback began), and the status is derived from the facts. Facts only accumulate, so the fold
//! gives the same answer for a history with duplicates or with events in another order — which is
//! what a retried publish or a redelivery can produce. The two things where order could matter are
//! made order-free too: pauses and resumes are counted (each pause is answered by one resume), and
//! the first terminal event in stream order ends the release for good.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use baton_proto::v1::{
    envelope::Payload, ReleaseSpec, RollbackRequested, RollbackStarted, Strategy,
};

use crate::event::{timestamp_ms, Event, EventType};
use crate::names::ReleaseId;

/// Where a release is. Terminal: `Succeeded`, `Failed`, `RolledBack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    Queued,
    Building,
    Deploying { step: u32 },
    Analysing { step: u32 },
    Paused { step: u32 },
    RollingBack,
    Succeeded,
    Failed,
    RolledBack,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::RolledBack
        )
    }

    /// A stable word for output and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Queued => "queued",
            Status::Building => "building",
            Status::Deploying { .. } => "deploying",
            Status::Analysing { .. } => "analysing",
            Status::Paused { .. } => "paused",
            Status::RollingBack => "rolling_back",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Deploying { step } => write!(f, "deploying step {step}"),
            Status::Analysing { step } => write!(f, "analysing step {step}"),
            Status::Paused { step } => write!(f, "paused at step {step}"),
            Status::RollingBack => f.write_str("rolling back"),
            Status::RolledBack => f.write_str("rolled back"),
            other => f.write_str(other.name()),
        }
    }
}

/// Which part of the release failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub stage: EventType,
    pub step: Option<u32>,
    pub reason: String,
}

/// What is known of one release from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseState {
    pub release_id: Option<ReleaseId>,
    pub spec: Option<ReleaseSpec>,
    /// Set when the release is a manual rollback (`rollback.requested`).
    pub rollback_request: Option<RollbackRequested>,
    pub actor: String,
    pub queued_behind: Option<String>,
    pub build_started: bool,
    pub image_ref: Option<String>,
    pub deploy_started: bool,
    pub strategy: Option<Strategy>,
    pub previous_revision: Option<String>,
    pub previous_image: Option<String>,
    /// Replicas of the workload when the release began (`deploy.started`).
    pub replicas: Option<u32>,
    /// Steps started, with their weights, and when each began (its first `deploy.step_started`).
    pub steps_started: BTreeMap<u32, u32>,
    pub step_started_ms: BTreeMap<u32, i64>,
    /// When each step was first ready.
    pub step_ready_ms: BTreeMap<u32, i64>,
    pub steps_ready: BTreeSet<u32>,
    pub analyses_started: BTreeSet<u32>,
    pub analyses_passed: BTreeSet<u32>,
    pub analyses_failed: BTreeSet<u32>,
    /// Steps whose analysis gave no verdict (`analysis.inconclusive`): held for a person.
    pub analyses_inconclusive: BTreeSet<u32>,
    /// Why each of those gave no verdict.
    pub inconclusive_reasons: BTreeMap<u32, String>,
    /// Inconclusive steps a person then let go on (`release.resumed` of the step after it): their
    /// analysis counts as passed.
    pub analyses_accepted: BTreeSet<u32>,
    pub deploy_completed: bool,
    /// The cluster was changed by this release (so a rollback has something to undo).
    pub cluster_changed: bool,
    pub pauses: usize,
    pub resumes: usize,
    /// Pauses and resumes per step, and when a step was first paused (for timed pauses).
    pub step_pauses: BTreeMap<u32, u32>,
    pub step_resumes: BTreeMap<u32, u32>,
    pub first_pause_ms: BTreeMap<u32, i64>,
    /// Steps whose gate (the strategy's own pause) has begun.
    pub gate_steps: BTreeSet<u32>,
    /// Who asked to abort, and why (the first request).
    pub abort: Option<(String, String)>,
    pub abort_requested: bool,
    pub pause_requests: usize,
    pub resume_requests: usize,
    pub promote_requests: usize,
    pub promote_full: bool,
    pub rollback_started: bool,
    /// The rollback's target as its first `rollback.started` recorded it, and when.
    pub rollback_target: Option<RollbackStarted>,
    pub rollback_started_ms: Option<i64>,
    pub rollback_completed: bool,
    /// The first failure, in stream order.
    pub failure: Option<Failure>,
    pub terminal: Option<EventType>,
    pub terminal_reason: Option<String>,
    pub requested_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// When an agent last told of progress (any event but a person's command): deadlines count
    /// from it.
    pub last_progress_ms: Option<i64>,
    /// When the release was paused and resumed, per step, in stream order: the time held at a
    /// person's gate is known from them.
    pub pause_times: BTreeMap<u32, Vec<i64>>,
    pub resume_times: BTreeMap<u32, Vec<i64>>,
    /// A second `release.requested` with the same release id (and another event id) was seen and
    /// ignored: the first one's spec stands.
    pub duplicate_request: bool,
    /// Distinct events folded (duplicates by id are counted once).
    pub events: usize,
    seen: HashSet<String>,
}

/// Folds the events of one release, in stream order.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> ReleaseState {
    let mut state = ReleaseState::default();
    for event in events {
        state.apply(event);
    }
    state
}

impl ReleaseState {
    /// Adds one event. An event whose id was already folded changes nothing.
    pub fn apply(&mut self, event: &Event) {
        if !self.seen.insert(event.envelope.id.clone()) {
            return;
        }
        if self.release_id.is_some_and(|r| r != event.release_id) {
            // Not this release's event: the caller's filter is wrong; never mix two releases.
            self.seen.remove(&event.envelope.id);
            return;
        }
        self.release_id = Some(event.release_id);
        self.events += 1;
        let time = event.envelope.time.as_ref().map(timestamp_ms);
        if let (Some(t), false) = (time, event.event_type.is_command()) {
            self.last_progress_ms = Some(self.last_progress_ms.map_or(t, |p| p.max(t)));
        }
        let Some(payload) = event.payload() else {
            return;
        };
        match payload {
            // The first request is the release: a second one with the same release id can't
            // change a release in flight.
            Payload::ReleaseRequested(_) if self.spec.is_some() => self.duplicate_request = true,
            Payload::ReleaseRequested(r) => {
                self.spec = r.spec.clone();
                self.actor = event.envelope.actor.clone();
                self.requested_at_ms = time;
                if let Some(t) = time {
                    self.last_progress_ms = Some(self.last_progress_ms.map_or(t, |p| p.max(t)));
                }
            }
            Payload::RollbackRequested(r) => {
                self.rollback_request = Some(r.clone());
                self.actor = event.envelope.actor.clone();
                self.requested_at_ms = time;
            }
            Payload::ReleaseAbortRequested(a) => {
                self.abort_requested = true;
                if self.abort.is_none() {
                    self.abort = Some((event.envelope.actor.clone(), a.reason.clone()));
                }
            }
            Payload::ReleasePauseRequested(_) => self.pause_requests += 1,
            Payload::ReleaseResumeRequested(_) => self.resume_requests += 1,
            Payload::ReleasePromoteRequested(p) => {
                self.promote_requests += 1;
                self.promote_full |= p.full;
            }
            Payload::ReleaseQueued(q) => self.queued_behind = Some(q.blocking_release_id.clone()),
            Payload::BuildStarted(_) => {
                self.build_started = true;
                self.mark_started(time);
            }
            Payload::BuildSucceeded(b) => {
                self.build_started = true;
                self.image_ref = Some(b.image_ref.clone());
            }
            Payload::BuildFailed(b) => self.fail(EventType::BuildFailed, None, &b.reason),
            Payload::DeployStarted(d) => {
                self.deploy_started = true;
                self.strategy = Strategy::try_from(d.strategy).ok();
                self.previous_revision = non_empty(&d.previous_revision);
                self.previous_image = non_empty(&d.previous_image);
                self.replicas = Some(d.replicas);
                self.mark_started(time);
            }
            Payload::DeployStepStarted(s) => {
                self.deploy_started = true;
                self.cluster_changed = true;
                self.steps_started.insert(s.step, s.weight);
                if let Some(t) = time {
                    let first = self.step_started_ms.entry(s.step).or_insert(t);
                    *first = (*first).min(t);
                }
            }
            Payload::DeployStepReady(s) => {
                self.steps_started.entry(s.step).or_insert(s.weight);
                self.steps_ready.insert(s.step);
                if let Some(t) = time {
                    let first = self.step_ready_ms.entry(s.step).or_insert(t);
                    *first = (*first).min(t);
                }
            }
            Payload::DeployCompleted(_) => self.deploy_completed = true,
            Payload::DeployFailed(d) => {
                self.cluster_changed |= d.cluster_changed;
                self.fail(EventType::DeployFailed, Some(d.step), &d.reason);
            }
            Payload::ReleasePaused(p) => {
                self.pauses += 1;
                *self.step_pauses.entry(p.step).or_default() += 1;
                if p.gate {
                    self.gate_steps.insert(p.step);
                }
                if let Some(t) = time {
                    let first = self.first_pause_ms.entry(p.step).or_insert(t);
                    *first = (*first).min(t);
                    self.pause_times.entry(p.step).or_default().push(t);
                }
            }
            Payload::ReleaseResumed(r) => {
                if self.analyses_inconclusive.contains(&r.step) {
                    self.analyses_accepted.insert(r.step);
                }
                self.resumes += 1;
                *self.step_resumes.entry(r.step).or_default() += 1;
                if let Some(t) = time {
                    self.resume_times.entry(r.step).or_default().push(t);
                }
            }
            Payload::AnalysisStarted(a) => {
                self.analyses_started.insert(a.step);
            }
            Payload::AnalysisPassed(a) => {
                self.analyses_passed.insert(a.step);
            }
            Payload::AnalysisInconclusive(a) => {
                self.analyses_inconclusive.insert(a.step);
                self.inconclusive_reasons
                    .entry(a.step)
                    .or_insert_with(|| a.reason.clone());
            }
            Payload::AnalysisFailed(a) => {
                self.analyses_failed.insert(a.step);
                self.fail(EventType::AnalysisFailed, Some(a.step), &a.reason);
            }
            Payload::RollbackStarted(r) => {
                self.rollback_started = true;
                if self.rollback_target.is_none() {
                    self.rollback_target = Some(r.clone());
                    self.rollback_started_ms = time;
                }
            }
            Payload::RollbackCompleted(_) => {
                self.rollback_started = true;
                self.rollback_completed = true;
            }
            Payload::RollbackFailed(r) => {
                self.rollback_started = true;
                self.fail(EventType::RollbackFailed, None, &r.reason);
            }
            Payload::ReleaseSucceeded(_) => self.end(EventType::ReleaseSucceeded, time, None),
            Payload::ReleaseRolledBack(r) => {
                self.end(EventType::ReleaseRolledBack, time, Some(&r.reason))
            }
            Payload::ReleaseFailed(r) => self.end(EventType::ReleaseFailed, time, Some(&r.reason)),
        }
    }

    fn mark_started(&mut self, time: Option<i64>) {
        self.started_at_ms = match (self.started_at_ms, time) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn fail(&mut self, stage: EventType, step: Option<u32>, reason: &str) {
        if self.failure.is_none() {
            self.failure = Some(Failure {
                stage,
                step,
                reason: reason.to_owned(),
            });
        }
    }

    fn end(&mut self, terminal: EventType, time: Option<i64>, reason: Option<&str>) {
        if self.terminal.is_none() {
            self.terminal = Some(terminal);
            self.ended_at_ms = time;
            self.terminal_reason = reason.map(str::to_owned);
        }
    }

    /// When step `step` began: its `deploy.step_started`, else its first `deploy.step_ready`.
    /// Pod restarts after this time count against the step.
    pub fn step_began_ms(&self, step: u32) -> Option<i64> {
        self.step_started_ms
            .get(&step)
            .or_else(|| self.step_ready_ms.get(&step))
            .copied()
            .filter(|t| *t > 0)
    }

    /// The current step: the highest one started.
    pub fn current_step(&self) -> Option<u32> {
        self.steps_started.keys().next_back().copied()
    }

    /// The weight of the current step.
    pub fn current_weight(&self) -> Option<u32> {
        self.steps_started.values().next_back().copied()
    }

    pub fn is_paused(&self) -> bool {
        self.pauses > self.resumes
    }

    /// Whether `step`'s analysis gave no verdict and no person has judged it yet.
    pub fn awaits_judgement(&self, step: u32) -> bool {
        self.analyses_inconclusive.contains(&step) && !self.analyses_accepted.contains(&step)
    }

    /// Whether `step` has a pause not yet answered by a resume.
    pub fn is_paused_at(&self, step: u32) -> bool {
        self.step_pauses.get(&step).copied().unwrap_or(0)
            > self.step_resumes.get(&step).copied().unwrap_or(0)
    }

    /// The release's status, derived from the facts.
    pub fn status(&self) -> Status {
        match self.terminal {
            Some(EventType::ReleaseSucceeded) => return Status::Succeeded,
            Some(EventType::ReleaseRolledBack) => return Status::RolledBack,
            Some(_) => return Status::Failed,
            None => {}
        }
        if self.rollback_started {
            return Status::RollingBack;
        }
        if self.deploy_started {
            let step = self.current_step().unwrap_or(0);
            if self.is_paused() {
                return Status::Paused { step };
            }
            let analysing = self.analyses_started.contains(&step)
                && !self.analyses_passed.contains(&step)
                && !self.analyses_failed.contains(&step);
            return if analysing {
                Status::Analysing { step }
            } else {
                Status::Deploying { step }
            };
        }
        if self.queued_behind.is_some() {
            return Status::Queued;
        }
        if self.build_started {
            return Status::Building;
        }
        Status::Pending
    }

    /// How long the release took, from request to end (or `now_ms` while it runs).
    pub fn duration_ms(&self, now_ms: i64) -> Option<i64> {
        let start = self.requested_at_ms?;
        Some(
            self.ended_at_ms
                .unwrap_or(now_ms)
                .saturating_sub(start)
                .max(0),
        )
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}
