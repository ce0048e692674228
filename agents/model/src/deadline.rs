//! Every release ends: the deadline of where a release is, derived from its spec and the facts
//! of its fold. Pure (no clock, no I/O).
//!
//! A release must show progress — an agent's event — within a budget that depends on what it
//! waits for: its build (the build's timeout), a step (the step timeout), the analysis of a step
//! (its duration and interval), a timed pause (its length), a rollback (the step timeout), or an
//! agent's next move. Each budget has the release's margin on top. A release held by a person (a
//! pause until promoted, a person's pause) or queued behind another release of its workload has
//! no deadline while it is held; the clock starts again with the next event. So the whole
//! release's deadline is the sum of its steps' timeouts, analyses and timed pauses plus margins,
//! and time at a person's gate does not count.

use baton_proto::v1::{ReleaseSpec, Strategy};

use crate::config::{DEFAULT_BUILD_TIMEOUT_SECONDS, DEFAULT_STEP_TIMEOUT_SECONDS};
use crate::control::{analysed, plan, strategy};
use crate::fold::ReleaseState;

/// The margin on each budget when the spec sets none.
pub const DEFAULT_MARGIN_SECONDS: u32 = 60;
/// Resolving a pushed image (the builder retries an unreachable registry for about this long).
pub const RESOLVE_SECONDS: u32 = 60;
/// An analysis' duration and interval when the spec sets none (the health-checker's too).
pub const DEFAULT_ANALYSIS_DURATION_SECONDS: u32 = 10;
pub const DEFAULT_ANALYSIS_INTERVAL_SECONDS: u32 = 2;

/// When a release must next show progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deadline {
    /// The release has ended.
    Ended,
    /// Held by a person or queued: no deadline while it lasts.
    Held(String),
    /// Progress is due by `at_ms` (milliseconds since the epoch); `waiting_for` says what for.
    At { at_ms: i64, waiting_for: String },
}

fn or_default(value: u32, default: u32) -> i64 {
    i64::from(if value == 0 { default } else { value })
}

/// The margin of a release's budgets.
pub fn margin_ms(spec: &ReleaseSpec) -> i64 {
    or_default(spec.deadline_margin_seconds, DEFAULT_MARGIN_SECONDS) * 1000
}

fn step_timeout_ms(spec: &ReleaseSpec) -> i64 {
    or_default(spec.step_timeout_seconds, DEFAULT_STEP_TIMEOUT_SECONDS) * 1000
}

/// The analysis of step `step`: its own duration and interval (canary steps may have them),
/// else the release's, else the defaults.
pub fn analysis_ms(spec: &ReleaseSpec, step: u32) -> (i64, i64) {
    let base = spec.analysis.unwrap_or_default();
    let own = (strategy(spec) == Strategy::Canary)
        .then(|| {
            spec.canary
                .as_ref()
                .and_then(|c| c.steps.get(step as usize))
                .and_then(|s| s.analysis)
        })
        .flatten()
        .unwrap_or_default();
    let pick = |own: u32, base: u32, default: u32| {
        if own > 0 {
            i64::from(own)
        } else {
            or_default(base, default)
        }
    };
    (
        pick(
            own.duration_seconds,
            base.duration_seconds,
            DEFAULT_ANALYSIS_DURATION_SECONDS,
        ) * 1000,
        pick(
            own.interval_seconds,
            base.interval_seconds,
            DEFAULT_ANALYSIS_INTERVAL_SECONDS,
        ) * 1000,
    )
}

fn build_ms(spec: &ReleaseSpec) -> i64 {
    match &spec.build {
        Some(b) if !b.argv.is_empty() => {
            or_default(b.timeout_seconds, DEFAULT_BUILD_TIMEOUT_SECONDS) * 1000
                + i64::from(RESOLVE_SECONDS) * 1000
        }
        _ => i64::from(RESOLVE_SECONDS) * 1000,
    }
}

/// The longest a whole release may take without a person holding it: every budget of its path
/// added up (for `baton status` and the docs; the agents enforce the budgets one by one).
pub fn total_budget_ms(spec: &ReleaseSpec) -> i64 {
    let margin = margin_ms(spec);
    let steps = plan(spec);
    // The build, then the pre-checks and the first step's start (as long as a step may take: a
    // deployer with many releases in flight may take that long to come to this one).
    let mut total = build_ms(spec) + margin + step_timeout_ms(spec) + margin;
    for (i, def) in steps.iter().enumerate() {
        total += step_timeout_ms(spec) + margin;
        if analysed(spec, i as u32) {
            let (duration, interval) = analysis_ms(spec, i as u32);
            total += duration + interval + margin;
        }
        if !def.until_promoted && def.pause_seconds > 0 {
            total += i64::from(def.pause_seconds) * 1000 + margin;
        }
    }
    total
}

/// When the release must next show progress, from its fold.
pub fn deadline(state: &ReleaseState) -> Deadline {
    if state.terminal.is_some() {
        return Deadline::Ended;
    }
    let Some(spec) = &state.spec else {
        // Only a release with its request has a deadline; a manual rollback is the rollback
        // agent's own work and ends with it.
        return Deadline::Ended;
    };
    let margin = margin_ms(spec);
    let since = state
        .last_progress_ms
        .or(state.requested_at_ms)
        .unwrap_or(0);
    let at = |budget: i64, waiting_for: String| Deadline::At {
        at_ms: since.saturating_add(budget).saturating_add(margin),
        waiting_for,
    };
    if state.rollback_started {
        // A canary or blue-green rollback may follow two Deployments.
        return at(2 * step_timeout_ms(spec), "the rollback to complete".into());
    }
    if state.failure.is_some() || state.abort_requested {
        return at(0, "the rollback agent to act on the failure".into());
    }
    if state.image_ref.is_none() {
        if let Some(blocking) = &state.queued_behind {
            if !state.deploy_started {
                return Deadline::Held(format!("queued behind release {blocking}"));
            }
        }
        return at(build_ms(spec), "the build".into());
    }
    if !state.deploy_started {
        if let Some(blocking) = &state.queued_behind {
            return Deadline::Held(format!("queued behind release {blocking}"));
        }
        // Waiting for the deployer may include waiting for its turn among many releases in
        // flight: as long as a step may take, not the margin alone.
        return at(step_timeout_ms(spec), "the deployer's pre-checks".into());
    }
    let steps = plan(spec);
    let Some(step) = state.current_step() else {
        return at(step_timeout_ms(spec), "the deployer's first step".into());
    };
    if !state.steps_ready.contains(&step) {
        let follows = if strategy(spec) == Strategy::BlueGreen && step == 0 {
            2 // adopting a plain Deployment, then the new colour
        } else {
            1
        };
        return at(
            follows * step_timeout_ms(spec),
            format!("step {step} to be ready"),
        );
    }
    if analysed(spec, step)
        && !state.analyses_passed.contains(&step)
        && !state.analyses_accepted.contains(&step)
        // Held for a person once the deployer has paused it; until then the deployer is next.
        && !state.analyses_inconclusive.contains(&step)
    {
        let (duration, interval) = analysis_ms(spec, step);
        return at(
            duration + interval,
            format!("the analysis of step {step} (is the health-checker running?)"),
        );
    }
    if state.is_paused() {
        let def = steps.get(step as usize);
        let timed_gate = state.gate_steps.contains(&step)
            && def.is_some_and(|d| !d.until_promoted && d.pause_seconds > 0)
            // A person's pause on top of the gate holds it.
            && state.step_pauses.get(&step).copied().unwrap_or(0) <= 1
            // So does a verdict-less analysis, until a person judges it.
            && !state.awaits_judgement(step);
        if timed_gate {
            let seconds = def.map_or(0, |d| i64::from(d.pause_seconds));
            let paused_at = state.first_pause_ms.get(&step).copied().unwrap_or(since);
            return Deadline::At {
                at_ms: paused_at + seconds * 1000 + margin,
                waiting_for: format!("the end of the {seconds}s pause after step {step}"),
            };
        }
        return Deadline::Held(format!("paused at step {step}"));
    }
    at(0, format!("the deployer to go on after step {step}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::fold::Failure;
    use baton_proto::v1::{AnalysisParams, CanaryParams, CanaryStep};

    fn spec(strategy: Strategy) -> ReleaseSpec {
        ReleaseSpec {
            strategy: strategy as i32,
            step_timeout_seconds: 30,
            deadline_margin_seconds: 5,
            analysis: Some(AnalysisParams {
                duration_seconds: 20,
                interval_seconds: 2,
                failure_limit: 0,
            }),
            canary: Some(CanaryParams {
                steps: vec![
                    CanaryStep {
                        weight: 10,
                        pause_seconds: 60,
                        ..Default::default()
                    },
                    CanaryStep {
                        weight: 50,
                        pause_until_promoted: true,
                        analysis: Some(AnalysisParams {
                            duration_seconds: 100,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }
    }

    fn state(strategy: Strategy) -> ReleaseState {
        let mut s = ReleaseState::default();
        s.spec = Some(spec(strategy));
        s.requested_at_ms = Some(1_000);
        s.last_progress_ms = Some(1_000);
        s
    }

    fn at(d: Deadline) -> i64 {
        match d {
            Deadline::At { at_ms, .. } => at_ms,
            other => panic!("no deadline: {other:?}"),
        }
    }

    #[test]
    fn each_phase_has_its_budget_from_the_last_progress() {
        let mut s = state(Strategy::Canary);
        // The build: resolving a pushed image.
        assert_eq!(at(deadline(&s)), 1_000 + 60_000 + 5_000);
        s.image_ref = Some("web@sha256:1".into());
        // The pre-checks: as long as a step may take (the deployer's turn may come late).
        assert_eq!(at(deadline(&s)), 1_000 + 30_000 + 5_000);
        s.deploy_started = true;
        s.steps_started.insert(0, 10);
        s.last_progress_ms = Some(2_000);
        assert_eq!(at(deadline(&s)), 2_000 + 30_000 + 5_000);
        s.steps_ready.insert(0);
        // Step 0 takes the release's analysis; step 1 its own.
        assert_eq!(at(deadline(&s)), 2_000 + 20_000 + 2_000 + 5_000);
        s.steps_started.insert(1, 50);
        s.steps_ready.insert(1);
        assert_eq!(at(deadline(&s)), 2_000 + 100_000 + 2_000 + 5_000);
    }

    #[test]
    fn a_timed_pause_counts_and_a_persons_gate_does_not() {
        let mut s = state(Strategy::Canary);
        s.image_ref = Some("x".into());
        s.deploy_started = true;
        s.steps_started.insert(0, 10);
        s.steps_ready.insert(0);
        s.analyses_passed.insert(0);
        s.pauses = 1;
        s.step_pauses.insert(0, 1);
        s.gate_steps.insert(0);
        s.first_pause_ms.insert(0, 10_000);
        assert_eq!(at(deadline(&s)), 10_000 + 60_000 + 5_000);
        // A person paused it too: held.
        s.pauses = 2;
        s.step_pauses.insert(0, 2);
        assert!(matches!(deadline(&s), Deadline::Held(_)));
        // The gate until promoted after step 1 holds it.
        let mut s = state(Strategy::Canary);
        s.image_ref = Some("x".into());
        s.deploy_started = true;
        for step in [0, 1] {
            s.steps_started.insert(step, 10);
            s.steps_ready.insert(step);
            s.analyses_passed.insert(step);
        }
        s.pauses = 1;
        s.step_pauses.insert(1, 1);
        s.gate_steps.insert(1);
        assert!(matches!(deadline(&s), Deadline::Held(_)));
    }

    #[test]
    fn ended_queued_failed_and_rolling_back_releases() {
        let mut s = state(Strategy::Rolling);
        s.queued_behind = Some("01".into());
        assert!(matches!(deadline(&s), Deadline::Held(_)));
        s.failure = Some(Failure {
            stage: EventType::DeployFailed,
            step: Some(0),
            reason: "x".into(),
        });
        assert_eq!(at(deadline(&s)), 1_000 + 5_000);
        s.rollback_started = true;
        assert_eq!(at(deadline(&s)), 1_000 + 60_000 + 5_000);
        s.terminal = Some(EventType::ReleaseRolledBack);
        assert_eq!(deadline(&s), Deadline::Ended);
    }

    #[test]
    fn the_whole_budget_adds_up_the_path() {
        let mut rolling = spec(Strategy::Rolling);
        rolling.canary = None;
        // build 60 + 5, the pre-checks 30 + 5, one step 30 + 5, its analysis 22 + 5.
        assert_eq!(total_budget_ms(&rolling), (65 + 35 + 35 + 27) * 1000);
        let canary = spec(Strategy::Canary);
        // + step 0 (35) + analysis (27) + pause (65), step 1 (35) + analysis 102+5, step 2
        // (the promotion at 100%: 35 + 27).
        assert_eq!(
            total_budget_ms(&canary),
            (65 + 35 + 35 + 27 + 65 + 35 + 107 + 35 + 27) * 1000
        );
    }
}
