//! What the deployer does next, decided from a release's folded history alone (no I/O).
//!
//! Every strategy is a list of steps ([`plan`]): a rolling update is one step at 100%; a canary
//! is its weights, the last one (100%) being the promotion of the stable Deployment; blue-green is
//! the new colour behind the preview Service (0%), then the switch of the Service (100%). After a
//! step is ready the health-checker analyses it; the next step starts only on a passing verdict,
//! and after a step's gate (a timed pause, or a pause until a person promotes) is resumed.

use baton_core::fold::ReleaseState;

pub use baton_core::control::{plan, strategy};

/// The next thing to do for a release the deployer holds the lock for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing now: the release ended, failed, waits for its build, an analysis or a person.
    Wait(&'static str),
    /// A timed pause that ends in this many milliseconds.
    WaitFor { ms: i64 },
    /// Run the pre-checks and publish `deploy.started`.
    PreCheck,
    /// Start (or resume) a step.
    Step { step: u32, weight: u32, last: bool },
    /// Hold after a step (publish `release.paused`).
    Gate {
        step: u32,
        until_promoted: bool,
        seconds: u32,
    },
    /// A timed pause is over (publish `release.resumed`).
    EndGate { step: u32 },
    /// The step's analysis gave no verdict: hold for a person (publish `release.paused`), who
    /// promotes (the step counts as passed) or aborts.
    HoldInconclusive { step: u32 },
    /// The last step's analysis passed: complete the release.
    Complete,
}

/// Decides the next action. `now_ms` is only used for timed pauses.
pub fn next(state: &ReleaseState, now_ms: i64) -> Next {
    if state.terminal.is_some() {
        return Next::Wait("the release has ended");
    }
    if state.failure.is_some() || state.rollback_started || state.abort_requested {
        return Next::Wait("the release failed or is being rolled back");
    }
    let Some(spec) = &state.spec else {
        return Next::Wait("no spec yet");
    };
    if state.image_ref.is_none() {
        return Next::Wait("waiting for the build");
    }
    if !state.deploy_started {
        return Next::PreCheck;
    }
    let steps = plan(spec);
    let last = steps.len() as u32 - 1;
    let mut i: u32 = 0;
    while i <= last {
        let def = steps[i as usize];
        if !state.steps_ready.contains(&i) {
            if state.is_paused() {
                return Next::Wait("paused");
            }
            return Next::Step {
                step: i,
                weight: def.weight,
                last: i == last,
            };
        }
        if !state.analyses_passed.contains(&i)
            && !state.analyses_accepted.contains(&i)
            && baton_core::control::analysed(spec, i)
        {
            if state.analyses_inconclusive.contains(&i) {
                return if state.is_paused_at(i) {
                    Next::Wait("the analysis was inconclusive: waiting for a person")
                } else {
                    Next::HoldInconclusive { step: i }
                };
            }
            return Next::Wait("waiting for the analysis of the step");
        }
        if i == last {
            break;
        }
        // A gate after the step, unless a person promoted all the way.
        if def.gated() && !state.promote_full {
            if !state.gate_steps.contains(&i) {
                return Next::Gate {
                    step: i,
                    until_promoted: def.until_promoted,
                    seconds: def.pause_seconds,
                };
            }
            if state.is_paused_at(i) {
                if def.until_promoted {
                    return Next::Wait("waiting for a person to promote");
                }
                let since = state.first_pause_ms.get(&i).copied().unwrap_or(now_ms);
                let left = since + i64::from(def.pause_seconds) * 1000 - now_ms;
                return if left <= 0 {
                    Next::EndGate { step: i }
                } else {
                    Next::WaitFor { ms: left }
                };
            }
        }
        // Held by a person between this step and the next.
        if state.is_paused_at(i) {
            return Next::Wait("paused");
        }
        // `promote --full`: after this step's analysis, straight to the last step.
        i = if state.promote_full {
            i.max(last - 1) + 1
        } else {
            i + 1
        };
    }
    Next::Complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::config::DEFAULT_CANARY_WEIGHTS;
    use baton_core::event::EventType;
    use baton_proto::v1::{CanaryParams, CanaryStep, ReleaseSpec, Strategy};

    fn spec(strategy: Strategy) -> ReleaseSpec {
        ReleaseSpec {
            strategy: strategy as i32,
            canary: Some(CanaryParams {
                steps: vec![
                    CanaryStep {
                        weight: 10,
                        pause_seconds: 0,
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
                        weight: 75,
                        pause_seconds: 60,
                        pause_until_promoted: false,
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
            ..Default::default()
        }
    }

    fn state(strategy: Strategy) -> ReleaseState {
        let mut s = ReleaseState::default();
        s.spec = Some(spec(strategy));
        s.image_ref = Some("web@sha256:1".into());
        s.deploy_started = true;
        s
    }

    fn done(s: &mut ReleaseState, step: u32) {
        s.steps_started.insert(step, 0);
        s.steps_ready.insert(step);
        s.analyses_passed.insert(step);
    }

    #[test]
    fn plans_follow_the_strategy() {
        let weights = |s: &ReleaseSpec| plan(s).iter().map(|d| d.weight).collect::<Vec<_>>();
        assert_eq!(weights(&spec(Strategy::Rolling)), [100]);
        assert_eq!(weights(&spec(Strategy::Unspecified)), [100]);
        assert_eq!(weights(&spec(Strategy::BlueGreen)), [0, 100]);
        assert_eq!(weights(&spec(Strategy::Canary)), [10, 50, 75, 100]);
        let mut defaults = spec(Strategy::Canary);
        defaults.canary = None;
        assert_eq!(weights(&defaults), DEFAULT_CANARY_WEIGHTS);
        let mut no_hundred = spec(Strategy::Canary);
        no_hundred.canary = Some(CanaryParams {
            steps: vec![CanaryStep {
                weight: 20,
                ..Default::default()
            }],
        });
        assert_eq!(weights(&no_hundred), [20, 100]);
    }

    #[test]
    fn the_next_step_follows_from_the_facts() {
        let mut s = ReleaseState::default();
        assert_eq!(next(&s, 0), Next::Wait("no spec yet"));
        s.spec = Some(spec(Strategy::Rolling));
        assert_eq!(next(&s, 0), Next::Wait("waiting for the build"));
        s.image_ref = Some("x".into());
        assert_eq!(next(&s, 0), Next::PreCheck);
        s.deploy_started = true;
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 0,
                weight: 100,
                last: true
            }
        );
        s.steps_ready.insert(0);
        assert_eq!(
            next(&s, 0),
            Next::Wait("waiting for the analysis of the step")
        );
        s.analyses_passed.insert(0);
        assert_eq!(next(&s, 0), Next::Complete);
        s.terminal = Some(EventType::ReleaseSucceeded);
        assert_eq!(next(&s, 0), Next::Wait("the release has ended"));
    }

    #[test]
    fn a_canary_walks_its_steps_and_stops_at_its_gates() {
        let mut s = state(Strategy::Canary);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 0,
                weight: 10,
                last: false
            }
        );
        done(&mut s, 0);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 1,
                weight: 50,
                last: false
            }
        );
        done(&mut s, 1);
        // Pause until promoted.
        assert_eq!(
            next(&s, 0),
            Next::Gate {
                step: 1,
                until_promoted: true,
                seconds: 0
            }
        );
        s.pauses += 1;
        s.step_pauses.insert(1, 1);
        s.gate_steps.insert(1);
        assert_eq!(next(&s, 0), Next::Wait("waiting for a person to promote"));
        s.resumes += 1;
        s.step_resumes.insert(1, 1);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 2,
                weight: 75,
                last: false
            }
        );
        done(&mut s, 2);
        // A timed pause of 60 s.
        assert_eq!(
            next(&s, 1_000),
            Next::Gate {
                step: 2,
                until_promoted: false,
                seconds: 60
            }
        );
        s.pauses += 1;
        s.step_pauses.insert(2, 1);
        s.gate_steps.insert(2);
        s.first_pause_ms.insert(2, 1_000);
        assert_eq!(next(&s, 31_000), Next::WaitFor { ms: 30_000 });
        assert_eq!(next(&s, 61_000), Next::EndGate { step: 2 });
        s.resumes += 1;
        s.step_resumes.insert(2, 1);
        assert_eq!(
            next(&s, 61_000),
            Next::Step {
                step: 3,
                weight: 100,
                last: true
            }
        );
        done(&mut s, 3);
        assert_eq!(next(&s, 61_000), Next::Complete);
    }

    #[test]
    fn a_person_pausing_during_a_gated_step_does_not_skip_its_gate() {
        let mut s = state(Strategy::Canary);
        done(&mut s, 0);
        s.steps_started.insert(1, 50);
        // A person pauses and resumes at step 1 while it is analysed…
        s.pauses = 1;
        s.resumes = 1;
        s.step_pauses.insert(1, 1);
        s.step_resumes.insert(1, 1);
        s.steps_ready.insert(1);
        s.analyses_passed.insert(1);
        // …and the step's own gate still holds the release.
        assert_eq!(
            next(&s, 0),
            Next::Gate {
                step: 1,
                until_promoted: true,
                seconds: 0
            }
        );
    }

    #[test]
    fn an_inconclusive_analysis_holds_for_a_person_who_may_let_the_step_go_on() {
        let mut s = state(Strategy::Canary);
        s.steps_started.insert(0, 10);
        s.steps_ready.insert(0);
        s.analyses_inconclusive.insert(0);
        assert_eq!(next(&s, 0), Next::HoldInconclusive { step: 0 });
        // Held: the deployer published release.paused for the step.
        s.pauses = 1;
        s.step_pauses.insert(0, 1);
        assert_eq!(
            next(&s, 0),
            Next::Wait("the analysis was inconclusive: waiting for a person")
        );
        // Promoted: release.resumed of the step, after the verdict-less analysis.
        s.resumes = 1;
        s.step_resumes.insert(0, 1);
        s.analyses_accepted.insert(0);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 1,
                weight: 50,
                last: false
            }
        );
    }

    #[test]
    fn a_person_can_pause_and_promote_all_the_way() {
        let mut s = state(Strategy::Canary);
        done(&mut s, 0);
        // Paused by a person between steps: nothing moves.
        s.pauses = 1;
        s.step_pauses.insert(0, 1);
        assert_eq!(next(&s, 0), Next::Wait("paused"));
        s.resumes = 1;
        s.step_resumes.insert(0, 1);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 1,
                weight: 50,
                last: false
            }
        );
        // --full after step 1: its gate is skipped and the next step is the promotion.
        done(&mut s, 1);
        s.promote_full = true;
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 3,
                weight: 100,
                last: true
            }
        );
    }

    #[test]
    fn blue_green_without_post_promotion_analysis_completes_after_the_switch() {
        let mut s = state(Strategy::BlueGreen);
        if let Some(spec) = s.spec.as_mut() {
            spec.blue_green = Some(baton_proto::v1::BlueGreenParams {
                scale_down_delay_seconds: 5,
                post_promotion_analysis: false,
                ..Default::default()
            });
        }
        done(&mut s, 0);
        s.steps_started.insert(1, 100);
        s.steps_ready.insert(1);
        assert_eq!(next(&s, 0), Next::Complete);
    }

    #[test]
    fn blue_green_previews_then_switches() {
        let mut s = state(Strategy::BlueGreen);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 0,
                weight: 0,
                last: false
            }
        );
        done(&mut s, 0);
        assert_eq!(
            next(&s, 0),
            Next::Step {
                step: 1,
                weight: 100,
                last: true
            }
        );
        done(&mut s, 1);
        assert_eq!(next(&s, 0), Next::Complete);
    }
}
