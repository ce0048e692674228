//! Blue-green releases end to end: the new image on the idle colour behind `web-preview`, the
//! pre-promotion analysis, the switch of the Service `web`, the post-promotion analysis, and the
//! old colour scaled down after the delay — or, on a failing verdict, the Service left or put back
//! where it was. A watch of the namespace records what a user would see meanwhile: the Service's
//! selector, the ready pods it selects, and each Deployment's replicas.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use baton_tests::out_text;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::PostParams;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use libtest_mimic::Trial;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use baton_core::event::{Event, EventType::*};
use baton_core::workload::COLOUR_LABEL;
use baton_proto::v1::envelope::Payload;
use baton_tests::eventually;
use baton_tests::harness::trial;
use baton_tests::release::{app_config, in_order, Baton, PORT};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_healthy_release_switches_the_service_after_the_pre_promotion_analysis_and_scales_the_old_colour_down_after_the_delay,
        the_first_release_adopts_the_plain_deployment_without_losing_ready_pods_and_the_next_goes_back_to_blue,
        a_release_whose_image_fails_the_pre_promotion_analysis_never_switches_the_service,
        a_release_that_fails_the_post_promotion_analysis_is_switched_back_at_once,
        a_deployer_killed_while_adopting_finishes_the_release_without_repeating_a_step_or_losing_ready_pods,
        the_old_colour_is_scaled_down_after_the_delay_even_when_the_deployer_restarted_during_it,
        a_release_of_an_app_without_a_service_fails_before_changing_anything,
        a_manual_rollback_switches_the_service_back_to_the_other_colour_scaling_it_up_first,
        a_quota_without_room_for_a_second_colour_refuses_the_release_before_it_changes_anything,
        with_manual_promotion_the_switch_waits_for_baton_promote_and_baton_abort_before_it_moves_nothing_but_the_new_colour,
    ]
}

const LONG: Duration = Duration::from_secs(180);
const QUICK_ANALYSIS: &str = "{duration: 3s, interval: 1s, failure_limit: 0}";
const DELAY_MS: i64 = 3_000;

/// A Baton with the Service `web` (selector `app: web`, port 8080) and app `web` released
/// blue-green with a scale-down delay of 3 s and post-promotion analysis.
async fn start(prefix: &str, analysis: &str) -> Result<(Baton, Client)> {
    start_with_delay(prefix, analysis, DELAY_MS).await
}

async fn start_with_delay(prefix: &str, analysis: &str, delay_ms: i64) -> Result<(Baton, Client)> {
    start_with(prefix, analysis, delay_ms, "").await
}

/// A Baton as [`start`] makes it, with more `blue_green` settings (`", auto_promote: false"`).
async fn start_with(
    prefix: &str,
    analysis: &str,
    delay_ms: i64,
    more: &str,
) -> Result<(Baton, Client)> {
    let baton = Baton::start(prefix).await?;
    let client = baton.cluster.client().await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]
        }
    }))?;
    Api::<Service>::namespaced(client.clone(), &baton.ns.name)
        .create(&PostParams::default(), &service)
        .await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &format!(
                "strategy: blue-green\n\
                 blue_green: {{scale_down_delay: {delay_ms}ms, post_promotion_analysis: true{more}}}\n\
                 analysis: {analysis}"
            ),
        ))
        .await?;
    Ok((baton, client))
}

/// `app: web`, with a colour when given.
fn web(colour: Option<&str>) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([("app".to_string(), "web".to_string())]);
    if let Some(c) = colour {
        s.insert(COLOUR_LABEL.into(), c.into());
    }
    s
}

/// The test's error, with the end of the deployer's and the rollback agent's logs.
fn with_logs(baton: &Baton, result: Result<()>) -> Result<()> {
    result.map_err(|e| {
        let logs: String = baton
            .agents
            .iter()
            .filter(|a| a.name == "deployer" || a.name == "rollback")
            .map(|a| format!("\n--- {} log ---\n{}", a.name, a.process.log_tail(40)))
            .collect();
        anyhow::anyhow!("{e:#}\n{logs}")
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn selector(client: &Client, ns: &str, service: &str) -> Result<BTreeMap<String, String>> {
    Ok(Api::<Service>::namespaced(client.clone(), ns)
        .get(service)
        .await?
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default())
}

async fn deployment(client: &Client, ns: &str, name: &str) -> Result<Deployment> {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("Deployment {name}"))
}

/// The image of the `app` container.
fn image(d: &Deployment) -> String {
    d.spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "app"))
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

fn available(d: &Deployment) -> i32 {
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn step_of(e: &Event) -> Option<u32> {
    match e.payload()? {
        Payload::DeployStepStarted(s) => Some(s.step),
        Payload::DeployStepReady(s) => Some(s.step),
        Payload::AnalysisStarted(a) => Some(a.step),
        Payload::AnalysisPassed(a) => Some(a.step),
        Payload::AnalysisFailed(a) => Some(a.step),
        _ => None,
    }
}

/// Where the event of type `t` for `step` is in the history.
fn position(events: &[Event], t: baton_core::event::EventType, step: u32) -> Option<usize> {
    events
        .iter()
        .position(|e| e.event_type == t && step_of(e) == Some(step))
}

/// Events of one type and step (or of one type, for those without a step) published more than
/// once.
fn repeated_steps(events: &[Event]) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in events {
        let key = match step_of(e) {
            Some(step) => format!("{} of step {step}", e.event_type),
            None => e.event_type.to_string(),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, _)| k)
        .collect()
}

/// The Service selectors the events tell, in stream order: each step that changed it
/// (`deploy.step_started.selector`), and the rollback (`rollback.completed.selector`).
fn selector_history(events: &[Event]) -> Vec<BTreeMap<String, String>> {
    events
        .iter()
        .filter_map(|e| match e.payload()? {
            Payload::DeployStepStarted(s) if !s.selector.is_empty() => Some(s.selector.clone()),
            Payload::RollbackCompleted(r) if !r.selector.is_empty() => Some(r.selector.clone()),
            _ => None,
        })
        .map(|m| m.into_iter().collect())
        .collect()
}

/// A release that failed before changing anything: the plain Deployment `web` is as `before`,
/// and no other Deployment was made.
async fn only_the_plain_deployment_unchanged(
    client: &Client,
    ns: &str,
    before: &Deployment,
) -> Result<()> {
    let after = deployment(client, ns, "web").await?;
    ensure!(
        after.metadata.generation == before.metadata.generation,
        "the Deployment was changed"
    );
    let all = Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await?;
    ensure!(
        all.items.len() == 1,
        "Deployments were made: {:?}",
        all.items
            .iter()
            .map(|d| d.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// After a rollback: blue runs `v1` with its 2 pods available and green is scaled to 0.
async fn blue_serves_again(client: &Client, ns: &str, v1: &str) -> Result<()> {
    let blue = deployment(client, ns, "web-blue").await?;
    ensure!(
        image(&blue) == v1 && available(&blue) == 2,
        "web-blue: {} with {} available",
        image(&blue),
        available(&blue)
    );
    let green = deployment(client, ns, "web-green").await?;
    ensure!(
        green.spec.replicas == Some(0),
        "web-green has {:?} replicas",
        green.spec.replicas
    );
    Ok(())
}

/// The colour of each selector ("-" for none).
fn colours<'a>(selectors: impl IntoIterator<Item = &'a BTreeMap<String, String>>) -> Vec<String> {
    selectors
        .into_iter()
        .map(|s| s.get(COLOUR_LABEL).cloned().unwrap_or_else(|| "-".into()))
        .collect()
}

/// What a watch of the namespace saw, each change with when it was seen (ms since the epoch).
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The Service `web`'s selector.
    selectors: Vec<(i64, BTreeMap<String, String>)>,
    /// Ready pods matching the Service's selector, counted from the pods (the sandbox's pod IPs
    /// are loopback addresses, which the Endpoints controller leaves out).
    ready: Vec<(i64, usize)>,
    /// `spec.replicas` of each Deployment.
    replicas: BTreeMap<String, Vec<(i64, i32)>>,
}

impl Seen {
    fn fewest_ready(&self) -> usize {
        self.ready.iter().map(|(_, n)| *n).min().unwrap_or(0)
    }

    /// When the Service was first seen selecting `colour`.
    fn switched_to(&self, colour: &str) -> Option<i64> {
        self.selectors
            .iter()
            .find(|(_, s)| s.get(COLOUR_LABEL).map(String::as_str) == Some(colour))
            .map(|(t, _)| *t)
    }

    fn replicas_of(&self, name: &str) -> Vec<(i64, i32)> {
        self.replicas.get(name).cloned().unwrap_or_default()
    }

    /// The colours the Service selected, one entry per change.
    fn colours(&self) -> Vec<String> {
        colours(self.selectors.iter().map(|(_, s)| s))
    }
}

/// Watches the namespace's pods, Services and Deployments until dropped.
struct Observer {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl Observer {
    async fn start(client: &Client, ns: &str) -> Result<Observer> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        tokio::spawn(observe(
            client.clone(),
            ns.to_owned(),
            seen.clone(),
            stop.clone(),
        ));
        let first = seen.clone();
        eventually("a first look at the namespace", LONG, || {
            let first = first.clone();
            async move { Ok((!first.lock().unwrap().ready.is_empty()).then_some(())) }
        })
        .await?;
        Ok(Observer { seen, stop })
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn observe(client: Client, ns: String, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    let (pods, pw) = reflector::store::<Pod>();
    let (services, sw) = reflector::store::<Service>();
    let (deployments, dw) = reflector::store::<Deployment>();
    let cfg = watcher::Config::default;
    let streams = vec![
        reflector(
            pw,
            watcher(Api::<Pod>::namespaced(client.clone(), &ns), cfg()).default_backoff(),
        )
        .map(move |e| {
            (
                0,
                e.map(|e| matches!(e, watcher::Event::InitDone))
                    .unwrap_or(false),
            )
        })
        .boxed(),
        reflector(
            sw,
            watcher(Api::<Service>::namespaced(client.clone(), &ns), cfg()).default_backoff(),
        )
        .map(move |e| {
            (
                1,
                e.map(|e| matches!(e, watcher::Event::InitDone))
                    .unwrap_or(false),
            )
        })
        .boxed(),
        reflector(
            dw,
            watcher(Api::<Deployment>::namespaced(client, &ns), cfg()).default_backoff(),
        )
        .map(move |e| {
            (
                2,
                e.map(|e| matches!(e, watcher::Event::InitDone))
                    .unwrap_or(false),
            )
        })
        .boxed(),
    ];
    let mut events = futures::stream::select_all(streams);
    let mut listed = [false; 3];
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = events.next() => next,
        };
        let Some((which, done)) = next else { return };
        listed[which] |= done;
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let now = now_ms();
        let mut seen = seen.lock().unwrap();
        let selector = services
            .state()
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
            .and_then(|s| s.spec.as_ref()?.selector.clone())
            .unwrap_or_default();
        let ready = if selector.is_empty() {
            0
        } else {
            pods.state()
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .count()
        };
        if seen.selectors.last().map(|(_, s)| s) != Some(&selector) {
            seen.selectors.push((now, selector));
        }
        if seen.ready.last().map(|(_, n)| *n) != Some(ready) {
            seen.ready.push((now, ready));
        }
        for d in deployments.state() {
            let name = d.metadata.name.clone().unwrap_or_default();
            let replicas = d.spec.replicas.unwrap_or(1);
            let timeline = seen.replicas.entry(name).or_default();
            if timeline.last().map(|(_, r)| *r) != Some(replicas) {
                timeline.push((now, replicas));
            }
        }
    }
}

async fn a_healthy_release_switches_the_service_after_the_pre_promotion_analysis_and_scales_the_old_colour_down_after_the_delay(
) -> Result<()> {
    let (baton, client) = start("bg-ok", QUICK_ANALYSIS).await?;
    let result = healthy(&baton, &client).await;
    with_logs(&baton, result)
}

async fn healthy(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let watch = Observer::start(client, &ns).await?;
    let (image_v2, digest) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (code, rid, out) = baton.release(&image_v2, true).await?;
    ensure!(code == 0, "baton release --wait exited {code}:\n{out}");

    let events = baton.events(rid).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        in_order(
            &types,
            &[
                DeployStarted,
                DeployStepStarted,
                DeployStepReady,
                AnalysisStarted,
                AnalysisPassed,
                DeployStepStarted,
                DeployStepReady,
                AnalysisStarted,
                AnalysisPassed,
                DeployCompleted,
                ReleaseSucceeded,
            ]
        ),
        "events out of order: {types:?}"
    );
    let twice = repeated_steps(&events);
    ensure!(twice.is_empty(), "published twice: {twice:?}");
    let passed = position(&events, AnalysisPassed, 0).context("no analysis.passed of step 0")?;
    let switch = position(&events, DeployStepStarted, 1).context("no step 1")?;
    ensure!(
        passed < switch,
        "step 1 started before the pre-promotion analysis passed: {types:?}"
    );
    ensure!(
        position(&events, AnalysisPassed, 1).is_some(),
        "no post-promotion analysis: {types:?}"
    );
    // The switch, in the events and on the cluster, after the pre-promotion analysis.
    let history = selector_history(&events);
    ensure!(
        history.last() == Some(&web(Some("green"))),
        "deploy.step_started of the switch tells the selectors {history:?}"
    );
    ensure!(
        selector(client, &ns, "web").await? == web(Some("green")),
        "the Service does not select green"
    );
    let seen = watch.seen();
    let switched = seen
        .switched_to("green")
        .context("the Service was never seen selecting green")?;
    ensure!(
        switched >= events[passed].time_ms(),
        "the Service selected green {} ms before the pre-promotion analysis passed",
        events[passed].time_ms() - switched
    );
    // Green runs the new digest; the preview Service selects it.
    let green = deployment(client, &ns, "web-green").await?;
    let expected = format!("{}/{}@{digest}", baton.cluster.registry, baton.repo);
    ensure!(
        image(&green) == expected,
        "web-green runs {}, not {expected}",
        image(&green)
    );
    ensure!(available(&green) == 2, "web-green: {:?}", green.status);
    ensure!(
        selector(client, &ns, "web-preview").await? == web(Some("green")),
        "web-preview does not select green"
    );

    // The old colour: kept scaled after the release for the delay, then scaled to 0.
    let succeeded = events
        .iter()
        .find(|e| e.event_type == ReleaseSucceeded)
        .context("no release.succeeded")?
        .time_ms();
    eventually("web-blue scaled to 0", Duration::from_secs(60), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let blue = deployment(&client, &ns, "web-blue").await?;
            Ok((blue.spec.replicas == Some(0)).then_some(()))
        }
    })
    .await?;
    // The watch may hear of the scale-down a moment after the read above.
    let blue = eventually(
        "the watch to see web-blue scaled to 0",
        Duration::from_secs(30),
        || {
            let blue = watch.seen().replicas_of("web-blue");
            async move { Ok(blue.iter().any(|(_, r)| *r == 0).then_some(blue)) }
        },
    )
    .await?;
    ensure!(
        blue.first().map(|(_, r)| *r) == Some(2),
        "web-blue was never seen with 2 replicas: {blue:?}"
    );
    let (down, _) = *blue
        .iter()
        .find(|(_, r)| *r == 0)
        .context("the scale-down was not seen")?;
    ensure!(
        down >= succeeded + DELAY_MS,
        "web-blue was scaled down {} ms after release.succeeded, before the delay of {DELAY_MS} ms",
        down - succeeded
    );
    ensure!(
        watch.seen().fewest_ready() >= 2,
        "fewer than 2 ready pods behind the Service at one point: {:?}",
        watch.seen().ready
    );
    Ok(())
}

async fn the_first_release_adopts_the_plain_deployment_without_losing_ready_pods_and_the_next_goes_back_to_blue(
) -> Result<()> {
    let (baton, client) = start("bg-adopt", QUICK_ANALYSIS).await?;
    let result = adoption(&baton, &client).await;
    with_logs(&baton, result)
}

async fn adoption(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let v1 = baton.deployed_image().await?;
    let watch = Observer::start(client, &ns).await?;
    let (image_v2, _) = baton.push("v2", &[]).await?;
    let (code, first, out) = baton.release(&image_v2, true).await?;
    ensure!(code == 0, "the first release exited {code}:\n{out}");

    // The plain Deployment is kept, at 0; blue runs what it ran, selected by colour.
    let plain = deployment(client, &ns, "web").await?;
    ensure!(
        plain.spec.replicas == Some(0) && image(&plain) == v1,
        "the plain Deployment: {} replicas of {}",
        plain.spec.replicas.unwrap_or(-1),
        image(&plain)
    );
    let blue = deployment(client, &ns, "web-blue").await?;
    ensure!(image(&blue) == v1, "web-blue runs {}", image(&blue));
    ensure!(
        blue.spec.selector.match_labels == Some(web(Some("blue"))),
        "web-blue selects {:?}",
        blue.spec.selector
    );
    let events = baton.events(first).await?;
    let started = baton_tests::first!(events, DeployStarted)?;
    ensure!(
        started.workload == "web" && started.previous_image == v1,
        "the first release's deploy.started: {started:?}"
    );
    ensure!(
        colours(&selector_history(&events)) == ["blue", "green"],
        "the first release's events tell the selectors {:?}",
        selector_history(&events)
    );

    // The next release goes to the idle colour, blue, and green is scaled down after it.
    let green_before = deployment(client, &ns, "web-green").await?;
    let (image_v3, digest) = baton.push("v3", &[]).await?;
    let (code, second, out) = baton.release(&image_v3, true).await?;
    ensure!(code == 0, "the second release exited {code}:\n{out}");
    ensure!(
        selector(client, &ns, "web").await? == web(Some("blue")),
        "the Service does not select blue after the second release"
    );
    let blue = deployment(client, &ns, "web-blue").await?;
    let expected = format!("{}/{}@{digest}", baton.cluster.registry, baton.repo);
    ensure!(image(&blue) == expected, "web-blue runs {}", image(&blue));
    let events = baton.events(second).await?;
    // What ran before is the active colour's, and what runs after is the new colour's.
    let started = baton_tests::first!(events, DeployStarted)?;
    ensure!(
        started.workload == "web-green" && started.previous_image == image(&green_before),
        "the second release's deploy.started: {started:?}, web-green ran {}",
        image(&green_before)
    );
    let revision = |d: &Deployment| {
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("deployment.kubernetes.io/revision").cloned())
            .unwrap_or_default()
    };
    ensure!(
        started.previous_revision == revision(&green_before),
        "deploy.started tells revision {:?}, web-green was at {:?}",
        started.previous_revision,
        revision(&green_before)
    );
    let completed = baton_tests::first!(events, DeployCompleted)?;
    ensure!(
        !completed.revision.is_empty() && completed.revision == revision(&blue),
        "deploy.completed tells revision {:?}, web-blue is at {:?}",
        completed.revision,
        revision(&blue)
    );
    ensure!(
        colours(&selector_history(&events)) == ["blue"],
        "the second release's events tell the selectors {:?}",
        selector_history(&events)
    );
    eventually("web-green scaled to 0", Duration::from_secs(60), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let green = deployment(&client, &ns, "web-green").await?;
            Ok((green.spec.replicas == Some(0)).then_some(()))
        }
    })
    .await?;

    let seen = watch.seen();
    ensure!(
        seen.colours() == ["-", "blue", "green", "blue"],
        "the Service selected {:?}",
        seen.colours()
    );
    ensure!(
        seen.fewest_ready() >= 2,
        "fewer than 2 ready pods behind the Service at one point: {:?}",
        seen.ready
    );
    Ok(())
}

async fn a_release_whose_image_fails_the_pre_promotion_analysis_never_switches_the_service(
) -> Result<()> {
    let (baton, client) = start("bg-fail", QUICK_ANALYSIS).await?;
    let result = failing(&baton, &client).await;
    with_logs(&baton, result)
}

async fn failing(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let (good, _) = baton.push("v2", &[]).await?;
    let (code, _, out) = baton.release(&good, true).await?;
    ensure!(code == 0, "the good release exited {code}:\n{out}");
    let before = selector(client, &ns, "web").await?;
    ensure!(
        before == web(Some("green")),
        "the Service selects {before:?}"
    );
    let serving = image(&deployment(client, &ns, "web-green").await?);

    let watch = Observer::start(client, &ns).await?;
    let (bad, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let (code, rid, out) = baton.release(&bad, true).await?;
    ensure!(
        code == 2,
        "baton release --wait of a failing image exited {code}:\n{out}"
    );
    let events = baton.events(rid).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        in_order(
            &types,
            &[
                DeployStepStarted,
                DeployStepReady,
                AnalysisStarted,
                AnalysisFailed,
                RollbackStarted,
                RollbackCompleted,
                ReleaseRolledBack,
            ]
        ),
        "{types:?}"
    );
    ensure!(
        position(&events, DeployStepStarted, 1).is_none(),
        "the switch step started: {types:?}"
    );
    // The Service never moved; the new colour (blue) is scaled to 0; green serves as before.
    ensure!(
        selector(client, &ns, "web").await? == before,
        "the Service's selector changed"
    );
    let seen = watch.seen();
    ensure!(
        seen.selectors.iter().all(|(_, s)| *s == before),
        "the Service's selector moved during the release: {:?}",
        seen.selectors
    );
    ensure!(
        selector_history(&events) == [before.clone()],
        "rollback.completed tells the selectors {:?}",
        selector_history(&events)
    );
    let blue = deployment(client, &ns, "web-blue").await?;
    ensure!(
        blue.spec.replicas == Some(0),
        "the new colour has {:?} replicas",
        blue.spec.replicas
    );
    let green = deployment(client, &ns, "web-green").await?;
    ensure!(
        image(&green) == serving && available(&green) == 2,
        "web-green: {} with {} available",
        image(&green),
        available(&green)
    );
    ensure!(
        seen.fewest_ready() >= 2,
        "fewer than 2 ready pods behind the Service at one point: {:?}",
        seen.ready
    );
    Ok(())
}

async fn a_release_that_fails_the_post_promotion_analysis_is_switched_back_at_once() -> Result<()> {
    // Each analysis lasts 10 s; the image fails 18 s after its pods start: after the
    // pre-promotion analysis (about 12 s), within the post-promotion one (to about 24 s).
    let (baton, client) =
        start("bg-post", "{duration: 10s, interval: 1s, failure_limit: 0}").await?;
    let result = post_promotion(&baton, &client).await;
    with_logs(&baton, result)
}

async fn post_promotion(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let v1 = baton.deployed_image().await?;
    let watch = Observer::start(client, &ns).await?;
    let (late, _) = baton
        .push("v2", &[("BATON_SIM_FAIL_AFTER_MS", "18000")])
        .await?;
    let (code, rid, out) = baton.release(&late, true).await?;
    let events = baton.events(rid).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        position(&events, AnalysisFailed, 0).is_none(),
        "the pre-promotion analysis failed already (the machine is slower than the timings \
         assume): {types:?}"
    );
    ensure!(code == 2, "baton release --wait exited {code}:\n{out}");
    let (passed, failed) = (
        position(&events, AnalysisPassed, 0).context("no pre-promotion verdict")?,
        position(&events, AnalysisFailed, 1).context("no failing post-promotion verdict")?,
    );
    ensure!(
        passed < failed
            && in_order(
                &types[failed..],
                &[RollbackStarted, RollbackCompleted, ReleaseRolledBack]
            ),
        "{types:?}"
    );
    // The events tell the selector's history: blue (adopted), green (the switch), blue again.
    let history = selector_history(&events);
    ensure!(
        colours(&history) == ["blue", "green", "blue"],
        "the events tell the selectors {history:?}"
    );
    ensure!(
        history.last() == Some(&web(Some("blue"))),
        "rollback.completed tells {history:?}"
    );
    ensure!(
        selector(client, &ns, "web").await? == web(Some("blue")),
        "the Service does not select blue again"
    );
    let seen = watch.seen();
    ensure!(
        seen.colours() == ["-", "blue", "green", "blue"],
        "the Service selected {:?}",
        seen.colours()
    );
    // At once: blue was still scaled, so the switch back needed no pod to start.
    let blue = seen.replicas_of("web-blue");
    ensure!(
        blue.iter().all(|(_, r)| *r == 2),
        "web-blue's replicas went {blue:?}"
    );
    ensure!(
        seen.fewest_ready() >= 2,
        "fewer than 2 ready pods behind the Service at one point: {:?}",
        seen.ready
    );
    blue_serves_again(client, &ns, &v1).await?;
    Ok(())
}

async fn a_deployer_killed_while_adopting_finishes_the_release_without_repeating_a_step_or_losing_ready_pods(
) -> Result<()> {
    let (mut baton, client) = start("bg-crash", QUICK_ANALYSIS).await?;
    let ns = baton.ns.name.clone();
    let watch = Observer::start(&client, &ns).await?;
    // Slow to start, so step 0 is still under way when the deployer dies.
    let (slow, _) = baton
        .push("v2", &[("BATON_SIM_STARTUP_MS", "6000")])
        .await?;
    let (_, rid, _) = baton.release(&slow, false).await?;
    baton.wait_for_event(rid, DeployStepStarted, LONG).await?;
    baton.restart_agent("deployer").await?;
    let events = baton.wait_for_end(rid, LONG).await;
    let result = async {
        let events = events?;
        let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
        ensure!(
            types.last() == Some(&ReleaseSucceeded),
            "the release ended with {types:?}"
        );
        let twice = repeated_steps(&events);
        ensure!(twice.is_empty(), "published twice: {twice:?}");
        ensure!(
            selector(&client, &ns, "web").await? == web(Some("green")),
            "the Service does not select green"
        );
        let plain = deployment(&client, &ns, "web").await?;
        ensure!(
            plain.spec.replicas == Some(0),
            "the adopted Deployment has {:?} replicas",
            plain.spec.replicas
        );
        let seen = watch.seen();
        ensure!(
            seen.fewest_ready() >= 2,
            "fewer than 2 ready pods behind the Service at one point: {:?}",
            seen.ready
        );
        Ok(())
    }
    .await;
    with_logs(&baton, result)
}

async fn the_old_colour_is_scaled_down_after_the_delay_even_when_the_deployer_restarted_during_it(
) -> Result<()> {
    // A delay long enough for the restart to happen within it.
    let delay_ms = 8_000;
    let (mut baton, client) = start_with_delay("bg-delay", QUICK_ANALYSIS, delay_ms).await?;
    let ns = baton.ns.name.clone();
    let watch = Observer::start(&client, &ns).await?;
    let (image_v2, _) = baton.push("v2", &[]).await?;
    let (code, rid, out) = baton.release(&image_v2, true).await?;
    ensure!(code == 0, "baton release --wait exited {code}:\n{out}");
    // The deployer that scheduled the scale-down (written on the old colour) dies with its timer.
    eventually(
        "the scale-down scheduled on web-blue",
        Duration::from_secs(30),
        || async {
            let blue = deployment(&client, &ns, "web-blue").await?;
            Ok(blue
                .metadata
                .annotations
                .is_some_and(|a| a.contains_key("baton.dev/scale-down-at"))
                .then_some(()))
        },
    )
    .await?;
    baton.restart_agent("deployer").await?;
    let restarted = now_ms();
    let result = async {
        let succeeded = baton
            .events(rid)
            .await?
            .iter()
            .find(|e| e.event_type == ReleaseSucceeded)
            .context("no release.succeeded")?
            .time_ms();
        ensure!(
            restarted < succeeded + delay_ms,
            "the restart took longer than the delay; the test proves nothing"
        );
        eventually("web-blue scaled to 0", Duration::from_secs(60), || async {
            let blue = deployment(&client, &ns, "web-blue").await?;
            Ok((blue.spec.replicas == Some(0)).then_some(()))
        })
        .await?;
        let blue = eventually(
            "the watch to see web-blue scaled to 0",
            Duration::from_secs(30),
            || {
                let blue = watch.seen().replicas_of("web-blue");
                async move { Ok(blue.iter().any(|(_, r)| *r == 0).then_some(blue)) }
            },
        )
        .await?;
        let (down, _) = *blue
            .iter()
            .find(|(_, r)| *r == 0)
            .context("the scale-down was not seen")?;
        ensure!(
            down >= succeeded + delay_ms,
            "web-blue was scaled down {} ms after release.succeeded, before the delay",
            down - succeeded
        );
        ensure!(
            selector(&client, &ns, "web").await? == web(Some("green")),
            "the Service does not select green"
        );
        Ok(())
    }
    .await;
    with_logs(&baton, result)
}

async fn a_release_of_an_app_without_a_service_fails_before_changing_anything() -> Result<()> {
    let (baton, client) = start("bg-nosvc", QUICK_ANALYSIS).await?;
    let ns = baton.ns.name.clone();
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("web", &Default::default())
        .await?;
    let before = deployment(&client, &ns, "web").await?;
    let (image_v2, _) = baton.push("v2", &[]).await?;
    let (code, rid, out) = baton.release(&image_v2, true).await?;
    let result = async {
        ensure!(code == 1, "baton release --wait exited {code}:\n{out}");
        let events = baton.events(rid).await?;
        let reason = baton_tests::first!(events, ReleaseFailed)?.reason;
        ensure!(
            reason.contains("needs a Service web"),
            "the reason does not say what is missing: {reason}"
        );
        only_the_plain_deployment_unchanged(&client, &ns, &before).await
    }
    .await;
    with_logs(&baton, result)
}

async fn a_manual_rollback_switches_the_service_back_to_the_other_colour_scaling_it_up_first(
) -> Result<()> {
    let (baton, client) = start("bg-manual", QUICK_ANALYSIS).await?;
    let result = manual_rollback(&baton, &client).await;
    with_logs(&baton, result)
}

async fn manual_rollback(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let v1 = baton.deployed_image().await?;
    let (image_v2, _) = baton.push("v2", &[]).await?;
    let (code, _, out) = baton.release(&image_v2, true).await?;
    ensure!(code == 0, "the release exited {code}:\n{out}");
    // After the delay, blue (v1) is scaled down: the rollback must bring it back first.
    eventually("web-blue scaled to 0", Duration::from_secs(60), || async {
        let blue = deployment(client, &ns, "web-blue").await?;
        Ok((blue.spec.replicas == Some(0)).then_some(()))
    })
    .await?;
    let watch = Observer::start(client, &ns).await?;
    let out = baton
        .baton(&[
            "rollback",
            "web",
            "--env",
            "test",
            "--wait",
            "--timeout",
            "3m",
            "--reason",
            "errors up",
        ])
        .await?;
    let text = out_text(&out);
    ensure!(
        out.status.success(),
        "baton rollback --wait failed:\n{text}"
    );
    let rid = text
        .split_whitespace()
        .find_map(|w| baton_core::names::ReleaseId::parse(w.trim_end_matches(':')).ok())
        .with_context(|| format!("no rollback id in the output: {text}"))?;

    ensure!(
        selector(client, &ns, "web").await? == web(Some("blue")),
        "the Service does not select blue again"
    );
    blue_serves_again(client, &ns, &v1).await?;
    // The plain Deployment, adopted, was never brought back.
    let plain = deployment(client, &ns, "web").await?;
    ensure!(
        plain.spec.replicas == Some(0),
        "the adopted Deployment has {:?} replicas",
        plain.spec.replicas
    );
    let events = baton.events(rid).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        in_order(
            &types,
            &[
                RollbackRequested,
                RollbackStarted,
                RollbackCompleted,
                ReleaseRolledBack
            ]
        ),
        "{types:?}"
    );
    ensure!(
        colours(&selector_history(&events)) == ["blue"],
        "rollback.completed tells the selectors {:?}",
        selector_history(&events)
    );
    let started = baton_tests::first!(events, RollbackStarted)?;
    ensure!(
        started.to_image == v1 && started.to_revision.ends_with("of web-blue"),
        "rollback.started: {started:?}"
    );
    // Blue was scaled up and available before the Service selected it.
    let seen = watch.seen();
    ensure!(
        seen.colours() == ["green", "blue"],
        "the Service selected {:?}",
        seen.colours()
    );
    ensure!(
        seen.fewest_ready() >= 2,
        "fewer than 2 ready pods behind the Service at one point: {:?}",
        seen.ready
    );
    ensure!(
        out_text(&baton.baton(&["logs", &rid.to_string()]).await?)
            .contains("the Service selects app=web,baton.dev/colour=blue"),
        "baton logs does not show the Service's selector"
    );

    // A rolling release would change the plain Deployment, which serves nobody: refused.
    let out = baton
        .baton(&[
            "release",
            "web",
            "--env",
            "test",
            "--image",
            &image_v2,
            "--strategy",
            "rolling",
            "--wait",
        ])
        .await?;
    let text = out_text(&out);
    ensure!(
        out.status.code() == Some(1) && text.contains("is released blue-green"),
        "a rolling release of a blue-green app: exit {:?}\n{text}",
        out.status.code()
    );
    ensure!(
        deployment(client, &ns, "web").await?.spec.replicas == Some(0),
        "the plain Deployment was changed"
    );
    Ok(())
}

async fn a_quota_without_room_for_a_second_colour_refuses_the_release_before_it_changes_anything(
) -> Result<()> {
    let (baton, client) = start("bg-quota", QUICK_ANALYSIS).await?;
    let ns = baton.ns.name.clone();
    // Room for a rolling update's surge (2 + 1 pods) but not for a second colour (2 + 2).
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "three-pods"},
        "spec": {"hard": {"pods": "3"}}
    }))?;
    let quotas = Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), &ns);
    quotas.create(&PostParams::default(), &quota).await?;
    eventually(
        "the quota to count the 2 pods",
        Duration::from_secs(60),
        || async {
            let q = quotas.get("three-pods").await?;
            let used = q
                .status
                .and_then(|s| s.used)
                .and_then(|u| u.get("pods").map(|q| q.0.clone()));
            Ok((used.as_deref() == Some("2")).then_some(()))
        },
    )
    .await?;
    let before = deployment(&client, &ns, "web").await?;
    let (image_v2, _) = baton.push("v2", &[]).await?;
    let (code, rid, out) = baton.release(&image_v2, true).await?;
    let result = async {
        ensure!(code == 1, "baton release --wait exited {code}:\n{out}");
        let events = baton.events(rid).await?;
        let reason = baton_tests::first!(events, DeployFailed)?.reason;
        ensure!(
            reason.contains("three-pods")
                && reason.contains("second colour of 2")
                && reason.contains("pods would be 4 of 3"),
            "the reason does not say what does not fit: {reason}"
        );
        ensure!(
            out.contains("second colour"),
            "the CLI does not show the reason:\n{out}"
        );
        ensure!(
            selector(&client, &ns, "web").await? == web(None),
            "the Service was changed"
        );
        only_the_plain_deployment_unchanged(&client, &ns, &before).await
    }
    .await;
    with_logs(&baton, result)
}

async fn with_manual_promotion_the_switch_waits_for_baton_promote_and_baton_abort_before_it_moves_nothing_but_the_new_colour(
) -> Result<()> {
    let (baton, client) = start_with(
        "bg-promote",
        QUICK_ANALYSIS,
        DELAY_MS,
        ", auto_promote: false",
    )
    .await?;
    let result = manual_promotion(&baton, &client).await;
    with_logs(&baton, result)
}

/// Releases without waiting; returns the id once the release is held before the switch, having
/// checked that nothing but the new colour moved.
async fn held_before_the_switch(
    baton: &Baton,
    client: &Client,
    image_ref: &str,
    active: &str,
    new: &str,
) -> Result<baton_core::names::ReleaseId> {
    let ns = &baton.ns.name;
    let (_, rid, _) = baton.release(image_ref, false).await?;
    baton.wait_for_event(rid, ReleasePaused, LONG).await?;
    let events = baton.events(rid).await?;
    let paused = baton_tests::first!(events, ReleasePaused)?;
    ensure!(
        paused.step == 0 && paused.gate,
        "release.paused: {paused:?}"
    );
    ensure!(
        position(&events, AnalysisPassed, 0).is_some()
            && position(&events, DeployStepStarted, 1).is_none(),
        "held at the wrong place: {:?}",
        events.iter().map(|e| e.event_type).collect::<Vec<_>>()
    );
    ensure!(
        selector(client, ns, "web").await? == web(Some(active)),
        "the Service was switched before the promotion"
    );
    ensure!(
        selector(client, ns, "web-preview").await? == web(Some(new)),
        "the preview Service does not select {new}"
    );
    let id = rid.to_string();
    let status = out_text(&baton.baton(&["status", &id]).await?);
    ensure!(
        status.contains(&format!(
            "waiting for a person to promote (baton promote {id})"
        )),
        "baton status does not say what it waits for:\n{status}"
    );
    Ok(rid)
}

async fn manual_promotion(baton: &Baton, client: &Client) -> Result<()> {
    let ns = baton.ns.name.clone();
    let v1 = baton.deployed_image().await?;

    // Held before the switch, then aborted: the new colour goes, nothing else moved.
    let (bad, _) = baton.push("v2", &[]).await?;
    let rid = held_before_the_switch(baton, client, &bad, "blue", "green").await?;
    let out = baton
        .baton(&["abort", &rid.to_string(), "--reason", "not today"])
        .await?;
    ensure!(out.status.success(), "baton abort:\n{}", out_text(&out));
    let events = baton.wait_for_end(rid, LONG).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        types.last() == Some(&ReleaseRolledBack),
        "the aborted release ended with {types:?}"
    );
    ensure!(
        selector(client, &ns, "web").await? == web(Some("blue")),
        "the Service does not select blue after the abort"
    );
    blue_serves_again(client, &ns, &v1).await?;

    // Held again, then promoted: the switch follows the promotion.
    let (good, digest) = baton.push("v3", &[]).await?;
    let rid = held_before_the_switch(baton, client, &good, "blue", "green").await?;
    let out = baton.baton(&["promote", &rid.to_string()]).await?;
    ensure!(out.status.success(), "baton promote:\n{}", out_text(&out));
    let events = baton.wait_for_end(rid, LONG).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        types.last() == Some(&ReleaseSucceeded),
        "the promoted release ended with {types:?}"
    );
    let promoted = events
        .iter()
        .position(|e| e.event_type == ReleasePromoteRequested)
        .context("no release.promote_requested")?;
    let switch = position(&events, DeployStepStarted, 1).context("no switch")?;
    ensure!(
        promoted < switch,
        "the switch started before the promotion: {types:?}"
    );
    ensure!(
        selector(client, &ns, "web").await? == web(Some("green")),
        "the Service does not select green after the promotion"
    );
    let green = deployment(client, &ns, "web-green").await?;
    ensure!(
        image(&green).ends_with(&digest),
        "web-green runs {}",
        image(&green)
    );
    Ok(())
}
