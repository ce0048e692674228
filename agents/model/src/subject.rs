//! Subjects of the event contract: `baton.v1.events.<env>.<app>.<release_id>.<type>`,
//! `baton.v1.dlq.<agent>`, `baton.v1.api.>` and the notifier's outbox
//! `baton.v1.notify.<channel>.<release_id>`.

use std::fmt;

use crate::event::{EventType, Role, UnknownEventType};
use crate::names::{AppName, EnvName, NameError, ReleaseId};

pub const EVENTS_PREFIX: &str = "baton.v1.events";
pub const DLQ_PREFIX: &str = "baton.v1.dlq";
pub const API_PREFIX: &str = "baton.v1.api";
pub const NOTIFY_PREFIX: &str = "baton.v1.notify";

/// The parts of an event subject, each already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSubject {
    pub env: EnvName,
    pub app: AppName,
    pub release_id: ReleaseId,
    pub event_type: EventType,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {0:?} is not under {EVENTS_PREFIX}")]
    NotAnEventSubject(String),
    #[error("subject {subject:?}: {source}")]
    BadName { subject: String, source: NameError },
    #[error("subject {subject:?}: {source}")]
    UnknownType {
        subject: String,
        source: UnknownEventType,
    },
}

impl EventSubject {
    pub fn new(env: EnvName, app: AppName, release_id: ReleaseId, event_type: EventType) -> Self {
        Self {
            env,
            app,
            release_id,
            event_type,
        }
    }

    /// Parses a subject string; every token is validated.
    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let rest = subject
            .strip_prefix(EVENTS_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| SubjectError::NotAnEventSubject(subject.to_owned()))?;
        let mut parts = rest.splitn(4, '.');
        let (Some(env), Some(app), Some(release), Some(event_type)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SubjectError::NotAnEventSubject(subject.to_owned()));
        };
        let bad = |source| SubjectError::BadName {
            subject: subject.to_owned(),
            source,
        };
        Ok(Self {
            env: EnvName::new(env).map_err(bad)?,
            app: AppName::new(app).map_err(bad)?,
            release_id: ReleaseId::parse(release).map_err(bad)?,
            event_type: event_type
                .parse()
                .map_err(|source| SubjectError::UnknownType {
                    subject: subject.to_owned(),
                    source,
                })?,
        })
    }
}

impl fmt::Display for EventSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{EVENTS_PREFIX}.{}.{}.{}.{}",
            self.env, self.app, self.release_id, self.event_type
        )
    }
}

/// All events of every release.
pub fn all_events() -> String {
    format!("{EVENTS_PREFIX}.>")
}

/// Every event of one type, in any environment and app (a consumer's filter).
pub fn events_of_type(event_type: EventType) -> String {
    format!("{EVENTS_PREFIX}.*.*.*.{event_type}")
}

/// Every event of one release.
pub fn release_events(release_id: ReleaseId) -> String {
    format!("{EVENTS_PREFIX}.*.*.{release_id}.>")
}

/// Every event of one app in one environment.
pub fn app_events(env: &EnvName, app: &AppName) -> String {
    format!("{EVENTS_PREFIX}.{env}.{app}.>")
}

/// The dead-letter subject of an agent.
pub fn dlq(role: Role) -> String {
    format!("{DLQ_PREFIX}.{role}")
}

/// A notification waiting to be sent to a channel (the notifier's outbox, stream `BATON_NOTIFY`).
pub fn notification(channel: &str, release_id: ReleaseId) -> String {
    format!("{NOTIFY_PREFIX}.{channel}.{release_id}")
}

/// Every notification waiting, of every channel.
pub fn all_notifications() -> String {
    format!("{NOTIFY_PREFIX}.>")
}

/// A request/reply query subject, e.g. `api("metrics.report")`.
pub fn api(name: &str) -> String {
    format!("{API_PREFIX}.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventSubject {
        EventSubject::new(
            EnvName::new("staging").unwrap(),
            AppName::new("web").unwrap(),
            ReleaseId::generate(),
            EventType::DeployStepReady,
        )
    }

    #[test]
    fn subjects_round_trip() {
        let s = sample();
        let text = s.to_string();
        assert!(text.starts_with("baton.v1.events.staging.web."));
        assert!(text.ends_with(".deploy.step_ready"));
        assert_eq!(EventSubject::parse(&text), Ok(s));
    }

    #[test]
    fn bad_subjects_are_refused_with_the_reason() {
        let s = sample();
        let rid = s.release_id;
        let cases = [
            ("baton.v1.dlq.builder".to_string(), "not under"),
            (
                format!("baton.v1.events.Staging.web.{rid}.build.started"),
                "environment name",
            ),
            (
                format!("baton.v1.events.staging.web_1.{rid}.build.started"),
                "app name",
            ),
            (
                "baton.v1.events.staging.web.1234.build.started".to_string(),
                "not a UUID",
            ),
            (
                format!("baton.v1.events.staging.web.{rid}.build.exploded"),
                "unknown event type",
            ),
            (format!("baton.v1.events.staging.web.{rid}"), "not under"),
        ];
        for (subject, why) in cases {
            let err = EventSubject::parse(&subject).unwrap_err().to_string();
            assert!(err.contains(why), "{subject}: {err}");
        }
    }

    #[test]
    fn filters_match_the_contract() {
        let rid = ReleaseId::generate();
        assert_eq!(
            events_of_type(EventType::ReleaseRequested),
            "baton.v1.events.*.*.*.release.requested"
        );
        assert_eq!(release_events(rid), format!("baton.v1.events.*.*.{rid}.>"));
        assert_eq!(dlq(Role::HealthChecker), "baton.v1.dlq.health-checker");
    }
}
