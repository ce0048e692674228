//! What the deployer does next, decided from a release's folded history alone (no I/O).

use baton_core::fold::ReleaseState;
use baton_proto::v1::Strategy;

/// The next thing to do for a release the deployer holds the lock for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing: the release ended, failed, waits for its build, or waits for an analysis.
    Wait(&'static str),
    /// Run the pre-checks and publish `deploy.started`.
    PreCheck,
    /// Start (or resume) a step: patch the workload and follow the rollout.
    Step { step: u32, weight: u32 },
    /// The last step's analysis passed: complete the release.
    Complete,
    /// The strategy is not one this deployer can drive.
    Unsupported(Strategy),
}

/// The steps of a rolling update: one, at full weight.
pub const ROLLING_STEPS: &[u32] = &[100];

pub fn next(state: &ReleaseState) -> Next {
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
    let strategy = Strategy::try_from(spec.strategy).unwrap_or(Strategy::Unspecified);
    if !matches!(strategy, Strategy::Rolling | Strategy::Unspecified) {
        return Next::Unsupported(strategy);
    }
    if !state.deploy_started {
        return Next::PreCheck;
    }
    let steps = ROLLING_STEPS;
    for (i, weight) in steps.iter().enumerate() {
        let step = i as u32;
        if !state.steps_ready.contains(&step) {
            return Next::Step {
                step,
                weight: *weight,
            };
        }
        if !state.analyses_passed.contains(&step) {
            return Next::Wait("waiting for the analysis of the step");
        }
    }
    if state.deploy_completed {
        // deploy.completed is out but not release.succeeded (a crash in between): finish.
        return Next::Complete;
    }
    Next::Complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::v1::ReleaseSpec;

    fn state() -> ReleaseState {
        let mut s = ReleaseState::default();
        s.spec = Some(ReleaseSpec {
            strategy: Strategy::Rolling as i32,
            ..Default::default()
        });
        s
    }

    #[test]
    fn the_next_step_follows_from_the_facts() {
        use baton_core::EventType;
        let built = |mut s: ReleaseState| {
            s.image_ref = Some("web@sha256:1".into());
            s
        };
        let started = |mut s: ReleaseState| {
            s.deploy_started = true;
            s
        };
        let ready = |mut s: ReleaseState| {
            s.steps_started.insert(0, 100);
            s.steps_ready.insert(0);
            s
        };
        let passed = |mut s: ReleaseState| {
            s.analyses_passed.insert(0);
            s
        };
        let cases: Vec<(&str, ReleaseState, Next)> = vec![
            (
                "no spec",
                ReleaseState::default(),
                Next::Wait("no spec yet"),
            ),
            ("not built", state(), Next::Wait("waiting for the build")),
            ("built", built(state()), Next::PreCheck),
            (
                "started",
                started(built(state())),
                Next::Step {
                    step: 0,
                    weight: 100,
                },
            ),
            (
                "step ready",
                ready(started(built(state()))),
                Next::Wait("waiting for the analysis of the step"),
            ),
            (
                "analysis passed",
                passed(ready(started(built(state())))),
                Next::Complete,
            ),
            (
                "ended",
                {
                    let mut s = passed(ready(started(built(state()))));
                    s.terminal = Some(EventType::ReleaseSucceeded);
                    s
                },
                Next::Wait("the release has ended"),
            ),
            (
                "failed",
                {
                    let mut s = ready(started(built(state())));
                    s.failure = Some(baton_core::fold::Failure {
                        stage: EventType::AnalysisFailed,
                        step: Some(0),
                        reason: "x".into(),
                    });
                    s
                },
                Next::Wait("the release failed or is being rolled back"),
            ),
            (
                "canary not yet",
                {
                    let mut s = built(state());
                    if let Some(spec) = s.spec.as_mut() {
                        spec.strategy = Strategy::Canary as i32
                    }
                    s
                },
                Next::Unsupported(Strategy::Canary),
            ),
        ];
        for (name, s, expected) in cases {
            assert_eq!(next(&s), expected, "{name}");
        }
    }
}
