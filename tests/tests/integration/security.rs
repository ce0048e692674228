//! A bus that trusts no one: each refusal of the users' permissions (bus-config, `baton bus
//! auth`) shown with a real client against a real nats-server — another agent's consumer,
//! another user's inbox, the configuration written by an agent, build logs written by anyone
//! but the builder — each beside the same action done by its owner, which succeeds.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use async_nats::jetstream;
use baton_core::bus::{CONFIG_BUCKET, EVENTS_STREAM, LOGS_BUCKET};
use baton_tests::harness::trial;
use baton_tests::{target_bin, BusEnv, CLUSTER};
use bytes::Bytes;
use futures::StreamExt;
use libtest_mimic::Trial;
use tokio::sync::mpsc;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        an_agent_cannot_pull_inspect_or_ack_another_agents_consumer,
        a_user_cannot_read_another_users_inbox,
        only_the_config_role_writes_the_configuration,
        only_the_builder_writes_build_logs,
        the_generated_users_file_of_bus_config_is_current,
        a_forged_request_runs_nothing_changes_nothing_and_says_why,
        only_the_notifier_fills_and_drains_its_outbox_and_it_publishes_no_event,
    ]
}

/// A client as `user`, with its own inbox prefix, and the server's errors (permission
/// violations arrive asynchronously) on a channel.
async fn client(
    env: &BusEnv,
    user: &str,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let seed = env.sandbox.nats().seed(user)?.to_string();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .custom_inbox_prefix(baton_core::busauth::inbox_prefix(user))
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(env.sandbox.nats().url())
        .await?;
    Ok((client, rx))
}

/// Waits for the server to report a permission violation naming `subject`.
async fn violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e))
                if e.to_lowercase().contains("permissions violation") && e.contains(subject) =>
            {
                return Ok(())
            }
            Ok(Some(_)) => continue,
            _ => bail!("no permission violation for {subject} was reported"),
        }
    }
}

async fn an_agent_cannot_pull_inspect_or_ack_another_agents_consumer() -> Result<()> {
    let env = BusEnv::start().await?;
    let theirs = format!("deployer-{CLUSTER}-release-requested");
    // The owner may look at and pull from its own durable.
    let (deployer, _) = client(&env, "deployer").await?;
    let own = deployer
        .request(
            format!("$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{theirs}"),
            Bytes::new(),
        )
        .await
        .context("the deployer reading its own consumer")?;
    ensure!(
        String::from_utf8_lossy(&own.payload).contains(&theirs),
        "{}",
        String::from_utf8_lossy(&own.payload)
    );

    let (builder, mut errors) = client(&env, "builder").await?;
    for subject in [
        format!("$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{theirs}"),
        format!("$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{theirs}"),
        format!("$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{theirs}.baton.v1.events.>"),
    ] {
        let answer = builder
            .request(subject.clone(), Bytes::from_static(b"{}"))
            .await;
        ensure!(answer.is_err(), "the builder got an answer on {subject}");
        violation(&mut errors, &subject).await?;
    }
    // Acking (or terminating) a message of the deployer's consumer.
    let ack = format!("$JS.ACK.{EVENTS_STREAM}.{theirs}.1.1.1.0.0");
    builder
        .publish(ack.clone(), Bytes::from_static(b"+TERM"))
        .await?;
    builder.flush().await?;
    violation(&mut errors, &ack).await?;

    // The CLI's user can't either: a person's credentials don't let anyone take the agents'
    // work off their queue.
    let (cli, mut errors) = client(&env, "cli").await?;
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{theirs}");
    ensure!(cli.request(next.clone(), Bytes::new()).await.is_err());
    violation(&mut errors, &next).await?;
    Ok(())
}

async fn a_user_cannot_read_another_users_inbox() -> Result<()> {
    let env = BusEnv::start().await?;
    let (builder, mut errors) = client(&env, "builder").await?;
    // The shared default inbox and the deployer's are both refused.
    let mut default_inbox = builder.subscribe("_INBOX.>").await?;
    violation(&mut errors, "_INBOX.>").await?;
    let mut theirs = builder.subscribe("_INBOX_deployer.>").await?;
    violation(&mut errors, "_INBOX_deployer.>").await?;

    // The deployer's requests are answered in its inbox, and only it sees the answers.
    let (deployer, _) = client(&env, "deployer").await?;
    let answer = deployer.request("$JS.API.INFO", Bytes::new()).await?;
    ensure!(!answer.payload.is_empty(), "no JetStream account info");
    let leaked = tokio::time::timeout(Duration::from_millis(500), async {
        tokio::select! {
            m = theirs.next() => m,
            m = default_inbox.next() => m,
        }
    })
    .await;
    ensure!(
        !matches!(leaked, Ok(Some(_))),
        "the builder read a reply meant for the deployer"
    );
    // Its own inbox works.
    builder.request("$JS.API.INFO", Bytes::new()).await?;
    Ok(())
}

async fn only_the_config_role_writes_the_configuration() -> Result<()> {
    let env = BusEnv::start().await?;
    for agent in ["deployer", "builder", "rollback", "cli"] {
        let (c, mut errors) = client(&env, agent).await?;
        let js = jetstream::new(c);
        let put = js
            .publish(
                format!("$KV.{CONFIG_BUCKET}.config"),
                Bytes::from_static(b"{\"yaml\":\"apps: {}\"}"),
            )
            .await;
        if let Ok(ack) = put {
            ensure!(ack.await.is_err(), "{agent} stored a configuration");
        }
        violation(&mut errors, &format!("$KV.{CONFIG_BUCKET}.config")).await?;
    }
    // Nothing was stored.
    let admin = jetstream::new(env.sandbox.nats_client("admin").await?);
    let bucket = admin.get_key_value(CONFIG_BUCKET).await?;
    ensure!(
        bucket.entry("config").await?.is_none(),
        "the configuration bucket holds something"
    );

    // With the real CLI: `baton config apply` connects as the config role; with the release
    // role's key instead, the bus refuses it and nothing is stored.
    let file = env.sandbox.dir().join("baton.yaml");
    std::fs::write(
        &file,
        "environments:\n  staging: {cluster: sandbox, namespace: shop}\napps:\n  web: {}\n",
    )?;
    let creds = env.sandbox.nats().credentials_dir().to_path_buf();
    let run = |args: Vec<String>| {
        let url = env.sandbox.nats().url().to_owned();
        async move {
            let out = tokio::process::Command::new(target_bin("baton")?)
                .args(&args)
                .env("NATS_URL", url)
                .env_remove("BATON_CREDENTIALS")
                .output()
                .await?;
            Ok::<_, anyhow::Error>((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        }
    };
    let as_cli = creds.join("cli.nk").display().to_string();
    let (ok, out) = run(vec![
        "--nats-nkey".into(),
        as_cli,
        "config".into(),
        "apply".into(),
        file.display().to_string(),
    ])
    .await?;
    ensure!(!ok, "the release role applied a configuration: {out}");
    ensure!(
        bucket.entry("config").await?.is_none(),
        "the release role's apply stored something"
    );
    let (ok, out) = run(vec![
        "--credentials".into(),
        creds.display().to_string(),
        "config".into(),
        "apply".into(),
        file.display().to_string(),
    ])
    .await?;
    ensure!(ok, "the config role could not apply: {out}");
    ensure!(bucket.entry("config").await?.is_some(), "nothing stored");
    Ok(())
}

async fn only_the_builder_writes_build_logs() -> Result<()> {
    let env = BusEnv::start().await?;
    for user in [
        "deployer",
        "health-checker",
        "rollback",
        "metrics",
        "cli",
        "config",
    ] {
        let (c, mut errors) = client(&env, user).await?;
        let js = jetstream::new(c);
        // Straight to the object store's subjects: a chunk, as a put would begin.
        let chunk = format!("$O.{LOGS_BUCKET}.C.forged{}", user.replace('-', ""));
        if let Ok(ack) = js
            .publish(chunk.clone(), Bytes::from_static(b"forged"))
            .await
        {
            ensure!(ack.await.is_err(), "{user} wrote a build log chunk");
        }
        violation(&mut errors, &chunk).await?;
    }
    // The builder can, through the object store API.
    let (builder, _) = client(&env, "builder").await?;
    let store = jetstream::new(builder)
        .get_object_store(LOGS_BUCKET)
        .await?;
    store
        .put("release-test.log", &mut &b"built\n"[..])
        .await
        .context("the builder storing a build log")?;
    // Nothing else landed in the bucket's stream: the builder's object is its only chunk.
    let admin = jetstream::new(env.sandbox.nats_client("admin").await?);
    let info = admin
        .get_stream(format!("OBJ_{LOGS_BUCKET}"))
        .await?
        .info()
        .await?
        .state
        .clone();
    ensure!(
        info.messages == 2,
        "the log bucket holds {} messages, not the builder's chunk and its metadata",
        info.messages
    );
    Ok(())
}

/// `bus-config/auth.conf` (what compose's nats-server reads) is what `baton bus auth` makes of
/// the definitions beside it, for the cluster `default`.
async fn the_generated_users_file_of_bus_config_is_current() -> Result<()> {
    let root = baton_tests::repo_root();
    let out = tokio::process::Command::new(target_bin("baton")?)
        .args(["bus", "auth", "--clusters", "default", "--dir"])
        .arg(root.join("bus-config"))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read_to_string(root.join("bus-config/auth.conf"))?;
    ensure!(
        committed == String::from_utf8_lossy(&out.stdout),
        "bus-config/auth.conf is stale: run `baton bus auth --clusters default --out bus-config/auth.conf`"
    );
    Ok(())
}

/// The CLI's user publishes a `release.requested` by hand whose spec names the current
/// configuration revision but carries a build command and a namespace of its own: the builder
/// runs nothing, nothing in the cluster changes, and the release ends failed saying why.
async fn a_forged_request_runs_nothing_changes_nothing_and_says_why() -> Result<()> {
    use baton_core::config::{store, Overrides};
    use baton_core::event::EventType;
    use baton_proto::v1::{envelope::Payload, BuildParams};
    use k8s_openapi::api::apps::v1::Deployment;

    let baton = baton_tests::release::Baton::start("forged").await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let before = baton.deployment().await?;
    let cli = baton.bus.bus("cli").await?;
    let (revision, config, _) = store::current(&cli).await?.context("no configuration")?;
    let honest = config
        .resolve(
            "web",
            "test",
            &Overrides {
                image: image.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(honest.config_revision == revision);
    let marker =
        std::env::temp_dir().join(format!("baton-forged-{}", uuid::Uuid::new_v4().simple()));
    let forged = baton_proto::v1::ReleaseSpec {
        build: Some(BuildParams {
            argv: vec!["/usr/bin/touch".into(), marker.display().to_string()],
            timeout_seconds: 60,
        }),
        namespace: "kube-system".into(),
        ..honest
    };
    // The spec is valid on its own: only the configuration can tell it was forged.
    baton_core::validate::release_spec(&forged).map_err(|e| anyhow::anyhow!(e))?;
    let rid = baton_tests::publish_request(&cli, forged, "mallory").await?;

    let events = baton.wait_for_end(rid, Duration::from_secs(120)).await?;
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        types.last() == Some(&EventType::ReleaseFailed),
        "the release ended with {types:?}"
    );
    for never in [
        EventType::BuildStarted,
        EventType::BuildSucceeded,
        EventType::DeployStarted,
        EventType::DeployStepStarted,
    ] {
        ensure!(!types.contains(&never), "{never} in {types:?}");
    }
    let reason = match events.last().and_then(|e| e.payload().cloned()) {
        Some(Payload::ReleaseFailed(f)) => f.reason,
        other => anyhow::bail!("no release.failed: {other:?}"),
    };
    ensure!(
        reason.contains(&format!("configuration revision {revision}"))
            && reason.contains("build")
            && reason.contains("namespace"),
        "the reason does not say what was forged: {reason}"
    );
    ensure!(!marker.exists(), "the forged build command ran");
    // Nothing in the cluster changed.
    let after: Deployment = baton.deployment().await?;
    ensure!(
        after.metadata.generation == before.metadata.generation
            && after.spec.template == before.spec.template,
        "the Deployment changed"
    );
    // The refusals are dead letters with the reason, for whoever looks.
    let admin = jetstream::new(baton.bus.sandbox.nats_client("admin").await?);
    let dlq = admin
        .get_stream("BATON_DLQ")
        .await?
        .info()
        .await?
        .state
        .messages;
    ensure!(dlq >= 2, "{dlq} dead letters");
    Ok(())
}

/// A forged notification would reach a team's Slack: only the notifier writes the outbox and takes
/// from it, and the notifier itself cannot publish an event.
async fn only_the_notifier_fills_and_drains_its_outbox_and_it_publishes_no_event() -> Result<()> {
    let env = BusEnv::start().await?;
    let rid = baton_core::names::ReleaseId::generate();
    let outbox = baton_core::subject::notification("team", rid);
    // The notifier stores a notification, and the stream acknowledges it.
    let (notifier, mut notifier_errors) = client(&env, "notifier").await?;
    let ack = jetstream::new(notifier.clone())
        .publish(outbox.clone(), Bytes::from_static(b"{}"))
        .await?
        .await?;
    ensure!(ack.stream == "BATON_NOTIFY", "stored in {}", ack.stream);
    for user in ["cli", "deployer", "metrics"] {
        let (c, mut errors) = client(&env, user).await?;
        c.publish(outbox.clone(), Bytes::from_static(b"{}")).await?;
        c.flush().await?;
        violation(&mut errors, &outbox).await?;
        let next = "$JS.API.CONSUMER.MSG.NEXT.BATON_NOTIFY.notifier-deliveries";
        ensure!(
            c.request(next, Bytes::new()).await.is_err(),
            "{user} took from the outbox"
        );
        violation(&mut errors, next).await?;
    }
    let event = format!("baton.v1.events.test.web.{rid}.release.requested");
    notifier
        .publish(event.clone(), Bytes::from_static(b"x"))
        .await?;
    notifier.flush().await?;
    violation(&mut notifier_errors, &event).await?;
    Ok(())
}
