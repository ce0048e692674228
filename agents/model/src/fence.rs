//! The fence's rule: what a writer may still do for a release, decided from its fold alone. The
//! runtime (`baton_core::fence`) checks it, with the workload's lock, before every cluster write.

use crate::fold::ReleaseState;

/// Who writes to the cluster on a release's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Drives the release forward: only while nothing has stopped it.
    Deployer,
    /// Restores the workload: until the release has ended.
    Rollback,
}

/// Why `writer` must no longer write for this release, if so.
pub fn refusal(state: &ReleaseState, writer: Writer) -> Option<String> {
    if let Some(terminal) = state.terminal {
        return Some(format!("the release has ended ({terminal})"));
    }
    if writer == Writer::Rollback {
        return None;
    }
    if state.abort_requested {
        return Some("the release was aborted".into());
    }
    if state.rollback_started {
        return Some("the release is being rolled back".into());
    }
    if let Some(f) = &state.failure {
        return Some(format!("the release has failed ({})", f.stage));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    #[test]
    fn the_deployer_stops_at_any_stop_and_the_rollback_at_the_end() {
        let mut s = ReleaseState::default();
        assert_eq!(refusal(&s, Writer::Deployer), None);
        s.abort_requested = true;
        assert_eq!(
            refusal(&s, Writer::Deployer).as_deref(),
            Some("the release was aborted")
        );
        assert_eq!(refusal(&s, Writer::Rollback), None);
        s.terminal = Some(EventType::ReleaseRolledBack);
        assert!(refusal(&s, Writer::Rollback).is_some());
    }
}
