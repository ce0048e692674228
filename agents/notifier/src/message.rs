//! What is sent: a [`Notification`] made from a release event and the release's history up to
//! it, and the HTTP request each kind of channel gets for it — a Slack-compatible incoming
//! webhook body (`text` and `blocks`), or the notification as JSON in CloudEvents' HTTP binary
//! mode.

use baton_core::config::strategy_name;
use baton_core::metric::render;
use baton_core::notify::{Channel, ChannelKind, Notification, Trigger};
use baton_core::subject::EventSubject;
use baton_core::time::rfc3339_ms;
use baton_core::{Event, ReleaseState};
use baton_proto::v1::envelope::Payload;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One message of the outbox (`BATON_NOTIFY`): the notification and how its channel is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    pub kind: ChannelKind,
    pub notification: Notification,
}

/// The CloudEvents `type` of a notification: `dev.baton.` and the event type.
pub fn cloudevent_type(n: &Notification) -> String {
    format!("dev.baton.{}", n.event_type)
}

/// The CloudEvents `source`: the app in its environment and cluster.
pub fn cloudevent_source(n: &Notification) -> String {
    format!("/baton/{}/{}/{}", n.cluster, n.env, n.app)
}

/// The notification of `event` (of a trigger) for a channel, from the release's state folded up
/// to and including the event.
pub fn notification(
    trigger: Trigger,
    subject: &EventSubject,
    event: &Event,
    state: &ReleaseState,
    channel: &Channel,
) -> Notification {
    let spec = state.spec.as_ref();
    let rollback = state.rollback_request.as_ref();
    let field = |from_spec: Option<&str>, from_rollback: Option<&str>| {
        from_spec.or(from_rollback).unwrap_or_default().to_owned()
    };
    let (step, reason) = match event.payload() {
        Some(Payload::AnalysisPassed(p)) => (Some(p.step), String::new()),
        Some(Payload::ReleasePaused(p)) => (Some(p.step), p.reason.clone()),
        Some(Payload::ReleaseRolledBack(p)) => (last_step(state), p.reason.clone()),
        Some(Payload::ReleaseFailed(p)) => (last_step(state), p.reason.clone()),
        Some(Payload::ReleaseSucceeded(_)) => (last_step(state), String::new()),
        _ => (None, String::new()),
    };
    let weight = step.and_then(|s| state.steps_started.get(&s).copied());
    let image = match spec {
        Some(s) => s.image.clone(),
        None => state
            .rollback_target
            .as_ref()
            .map(|t| t.to_image.clone())
            .unwrap_or_default(),
    };
    let strategy = match (spec, rollback) {
        (Some(s), _) => strategy_name(s.strategy()).to_owned(),
        (None, Some(_)) => "rollback".to_owned(),
        (None, None) => String::new(),
    };
    let source = event
        .envelope
        .source
        .as_ref()
        .map(|s| format!("{}/{}", s.cluster, s.agent))
        .unwrap_or_default();
    let mut n = Notification {
        id: event.id().to_owned(),
        trigger,
        event_type: event.event_type.as_str().to_owned(),
        release_id: subject.release_id.to_string(),
        app: subject.app.to_string(),
        env: subject.env.to_string(),
        cluster: field(
            spec.map(|s| s.cluster.as_str()),
            rollback.map(|r| r.cluster.as_str()),
        ),
        namespace: field(
            spec.map(|s| s.namespace.as_str()),
            rollback.map(|r| r.namespace.as_str()),
        ),
        image,
        image_ref: state.image_ref.clone().unwrap_or_default(),
        strategy,
        step,
        weight,
        outcome: if trigger.is_outcome() {
            trigger.as_str().to_owned()
        } else {
            String::new()
        },
        reason,
        actor: if event.envelope.actor.is_empty() {
            state.actor.clone()
        } else {
            event.envelope.actor.clone()
        },
        time: rfc3339_ms(event.time_ms()),
        link: String::new(),
        source,
    };
    if let Some(template) = &channel.link {
        n.link = render(template, |name| link_variable(&n, name));
    }
    n
}

/// The step a release ended at: the last one started (none for a release that started none).
fn last_step(state: &ReleaseState) -> Option<u32> {
    state.steps_started.keys().next_back().copied()
}

fn link_variable(n: &Notification, name: &str) -> String {
    let raw = match name {
        "release_id" => &n.release_id,
        "app" => &n.app,
        "env" => &n.env,
        "namespace" => &n.namespace,
        "cluster" => &n.cluster,
        "image" => &n.image,
        "strategy" => &n.strategy,
        _ => return String::new(),
    };
    percent_encode(raw)
}

/// A value made safe to put into a URL's path or query.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Slack's mrkdwn reserves `&`, `<` and `>`.
fn mrkdwn(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters (Slack refuses longer block texts).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn headline(n: &Notification) -> String {
    let what = match n.trigger {
        Trigger::Requested => "release requested",
        Trigger::Step => "step passed",
        Trigger::Paused => "paused",
        Trigger::Succeeded => "succeeded",
        Trigger::RolledBack => "rolled back",
        Trigger::Failed => "failed",
    };
    let icon = match n.trigger {
        Trigger::Requested => "🚀",
        Trigger::Step => "➡️",
        Trigger::Paused => "⏸️",
        Trigger::Succeeded => "✅",
        Trigger::RolledBack => "↩️",
        Trigger::Failed => "❌",
    };
    format!("{icon} {} in {}: {what}", n.app, n.env)
}

/// The body of a Slack-compatible incoming webhook: `text` (what a notification shows) and
/// blocks with the app, environment, image, strategy, step, outcome, reason and link.
pub fn slack_body(n: &Notification) -> Value {
    let mut fields = vec![
        ("App", n.app.clone()),
        ("Environment", n.env.clone()),
        ("Image", format!("`{}`", n.image)),
        ("Strategy", n.strategy.clone()),
    ];
    if n.step.is_some() {
        let step = n.step_text();
        fields.push(("Step", step.trim_start_matches("step ").to_owned()));
    }
    if !n.outcome.is_empty() {
        fields.push(("Outcome", n.outcome.replace('_', " ")));
    }
    let fields: Vec<Value> = fields
        .into_iter()
        .map(|(k, v)| json!({"type": "mrkdwn", "text": clip(&format!("*{k}*\n{}", mrkdwn(&v)), 1900)}))
        .collect();
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": clip(&headline(n), 150), "emoji": true}}),
        json!({"type": "section", "fields": fields}),
    ];
    if !n.reason.is_empty() {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&format!("*Reason*\n{}", mrkdwn(&n.reason)), 2900)}}));
    }
    let release = if n.link.is_empty() {
        format!("release `{}`", n.release_id)
    } else {
        format!("release <{}|{}>", n.link, n.release_id)
    };
    blocks.push(
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": clip(&format!(
        "{release} · by {} · {} · {}",
        mrkdwn(&n.actor),
        n.time,
        n.event_type
    ), 2900)}]}),
    );
    json!({"text": clip(&n.summary(), 2900), "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Notification {
        Notification {
            id: "0b7e3c1e-0000-5000-8000-000000000001".into(),
            trigger: Trigger::RolledBack,
            event_type: "release.rolled_back".into(),
            release_id: "01938f2e-0000-7000-8000-000000000000".into(),
            app: "web".into(),
            env: "production".into(),
            cluster: "eu".into(),
            namespace: "shop".into(),
            image: "registry.example.com/web:1.2.3".into(),
            image_ref: String::new(),
            strategy: "canary".into(),
            step: Some(1),
            weight: Some(10),
            outcome: "rolled_back".into(),
            reason: "error-rate: 0.2 is not < 0.01 & rising".into(),
            actor: "alice".into(),
            time: "2026-12-02T10:00:00Z".into(),
            link: "https://baton.example.com/r/01938f2e".into(),
            source: "eu/rollback".into(),
        }
    }

    #[test]
    fn a_slack_message_has_every_field_escaped() {
        let body = slack_body(&sample());
        let text = body.to_string();
        assert!(body["text"].as_str().unwrap().starts_with(
            "web registry.example.com/web:1.2.3 in production: rolled back at step 1 (10%)"
        ));
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        let fields: Vec<&str> = blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "*App*\nweb",
                "*Environment*\nproduction",
                "*Image*\n`registry.example.com/web:1.2.3`",
                "*Strategy*\ncanary",
                "*Step*\n1 (10%)",
                "*Outcome*\nrolled back"
            ]
        );
        assert!(text.contains("0.2 is not &lt; 0.01 &amp; rising"), "{text}");
        assert!(text.contains(
            "release <https://baton.example.com/r/01938f2e|01938f2e-0000-7000-8000-000000000000>"
        ));
    }

    #[test]
    fn long_reasons_are_clipped_to_slack_limits() {
        let mut n = sample();
        n.reason = "x".repeat(10_000);
        let body = slack_body(&n);
        let reason = body["blocks"][2]["text"]["text"].as_str().unwrap();
        assert_eq!(reason.chars().count(), 2900);
        assert!(body["text"].as_str().unwrap().chars().count() <= 2900);
    }

    #[test]
    fn links_are_filled_url_safe() {
        let n = sample();
        assert_eq!(
            link_variable(&n, "image"),
            "registry.example.com%2Fweb%3A1.2.3"
        );
        assert_eq!(
            render("https://x/{{app}}/{{release_id}}", |v| link_variable(&n, v)),
            "https://x/web/01938f2e-0000-7000-8000-000000000000"
        );
        assert_eq!(cloudevent_type(&n), "dev.baton.release.rolled_back");
        assert_eq!(cloudevent_source(&n), "/baton/eu/production/web");
    }
}
