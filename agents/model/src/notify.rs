//! Notifications: which release events are told to whom (the `notifications:` section of the
//! configuration), and the message a notification carries. The notifier agent
//! (`baton-notifier`) routes events with [`Notifications::channels_for`] and sends
//! [`Notification`]s; their URLs are secrets and never part of this model.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::event::EventType;

/// The variables a channel's `link` template may name.
pub const LINK_VARIABLES: [&str; 7] = [
    "release_id",
    "app",
    "env",
    "namespace",
    "cluster",
    "image",
    "strategy",
];

/// What a route can be told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A release was asked for (`release.requested`).
    Requested,
    /// A step passed its analysis (`analysis.passed`).
    Step,
    /// The release holds: for a person (a gate until promoted, a manual promotion, a person's
    /// pause) or a timed pause (`release.paused`).
    Paused,
    /// `release.succeeded`.
    Succeeded,
    /// `release.rolled_back`.
    RolledBack,
    /// `release.failed`.
    Failed,
}

impl Trigger {
    pub const ALL: [Trigger; 6] = [
        Trigger::Requested,
        Trigger::Step,
        Trigger::Paused,
        Trigger::Succeeded,
        Trigger::RolledBack,
        Trigger::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Requested => "requested",
            Trigger::Step => "step",
            Trigger::Paused => "paused",
            Trigger::Succeeded => "succeeded",
            Trigger::RolledBack => "rolled_back",
            Trigger::Failed => "failed",
        }
    }

    /// The trigger an event type is, if any.
    pub fn of(event_type: EventType) -> Option<Trigger> {
        Some(match event_type {
            EventType::ReleaseRequested => Trigger::Requested,
            EventType::AnalysisPassed => Trigger::Step,
            EventType::ReleasePaused => Trigger::Paused,
            EventType::ReleaseSucceeded => Trigger::Succeeded,
            EventType::ReleaseRolledBack => Trigger::RolledBack,
            EventType::ReleaseFailed => Trigger::Failed,
            _ => return None,
        })
    }

    /// Whether the release ended with it.
    pub fn is_outcome(self) -> bool {
        matches!(
            self,
            Trigger::Succeeded | Trigger::RolledBack | Trigger::Failed
        )
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Trigger::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a trigger (use {})",
                    Trigger::ALL.map(Trigger::as_str).join(", ")
                )
            })
    }
}

/// How a channel's messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// A Slack-compatible incoming webhook: a JSON body of `text` and `blocks`.
    Slack,
    /// A JSON webhook in CloudEvents' HTTP binary mode (`ce-id`, `ce-type`, `ce-source`,
    /// `ce-subject` headers; the notification as the body).
    Cloudevents,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Slack => "slack",
            ChannelKind::Cloudevents => "cloudevents",
        }
    }
}

impl FromStr for ChannelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "slack" => Ok(ChannelKind::Slack),
            "cloudevents" => Ok(ChannelKind::Cloudevents),
            other => Err(format!(
                "{other:?} is not a channel kind (use slack or cloudevents)"
            )),
        }
    }
}

/// A channel as the configuration names it; its URL is in the notifier's secrets file, under
/// the channel's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub kind: ChannelKind,
    /// A link to put in each message (`{{release_id}}` and the other [`LINK_VARIABLES`]); the
    /// section's `link` when the channel has none.
    pub link: Option<String>,
}

/// Which releases go to a channel: every app and environment, and every trigger, unless named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub channel: String,
    /// Empty: every app.
    pub apps: Vec<String>,
    /// Empty: every environment.
    pub environments: Vec<String>,
    pub triggers: Vec<Trigger>,
}

impl Route {
    fn matches(&self, app: &str, env: &str, trigger: Trigger) -> bool {
        (self.apps.is_empty() || self.apps.iter().any(|a| a == app))
            && (self.environments.is_empty() || self.environments.iter().any(|e| e == env))
            && self.triggers.contains(&trigger)
    }
}

/// The `notifications:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notifications {
    pub channels: BTreeMap<String, Channel>,
    pub routes: Vec<Route>,
}

impl Notifications {
    /// The channels an event of `app` in `env` of this trigger goes to, each once, by name.
    pub fn channels_for(&self, app: &str, env: &str, trigger: Trigger) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .routes
            .iter()
            .filter(|r| r.matches(app, env, trigger))
            .map(|r| r.channel.as_str())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What one notification tells: the same fields for every kind of channel, so a receiver of the
/// JSON webhook gets what a person reads in Slack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The event's id: the idempotency key (`ce-id`), the same on every attempt.
    pub id: String,
    pub trigger: Trigger,
    /// The event type that caused it (`release.succeeded`…).
    pub event_type: String,
    pub release_id: String,
    pub app: String,
    pub env: String,
    pub cluster: String,
    pub namespace: String,
    /// The image as requested, and as resolved by the builder once it is known.
    pub image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_ref: String,
    pub strategy: String,
    /// The step the event is about, numbered from 0 as in the release's events (none for a
    /// request, or an end before any step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Its weight in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// succeeded, rolled_back or failed for the release's end; else empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Who asked for the release.
    pub actor: String,
    /// When the event happened, RFC 3339.
    pub time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link: String,
    /// The cluster and agent that published the event.
    pub source: String,
}

impl Notification {
    /// One line a person reads: "web 1.2.3 in production: rolled back at step 2 (10%) — error
    /// rate 0.2 > 0.01".
    pub fn summary(&self) -> String {
        let what = match self.trigger {
            Trigger::Requested => format!("release requested ({})", self.strategy),
            Trigger::Step => format!("{} passed its analysis", self.step_text()),
            Trigger::Paused => format!("paused at {}", self.step_text()),
            Trigger::Succeeded => "succeeded".to_owned(),
            Trigger::RolledBack => format!("rolled back{}", self.at_step()),
            Trigger::Failed => format!("failed{}", self.at_step()),
        };
        let mut line = format!("{} {} in {}: {what}", self.app, self.image, self.env);
        if !self.reason.is_empty() {
            line.push_str(" — ");
            line.push_str(&self.reason);
        }
        line
    }

    /// "step 1 (25%)".
    pub fn step_text(&self) -> String {
        match (self.step, self.weight) {
            (Some(s), Some(w)) => format!("step {s} ({w}%)"),
            (Some(s), None) => format!("step {s}"),
            (None, _) => "no step".to_owned(),
        }
    }

    fn at_step(&self) -> String {
        if self.step.is_some() {
            format!(" at {}", self.step_text())
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(channel: &str, apps: &[&str], envs: &[&str], triggers: &[Trigger]) -> Route {
        Route {
            channel: channel.into(),
            apps: apps.iter().map(|s| s.to_string()).collect(),
            environments: envs.iter().map(|s| s.to_string()).collect(),
            triggers: triggers.to_vec(),
        }
    }

    #[test]
    fn routes_pick_channels_by_app_environment_and_trigger() {
        let n = Notifications {
            channels: BTreeMap::new(),
            routes: vec![
                route("web-team", &["web"], &[], &Trigger::ALL),
                route("prod", &[], &["production"], &[Trigger::Failed]),
                route("web-team", &[], &["production"], &Trigger::ALL),
            ],
        };
        assert_eq!(
            n.channels_for("web", "production", Trigger::Failed),
            ["prod", "web-team"],
            "each channel once"
        );
        assert_eq!(
            n.channels_for("api", "staging", Trigger::Failed),
            [] as [&str; 0]
        );
        assert_eq!(
            n.channels_for("api", "production", Trigger::Step),
            ["web-team"]
        );
    }

    #[test]
    fn each_trigger_has_one_event_type() {
        let mapped: Vec<Trigger> = EventType::ALL
            .iter()
            .filter_map(|t| Trigger::of(*t))
            .collect();
        assert_eq!(mapped.len(), Trigger::ALL.len());
        for t in Trigger::ALL {
            assert_eq!(t.as_str().parse::<Trigger>(), Ok(t));
        }
        assert!("done"
            .parse::<Trigger>()
            .unwrap_err()
            .contains("rolled_back"));
    }

    #[test]
    fn a_summary_says_what_happened_and_why() {
        let n = Notification {
            id: "id".into(),
            trigger: Trigger::RolledBack,
            event_type: "release.rolled_back".into(),
            release_id: "r".into(),
            app: "web".into(),
            env: "production".into(),
            cluster: "eu".into(),
            namespace: "shop".into(),
            image: "web:1.2.3".into(),
            image_ref: String::new(),
            strategy: "canary".into(),
            step: Some(1),
            weight: Some(10),
            outcome: "rolled_back".into(),
            reason: "error-rate: 0.2 is not < 0.01".into(),
            actor: "alice".into(),
            time: "2026-12-02T10:00:00Z".into(),
            link: String::new(),
            source: "eu/rollback".into(),
        };
        assert_eq!(
            n.summary(),
            "web web:1.2.3 in production: rolled back at step 1 (10%) — error-rate: 0.2 is not < 0.01"
        );
    }
}
