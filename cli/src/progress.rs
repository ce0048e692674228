//! How the CLI words a release's progress: its step ("step 2 (3 of 5) at 50%"), its plan
//! ("10% → [25%] → 50% (until promoted) → 100%") and what it waits for, from the model's
//! [`Progress`] of its history.

use baton_core::control::{seconds_text, Hold, Progress};
use baton_core::fold::Status;

/// The words for a release's progress.
pub trait Wording {
    /// "step 2 (3 of 5) at 50%" — step numbers are those of the events (from 0); "(3 of 5)"
    /// counts the strategy's steps. A one-step strategy (rolling) shows "step 0 at 100%".
    fn step_text(&self) -> Option<String>;
    /// The strategy's steps in a line, the current one in brackets. None for a one-step strategy.
    fn plan_text(&self) -> Option<String>;
    /// What the release is doing or waiting for now, in words.
    fn waiting_for(&self, now_ms: i64) -> String;
}

impl Wording for Progress {
    /// "step 2 (3 of 5) at 50%" — step numbers are those of the events (from 0); "(3 of 5)" counts
    /// the strategy's steps. A one-step strategy (rolling) shows "step 0 at 100%".
    fn step_text(&self) -> Option<String> {
        let step = self.state.current_step()?;
        let weight = self.state.current_weight().unwrap_or(0);
        Some(if self.plan.len() > 1 {
            format!(
                "step {step} ({} of {}) at {weight}%",
                step + 1,
                self.plan.len()
            )
        } else {
            format!("step {step} at {weight}%")
        })
    }

    /// The strategy's steps in a line, the current one in brackets:
    /// "10% → [25%] → 50% (until promoted) → 100%". None for a one-step strategy.
    fn plan_text(&self) -> Option<String> {
        if self.plan.len() < 2 {
            return None;
        }
        let current = self.state.current_step();
        let steps: Vec<String> = self
            .plan
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut text = format!("{}%", s.weight);
                if current == Some(i as u32) {
                    text = format!("[{text}]");
                }
                if s.until_promoted {
                    text.push_str(" (until promoted)");
                } else if s.pause_seconds > 0 {
                    text.push_str(&format!(
                        " (pause {})",
                        seconds_text(s.pause_seconds.into())
                    ));
                }
                text
            })
            .collect();
        Some(steps.join(" → "))
    }

    /// What the release is doing or waiting for now, in words: "waiting for a person to promote
    /// (baton promote ID)", "analysing step 2 (started 12s ago)", "paused by alice: … (baton
    /// resume ID)", "a pause of 5m after step 2: 42s left (…)".
    fn waiting_for(&self, now_ms: i64) -> String {
        let rid = self.release_id;
        let s = &self.state;
        let ago = |t: Option<&i64>| {
            t.map(|t| {
                format!(
                    " (started {} ago)",
                    seconds_text((now_ms - t).max(0) / 1000)
                )
            })
            .unwrap_or_default()
        };
        if s.terminal.is_some() {
            return "nothing: the release has ended".into();
        }
        if s.rollback_started {
            return "rolling back: waiting for the previous revision to become available again"
                .into();
        }
        if let Some(by) = &self.abort_by {
            return format!("aborted by {by}: waiting for the rollback agent");
        }
        if let Some(f) = &s.failure {
            let at = f.step.map(|n| format!(" at step {n}")).unwrap_or_default();
            return format!("{} failed{at}: waiting for the rollback agent", f.stage);
        }
        if s.rollback_request.is_some() {
            return "waiting for the rollback agent to restore the previous revision".into();
        }
        match s.status() {
            Status::Pending => "waiting for the agents to pick it up".into(),
            Status::Queued => format!(
                "waiting for release {} to end (queued behind it)",
                s.queued_behind.as_deref().unwrap_or("in flight")
            ),
            Status::Building => "waiting for the image to resolve".into(),
            Status::Paused { .. } => match &self.hold {
                Some(Hold::Promotion { .. }) => {
                    format!("waiting for a person to promote (baton promote {rid})")
                }
                Some(Hold::Inconclusive { step, reason }) => format!(
                    "the analysis of step {step} gave no verdict ({reason}): baton promote {rid} takes the step as passed, baton abort {rid} rolls it back"
                ),
                Some(Hold::Timed {
                    step,
                    seconds,
                    until_ms,
                }) => format!(
                    "a pause of {} after step {step}: {} left (baton promote {rid} ends it now)",
                    seconds_text(i64::from(*seconds)),
                    seconds_text(((until_ms - now_ms).max(0) + 999) / 1000)
                ),
                Some(Hold::Person { reason, .. }) => format!("{reason} (baton resume {rid})"),
                None => format!("paused (baton resume {rid})"),
            },
            Status::Analysing { step } => {
                format!(
                    "analysing step {step}{}",
                    ago(self.analysis_started_ms.get(&step))
                )
            }
            Status::Deploying { step } => {
                if !s.steps_started.contains_key(&step) {
                    "waiting for the first step to start".into()
                } else if !s.steps_ready.contains(&step) {
                    format!(
                        "waiting for the new pods of step {step} to become ready{}",
                        ago(self.step_started_ms.get(&step))
                    )
                } else if !s.analyses_passed.contains(&step) {
                    format!("waiting for the analysis of step {step} to start")
                } else if self.at_last_step() {
                    "waiting for the deployer to complete the release".into()
                } else {
                    format!("waiting for the step after step {step} to start")
                }
            }
            _ => "nothing".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::testing::{History, NOW};
    use baton_proto::v1::Strategy;

    #[test]
    fn progress_says_where_the_release_is_and_what_it_waits_for() {
        let mut h = History::canary();
        let p = h.progress();
        assert_eq!(p.step_text(), None);
        assert_eq!(p.waiting_for(NOW), "waiting for the agents to pick it up");
        h.started()
            .done(0, 10)
            .step(1, 50)
            .ready(1, 50)
            .analysing(1);
        let p = h.progress();
        assert_eq!(p.step_text().as_deref(), Some("step 1 (2 of 4) at 50%"));
        assert_eq!(
            p.plan_text().as_deref(),
            Some("10% → [50%] (until promoted) → 75% (pause 1m) → 100%")
        );
        let started = p.analysis_started_ms[&1];
        assert_eq!(
            p.waiting_for(started + 12_400),
            "analysing step 1 (started 12s ago)"
        );
        // The last verdict, with its measurements.
        let v = p.verdict.clone().expect("a verdict");
        assert_eq!((v.step, v.passed, v.measurements.len()), (0, true, 1));
        h.passed(1)
            .paused(1, "waiting for a person to promote (baton promote)");
        let rid = h.rid;
        assert_eq!(
            h.progress().waiting_for(NOW),
            format!("waiting for a person to promote (baton promote {rid})")
        );
        h.resumed(1)
            .done(2, 75)
            .paused(2, "pause of 60s after step 2");
        let p = h.progress();
        let Some(Hold::Timed { until_ms, .. }) = p.hold else {
            panic!("{:?}", p.hold)
        };
        assert_eq!(
            p.waiting_for(until_ms - 42_000),
            format!("a pause of 1m after step 2: 42s left (baton promote {rid} ends it now)")
        );
        h.resumed(2).step(3, 100);
        assert_eq!(
            h.progress().step_text().as_deref(),
            Some("step 3 (4 of 4) at 100%")
        );
        // A person's pause.
        let mut h = History::canary();
        h.started().step(0, 10).paused(0, "paused by bob: lunch");
        let p = h.progress();
        assert_eq!(
            p.waiting_for(NOW),
            format!("paused by bob: lunch (baton resume {})", h.rid)
        );
        assert!(matches!(p.hold, Some(Hold::Person { ref by, .. }) if by == "bob"));
        // Rolling: one step, no "of".
        let mut h = History::new(Strategy::Rolling, &[]);
        h.started().step(0, 100);
        let p = h.progress();
        assert_eq!(p.step_text().as_deref(), Some("step 0 at 100%"));
        assert_eq!(p.plan_text(), None);
        assert!(p
            .waiting_for(NOW)
            .starts_with("waiting for the new pods of step 0 to become ready (started "));
    }
}
