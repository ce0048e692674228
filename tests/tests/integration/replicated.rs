//! A replicated bus: three nats-servers in a JetStream cluster on loopback, every stream and
//! bucket with three replicas (bus-config/replicas.json), the agents connected with every
//! server's URL. A server killed at any moment loses nothing: a quorum has every acknowledged
//! event.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use baton_core::bus::{CONFIG_BUCKET, EVENTS_STREAM, LOCKS_BUCKET};
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, ReleaseAbortRequested};
use baton_tests::harness::trial;
use baton_tests::release::{config_yaml, fleet_config, repeated, Baton};
use baton_tests::{BusEnv, CLUSTER};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        every_stream_and_bucket_has_three_replicas_on_a_cluster,
        a_release_completes_when_the_event_streams_leader_is_killed_mid_release,
        a_killed_follower_catches_up_once_restarted,
        every_history_and_consumer_is_there_after_all_three_servers_are_killed,
        releases_end_and_every_cli_read_answers_with_the_streams_leader_down_for_good,
        releases_end_and_every_cli_read_answers_with_a_follower_down_for_good,
    ]
}

const END: Duration = Duration::from_secs(180);

async fn admin(env: &BusEnv) -> Result<jetstream::Context> {
    Ok(jetstream::new(
        env.sandbox.nats_cluster().connect("admin").await?,
    ))
}

async fn roles(js: &jetstream::Context, stream: &str) -> Result<(String, Vec<String>)> {
    baton_tests::stream_roles(js, stream).await
}

async fn every_stream_and_bucket_has_three_replicas_on_a_cluster() -> Result<()> {
    let env = BusEnv::start_servers(3).await?;
    let js = admin(&env).await?;
    for stream in [
        EVENTS_STREAM.to_owned(),
        "BATON_DLQ".to_owned(),
        format!("KV_{CONFIG_BUCKET}"),
        format!("KV_{LOCKS_BUCKET}"),
        "OBJ_BATON_LOGS".to_owned(),
    ] {
        let info = js.get_stream(&stream).await?.info().await?.clone();
        ensure!(
            info.config.num_replicas == 3,
            "{stream} has {} replicas",
            info.config.num_replicas
        );
        let peers = info.cluster.map(|c| c.replicas.len()).unwrap_or(0);
        ensure!(peers == 2, "{stream} has {peers} followers, not 2");
    }
    // A single server keeps one copy: the same definitions, applied where they are.
    let single = BusEnv::start().await?;
    let info = admin(&single)
        .await?
        .get_stream(EVENTS_STREAM)
        .await?
        .info()
        .await?
        .config
        .clone();
    ensure!(
        info.num_replicas == 1,
        "R{} on one server",
        info.num_replicas
    );
    Ok(())
}

/// The release's events once it has ended. Reads made while the stream elects a new leader
/// time out; they are tried again, as the agents' are.
async fn end_through_an_election(baton: &Baton, rid: ReleaseId) -> Result<Vec<Event>> {
    baton_tests::eventually(&format!("the end of release {rid}"), END, || async {
        Ok(match baton.events(rid).await {
            Ok(events) if events.last().is_some_and(|e| e.event_type.is_terminal()) => Some(events),
            _ => None,
        })
    })
    .await
}

/// `f`'s value once it succeeds, trying again while it fails (for up to [`END`]).
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + END;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("{what}: still failing after {END:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// No event id is in the stream twice (an event's id is derived from its release, type and step:
/// no step of the release was published twice).
fn ids_once(events: &[Event]) -> Result<()> {
    let mut ids = HashSet::new();
    for e in events {
        ensure!(
            ids.insert(e.envelope.id.clone()),
            "{} is in the stream twice",
            e.event_type
        );
    }
    Ok(())
}

/// Each event of a one-step release is in the stream once.
fn once_each(events: &[Event]) -> Result<()> {
    ids_once(events)?;
    let twice = repeated(events);
    ensure!(twice.is_empty(), "events repeated: {twice:?}");
    Ok(())
}

async fn a_release_completes_when_the_event_streams_leader_is_killed_mid_release() -> Result<()> {
    let bus = BusEnv::start_servers(3).await?;
    let baton = Baton::start_on(bus, "r3-leader", &["web"], 1, &[]).await?;
    baton
        .apply_config(&config_yaml(
            &baton.ns.name,
            "{duration: 4s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    baton
        .wait_for_event(rid, EventType::DeployStepReady, END)
        .await?;
    // Mid-analysis: the leader of the event stream goes, with whatever it had in memory.
    let js = admin(&baton.bus).await?;
    let (leader, _) = roles(&js, EVENTS_STREAM).await?;
    let cluster = baton.bus.sandbox.nats_cluster();
    let server = cluster.server(&leader).context("no such server")?;
    server.kill9().await?;
    let events = end_through_an_election(&baton, rid).await?;
    let last = events.last().map(|e| e.event_type);
    ensure!(
        last == Some(EventType::ReleaseSucceeded),
        "the release ended with {last:?}: {:?}",
        events.iter().map(|e| e.event_type).collect::<Vec<_>>()
    );
    once_each(&events)?;
    // A new leader was chosen among the two left.
    let (new_leader, _) = roles(&js, EVENTS_STREAM).await?;
    ensure!(new_leader != leader, "{leader} still leads");
    server.start_again().await?;
    Ok(())
}

async fn a_killed_follower_catches_up_once_restarted() -> Result<()> {
    let env = BusEnv::start_servers(3).await?;
    let js = admin(&env).await?;
    let cli = env.bus("cli").await?;
    let publish = |n: usize| {
        let cli = cli.clone();
        async move {
            let mut seq = 0;
            for _ in 0..n {
                let rid = ReleaseId::generate();
                let subject = EventSubject::new(
                    EnvName::new("staging")?,
                    AppName::new("web")?,
                    rid,
                    EventType::ReleaseAbortRequested,
                );
                let event = Event::new(
                    rid,
                    EventKey::Once,
                    Payload::ReleaseAbortRequested(ReleaseAbortRequested {
                        reason: "replication test".into(),
                    }),
                    cli.source(),
                    "tester",
                    "",
                );
                seq = cli.publish(&subject, &event).await?.0;
            }
            Ok::<u64, anyhow::Error>(seq)
        }
    };
    publish(20).await?;
    let (_, followers) = roles(&js, EVENTS_STREAM).await?;
    let name = followers.first().context("no follower")?.clone();
    let cluster = env.sandbox.nats_cluster();
    let follower = cluster.server(&name).context("no such server")?;
    follower.kill9().await?;
    // The two left are a quorum: publishing goes on.
    let last = publish(50).await?;
    follower.start_again().await?;
    let caught_up = baton_tests::eventually("the follower to catch up", END, || {
        let js = js.clone();
        let name = name.clone();
        async move {
            let info = js.get_stream(EVENTS_STREAM).await?.info().await?.clone();
            let peer = info
                .cluster
                .and_then(|c| c.replicas.into_iter().find(|p| p.name == name));
            Ok(peer
                .filter(|p| p.current && !p.offline && p.lag.unwrap_or(0) == 0)
                .map(|_| info.state.last_sequence))
        }
    })
    .await?;
    ensure!(
        caught_up >= last,
        "the stream is at {caught_up}, not {last}"
    );
    // With the other two gone, the caught-up server and one more still have every event.
    let others: Vec<_> = cluster
        .servers()
        .iter()
        .filter(|s| s.name() != name)
        .collect();
    others[0].kill9().await?;
    let info = baton_tests::eventually("the stream to answer", END, || {
        let js = js.clone();
        async move {
            Ok(match js.get_stream(EVENTS_STREAM).await {
                Ok(mut s) => s.info().await.ok().map(|i| i.state.clone()),
                Err(_) => None,
            })
        }
    })
    .await?;
    ensure!(
        info.last_sequence >= last && info.messages >= 70,
        "events lost: {info:?}"
    );
    others[0].start_again().await?;
    Ok(())
}

async fn every_history_and_consumer_is_there_after_all_three_servers_are_killed() -> Result<()> {
    let bus = BusEnv::start_servers(3).await?;
    let baton = Baton::start_on(bus, "r3-all", &["web"], 1, &[]).await?;
    baton
        .apply_config(&config_yaml(
            &baton.ns.name,
            "{duration: 2s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let first = baton.release_of("web", &image, &[]).await?;
    let before = baton.wait_for_end(first, END).await?;

    let cluster = baton.bus.sandbox.nats_cluster();
    cluster.kill9_all().await?;
    cluster.start_again_all().await?;

    // The release's history, event for event.
    let after = baton_tests::eventually("the history to be readable", END, || async {
        Ok(baton.events(first).await.ok().filter(|e| !e.is_empty()))
    })
    .await?;
    let ids = |events: &[Event]| {
        events
            .iter()
            .map(|e| e.envelope.id.clone())
            .collect::<Vec<_>>()
    };
    ensure!(
        ids(&after) == ids(&before),
        "the history changed: {before:?} → {after:?}"
    );
    // Every durable consumer, and the configuration (each stream and consumer elects its
    // leader again first: until then a read times out and is tried again).
    let js = admin(&baton.bus).await?;
    let defs = baton_core::busconfig::Definitions::embedded()?;
    for c in defs.concrete_consumers(&[CLUSTER.to_owned()]) {
        retrying(
            &format!("consumer {} after the restart", c.durable),
            || async {
                js.get_stream(EVENTS_STREAM)
                    .await?
                    .consumer_info(&c.durable)
                    .await?;
                Ok(())
            },
        )
        .await?;
    }
    let present = retrying("the configuration after the restart", || async {
        let config = js.get_key_value(CONFIG_BUCKET).await?;
        Ok(config.entry("config").await?.is_some())
    })
    .await?;
    ensure!(present, "the configuration is gone");
    // The agents, never restarted, carry on with the next release.
    let (v3, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let second = baton.release_of("web", &v3, &[]).await?;
    let events = baton.wait_for_end(second, END).await?;
    ensure!(
        events.last().map(|e| e.event_type) == Some(EventType::ReleaseSucceeded),
        "the next release ended with {:?}",
        events.last().map(|e| e.event_type)
    );
    once_each(&events)?;
    Ok(())
}

/// Which server of three goes down for good.
#[derive(Debug, Clone, Copy)]
enum Down {
    /// The one leading the event stream's replicas.
    Leader,
    /// One that follows it.
    Follower,
}

async fn releases_end_and_every_cli_read_answers_with_the_streams_leader_down_for_good(
) -> Result<()> {
    with_one_server_down(Down::Leader).await
}

async fn releases_end_and_every_cli_read_answers_with_a_follower_down_for_good() -> Result<()> {
    with_one_server_down(Down::Follower).await
}

/// How many times each read of the CLI is made after each release: every one must answer. A
/// read that had one chance in three to wait for a server that is down (as reads through an
/// ephemeral consumer had) would fail one of these almost surely (1 - (2/3)^20).
const READS: usize = 5;

/// With one server of three killed and never restarted: a canary, a rolling release and a
/// failing release each end as they should, a forged request still ends `release.failed`, and
/// `baton status`, `logs`, `list` and `history` answer every time they are asked.
async fn with_one_server_down(down: Down) -> Result<()> {
    let bus = BusEnv::start_servers(3).await?;
    let prefix = match down {
        Down::Leader => "r3-noleader",
        Down::Follower => "r3-nofollower",
    };
    let baton = Baton::start_on(bus, prefix, &["web", "api"], 1, &[]).await?;
    let apps = ["web".to_owned(), "api".to_owned()];
    baton
        .apply_config(&fleet_config(&baton.ns.name, &apps, |app| match app {
            "web" => "strategy: canary\ncanary: {steps: [{weight: 25}, {weight: 50}, {weight: 100}]}\nanalysis: {duration: 2s, interval: 1s, failure_limit: 0}".to_owned(),
            _ => "strategy: rolling\nanalysis: {duration: 2s, interval: 1s, failure_limit: 0}".to_owned(),
        }))
        .await?;
    let (good, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (bad, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "fail")]).await?;

    let js = admin(&baton.bus).await?;
    let (leader, followers) = roles(&js, EVENTS_STREAM).await?;
    let victim = match down {
        Down::Leader => leader,
        Down::Follower => followers.first().context("no follower")?.clone(),
    };
    let cluster = baton.bus.sandbox.nats_cluster();
    cluster
        .server(&victim)
        .context("no such server")?
        .kill9()
        .await?;

    // `baton bus status` (as the CLI's user) says so: once the streams it led have new
    // leaders, every stream takes writes again, and none is led by the server that is down.
    let status = baton_tests::eventually("every stream to have a leader", END, || async {
        let out = baton.baton(&["bus", "status"]).await?;
        Ok(out.status.success().then(|| baton_tests::out_text(&out)))
    })
    .await?;
    ensure!(
        status
            .lines()
            .filter(|l| l.starts_with("BATON_") || l.starts_with("KV_") || l.starts_with("OBJ_"))
            .count()
            == 6
            && status
                .lines()
                .all(|l| l.split_whitespace().nth(2) != Some(victim.as_str())),
        "bus status with {victim} down:\n{status}"
    );

    let mut reads = 0;
    for (app, image, ends) in [
        ("web", &good, EventType::ReleaseSucceeded),
        ("api", &good, EventType::ReleaseSucceeded),
        ("web", &bad, EventType::ReleaseRolledBack),
    ] {
        let rid = baton.release_of(app, image, &[]).await?;
        let events = baton.wait_for_end(rid, END).await?;
        let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
        ensure!(
            types.last() == Some(&ends),
            "{app} with {image} ended with {:?}, not {ends}: {types:?}",
            types.last()
        );
        ids_once(&events)?;
        reads += every_read_answers(&baton, rid).await?;
    }

    // A request whose spec the configuration does not back is refused as before.
    let cli = baton.bus.bus("cli").await?;
    let mut spec = baton_tests::sample_spec("test", "web", &good);
    spec.namespace = "kube-system".into();
    let rid = baton_tests::publish_request(&cli, spec, "mallory").await?;
    let events = baton.wait_for_end(rid, END).await?;
    ensure!(
        events.last().map(|e| e.event_type) == Some(EventType::ReleaseFailed),
        "the forged request ended with {:?}",
        events.iter().map(|e| e.event_type).collect::<Vec<_>>()
    );
    println!("{down:?} down: 3 releases and a forged request ended, {reads} CLI reads answered");
    Ok(())
}

/// `baton status`, `logs`, `list` and `history`, [`READS`] times each: each must answer (exit
/// 0) with what it shows of `rid`. Returns how many reads were made.
async fn every_read_answers(baton: &Baton, rid: ReleaseId) -> Result<usize> {
    let id = rid.to_string();
    let mut made = 0;
    for _ in 0..READS {
        for args in [
            vec!["status", id.as_str()],
            vec!["logs", id.as_str()],
            vec!["list"],
            vec!["history", "--env", "test"],
        ] {
            let started = tokio::time::Instant::now();
            let out = baton.baton(&args).await?;
            let text = baton_tests::out_text(&out);
            ensure!(
                out.status.success(),
                "`baton {}` failed after {:?}: {text}",
                args.join(" "),
                started.elapsed()
            );
            // status names the release and logs lists its events; list shows releases in
            // flight, and history what the metrics agent has folded so far.
            let shows = match args[0] {
                "status" => text.contains(&id[..8]),
                "logs" => text.contains("release.requested"),
                _ => true,
            };
            ensure!(
                shows,
                "`baton {}` does not show {id}: {text}",
                args.join(" ")
            );
            made += 1;
        }
    }
    Ok(made)
}
