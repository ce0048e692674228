//! The agents as real processes: they consume their events, dead-letter bad input with a reason
//! while they keep consuming, and stop cleanly on SIGTERM.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::ReleaseId;
use baton_proto::v1::{envelope::Payload, *};
use baton_tests::harness::trial;
use baton_tests::{sample_spec, AgentProcess, BusEnv};
use libtest_mimic::Trial;
use prost::Message;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        bad_messages_land_in_the_dead_letter_subject_with_a_reason_while_the_agent_keeps_consuming,
        every_agent_consumes_its_events_and_stops_cleanly_on_sigterm,
        an_agent_refuses_a_bad_bound_or_grace_at_start_naming_the_flag,
    ]
}

fn source() -> Source {
    Source {
        agent: "cli".into(),
        cluster: "test".into(),
        instance: "test".into(),
    }
}

async fn bad_messages_land_in_the_dead_letter_subject_with_a_reason_while_the_agent_keeps_consuming(
) -> Result<()> {
    let env = BusEnv::start().await?;
    let builder = AgentProcess::start(&env, "builder", &[], env.sandbox.dir()).await?;
    let js = jetstream::new(env.sandbox.nats_client("cli").await?);
    let rid = ReleaseId::generate();
    let subject = format!("baton.v1.events.staging.web.{rid}.release.requested");
    let publish = |payload: Vec<u8>| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            js.publish(subject, payload.into())
                .await?
                .await
                .map_err(anyhow::Error::from)
        }
    };

    // 1. bytes that are no protobuf at all
    publish(b"\xff\xff\xff\xff not an event".to_vec()).await?;
    // 2. an envelope whose payload is a type this version does not know (oneof field 99)
    let mut unknown = Envelope {
        id: uuid::Uuid::new_v4().to_string(),
        release_id: rid.to_string(),
        time: Some(baton_proto::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        source: Some(source()),
        ..Default::default()
    }
    .encode_to_vec();
    unknown.extend_from_slice(&[0x9a, 0x06, 0x00]);
    publish(unknown).await?;
    // 3. a valid event of another type on this type's subject
    let wrong = Event::new(
        rid,
        EventKey::Once,
        Payload::BuildStarted(BuildStarted::default()),
        source(),
        "t",
        "",
    );
    publish(wrong.encode()).await?;
    // 4. a spec whose app is not a DNS label
    let bad_name = Event::new(
        rid,
        EventKey::Named("bad-name"),
        Payload::ReleaseRequested(ReleaseRequested {
            spec: Some(sample_spec("staging", "Web_App", "web:v1")),
        }),
        source(),
        "t",
        "",
    );
    publish(bad_name.encode()).await?;
    // 5. a huge payload (the stream takes it; the agent's limit refuses it)
    publish(vec![0x0a; 200 * 1024]).await?;
    // 6. at last, a good one
    let good = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested {
            spec: Some(
                env.configured(sample_spec("staging", "web", "web:v1"))
                    .await?,
            ),
        }),
        source(),
        "t",
        "",
    );
    publish(good.encode()).await?;

    let letters = baton_tests::dead_letters(&js, "builder", 5).await?;
    let expected = [
        "not a protobuf envelope",
        "unknown event type",
        "subject says release.requested but payload is build.started",
        "is not a DNS label",
        "larger than the limit",
    ];
    for (letter, why) in letters.iter().zip(expected) {
        ensure!(
            letter.reason.contains(why),
            "dead letter reason {:?} does not say {why:?}",
            letter.reason
        );
        ensure!(
            letter.original_subject == subject,
            "dead letter names {:?}",
            letter.original_subject
        );
        ensure!(
            letter.payload_len > 0,
            "dead letter lost the original message"
        );
    }
    ensure!(
        letters[4].payload_len == 200 * 1024,
        "the huge original was not kept whole"
    );

    // The agent went on: the good event after the bad ones was handled and acknowledged.
    builder
        .wait_metric(
            "baton_events_handled_total{consumer=\"builder-release-requested\",outcome=\"ack\"}",
            1.0,
            Duration::from_secs(30),
        )
        .await?;
    let dead = builder
        .metric("baton_events_handled_total{consumer=\"builder-release-requested\",outcome=\"dead_letter\"}")
        .await?;
    ensure!(dead == 5.0, "the agent counts {dead} dead letters");

    // A payload over NATS' own limit is refused at publish, never stored.
    let huge = publish(vec![0u8; 2 * 1024 * 1024]).await;
    ensure!(huge.is_err(), "a 2 MiB message was accepted");
    Ok(())
}

/// One event each agent reacts to.
fn trigger(agent: &str, rid: ReleaseId) -> (EventType, Payload) {
    match agent {
        "builder" => (
            EventType::ReleaseRequested,
            Payload::ReleaseRequested(ReleaseRequested {
                spec: Some(sample_spec("staging", "web", "web:v1")),
            }),
        ),
        "deployer" => (
            EventType::BuildSucceeded,
            Payload::BuildSucceeded(BuildSucceeded {
                image_ref: format!("web@sha256:{}", "a".repeat(64)),
                digest: format!("sha256:{}", "a".repeat(64)),
                log_object: String::new(),
            }),
        ),
        "health-checker" => (
            EventType::DeployStepReady,
            Payload::DeployStepReady(DeployStepReady {
                step: 0,
                weight: 100,
                pods: vec![],
            }),
        ),
        "rollback" => (
            EventType::RollbackRequested,
            Payload::RollbackRequested(RollbackRequested {
                app: "web".into(),
                env: "staging".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
        ),
        _ => {
            let _ = rid;
            (
                EventType::ReleaseRequested,
                Payload::ReleaseRequested(ReleaseRequested {
                    spec: Some(sample_spec("staging", "web", "web:v1")),
                }),
            )
        }
    }
}

async fn every_agent_consumes_its_events_and_stops_cleanly_on_sigterm() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut agents = Vec::new();
    // The cluster-bound agents need a cluster to be ready; the builder gives up on the
    // unreachable registry of the test's image at once.
    let cluster = baton_tests::cluster::shared()?;
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let extra = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("BATON_REGISTRY_RETRY_SECONDS", "0"),
    ];
    for name in [
        "builder",
        "deployer",
        "health-checker",
        "rollback",
        "metrics",
    ] {
        agents.push(AgentProcess::start(&env, name, &extra, env.sandbox.dir()).await?);
    }
    // Agents may only publish their own events, so the test publishes as the owner of each type.
    for agent in &agents {
        let rid = ReleaseId::generate();
        let (t, payload) = trigger(&agent.name, rid);
        // A request the builder acts on names a stored configuration revision.
        let payload = match payload {
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }) => {
                Payload::ReleaseRequested(ReleaseRequested {
                    spec: Some(env.configured(spec).await?),
                })
            }
            other => other,
        };
        let owner = env.bus(t.owner().as_str()).await?;
        let event = Event::new(rid, EventKey::Once, payload, owner.source(), "t", "");
        let subject =
            baton_core::subject::EventSubject::new("staging".parse()?, "web".parse()?, rid, t);
        owner.publish(&subject, &event).await?;
        let suffix = t.as_str().replace('.', "-");
        let consumer = match agent.name.as_str() {
            "metrics" => "metrics-all".to_string(),
            "builder" => format!("builder-{suffix}"),
            // Cluster-bound agents have consumers of their own per cluster.
            name => format!("{name}-{}-{suffix}", baton_tests::CLUSTER),
        };
        agent
            .wait_metric(
                &format!("baton_events_handled_total{{consumer=\"{consumer}\",outcome=\"ack\"}}"),
                1.0,
                Duration::from_secs(30),
            )
            .await?;
    }
    for mut agent in agents {
        agent.process.signal(nix::sys::signal::Signal::SIGTERM)?;
        let status = agent
            .process
            .wait_exit(Duration::from_secs(30))
            .await
            .with_context(|| format!("{} did not stop after SIGTERM", agent.name))?;
        ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM:\n{}",
            agent.name,
            agent.process.log_tail(20)
        );
        let log = std::fs::read_to_string(agent.process.log_path())?;
        ensure!(
            log.contains("stopped"),
            "{} did not log its shutdown",
            agent.name
        );
    }
    Ok(())
}

async fn an_agent_refuses_a_bad_bound_or_grace_at_start_naming_the_flag() -> Result<()> {
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "deployer",
            &["--max-in-flight", "0"],
            "not a number from 1 to 100000",
        ),
        (
            "builder",
            &["--max-in-flight", "many"],
            "not a number from 1 to 100000",
        ),
        (
            "rollback",
            &["--shutdown-grace", "1h"],
            "not between 1s and 10m",
        ),
        (
            "metrics",
            &["--shutdown-grace", "soon"],
            "is not a duration",
        ),
        (
            "health-checker",
            &["--shutdown-grace", "0s"],
            "not between 1s and 10m",
        ),
        (
            "deployer",
            &["--fault-write-delay", "4 seconds"],
            "is not a duration",
        ),
    ];
    for (agent, args, says) in cases {
        let out = tokio::process::Command::new(baton_tests::target_bin(&format!("baton-{agent}"))?)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "baton-{agent} {args:?} exited {:?}: {err}",
            out.status.code()
        );
        ensure!(
            err.contains(args[0]) && err.contains(says),
            "baton-{agent} {args:?} said: {err}"
        );
    }
    Ok(())
}
