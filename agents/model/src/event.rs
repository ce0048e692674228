//! Event types, their owners, and the envelope: building, encoding, decoding and validating it.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use baton_proto::v1::{envelope::Payload, Envelope, Source};
use prost::Message;

use crate::ids::EventKey;
use crate::names::{NameError, ReleaseId};

/// The largest envelope an agent accepts; larger ones are dead-lettered, not decoded.
pub const MAX_EVENT_BYTES: usize = 128 * 1024;

/// Who may publish an event type (DESIGN.md §3). NATS permissions enforce the same table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Cli,
    Builder,
    Deployer,
    HealthChecker,
    Rollback,
    Metrics,
    Notifier,
}

impl Role {
    pub const AGENTS: [Role; 6] = [
        Role::Builder,
        Role::Deployer,
        Role::HealthChecker,
        Role::Rollback,
        Role::Metrics,
        Role::Notifier,
    ];

    /// The name used for the NATS user, the dead-letter subject and consumer names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cli => "cli",
            Role::Builder => "builder",
            Role::Deployer => "deployer",
            Role::HealthChecker => "health-checker",
            Role::Rollback => "rollback",
            Role::Metrics => "metrics",
            Role::Notifier => "notifier",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Role::Cli,
            Role::Builder,
            Role::Deployer,
            Role::HealthChecker,
            Role::Rollback,
            Role::Metrics,
            Role::Notifier,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("unknown role {s:?}"))
    }
}

macro_rules! event_types {
    ($($variant:ident => $name:literal, $payload:ident, $owner:ident;)*) => {
        /// Every event type of the contract; `as_str` is the dotted name that ends the subject.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType { $($variant,)* }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name,)* }
            }

            pub fn owner(self) -> Role {
                match self { $(EventType::$variant => Role::$owner,)* }
            }

            pub fn of(payload: &Payload) -> EventType {
                match payload { $(Payload::$payload(_) => EventType::$variant,)* }
            }
        }

        impl FromStr for EventType {
            type Err = UnknownEventType;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(EventType::$variant),)*
                    other => Err(UnknownEventType(other.to_owned())),
                }
            }
        }
    };
}

event_types! {
    ReleaseRequested => "release.requested", ReleaseRequested, Cli;
    ReleaseAbortRequested => "release.abort_requested", ReleaseAbortRequested, Cli;
    ReleasePauseRequested => "release.pause_requested", ReleasePauseRequested, Cli;
    ReleaseResumeRequested => "release.resume_requested", ReleaseResumeRequested, Cli;
    ReleasePromoteRequested => "release.promote_requested", ReleasePromoteRequested, Cli;
    RollbackRequested => "rollback.requested", RollbackRequested, Cli;
    BuildStarted => "build.started", BuildStarted, Builder;
    BuildSucceeded => "build.succeeded", BuildSucceeded, Builder;
    BuildFailed => "build.failed", BuildFailed, Builder;
    DeployStarted => "deploy.started", DeployStarted, Deployer;
    DeployStepStarted => "deploy.step_started", DeployStepStarted, Deployer;
    DeployStepReady => "deploy.step_ready", DeployStepReady, Deployer;
    DeployCompleted => "deploy.completed", DeployCompleted, Deployer;
    DeployFailed => "deploy.failed", DeployFailed, Deployer;
    ReleaseSucceeded => "release.succeeded", ReleaseSucceeded, Deployer;
    ReleaseQueued => "release.queued", ReleaseQueued, Deployer;
    ReleasePaused => "release.paused", ReleasePaused, Deployer;
    ReleaseResumed => "release.resumed", ReleaseResumed, Deployer;
    AnalysisStarted => "analysis.started", AnalysisStarted, HealthChecker;
    AnalysisPassed => "analysis.passed", AnalysisPassed, HealthChecker;
    AnalysisFailed => "analysis.failed", AnalysisFailed, HealthChecker;
    AnalysisInconclusive => "analysis.inconclusive", AnalysisInconclusive, HealthChecker;
    RollbackStarted => "rollback.started", RollbackStarted, Rollback;
    RollbackCompleted => "rollback.completed", RollbackCompleted, Rollback;
    RollbackFailed => "rollback.failed", RollbackFailed, Rollback;
    ReleaseRolledBack => "release.rolled_back", ReleaseRolledBack, Rollback;
    ReleaseFailed => "release.failed", ReleaseFailed, Rollback;
}

impl EventType {
    /// A person's (or CI's) request or command: what the CLI publishes.
    pub fn is_command(self) -> bool {
        self.owner() == Role::Cli
    }

    /// Types that end a release.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventType::ReleaseSucceeded | EventType::ReleaseFailed | EventType::ReleaseRolledBack
        )
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

/// Why bytes from the bus are not a valid event. Each is permanent: the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("event of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not a protobuf envelope: {0}")]
    Undecodable(String),
    #[error("envelope has no payload this version knows (unknown event type)")]
    UnknownPayload,
    #[error("envelope id {0:?} is not a UUID")]
    BadId(String),
    #[error("envelope release id is invalid: {0}")]
    BadReleaseId(NameError),
    #[error("envelope has no time")]
    NoTime,
    #[error("envelope has no source")]
    NoSource,
    #[error("subject says {subject} but payload is {payload}")]
    TypeMismatch {
        subject: EventType,
        payload: EventType,
    },
    #[error("subject names release {subject} but envelope names {envelope}")]
    ReleaseMismatch { subject: String, envelope: String },
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
}

/// A decoded, validated event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: Envelope,
    pub event_type: EventType,
    pub release_id: ReleaseId,
}

impl Event {
    /// Builds the envelope of a new event. `key` makes the id deterministic (DESIGN.md §3): the
    /// same release, type and key always give the same id, so a retried publish is dropped by
    /// JetStream's duplicate window.
    pub fn new(
        release_id: ReleaseId,
        key: EventKey<'_>,
        payload: Payload,
        source: Source,
        actor: impl Into<String>,
        causation_id: impl Into<String>,
    ) -> Self {
        let event_type = EventType::of(&payload);
        let id = crate::ids::event_id(release_id, event_type, key);
        let envelope = Envelope {
            id: id.to_string(),
            release_id: release_id.to_string(),
            causation_id: causation_id.into(),
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            source: Some(source),
            actor: actor.into(),
            payload: Some(payload),
        };
        Event {
            envelope,
            event_type,
            release_id,
        }
    }

    /// The `n`th event of a hand-written history, as fold and analysis tests write them: by
    /// alice from a test agent, keyed and timed by `n` (second 1000 + n).
    pub fn numbered(release_id: ReleaseId, n: u32, payload: Payload) -> Event {
        let mut e = Event::new(
            release_id,
            EventKey::Named(&n.to_string()),
            payload,
            Source {
                agent: "test".into(),
                cluster: "c".into(),
                instance: "i".into(),
            },
            "alice",
            "",
        );
        e.envelope.time = Some(prost_types::Timestamp {
            seconds: 1_000 + i64::from(n),
            nanos: 0,
        });
        e
    }

    pub fn id(&self) -> &str {
        &self.envelope.id
    }

    pub fn payload(&self) -> Option<&Payload> {
        self.envelope.payload.as_ref()
    }

    pub fn encode(&self) -> Vec<u8> {
        self.envelope.encode_to_vec()
    }

    /// Event time in milliseconds since the epoch (0 when absent, which validation refuses).
    pub fn time_ms(&self) -> i64 {
        self.envelope.time.as_ref().map(timestamp_ms).unwrap_or(0)
    }

    /// Decodes and validates bytes from the bus. `subject_type` and `subject_release` are what the
    /// subject says, when the message came on an event subject; they must agree with the payload.
    pub fn decode(
        bytes: &[u8],
        subject_type: Option<EventType>,
        subject_release: Option<&str>,
    ) -> Result<Event, InvalidEvent> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(InvalidEvent::TooLarge {
                size: bytes.len(),
                limit: MAX_EVENT_BYTES,
            });
        }
        let envelope =
            Envelope::decode(bytes).map_err(|e| InvalidEvent::Undecodable(e.to_string()))?;
        Self::from_envelope(envelope, subject_type, subject_release)
    }

    pub fn from_envelope(
        envelope: Envelope,
        subject_type: Option<EventType>,
        subject_release: Option<&str>,
    ) -> Result<Event, InvalidEvent> {
        let payload = envelope
            .payload
            .as_ref()
            .ok_or(InvalidEvent::UnknownPayload)?;
        let event_type = EventType::of(payload);
        uuid::Uuid::parse_str(&envelope.id)
            .map_err(|_| InvalidEvent::BadId(envelope.id.clone()))?;
        let release_id =
            ReleaseId::parse(&envelope.release_id).map_err(InvalidEvent::BadReleaseId)?;
        if envelope.time.is_none() {
            return Err(InvalidEvent::NoTime);
        }
        if envelope.source.is_none() {
            return Err(InvalidEvent::NoSource);
        }
        if let Some(subject) = subject_type {
            if subject != event_type {
                return Err(InvalidEvent::TypeMismatch {
                    subject,
                    payload: event_type,
                });
            }
        }
        if let Some(subject) = subject_release {
            if subject != envelope.release_id {
                return Err(InvalidEvent::ReleaseMismatch {
                    subject: subject.to_owned(),
                    envelope: envelope.release_id.clone(),
                });
            }
        }
        crate::validate::payload(payload).map_err(InvalidEvent::InvalidPayload)?;
        Ok(Event {
            envelope,
            event_type,
            release_id,
        })
    }
}

pub fn timestamp_ms(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_name() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(*t));
        }
        assert_eq!(EventType::ALL.len(), 27);
        assert!("release.exploded".parse::<EventType>().is_err());
    }

    #[test]
    fn owners_follow_the_contract() {
        use EventType::*;
        let table = [
            (ReleaseRequested, Role::Cli),
            (RollbackRequested, Role::Cli),
            (BuildSucceeded, Role::Builder),
            (DeployStepReady, Role::Deployer),
            (ReleaseSucceeded, Role::Deployer),
            (ReleaseQueued, Role::Deployer),
            (AnalysisFailed, Role::HealthChecker),
            (ReleaseRolledBack, Role::Rollback),
            (ReleaseFailed, Role::Rollback),
        ];
        for (t, owner) in table {
            assert_eq!(t.owner(), owner, "{t}");
        }
        assert!(EventType::ALL.iter().all(|t| t.owner() != Role::Metrics));
        assert!(EventType::ALL.iter().all(|t| t.owner() != Role::Notifier));
    }
}
