//! Notifications through the real notifier process, to a real HTTP receiver started by the test
//! (on loopback): routes by app, environment and trigger; Slack blocks and CloudEvents' binary
//! mode; a receiver failing three times; a receiver that never takes anything, which holds up no
//! other channel and whose messages are dead-lettered with the reason; and a kill -9 of the
//! notifier while a receiver holds a request, after which every message is there once per event
//! id, in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use baton_core::event::Event;
use baton_core::notify::Trigger;
use baton_tests::harness::trial;
use baton_tests::release::{app_config, Baton};
use baton_tests::{eventually, AgentProcess};
use libtest_mimic::Trial;
use serde_json::Value;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        every_routed_event_reaches_its_channels_once_in_order_and_a_dead_receiver_holds_up_no_other,
        a_notifier_killed_while_a_receiver_holds_a_request_leaves_each_message_once_per_event_id,
    ]
}

const END: Duration = Duration::from_secs(180);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    channel: String,
    headers: BTreeMap<String, String>,
    body: Value,
    /// Answered 2xx.
    accepted: bool,
}

impl Received {
    fn id(&self) -> &str {
        self.headers
            .get("idempotency-key")
            .map_or("", String::as_str)
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    counts: HashMap<String, usize>,
    fail_first: HashMap<String, usize>,
    always_fail: HashSet<String>,
    /// (channel, n): the n-th request of the channel waits for `release` before it is answered.
    hold: Option<(String, usize)>,
    holding: bool,
}

/// A webhook receiver: `POST /<channel>`, each request recorded; a channel may fail its first
/// requests, fail all of them, or hold one until the test lets it go.
struct Receiver {
    base: String,
    state: Arc<Mutex<State>>,
    release: Arc<tokio::sync::Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(setup: impl FnOnce(&mut State)) -> Result<Receiver> {
        let mut initial = State::default();
        setup(&mut initial);
        let state = Arc::new(Mutex::new(initial));
        let release = Arc::new(tokio::sync::Notify::new());
        let (st, rel) = (state.clone(), release.clone());
        let app = axum::Router::new().route(
            "/{channel}",
            axum::routing::post(
                move |axum::extract::Path(channel): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Bytes| {
                    let (st, rel) = (st.clone(), rel.clone());
                    async move {
                        let headers: BTreeMap<String, String> = headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let (status, hold) = {
                            let mut s = st.lock().unwrap();
                            let n = {
                                let c = s.counts.entry(channel.clone()).or_insert(0);
                                *c += 1;
                                *c
                            };
                            let failing = s.always_fail.contains(&channel)
                                || n <= s.fail_first.get(&channel).copied().unwrap_or(0);
                            let hold = s.hold.as_ref() == Some(&(channel.clone(), n));
                            if hold {
                                s.holding = true;
                            }
                            let status = if failing { 503 } else { 200 };
                            s.received.push(Received {
                                channel: channel.clone(),
                                headers,
                                body,
                                accepted: status == 200,
                            });
                            (status, hold)
                        };
                        if hold {
                            rel.notified().await;
                        }
                        axum::http::StatusCode::from_u16(status).unwrap()
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            base,
            state,
            release,
            server,
        })
    }

    fn url(&self, channel: &str) -> String {
        format!("{}/{channel}", self.base)
    }

    fn received(&self, channel: &str) -> Vec<Received> {
        let s = self.state.lock().unwrap();
        s.received
            .iter()
            .filter(|r| r.channel == channel)
            .cloned()
            .collect()
    }

    /// The accepted requests of a channel, the first of each idempotency key (what a receiver
    /// that keeps messages by id keeps).
    fn kept(&self, channel: &str) -> Vec<Received> {
        let mut seen = HashSet::new();
        self.received(channel)
            .into_iter()
            .filter(|r| r.accepted && seen.insert(r.id().to_owned()))
            .collect()
    }

    fn holding(&self) -> bool {
        self.state.lock().unwrap().holding
    }

    async fn wait_kept(&self, channel: &str, count: usize) -> Result<Vec<Received>> {
        eventually(
            &format!("{count} notifications in channel {channel}"),
            Duration::from_secs(60),
            || async move {
                let kept = self.kept(channel);
                Ok((kept.len() >= count).then_some(kept))
            },
        )
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The (trigger, event id) of each event of `events` a route with `triggers` is told of, in
/// stream order.
fn expected(events: &[Event], triggers: &[Trigger]) -> Vec<(Trigger, String)> {
    events
        .iter()
        .filter_map(|e| Trigger::of(e.event_type).map(|t| (t, e.id().to_owned())))
        .filter(|(t, _)| triggers.contains(t))
        .collect()
}

fn ids(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.id().to_owned()).collect()
}

/// A Baton with a two-step canary `web`, the notifier with `secrets` (channel to URL), the
/// notifications section `notifications` applied.
async fn start(prefix: &str, secrets: &[(&str, String)], notifications: &str) -> Result<Baton> {
    let probe = Baton::start_with(prefix, &["web"], 2, &[]).await?;
    let dir = probe.bus.sandbox.dir().join("notifier");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("webhooks.yaml");
    let text: String = secrets
        .iter()
        .map(|(name, url)| format!("{name}: {url}\n"))
        .collect();
    std::fs::write(&file, text)?;
    let mut baton = probe;
    let env = [
        ("BATON_NOTIFIER_SECRETS", file.display().to_string()),
        ("BATON_NOTIFIER_GIVE_UP_AFTER", "20s".to_owned()),
    ];
    baton
        .agent_env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let notifier =
        AgentProcess::start(&baton.bus, "notifier", &env, baton.bus.sandbox.dir()).await?;
    baton.agents.push(notifier);
    let config = app_config(
        &baton.ns.name,
        "strategy: canary\ncanary: {steps: [{weight: 50}, {weight: 100}]}\nanalysis: {duration: 2s, interval: 1s, failure_limit: 0}",
    );
    baton
        .apply_config(&format!("{config}notifications:\n{notifications}"))
        .await?;
    Ok(baton)
}

async fn every_routed_event_reaches_its_channels_once_in_order_and_a_dead_receiver_holds_up_no_other(
) -> Result<()> {
    let receiver = Receiver::start(|s| {
        s.fail_first.insert("flaky".into(), 3);
        s.always_fail.insert("down".into());
    })
    .await?;
    let secrets: Vec<(&str, String)> = ["team", "audit", "flaky", "down", "elsewhere"]
        .into_iter()
        .map(|c| (c, receiver.url(c)))
        .collect();
    let baton = start(
        "notify",
        &secrets,
        r#"  link: "https://baton.example.com/releases/{{release_id}}"
  channels:
    team: {kind: slack}
    audit: {kind: cloudevents}
    flaky: {kind: cloudevents}
    down: {kind: slack}
    elsewhere: {kind: slack}
  routes:
    - {channel: team, apps: [web], environments: [test]}
    - {channel: audit, on: [requested, succeeded, rolled_back, failed]}
    - {channel: flaky}
    - {channel: down}
    - {channel: elsewhere, environments: [ghost]}
"#,
    )
    .await?;

    // A canary that succeeds, then one whose health fails: rolled back.
    let (good, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let first = baton.release_of("web", &good, &[]).await?;
    let first_events = baton.wait_for_end(first, END).await?;
    let (bad, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let second = baton.release_of("web", &bad, &[]).await?;
    let second_events = baton.wait_for_end(second, END).await?;
    ensure!(
        second_events.last().map(|e| e.event_type)
            == Some(baton_core::EventType::ReleaseRolledBack),
        "the second release was not rolled back: {:?}",
        second_events
            .iter()
            .map(|e| e.event_type)
            .collect::<Vec<_>>()
    );
    let events: Vec<Event> = first_events.iter().chain(&second_events).cloned().collect();

    // Every trigger to `team`, in stream order, once each — while `down` fails every request.
    let all = expected(&events, &Trigger::ALL);
    ensure!(all.len() >= 6, "too few triggers: {all:?}");
    let team = receiver.wait_kept("team", all.len()).await?;
    let want: Vec<String> = all.iter().map(|(_, id)| id.clone()).collect();
    ensure!(
        ids(&team) == want,
        "team got {:?}\nexpected {want:?}",
        ids(&team)
    );
    ensure!(
        receiver.received("team").len() == all.len(),
        "team got a message twice"
    );
    // Slack blocks, with the reason and the link of the rolled-back release.
    let last = &team[team.len() - 1].body;
    let text = last.to_string();
    ensure!(last["blocks"][0]["type"] == "header", "{text}");
    for field in [
        "*App*\\nweb",
        "*Environment*\\ntest",
        "*Strategy*\\ncanary",
        "*Outcome*\\nrolled back",
        "*Reason*",
    ] {
        ensure!(text.contains(field), "no {field} in {text}");
    }
    ensure!(text.contains(&bad), "no image in {text}");
    ensure!(
        text.contains(&format!("https://baton.example.com/releases/{second}")),
        "no link in {text}"
    );
    ensure!(
        last["text"].as_str().unwrap_or("").contains("rolled back"),
        "{text}"
    );
    ensure!(
        !receiver.kept("down").iter().any(|r| r.accepted),
        "down took something"
    );
    // The first step (step 0 of the canary, at 50%) passed: its message says which.
    let step = team[1].body.to_string();
    ensure!(
        all[1].0 == Trigger::Step && step.contains("*Step*\\n0 (50%)"),
        "{step}"
    );

    // `audit`: only the requests and the ends, in CloudEvents' binary mode.
    let outcomes = expected(
        &events,
        &[
            Trigger::Requested,
            Trigger::Succeeded,
            Trigger::RolledBack,
            Trigger::Failed,
        ],
    );
    let audit = receiver.wait_kept("audit", outcomes.len()).await?;
    ensure!(
        ids(&audit)
            == outcomes
                .iter()
                .map(|(_, id)| id.clone())
                .collect::<Vec<_>>(),
        "audit got {:?}",
        ids(&audit)
    );
    let kinds: Vec<&str> = audit
        .iter()
        .map(|r| r.body["trigger"].as_str().unwrap_or(""))
        .collect();
    ensure!(
        kinds == ["requested", "succeeded", "requested", "rolled_back"],
        "{kinds:?}"
    );
    for (r, (_, id)) in audit.iter().zip(&outcomes) {
        let h = &r.headers;
        let rid = r.body["release_id"].as_str().unwrap_or("");
        ensure!(
            h.get("ce-specversion").map(String::as_str) == Some("1.0"),
            "{h:?}"
        );
        ensure!(h.get("ce-id") == Some(id), "{h:?}");
        ensure!(
            h.get("ce-type").map(String::as_str)
                == Some(
                    format!("dev.baton.{}", r.body["event_type"].as_str().unwrap_or("")).as_str()
                ),
            "{h:?}"
        );
        ensure!(
            h.get("ce-source").map(String::as_str)
                == Some(format!("/baton/{}/test/web", baton_tests::CLUSTER).as_str()),
            "{h:?}"
        );
        ensure!(
            h.get("ce-subject").map(String::as_str) == Some(rid),
            "{h:?}"
        );
        ensure!(h.contains_key("ce-time"), "{h:?}");
        ensure!(
            h.get("content-type").map(String::as_str) == Some("application/json"),
            "{h:?}"
        );
        ensure!(
            r.body["app"] == "web" && r.body["env"] == "test",
            "{}",
            r.body
        );
        ensure!(r.body["strategy"] == "canary", "{}", r.body);
    }
    ensure!(audit[1].body["outcome"] == "succeeded", "{}", audit[1].body);
    ensure!(audit[1].body["image"] == good.as_str(), "{}", audit[1].body);
    ensure!(
        !audit[3].body["reason"].as_str().unwrap_or("").is_empty(),
        "no reason: {}",
        audit[3].body
    );

    // `flaky` failed its first three requests: then each message once, in order.
    let flaky = receiver.wait_kept("flaky", all.len()).await?;
    ensure!(ids(&flaky) == want, "flaky got {:?}", ids(&flaky));
    let raw = receiver.received("flaky");
    ensure!(
        raw.len() == all.len() + 3,
        "flaky was sent {} requests for {} messages",
        raw.len(),
        all.len()
    );
    ensure!(
        raw[..4].iter().all(|r| r.id() == want[0]) && raw[3].accepted,
        "the first message was not the one tried again: {:?}",
        ids(&raw[..4])
    );

    // `down` never takes anything: each of its messages is dead-lettered, with the reason.
    let js = jetstream::new(baton.bus.sandbox.nats_client("cli").await?);
    let dead = baton_tests::dead_letters(&js, "notifier", all.len()).await?;
    for baton_tests::DeadLetter {
        reason,
        original_subject: subject,
        ..
    } in &dead
    {
        ensure!(subject.starts_with("baton.v1.notify.down."), "{subject}");
        ensure!(
            reason.contains("channel down still failing") && reason.contains("HTTP 503"),
            "{reason}"
        );
    }
    // What is not a notification, even on the outbox's subjects, is dead-lettered with the
    // reason, and the receivers get nothing of it.
    let outbox = jetstream::new(baton.bus.sandbox.nats_client("notifier").await?);
    for (subject, payload) in [
        (
            baton_core::subject::notification("team", second),
            "not json",
        ),
        (format!("baton.v1.notify.Not_A_Channel.{second}"), "{}"),
    ] {
        outbox
            .publish(subject, bytes::Bytes::from_static(payload.as_bytes()))
            .await?
            .await?;
    }
    let letters = baton_tests::dead_letters(&js, "notifier", all.len() + 2).await?;
    let reasons: Vec<&str> = letters[all.len()..]
        .iter()
        .map(|l| l.reason.as_str())
        .collect();
    ensure!(
        reasons.iter().any(|r| r.starts_with("not a notification"))
            && reasons
                .iter()
                .any(|r| r.contains("Not_A_Channel") && r.contains("not a notification subject")),
        "{reasons:?}"
    );
    ensure!(
        receiver.received("team").len() == all.len(),
        "the garbage reached team"
    );
    ensure!(
        receiver.received("elsewhere").is_empty(),
        "a route of another environment was told"
    );
    let notifier = baton
        .agents
        .iter()
        .find(|a| a.name == "notifier")
        .context("no notifier")?;
    let sent = notifier
        .metric(r#"baton_notifications_sent_total{channel="team",trigger="requested"}"#)
        .await?;
    ensure!(sent == 2.0, "{sent} requested notifications sent to team");
    // The dashboard's notification panels read what this notifier exports.
    let board = baton_tests::dashboard::load()?;
    let panels =
        baton_tests::dashboard::queries_of(&board, baton_tests::dashboard::Exporter::Notifier);
    ensure!(
        panels.len() >= 4,
        "the dashboard shows {} notifier queries",
        panels.len()
    );
    let exported = baton_tests::dashboard::exported_names(&notifier.metrics().await?);
    let missing = baton_tests::dashboard::missing(
        &board,
        baton_tests::dashboard::Exporter::Notifier,
        &exported,
    );
    ensure!(
        missing.is_empty(),
        "the dashboard reads metrics the notifier does not export: {missing:?}\nit exports: {exported:?}"
    );
    Ok(())
}

async fn a_notifier_killed_while_a_receiver_holds_a_request_leaves_each_message_once_per_event_id(
) -> Result<()> {
    // The second request (the release's first step) is held until the notifier is dead.
    let receiver = Receiver::start(|s| s.hold = Some(("team".into(), 2))).await?;
    let mut baton = start(
        "notify-kill",
        &[("team", receiver.url("team"))],
        "  channels:\n    team: {kind: cloudevents}\n  routes:\n    - {channel: team}\n",
    )
    .await?;
    let (good, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &good, &[]).await?;
    eventually("a held request", Duration::from_secs(60), || async {
        Ok(receiver.holding().then_some(()))
    })
    .await?;
    let held_id = receiver.received("team")[1].id().to_owned();
    // kill -9 and a new notifier: the receiver took the held message, but the notifier is gone
    // before it hears so.
    baton.restart_agent("notifier").await?;
    receiver.release.notify_one();
    let events = baton.wait_for_end(rid, END).await?;
    let all = expected(&events, &Trigger::ALL);
    let kept = receiver.wait_kept("team", all.len()).await?;
    let want: Vec<String> = all.iter().map(|(_, id)| id.clone()).collect();
    ensure!(
        ids(&kept) == want,
        "kept {:?}\nexpected {want:?}",
        ids(&kept)
    );
    // Sent again after the restart, with the same id; everything else once.
    let raw = receiver.received("team");
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in &raw {
        *per_id.entry(r.id().to_owned()).or_default() += 1;
    }
    ensure!(
        per_id.get(&held_id) == Some(&2),
        "the held message was sent {:?} times",
        per_id.get(&held_id)
    );
    let twice: Vec<&String> = per_id
        .iter()
        .filter(|(id, n)| **n > 1 && **id != held_id)
        .map(|(id, _)| id)
        .collect();
    ensure!(twice.is_empty(), "sent more than once: {twice:?}");
    let again: Vec<&Received> = raw.iter().filter(|r| r.id() == held_id).collect();
    ensure!(
        again[0].body == again[1].body
            && again[0].headers.get("ce-id") == again[1].headers.get("ce-id"),
        "the message sent again differs"
    );
    Ok(())
}
