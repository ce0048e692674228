//! The deployment history: every release seen on the event stream, folded (DESIGN.md §4), with
//! the environment and app its subjects name.
//!
//! Pure: no I/O, no clock. The service feeds it the stream in order, from the first event; a
//! restarted agent rebuilds the same history by reading the stream again.

use std::collections::HashMap;

use baton_core::event::{Event, EventType};
use baton_core::fold::ReleaseState;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_core::Status;
use baton_proto::v1::Strategy;
use serde::Serialize;

use baton_core::time::rfc3339_ms as rfc3339;

use crate::timings::{self, Clocks, Facts, Observation};

/// One release as the history knows it.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: ReleaseId,
    pub env: EnvName,
    pub app: AppName,
    pub state: ReleaseState,
    /// Time of the earliest `deploy.failed` or `analysis.failed`: when the release was seen to
    /// break, the start of its time to restore.
    pub first_failure_ms: Option<i64>,
    /// Time of the earliest event, for releases whose request is not in the stream.
    pub first_seen_ms: i64,
    /// What its timings need until it ends.
    clocks: Clocks,
}

impl Record {
    /// A manual rollback is a release of its own whose first event is `rollback.requested`;
    /// it carries no spec and deploys nothing new.
    pub fn is_manual_rollback(&self) -> bool {
        self.state.rollback_request.is_some() && self.state.spec.is_none()
    }

    pub fn status(&self) -> Status {
        self.state.status()
    }

    /// When the release ended (its terminal event's time), if it did.
    pub fn ended_ms(&self) -> Option<i64> {
        self.state.terminal.and(self.state.ended_at_ms)
    }

    /// When the release was asked for; the first event seen stands in for a missing request.
    pub fn requested_ms(&self) -> i64 {
        self.state.requested_at_ms.unwrap_or(self.first_seen_ms)
    }

    pub fn matches(&self, filter: &Filter) -> bool {
        filter.env.as_ref().is_none_or(|e| *e == self.env)
            && filter.app.as_ref().is_none_or(|a| *a == self.app)
    }
}

/// Which releases a query is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub env: Option<EnvName>,
    pub app: Option<AppName>,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new event of a release was folded.
    Folded,
    /// The event was folded before (a duplicate publish or a re-read).
    Duplicate,
    /// The subject names another environment or app than the release's first event did; the
    /// event is not folded into the release (it would mix two apps' histories).
    Mismatch,
}

/// Every release, by id.
#[derive(Debug, Clone, Default)]
pub struct History {
    releases: HashMap<ReleaseId, Record>,
    events: u64,
    /// Durations completed by the events folded since the last [`History::take_observations`].
    observations: Vec<Observation>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event, in stream order.
    pub fn apply(&mut self, subject: &EventSubject, event: &Event) -> Applied {
        let time = event.time_ms();
        let record = self
            .releases
            .entry(event.release_id)
            .or_insert_with(|| Record {
                id: event.release_id,
                env: subject.env.clone(),
                app: subject.app.clone(),
                state: ReleaseState::default(),
                first_failure_ms: None,
                first_seen_ms: time,
                clocks: Clocks::default(),
            });
        if record.env != subject.env || record.app != subject.app {
            return Applied::Mismatch;
        }
        let before = record.state.events;
        let was_ended = record.state.terminal.is_some();
        record.state.apply(event);
        if record.state.events == before {
            return Applied::Duplicate;
        }
        self.events += 1;
        record.first_seen_ms = record.first_seen_ms.min(time);
        if matches!(
            event.event_type,
            EventType::DeployFailed | EventType::AnalysisFailed
        ) {
            record.first_failure_ms = Some(record.first_failure_ms.map_or(time, |t| t.min(time)));
        }
        let facts = Facts {
            env: &record.env,
            app: &record.app,
            state: &record.state,
            ended_now: !was_ended && record.state.terminal.is_some(),
            manual_rollback: record.is_manual_rollback(),
            requested_ms: record.requested_ms(),
            first_failure_ms: record.first_failure_ms,
        };
        timings::observe(&facts, &mut record.clocks, event, &mut self.observations);
        Applied::Folded
    }

    /// The durations completed since the last call (each release, step, analysis and rollback
    /// once), oldest first.
    pub fn take_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.observations)
    }

    /// Distinct events folded.
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn len(&self) -> usize {
        self.releases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.releases.is_empty()
    }

    pub fn get(&self, id: &ReleaseId) -> Option<&Record> {
        self.releases.get(id)
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.releases.values()
    }

    /// The releases a filter selects, newest request first (ties: the later id first; ids are
    /// UUID v7, which sort by creation), at most `limit`.
    pub fn list(&self, filter: &Filter, limit: usize) -> Vec<ReleaseView> {
        let mut selected: Vec<&Record> = self.records().filter(|r| r.matches(filter)).collect();
        selected.sort_by(|a, b| {
            b.requested_ms()
                .cmp(&a.requested_ms())
                .then_with(|| b.id.cmp(&a.id))
        });
        selected
            .into_iter()
            .take(limit)
            .map(ReleaseView::of)
            .collect()
    }
}

/// A release as `baton.v1.api.releases.list` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReleaseView {
    pub id: String,
    pub env: String,
    pub app: String,
    /// `release` (a deployment) or `rollback` (a manual rollback).
    pub kind: String,
    /// The image as requested.
    pub image: Option<String>,
    /// The immutable reference the builder resolved (repo@sha256:…).
    pub image_ref: Option<String>,
    pub strategy: Option<String>,
    /// pending, queued, building, deploying, analysing, paused, rolling_back, succeeded,
    /// failed, rolled_back.
    pub status: String,
    pub step: Option<u32>,
    pub actor: String,
    pub commit: Option<String>,
    pub requested_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// From request to end, for releases that ended.
    pub duration_seconds: Option<f64>,
    pub failure_reason: Option<String>,
}

impl ReleaseView {
    pub fn of(record: &Record) -> ReleaseView {
        let state = &record.state;
        let status = state.status();
        let step = match status {
            Status::Deploying { step } | Status::Analysing { step } | Status::Paused { step } => {
                Some(step)
            }
            _ => None,
        };
        let strategy = state
            .strategy
            .or_else(|| {
                state
                    .spec
                    .as_ref()
                    .and_then(|s| Strategy::try_from(s.strategy).ok())
            })
            .and_then(strategy_name);
        let failure_reason = state
            .failure
            .as_ref()
            .map(|f| f.reason.clone())
            .filter(|r| !r.is_empty())
            .or_else(|| {
                // A manual rollback that rolled back did what was asked: its reason is no failure.
                let failed = match status {
                    Status::Failed => true,
                    Status::RolledBack => !record.is_manual_rollback(),
                    _ => false,
                };
                failed
                    .then(|| state.terminal_reason.clone())
                    .flatten()
                    .filter(|r| !r.is_empty())
            });
        let duration_seconds = match (state.requested_at_ms, record.ended_ms()) {
            (Some(start), Some(end)) => Some(seconds(end.saturating_sub(start).max(0))),
            _ => None,
        };
        ReleaseView {
            id: record.id.to_string(),
            env: record.env.to_string(),
            app: record.app.to_string(),
            kind: if record.is_manual_rollback() {
                "rollback"
            } else {
                "release"
            }
            .into(),
            image: state
                .spec
                .as_ref()
                .map(|s| s.image.clone())
                .filter(|i| !i.is_empty()),
            image_ref: state.image_ref.clone().filter(|i| !i.is_empty()),
            strategy: strategy.map(str::to_owned),
            status: status.name().into(),
            step,
            actor: state.actor.clone(),
            commit: state
                .spec
                .as_ref()
                .map(|s| s.commit.clone())
                .filter(|c| !c.is_empty()),
            requested_at: state.requested_at_ms.map(rfc3339),
            started_at: state.started_at_ms.map(rfc3339),
            ended_at: record.ended_ms().map(rfc3339),
            duration_seconds,
            failure_reason,
        }
    }
}

/// Milliseconds as seconds.
pub fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn strategy_name(s: Strategy) -> Option<&'static str> {
    match s {
        Strategy::Unspecified => None,
        Strategy::Rolling => Some("rolling"),
        Strategy::BlueGreen => Some("blue_green"),
        Strategy::Canary => Some("canary"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn releases_are_listed_newest_first_with_their_status() {
        let mut h = History::new();
        let a = Script::release("staging", "web", 1_000).succeed(2_000);
        let b = Script::release("staging", "web", 3_000).roll_back(3_500, 4_000);
        let c = Script::release("prod", "web", 5_000).in_flight();
        let d = Script::manual_rollback("staging", "web", 6_000).rolled_back(6_500);
        for s in [&a, &b, &c, &d] {
            s.feed(&mut h);
        }
        let all = h.list(&Filter::default(), 10);
        let got: Vec<(&str, &str, &str)> = all
            .iter()
            .map(|v| (v.env.as_str(), v.kind.as_str(), v.status.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("staging", "rollback", "rolled_back"),
                ("prod", "release", "deploying"),
                ("staging", "release", "rolled_back"),
                ("staging", "release", "succeeded"),
            ]
        );
        assert_eq!(all[3].id, a.id.to_string());
        assert_eq!(all[3].duration_seconds, Some(1.0));
        assert_eq!(all[3].requested_at.as_deref(), Some("1970-01-01T00:00:01Z"));
        assert_eq!(all[3].ended_at.as_deref(), Some("1970-01-01T00:00:02Z"));
        assert_eq!(all[3].strategy.as_deref(), Some("rolling"));
        assert_eq!(all[3].image.as_deref(), Some("web:v1"));
        assert_eq!(all[3].failure_reason, None);
        assert_eq!(
            all[2].failure_reason.as_deref(),
            Some("health check failed")
        );
        assert_eq!(all[1].duration_seconds, None);
        assert_eq!(all[0].image, None);
        assert_eq!(
            all[0].failure_reason, None,
            "a done manual rollback is no failure"
        );

        let staging = Filter {
            env: Some(EnvName::new("staging").unwrap()),
            app: None,
        };
        assert_eq!(h.list(&staging, 10).len(), 3);
        assert_eq!(h.list(&staging, 1)[0].kind, "rollback");
        let other = Filter {
            env: None,
            app: Some(AppName::new("api").unwrap()),
        };
        assert!(h.list(&other, 10).is_empty());
    }

    #[test]
    fn duplicates_and_subject_mismatches_are_not_folded() {
        let mut h = History::new();
        let s = Script::release("staging", "web", 1_000).succeed(2_000);
        s.feed(&mut h);
        let n = h.events();
        s.feed(&mut h);
        assert_eq!(h.events(), n, "a re-read adds nothing");
        let (subject, event) = &s.events[0];
        let mut moved = subject.clone();
        moved.app = AppName::new("api").unwrap();
        let mut fresh = event.clone();
        fresh.envelope.id = uuid::Uuid::new_v4().to_string();
        assert_eq!(h.apply(&moved, &fresh), Applied::Mismatch);
        assert_eq!(h.apply(subject, event), Applied::Duplicate);
        assert_eq!(h.len(), 1);
        assert_eq!(h.get(&s.id).map(Record::status), Some(Status::Succeeded));
    }

    #[test]
    fn the_first_failure_time_is_the_earliest_failure_event() {
        let mut h = History::new();
        let s = Script::release("staging", "web", 1_000).roll_back(1_700, 2_000);
        s.feed(&mut h);
        let r = h.get(&s.id).unwrap();
        assert_eq!(r.first_failure_ms, Some(1_700));
        assert_eq!(r.ended_ms(), Some(2_000));
    }
}
