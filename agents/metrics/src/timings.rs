//! Durations of release work, taken from the events as they are folded: each release, step,
//! analysis and rollback gives one [`Observation`] when it ends, which the service records in a
//! Prometheus histogram. Pure: no I/O, no clock — every time is an event's.
//!
//! An observation is made once per release, step or analysis: a re-read or duplicate event is
//! not folded again ([`crate::history::Applied::Duplicate`]), and a step or analysis already
//! measured is not measured twice. A restarted agent reads the stream from the first event and
//! so makes the same observations again, from the same event times: its histograms come back
//! with the same figures.
//!
//! | histogram | from | to | outcome |
//! |---|---|---|---|
//! | release | `release.requested` | the terminal event | `succeeded`, `failed`, `rolled_back` |
//! | step | the step's first `deploy.step_started` | its first `deploy.step_ready`, its `deploy.failed`, or the release's end | `ready`, `failed`, `cancelled` |
//! | analysis | the step's first `analysis.started` | its first `analysis.passed` / `analysis.failed`, or the release's end | `passed`, `failed`, `cancelled` |
//! | failure to rollback | the first `deploy.failed` / `analysis.failed` | `rollback.completed` (else the terminal event) | `rolled_back`, `failed` |
//!
//! All are labelled by environment, app and strategy (`rolling`, `blue_green`, `canary`, or
//! `none` when the release never said). Manual rollbacks (`rollback.requested`) deploy nothing:
//! they have no release duration and no failure; a release whose rollback never started (its
//! `rollback_on_failure` off, or nothing to undo) has no failure-to-rollback figure.

use std::collections::{BTreeMap, BTreeSet};

use baton_core::event::Event;
use baton_core::fold::ReleaseState;
use baton_core::names::{AppName, EnvName};
use baton_core::Status;
use baton_proto::v1::{envelope::Payload, Strategy};

/// Which histogram an observation goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timing {
    Release,
    Step,
    Analysis,
    FailureToRollback,
}

/// One duration of release work.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub timing: Timing,
    pub env: EnvName,
    pub app: AppName,
    pub strategy: &'static str,
    pub outcome: &'static str,
    pub seconds: f64,
}

/// What a release's timings need beyond its fold: when each analysis began, when the rollback
/// completed, and what was measured already. Emptied when the release ends, so a year of
/// history keeps none of it.
#[derive(Debug, Clone, Default)]
pub struct Clocks {
    analysis_started_ms: BTreeMap<u32, i64>,
    rollback_completed_ms: Option<i64>,
    steps_measured: BTreeSet<u32>,
    analyses_measured: BTreeSet<u32>,
}

/// The strategy label of a release: its `deploy.started`'s, else its spec's.
pub fn strategy_label(state: &ReleaseState) -> &'static str {
    let strategy = state.strategy.or_else(|| {
        state
            .spec
            .as_ref()
            .and_then(|s| Strategy::try_from(s.strategy).ok())
    });
    match strategy {
        Some(Strategy::Rolling) => "rolling",
        Some(Strategy::BlueGreen) => "blue_green",
        Some(Strategy::Canary) => "canary",
        Some(Strategy::Unspecified) | None => "none",
    }
}

fn seconds(from_ms: i64, to_ms: i64) -> f64 {
    // A publisher's clock behind another's must not give a negative duration.
    to_ms.saturating_sub(from_ms).max(0) as f64 / 1000.0
}

/// The facts [`observe`] reads, about the release the event belongs to.
pub struct Facts<'a> {
    pub env: &'a EnvName,
    pub app: &'a AppName,
    /// The fold after the event.
    pub state: &'a ReleaseState,
    /// Whether the event ended the release (it is its first terminal event).
    pub ended_now: bool,
    pub manual_rollback: bool,
    pub requested_ms: i64,
    pub first_failure_ms: Option<i64>,
}

/// The observations `event`, just folded into `release`, completes; `clocks` keeps what later
/// events need.
pub fn observe(
    release: &Facts<'_>,
    clocks: &mut Clocks,
    event: &Event,
    out: &mut Vec<Observation>,
) {
    let time = event.time_ms();
    let state = release.state;
    if state.terminal.is_some() && !release.ended_now {
        // Measured and forgotten when it ended: a late event adds nothing.
        return;
    }
    let strategy = strategy_label(state);
    let mut emit = |timing: Timing, outcome: &'static str, from_ms: i64, to_ms: i64| {
        out.push(Observation {
            timing,
            env: release.env.clone(),
            app: release.app.clone(),
            strategy,
            outcome,
            seconds: seconds(from_ms, to_ms),
        });
    };
    let step_started = |step: u32| state.step_started_ms.get(&step).copied();
    match event.payload() {
        Some(Payload::DeployStepReady(s)) => {
            if let Some(start) = step_started(s.step) {
                if clocks.steps_measured.insert(s.step) {
                    emit(Timing::Step, "ready", start, time);
                }
            }
        }
        Some(Payload::DeployFailed(d)) => {
            if let Some(start) = step_started(d.step) {
                if clocks.steps_measured.insert(d.step) {
                    emit(Timing::Step, "failed", start, time);
                }
            }
        }
        Some(Payload::AnalysisStarted(a)) => {
            let first = clocks.analysis_started_ms.entry(a.step).or_insert(time);
            *first = (*first).min(time);
        }
        Some(Payload::AnalysisPassed(a)) => {
            if let Some(&start) = clocks.analysis_started_ms.get(&a.step) {
                if clocks.analyses_measured.insert(a.step) {
                    emit(Timing::Analysis, "passed", start, time);
                }
            }
        }
        Some(Payload::AnalysisFailed(a)) => {
            if let Some(&start) = clocks.analysis_started_ms.get(&a.step) {
                if clocks.analyses_measured.insert(a.step) {
                    emit(Timing::Analysis, "failed", start, time);
                }
            }
        }
        Some(Payload::AnalysisInconclusive(a)) => {
            if let Some(&start) = clocks.analysis_started_ms.get(&a.step) {
                if clocks.analyses_measured.insert(a.step) {
                    emit(Timing::Analysis, "inconclusive", start, time);
                }
            }
        }
        Some(Payload::RollbackCompleted(_)) => {
            clocks.rollback_completed_ms =
                Some(clocks.rollback_completed_ms.map_or(time, |t| t.min(time)));
        }
        _ => {}
    }
    if !release.ended_now {
        return;
    }
    let end = state.ended_at_ms.unwrap_or(time);
    // What was still running when the release ended was cut short.
    for (&step, &start) in &state.step_started_ms {
        if !clocks.steps_measured.contains(&step) {
            emit(Timing::Step, "cancelled", start, end);
        }
    }
    for (&step, &start) in &clocks.analysis_started_ms {
        if !clocks.analyses_measured.contains(&step) {
            emit(Timing::Analysis, "cancelled", start, end);
        }
    }
    if !release.manual_rollback {
        let outcome = match state.status() {
            Status::Succeeded => "succeeded",
            Status::RolledBack => "rolled_back",
            _ => "failed",
        };
        emit(Timing::Release, outcome, release.requested_ms, end);
        if let (true, Some(failed_at)) = (state.rollback_started, release.first_failure_ms) {
            let (outcome, restored) = match (state.status(), clocks.rollback_completed_ms) {
                (Status::RolledBack, done) => ("rolled_back", done.unwrap_or(end)),
                (_, Some(done)) => ("rolled_back", done),
                _ => ("failed", end),
            };
            emit(Timing::FailureToRollback, outcome, failed_at, restored);
        }
    }
    *clocks = Clocks::default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;
    use crate::testing::Script;
    use baton_proto::v1::Strategy;

    const S: i64 = 1000;

    /// (histogram, strategy, outcome, seconds) of each observation, in order.
    type Seen = Vec<(Timing, &'static str, &'static str, f64)>;

    fn seen(h: &mut History) -> Seen {
        h.take_observations()
            .into_iter()
            .map(|o| (o.timing, o.strategy, o.outcome, o.seconds))
            .collect()
    }

    fn fed(scripts: &[&Script]) -> (History, Seen) {
        let mut h = History::new();
        for s in scripts {
            s.feed(&mut h);
        }
        let seen = seen(&mut h);
        (h, seen)
    }

    #[test]
    fn a_canary_gives_one_figure_per_step_analysis_and_release() {
        let canary = Script::release("prod", "web", 0)
            .with_strategy(Strategy::Canary)
            .deploy(S, Strategy::Canary)
            .step(1, 10, 2 * S)
            .ready(1, 10, 12 * S)
            .analysis_started(1, 12 * S)
            .verdict(1, true, 72 * S)
            .step(2, 100, 73 * S)
            .ready(2, 100, 93 * S)
            .analysis_started(2, 93 * S)
            .verdict(2, true, 153 * S)
            .succeeded(160 * S);
        let (mut h, got) = fed(&[&canary]);
        assert_eq!(
            got,
            [
                (Timing::Step, "canary", "ready", 10.0),
                (Timing::Analysis, "canary", "passed", 60.0),
                (Timing::Step, "canary", "ready", 20.0),
                (Timing::Analysis, "canary", "passed", 60.0),
                (Timing::Release, "canary", "succeeded", 160.0),
            ]
        );
        let o = &h.take_observations();
        assert!(o.is_empty());
        // Read again (a redelivery, or a duplicate publish): nothing more.
        canary.feed(&mut h);
        assert!(seen(&mut h).is_empty());
    }

    #[test]
    fn a_failed_analysis_times_the_rollback_from_the_failure_to_its_completion() {
        let r = Script::release("prod", "web", 0)
            .deploy(S, Strategy::Rolling)
            .step(1, 100, 2 * S)
            .ready(1, 100, 12 * S)
            .analysis_started(1, 12 * S)
            .verdict(1, false, 42 * S)
            .rollback_started(43 * S)
            .rollback_completed(50 * S)
            .rolled_back(51 * S);
        let (_, got) = fed(&[&r]);
        assert_eq!(
            got,
            [
                (Timing::Step, "rolling", "ready", 10.0),
                (Timing::Analysis, "rolling", "failed", 30.0),
                (Timing::Release, "rolling", "rolled_back", 51.0),
                (Timing::FailureToRollback, "rolling", "rolled_back", 8.0),
            ]
        );
    }

    #[test]
    fn what_still_runs_when_a_release_ends_is_cancelled_and_a_failed_step_is_failed() {
        // Blue-green: the new colour's step is ready, its analysis is cut short by the deadline.
        let cut = Script::release("prod", "web", 0)
            .with_strategy(Strategy::BlueGreen)
            .deploy(S, Strategy::BlueGreen)
            .step(1, 0, 2 * S)
            .ready(1, 0, 5 * S)
            .analysis_started(1, 5 * S)
            .step(2, 100, 6 * S)
            .failed(600 * S);
        // Crash-looping pods fail the step; nothing is rolled back (rollback_on_failure off).
        let crash = Script::release("prod", "api", 0)
            .deploy(S, Strategy::Rolling)
            .step(1, 100, 2 * S)
            .deploy_failed(1, 32 * S)
            .failed(33 * S);
        // The rollback itself fails: the fast-rollback figure says so.
        let stuck = Script::release("prod", "db", 0)
            .deploy(S, Strategy::Rolling)
            .step(1, 100, 2 * S)
            .deploy_failed(1, 12 * S)
            .rollback_started(13 * S)
            .failed(40 * S);
        let (_, got) = fed(&[&cut, &crash, &stuck]);
        assert_eq!(
            got,
            [
                (Timing::Step, "blue_green", "ready", 3.0),
                (Timing::Step, "blue_green", "cancelled", 594.0),
                (Timing::Analysis, "blue_green", "cancelled", 595.0),
                (Timing::Release, "blue_green", "failed", 600.0),
                (Timing::Step, "rolling", "failed", 30.0),
                (Timing::Release, "rolling", "failed", 33.0),
                (Timing::Step, "rolling", "failed", 10.0),
                (Timing::Release, "rolling", "failed", 40.0),
                (Timing::FailureToRollback, "rolling", "failed", 28.0),
            ]
        );
    }

    #[test]
    fn a_manual_rollback_has_no_release_duration_and_no_failure() {
        let m = Script::manual_rollback("prod", "web", 0)
            .rollback_started(S)
            .rollback_completed(5 * S)
            .rolled_back(6 * S);
        let (_, got) = fed(&[&m]);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn late_events_and_clock_skew_give_no_second_or_negative_figure() {
        // The step's ready comes after the release ended; a failure stamped after the
        // rollback's completion by a clock that runs ahead.
        let r = Script::release("prod", "web", 10 * S)
            .deploy(11 * S, Strategy::Rolling)
            .step(1, 100, 12 * S)
            .deploy_failed(1, 30 * S)
            .rollback_started(20 * S)
            .rollback_completed(25 * S)
            .rolled_back(26 * S)
            .ready(1, 100, 40 * S);
        let (h, got) = fed(&[&r]);
        assert_eq!(
            got,
            [
                (Timing::Step, "rolling", "failed", 18.0),
                (Timing::Release, "rolling", "rolled_back", 16.0),
                (Timing::FailureToRollback, "rolling", "rolled_back", 0.0),
            ]
        );
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_history_read_again_from_the_first_event_gives_the_same_figures() {
        let scripts = [
            Script::release("staging", "web", 0).succeed(90 * S),
            Script::release("staging", "web", 100 * S).roll_back(160 * S, 200 * S),
            Script::release("prod", "api", 0)
                .deploy(S, Strategy::Rolling)
                .step(1, 100, 2 * S)
                .ready(1, 100, 4 * S)
                .succeeded(5 * S),
        ];
        let refs: Vec<&Script> = scripts.iter().collect();
        let (_, first) = fed(&refs);
        // The restarted agent's reader may see some events twice around an interruption.
        let mut h = History::new();
        for s in &scripts {
            s.feed(&mut h);
            s.feed(&mut h);
        }
        assert_eq!(seen(&mut h), first);
        assert_eq!(first.len(), 5);
    }
}
