//! The bus: exactly-once publishing, permissions, the bus definitions, surviving a broker crash.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use baton_core::bus::EVENTS_STREAM;
use baton_core::error::Error;
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, BuildStarted, DeployStarted, ReleaseRequested};
use baton_tests::harness::trial;
use baton_tests::{sample_spec, target_bin, AgentProcess, BusEnv};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        publishing_the_same_event_twice_stores_it_once,
        builder_cannot_publish_a_deploy_event_and_the_cli_cannot_publish_agent_events,
        bus_apply_twice_changes_nothing_the_second_time,
        bus_apply_with_bad_credentials_fails_with_a_clear_message,
        stream_events_and_consumers_survive_kill_9_of_nats_and_a_connected_agent_resumes,
    ]
}

fn subject(rid: ReleaseId, t: EventType) -> EventSubject {
    EventSubject::new(
        EnvName::new("staging").unwrap(),
        AppName::new("web").unwrap(),
        rid,
        t,
    )
}

fn requested(bus: &baton_core::bus::Bus, rid: ReleaseId) -> Event {
    requested_with(
        bus,
        rid,
        sample_spec("staging", "web", "127.0.0.1:5000/web:v1"),
    )
}

/// A request an agent acts on: its spec backed by a stored configuration revision.
async fn configured_request(
    env: &BusEnv,
    bus: &baton_core::bus::Bus,
    rid: ReleaseId,
) -> Result<Event> {
    let spec = env
        .configured(sample_spec("staging", "web", "127.0.0.1:5000/web:v1"))
        .await?;
    Ok(requested_with(bus, rid, spec))
}

fn requested_with(
    bus: &baton_core::bus::Bus,
    rid: ReleaseId,
    spec: baton_proto::v1::ReleaseSpec,
) -> Event {
    Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        bus.source(),
        "tester",
        "",
    )
}

async fn publishing_the_same_event_twice_stores_it_once() -> Result<()> {
    let env = BusEnv::start().await?;
    let cli = env.bus("cli").await?;
    let rid = ReleaseId::generate();
    let event = requested(&cli, rid);
    let s = subject(rid, EventType::ReleaseRequested);
    let (first_seq, first_dup) = cli.publish(&s, &event).await?;
    let (second_seq, second_dup) = cli.publish(&s, &event).await?;
    ensure!(!first_dup, "the first publish was taken for a duplicate");
    ensure!(
        second_dup,
        "the second publish of the same event was not recognised as a duplicate"
    );
    ensure!(
        first_seq == second_seq,
        "the duplicate got a sequence of its own: {first_seq} vs {second_seq}"
    );

    // Rebuilt from scratch, as a restarted agent would: the id is derived, so it is the same.
    let again = requested(&cli, rid);
    ensure!(again.id() == event.id());
    let (_, dup) = cli.publish(&s, &again).await?;
    ensure!(dup, "a retry of the same logical event was stored again");

    let history = cli.release_history(rid).await?;
    ensure!(
        history.len() == 1,
        "the stream holds {} copies of the event",
        history.len()
    );
    ensure!(history[0].id() == event.id());
    Ok(())
}

async fn builder_cannot_publish_a_deploy_event_and_the_cli_cannot_publish_agent_events(
) -> Result<()> {
    let env = BusEnv::start().await?;
    let rid = ReleaseId::generate();
    let builder = env.bus("builder").await?;
    let cli = env.bus("cli").await?;

    let deploy = Event::new(
        rid,
        EventKey::Once,
        Payload::DeployStarted(DeployStarted::default()),
        builder.source(),
        "t",
        "",
    );
    match builder
        .publish(&subject(rid, EventType::DeployStarted), &deploy)
        .await
    {
        Err(Error::PermissionDenied { subject }) => ensure!(subject.ends_with(".deploy.started")),
        other => bail!("the builder published a deploy event: {other:?}"),
    }
    // Its own events go through.
    let build = Event::new(
        rid,
        EventKey::Once,
        Payload::BuildStarted(BuildStarted {
            image: "web:v1".into(),
            backend: "resolve".into(),
        }),
        builder.source(),
        "t",
        "",
    );
    builder
        .publish(&subject(rid, EventType::BuildStarted), &build)
        .await
        .context("builder publishing its own event")?;

    // The CLI may publish requests, not what agents own.
    for t in [
        EventType::BuildStarted,
        EventType::DeployStarted,
        EventType::ReleaseSucceeded,
        EventType::ReleaseRolledBack,
    ] {
        let payload = match t {
            EventType::BuildStarted => Payload::BuildStarted(BuildStarted::default()),
            EventType::DeployStarted => Payload::DeployStarted(DeployStarted::default()),
            EventType::ReleaseSucceeded => Payload::ReleaseSucceeded(Default::default()),
            _ => Payload::ReleaseRolledBack(Default::default()),
        };
        let e = Event::new(rid, EventKey::Named("cli"), payload, cli.source(), "t", "");
        match cli.publish(&subject(rid, t), &e).await {
            Err(Error::PermissionDenied { .. }) => {}
            other => bail!("the CLI published {t}: {other:?}"),
        }
    }
    cli.publish(
        &subject(rid, EventType::ReleaseRequested),
        &requested(&cli, rid),
    )
    .await?;

    let types: Vec<EventType> = cli
        .release_history(rid)
        .await?
        .iter()
        .map(|e| e.event_type)
        .collect();
    ensure!(
        types == [EventType::BuildStarted, EventType::ReleaseRequested],
        "stream holds {types:?}"
    );
    Ok(())
}

async fn run_baton(env: &[(String, String)], args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(target_bin("baton")?)
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

async fn bus_apply_twice_changes_nothing_the_second_time() -> Result<()> {
    // A bare server: nothing applied yet.
    let sandbox = baton_sandbox::Sandbox::start(baton_sandbox::SandboxOptions::nats_only()).await?;
    let env = vec![
        ("NATS_URL".to_string(), sandbox.nats().url().to_string()),
        (
            "BATON_CREDENTIALS".to_string(),
            sandbox.nats().credentials_dir().display().to_string(),
        ),
    ];
    let (ok, first, err) = run_baton(&env, &["bus", "apply"]).await?;
    ensure!(ok, "first apply failed: {err}");
    for expected in [
        "created   stream BATON_EVENTS",
        "created   stream BATON_DLQ",
        "created   consumer BATON_EVENTS/builder-release-requested",
        "created   consumer BATON_EVENTS/metrics-all",
        "created   kv bucket BATON_LOCKS",
        "created   kv bucket BATON_CONFIG",
        "created   object store BATON_LOGS",
    ] {
        ensure!(
            first.contains(expected),
            "first apply did not say {expected:?}:\n{first}"
        );
    }
    let (ok, second, err) = run_baton(&env, &["bus", "apply"]).await?;
    ensure!(ok, "second apply failed: {err}");
    ensure!(
        !second.contains("created") && !second.contains("updated"),
        "second apply changed something:\n{second}"
    );
    ensure!(second.contains("nothing changed"), "{second}");

    // The folder in the repository is the same definition as the built-in one.
    let dir = baton_sandbox::default_bus_config_dir();
    let (ok, third, err) =
        run_baton(&env, &["bus", "apply", "--dir", &dir.display().to_string()]).await?;
    ensure!(
        ok && third.contains("nothing changed"),
        "apply from {}: {third}{err}",
        dir.display()
    );

    // The stream is the audit log: deletes and purges are refused by the server itself.
    let admin = sandbox.nats_client("admin").await?;
    let js = async_nats::jetstream::new(admin);
    let info = js
        .get_stream(EVENTS_STREAM)
        .await?
        .info()
        .await?
        .config
        .clone();
    ensure!(
        info.deny_delete && info.deny_purge,
        "BATON_EVENTS allows delete or purge"
    );
    sandbox.shutdown().await;
    Ok(())
}

async fn bus_apply_with_bad_credentials_fails_with_a_clear_message() -> Result<()> {
    let sandbox = baton_sandbox::Sandbox::start(baton_sandbox::SandboxOptions::nats_only()).await?;
    let url = sandbox.nats().url().to_string();
    let empty = tempfile_dir()?;
    let env = vec![
        ("NATS_URL".to_string(), url.clone()),
        ("BATON_CREDENTIALS".to_string(), empty.clone()),
    ];
    let (ok, _, err) = run_baton(&env, &["bus", "apply"]).await?;
    ensure!(!ok, "apply without credentials succeeded");
    ensure!(
        err.contains("admin.nk"),
        "the error does not name the missing credentials: {err}"
    );

    // The CLI's own user may not change the bus.
    let env = vec![
        ("NATS_URL".to_string(), url),
        (
            "BATON_CREDENTIALS".to_string(),
            sandbox.nats().credentials_dir().display().to_string(),
        ),
    ];
    let (ok, _, err) = run_baton(&env, &["bus", "apply", "--as", "cli"]).await?;
    ensure!(!ok, "the cli user could create streams");
    ensure!(
        err.contains("stream BATON_DLQ") || err.contains("stream BATON_EVENTS"),
        "{err}"
    );
    std::fs::remove_dir_all(&empty).ok();
    sandbox.shutdown().await;
    Ok(())
}

fn tempfile_dir() -> Result<String> {
    let dir = std::env::temp_dir().join(format!("baton-empty-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.display().to_string())
}

async fn stream_events_and_consumers_survive_kill_9_of_nats_and_a_connected_agent_resumes(
) -> Result<()> {
    let env = BusEnv::start().await?;
    let extra = [("BATON_REGISTRY_RETRY_SECONDS", "0")];
    let mut builder = AgentProcess::start(&env, "builder", &extra, env.sandbox.dir()).await?;
    let pid = builder.process.pid();
    let cli = env.bus("cli").await?;
    let before = ReleaseId::generate();
    let (seq_before, _) = cli
        .publish(
            &subject(before, EventType::ReleaseRequested),
            &configured_request(&env, &cli, before).await?,
        )
        .await?;
    builder
        .wait_metric(
            "baton_events_handled_total{consumer=\"builder-release-requested\",outcome=\"ack\"}",
            1.0,
            Duration::from_secs(30),
        )
        .await?;

    env.sandbox.nats().kill9().await?;
    env.sandbox.nats().start_again().await?;

    // Everything is still there.
    let admin = async_nats::jetstream::new(env.sandbox.nats_client("admin").await?);
    let mut stream = admin
        .get_stream(EVENTS_STREAM)
        .await
        .context("BATON_EVENTS after the crash")?;
    let info = stream.info().await?;
    ensure!(
        info.state.messages >= 1 && info.state.last_sequence >= seq_before,
        "events lost: {:?}",
        info.state
    );
    let defs = baton_core::busconfig::Definitions::embedded()?;
    for c in &defs.concrete_consumers(&[baton_tests::CLUSTER.to_owned()]) {
        stream
            .consumer_info(&c.durable)
            .await
            .with_context(|| format!("consumer {} after the crash", c.durable))?;
    }
    let history = cli.release_history(before).await?;
    ensure!(
        history.first().map(|e| e.event_type) == Some(EventType::ReleaseRequested),
        "the release's events are gone"
    );

    // The agent, never restarted, takes the next event.
    let after = ReleaseId::generate();
    let cli = env.bus("cli").await?;
    let (seq_after, _) = cli
        .publish(
            &subject(after, EventType::ReleaseRequested),
            &configured_request(&env, &cli, after).await?,
        )
        .await?;
    baton_tests::eventually(
        "the builder to ack the event published after the crash",
        Duration::from_secs(60),
        || {
            let stream = stream.clone();
            async move {
                let info = stream.consumer_info("builder-release-requested").await?;
                Ok((info.ack_floor.stream_sequence >= seq_after).then_some(()))
            }
        },
    )
    .await?;
    ensure!(
        builder.process.is_running() && builder.process.pid() == pid,
        "the agent was restarted"
    );
    Ok(())
}
