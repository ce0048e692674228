//! Garbage on every agent's subjects — bytes, wrong types, huge payloads, names that are not DNS
//! labels, and on the notifier's outbox what is not a notification — ends in dead letters with
//! reasons, while the six agents keep working and releases go on.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream::{self, consumer};
use baton_core::busconfig::Definitions;
use baton_core::event::{Event, EventType, Role};
use baton_core::ids::EventKey;
use baton_core::names::ReleaseId;
use baton_proto::v1::{envelope::Payload, *};
use baton_tests::harness::trial;
use baton_tests::release::Baton;
use baton_tests::{AgentProcess, CLUSTER};
use futures::StreamExt;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![garbage_on_every_agent_subject_is_dead_lettered_and_releases_go_on]
}

/// A valid payload of another type with the same owner, to put on `t`'s subject.
fn other_type_payload(t: EventType) -> Payload {
    match t.owner() {
        Role::Cli if t == EventType::RollbackRequested => {
            Payload::ReleaseAbortRequested(ReleaseAbortRequested { reason: "x".into() })
        }
        Role::Cli => Payload::RollbackRequested(RollbackRequested {
            app: "web".into(),
            env: "test".into(),
            ..Default::default()
        }),
        Role::Builder if t == EventType::BuildStarted => {
            Payload::BuildFailed(BuildFailed::default())
        }
        Role::Builder => Payload::BuildStarted(BuildStarted::default()),
        Role::Deployer if t == EventType::DeployStarted => {
            Payload::DeployCompleted(DeployCompleted::default())
        }
        Role::Deployer => Payload::DeployStarted(DeployStarted::default()),
        Role::HealthChecker if t == EventType::AnalysisStarted => {
            Payload::AnalysisFailed(AnalysisFailed::default())
        }
        Role::HealthChecker => Payload::AnalysisStarted(AnalysisStarted::default()),
        Role::Rollback | Role::Metrics | Role::Notifier if t == EventType::RollbackStarted => {
            Payload::ReleaseFailed(ReleaseFailed::default())
        }
        Role::Rollback | Role::Metrics | Role::Notifier => {
            Payload::RollbackStarted(RollbackStarted::default())
        }
    }
}

/// What the dead letters of an agent's garbage say, one of each.
const EXPECTED: [&str; 4] = [
    "not a protobuf envelope",
    "subject says",
    "larger than the limit",
    "not a DNS label",
];

/// The notifier's: the garbage of every event, and that of its outbox.
const NOTIFIER_EXPECTED: [&str; 6] = [
    "not a protobuf envelope",
    "subject says",
    "larger than the limit",
    "not a DNS label",
    "not a notification:",
    "not a notification subject",
];

fn source() -> Source {
    Source {
        agent: "garbage".into(),
        cluster: CLUSTER.into(),
        instance: "test".into(),
    }
}

/// The notifier, with a secrets file of no channel (no notification is routed anywhere here).
async fn start_notifier(baton: &mut Baton) -> Result<()> {
    let dir = baton.bus.sandbox.dir().join("notifier");
    std::fs::create_dir_all(&dir)?;
    let secrets = dir.join("webhooks.yaml");
    std::fs::write(&secrets, "{}\n")?;
    let secrets = secrets.display().to_string();
    let notifier = AgentProcess::start(
        &baton.bus,
        "notifier",
        &[("BATON_NOTIFIER_SECRETS", secrets.as_str())],
        baton.bus.sandbox.dir(),
    )
    .await?;
    baton.agents.push(notifier);
    Ok(())
}

async fn garbage_on_every_agent_subject_is_dead_lettered_and_releases_go_on() -> Result<()> {
    let mut baton = Baton::start("garbage").await?;
    start_notifier(&mut baton).await?;
    let types: std::collections::BTreeSet<EventType> = Definitions::embedded()?
        .concrete_consumers(&[CLUSTER.to_owned()])
        .iter()
        .filter_map(|c| c.event_type)
        .collect();
    let mut published = 0;
    for t in &types {
        // Only a type's owner may publish on its subject; garbage comes from inside.
        let js = jetstream::new(baton.bus.sandbox.nats_client(t.owner().as_str()).await?);
        let rid = ReleaseId::generate();
        let good_subject = format!("baton.v1.events.test.web.{rid}.{t}");
        let wrong = Event::new(
            rid,
            EventKey::Named("wrong"),
            other_type_payload(*t),
            source(),
            "t",
            "",
        );
        let bad_name_subject = format!("baton.v1.events.Not_A_Label.web.{rid}.{t}");
        let cases: Vec<(String, Vec<u8>)> = vec![
            (good_subject.clone(), b"\x00\xff garbage".to_vec()),
            (good_subject.clone(), wrong.encode()),
            (good_subject.clone(), vec![0x0a; 200 * 1024]),
            (bad_name_subject, wrong.encode()),
        ];
        for (subject, payload) in cases {
            js.publish(subject.clone(), payload.into())
                .await?
                .await
                .with_context(|| format!("publishing garbage on {subject}"))?;
            published += 1;
        }
    }

    // The notifier's outbox takes only notifications: the rest is dead-lettered too.
    let outbox = jetstream::new(baton.bus.sandbox.nats_client("notifier").await?);
    let rid = ReleaseId::generate();
    for (subject, payload) in [
        (baton_core::subject::notification("team", rid), "not json"),
        (format!("baton.v1.notify.Not_A_Channel.{rid}"), "{}"),
    ] {
        outbox
            .publish(
                subject.clone(),
                bytes::Bytes::from_static(payload.as_bytes()),
            )
            .await?
            .await
            .with_context(|| format!("publishing garbage on {subject}"))?;
    }

    // Releases are not harmed: a good one still goes through.
    let (image, _) = baton.push("v2", &[]).await?;
    let (code, _, out) = baton.release(&image, true).await?;
    ensure!(code == 0, "a release after the garbage failed:\n{out}");

    // Every agent dead-lettered what reached it, each with a reason.
    let js = jetstream::new(baton.bus.sandbox.nats_client("admin").await?);
    let stream = js.get_stream("BATON_DLQ").await?;
    for agent in Role::AGENTS.map(|r| r.as_str()) {
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("baton.v1.dlq.{agent}"),
                ..Default::default()
            })
            .await?;
        let pending = consumer.cached_info().num_pending as usize;
        let expected: &[&str] = if agent == "notifier" {
            &NOTIFIER_EXPECTED
        } else {
            &EXPECTED
        };
        ensure!(
            pending >= expected.len(),
            "{agent} dead-lettered {pending} messages"
        );
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        let mut messages = consumer.messages().await?;
        for _ in 0..pending {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await?
                .context("ended")??;
            let reason = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Baton-Dlq-Reason"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let kind = expected.iter().find(|e| reason.contains(*e)).copied();
            ensure!(
                kind.is_some(),
                "{agent}: dead letter with an unexpected reason {reason:?}"
            );
            *reasons.entry(kind.unwrap_or_default()).or_default() += 1;
        }
        ensure!(
            reasons.len() == expected.len(),
            "{agent} dead-lettered only {reasons:?}"
        );
    }
    // The metrics agent and the notifier see every event, so each dead-lettered every piece of
    // garbage on the event stream.
    for agent in ["metrics", "notifier"] {
        let process = baton
            .agents
            .iter()
            .find(|a| a.name == agent)
            .with_context(|| format!("no {agent} agent"))?;
        let series = format!(
            "baton_events_handled_total{{consumer=\"{agent}-all\",outcome=\"dead_letter\"}}"
        );
        let dead = process.metric(&series).await?;
        ensure!(
            dead as usize == published,
            "the {agent} agent dead-lettered {dead} of {published}"
        );
    }
    Ok(())
}
