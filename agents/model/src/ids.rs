//! Deterministic event ids (DESIGN.md §3).
//!
//! An agent that crashes after publishing but before acking will handle the same trigger again.
//! Because the id of the event it publishes is derived from (release, type, key), the second
//! publish carries the same `Nats-Msg-Id` and JetStream drops it: no step is published twice.

use uuid::Uuid;

use crate::event::EventType;
use crate::names::ReleaseId;

/// The UUID v5 namespace of Baton's event ids.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c0e_4a8e_5b1d_4f3a_9e2c_7d10_b470_0001);

/// What distinguishes one logical event from another of the same type in one release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKey<'a> {
    /// At most one such event per release (e.g. `release.succeeded`, `deploy.started`).
    Once,
    /// One per step (e.g. `deploy.step_started` of step 2).
    Step(u32),
    /// One per named occasion (e.g. the event it answers, or a rollback attempt).
    Named(&'a str),
    /// Every occurrence is distinct (commands from people: each `pause` is its own event).
    Unique,
}

/// The id of an event. Deterministic for every key but [`EventKey::Unique`].
pub fn event_id(release: ReleaseId, event_type: EventType, key: EventKey<'_>) -> Uuid {
    let name = match key {
        EventKey::Once => format!("{release}/{event_type}"),
        EventKey::Step(step) => format!("{release}/{event_type}/step/{step}"),
        EventKey::Named(name) => format!("{release}/{event_type}/named/{name}"),
        EventKey::Unique => return Uuid::now_v7(),
    };
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_of_one_logical_event_share_an_id() {
        let r = ReleaseId::generate();
        let t = EventType::DeployStepStarted;
        assert_eq!(
            event_id(r, t, EventKey::Step(2)),
            event_id(r, t, EventKey::Step(2))
        );
        assert_eq!(
            event_id(r, t, EventKey::Once),
            event_id(r, t, EventKey::Once)
        );
        assert_eq!(
            event_id(r, t, EventKey::Named("x")),
            event_id(r, t, EventKey::Named("x"))
        );
    }

    #[test]
    fn different_events_get_different_ids() {
        let r = ReleaseId::generate();
        let other = ReleaseId::generate();
        let t = EventType::DeployStepStarted;
        let ids = [
            event_id(r, t, EventKey::Step(1)),
            event_id(r, t, EventKey::Step(2)),
            event_id(r, t, EventKey::Once),
            event_id(r, t, EventKey::Named("1")),
            event_id(r, EventType::DeployStepReady, EventKey::Step(1)),
            event_id(other, t, EventKey::Step(1)),
            event_id(r, t, EventKey::Unique),
            event_id(r, t, EventKey::Unique),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
