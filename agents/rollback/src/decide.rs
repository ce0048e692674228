//! What the rollback agent does with a trigger, decided from the release's folded history alone.

use baton_core::event::EventType;
use baton_core::fold::ReleaseState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing(&'static str),
    /// End the release as failed: nothing on the cluster to undo (or rollback is off).
    Fail(String),
    /// Restore the previous revision, then end the release as rolled back.
    RollBack {
        reason: String,
    },
}

/// The reaction to `trigger` (one of the failure events, an abort, or a manual request).
pub fn decide(trigger: EventType, state: &ReleaseState) -> Action {
    if state.terminal.is_some() {
        return Action::Nothing("the release has ended");
    }
    let rollback_on_failure = state.spec.as_ref().is_none_or(|s| s.rollback_on_failure);
    let reason = state
        .failure
        .as_ref()
        .map(|f| f.reason.clone())
        .unwrap_or_default();
    match trigger {
        EventType::RollbackRequested => Action::RollBack {
            reason: state
                .rollback_request
                .as_ref()
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
        },
        EventType::BuildFailed => Action::Fail(format!("build failed: {reason}")),
        EventType::ReleaseAbortRequested if !state.cluster_changed => {
            Action::Fail("aborted before the cluster was changed".into())
        }
        EventType::ReleaseAbortRequested => {
            let (by, why) = state
                .abort
                .clone()
                .unwrap_or_else(|| (state.actor.clone(), String::new()));
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            };
            Action::RollBack {
                reason: format!("aborted by {by}{why}"),
            }
        }
        EventType::DeployFailed | EventType::AnalysisFailed if !state.cluster_changed => {
            Action::Fail(format!(
                "deploy failed before changing the cluster: {reason}"
            ))
        }
        EventType::DeployFailed | EventType::AnalysisFailed if !rollback_on_failure => {
            Action::Fail(format!("{reason} (rollback_on_failure is off)"))
        }
        EventType::DeployFailed | EventType::AnalysisFailed => Action::RollBack { reason },
        _ => Action::Nothing("not a trigger of the rollback agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::fold::Failure;
    use baton_proto::v1::ReleaseSpec;

    fn failed(stage: EventType, changed: bool, rollback: bool) -> ReleaseState {
        let mut s = ReleaseState::default();
        s.spec = Some(ReleaseSpec {
            rollback_on_failure: rollback,
            ..Default::default()
        });
        s.failure = Some(Failure {
            stage,
            step: Some(0),
            reason: "http 500".into(),
        });
        s.cluster_changed = changed;
        s
    }

    #[test]
    fn each_trigger_gets_its_reaction() {
        use EventType::*;
        let cases = [
            (
                BuildFailed,
                failed(BuildFailed, false, true),
                Action::Fail("build failed: http 500".into()),
            ),
            (
                DeployFailed,
                failed(DeployFailed, false, true),
                Action::Fail("deploy failed before changing the cluster: http 500".into()),
            ),
            (
                DeployFailed,
                failed(DeployFailed, true, true),
                Action::RollBack {
                    reason: "http 500".into(),
                },
            ),
            (
                AnalysisFailed,
                failed(AnalysisFailed, true, true),
                Action::RollBack {
                    reason: "http 500".into(),
                },
            ),
            (
                AnalysisFailed,
                failed(AnalysisFailed, true, false),
                Action::Fail("http 500 (rollback_on_failure is off)".into()),
            ),
            (
                ReleaseAbortRequested,
                failed(AnalysisFailed, false, true),
                Action::Fail("aborted before the cluster was changed".into()),
            ),
        ];
        for (trigger, state, expected) in cases {
            assert_eq!(decide(trigger, &state), expected, "{trigger}");
        }
        let mut ended = failed(AnalysisFailed, true, true);
        ended.terminal = Some(ReleaseRolledBack);
        assert_eq!(
            decide(AnalysisFailed, &ended),
            Action::Nothing("the release has ended")
        );
    }
}
