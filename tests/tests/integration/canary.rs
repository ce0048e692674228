//! Canary releases end to end: steps of weight with an analysis of the canary pods each, then
//! promotion — or, on a failing verdict, the canary removed and the stable Deployment untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType::{self, *};
use baton_core::fold::{fold, Status};
use baton_proto::v1::envelope::Payload;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::PostParams;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use libtest_mimic::Trial;
use tokio::sync::oneshot;

use baton_tests::harness::trial;
use baton_tests::release::{app_config, repeated, Baton};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_healthy_canary_passes_every_step_and_is_promoted_without_losing_available_pods,
        a_canary_whose_image_fails_health_is_rolled_back_at_its_first_step,
        a_canary_that_starts_failing_later_is_caught_at_a_later_step,
        with_an_ingress_the_canary_ingress_weight_follows_each_step,
        a_deployer_killed_between_two_canary_steps_resumes_at_its_step,
    ]
}

const LONG: Duration = Duration::from_secs(180);

fn canary_settings(steps: &str, extra: &str) -> String {
    format!("strategy: canary\ncanary: {{steps: {steps}}}\nanalysis: {{duration: 2s, interval: 1s, failure_limit: 0}}\n{extra}")
}

/// Watches the stable Deployment until told to stop; returns the lowest `available - desired`
/// seen and how many states were seen.
fn watch_stable(
    baton: &Baton,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(i32, usize)>>,
) {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let cluster = baton.cluster.clone();
    let ns = baton.ns.name.clone();
    let task = tokio::spawn(async move {
        let client = cluster.client().await?;
        let api: Api<Deployment> = Api::namespaced(client, &ns);
        let stream =
            watcher(api, watcher::Config::default().fields("metadata.name=web")).applied_objects();
        futures::pin_mut!(stream);
        let (mut lowest, mut seen) = (i32::MAX, 0);
        loop {
            tokio::select! {
                _ = &mut stopped => return Ok((lowest, seen)),
                next = stream.try_next() => {
                    let Some(d) = next? else { return Ok((lowest, seen)) };
                    let desired = d.spec.replicas.unwrap_or(1);
                    let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
                    lowest = lowest.min(available - desired);
                    seen += 1;
                }
            }
        }
    });
    (stop, task)
}

async fn canary_exists(baton: &Baton) -> Result<bool> {
    let client = baton.cluster.client().await?;
    Ok(Api::<Deployment>::namespaced(client, &baton.ns.name)
        .get_opt("web-canary")
        .await?
        .is_some())
}

fn step_weights(events: &[baton_core::event::Event], t: EventType) -> Vec<(u32, u32)> {
    events
        .iter()
        .filter(|e| e.event_type == t)
        .filter_map(|e| match e.payload() {
            Some(Payload::DeployStepStarted(s)) => Some((s.step, s.weight)),
            Some(Payload::DeployStepReady(s)) => Some((s.step, s.weight)),
            _ => None,
        })
        .collect()
}

async fn a_healthy_canary_passes_every_step_and_is_promoted_without_losing_available_pods(
) -> Result<()> {
    let baton = Baton::start("cn-ok").await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &canary_settings("[{weight: 25}, {weight: 50}, {weight: 100}]", ""),
        ))
        .await?;
    let (image, digest) = baton.push("v2", &[]).await?;
    let (stop, watch) = watch_stable(&baton);
    let (code, rid, out) = baton.release(&image, true).await?;
    let _ = stop.send(());
    let (lowest, seen) = watch.await??;
    ensure!(code == 0, "the canary release exited {code}:\n{out}");
    let events = baton.events(rid).await?;
    ensure!(
        step_weights(&events, DeployStepStarted) == [(0, 25), (1, 50), (2, 100)],
        "{:?}",
        step_weights(&events, DeployStepStarted)
    );
    let passed = events
        .iter()
        .filter(|e| e.event_type == AnalysisPassed)
        .count();
    ensure!(passed == 3, "{passed} analyses passed");
    ensure!(
        repeated(&events).iter().all(|t| matches!(
            t,
            DeployStepStarted | DeployStepReady | AnalysisStarted | AnalysisPassed
        )),
        "{:?}",
        repeated(&events)
    );
    let expected = format!("{}/{}@{digest}", baton.cluster.registry, baton.repo);
    ensure!(
        baton.deployed_image().await? == expected,
        "the stable Deployment does not run the canary's digest"
    );
    ensure!(
        !canary_exists(&baton).await?,
        "the canary Deployment is still there"
    );
    ensure!(
        seen > 0 && lowest >= 0,
        "the stable Deployment's available replicas fell {} below desired",
        -lowest
    );
    Ok(())
}

async fn a_canary_whose_image_fails_health_is_rolled_back_at_its_first_step() -> Result<()> {
    let baton = Baton::start("cn-fail").await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &canary_settings("[{weight: 25}, {weight: 50}, {weight: 100}]", ""),
        ))
        .await?;
    let before = baton.deployment().await?;
    let (bad, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let (code, rid, out) = baton.release(&bad, true).await?;
    ensure!(code == 2, "exit {code}:\n{out}");
    let events = baton.events(rid).await?;
    ensure!(
        step_weights(&events, DeployStepStarted) == [(0, 25)],
        "went past the first step: {:?}",
        step_weights(&events, DeployStepStarted)
    );
    ensure!(fold(&events).status() == Status::RolledBack);
    let after = baton.deployment().await?;
    ensure!(
        serde_json::to_value(&after.spec.template)? == serde_json::to_value(&before.spec.template)?,
        "the stable Deployment's template changed"
    );
    ensure!(
        after.spec.replicas == before.spec.replicas,
        "the stable replica count changed"
    );
    ensure!(
        after.metadata.generation == before.metadata.generation,
        "the stable Deployment was changed"
    );
    ensure!(
        !canary_exists(&baton).await?,
        "the canary Deployment is still there"
    );
    Ok(())
}

async fn a_canary_that_starts_failing_later_is_caught_at_a_later_step() -> Result<()> {
    let baton = Baton::start("cn-late").await?;
    let steps = "[{weight: 10}, {weight: 25}, {weight: 50}, {weight: 75}, {weight: 100}]";
    baton
        .apply_config(&app_config(&baton.ns.name, &canary_settings(steps, "")))
        .await?;
    // Healthy for its first seconds (the first step's analysis), failing after.
    let (late, _) = baton
        .push("v2", &[("BATON_SIM_FAIL_AFTER_MS", "5000")])
        .await?;
    let (code, rid, out) = baton.release(&late, true).await?;
    ensure!(code == 2, "exit {code}:\n{out}");
    let events = baton.events(rid).await?;
    let failed_step = events
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::AnalysisFailed(a)) => Some(a.step),
            _ => None,
        })
        .context("no analysis failed")?;
    ensure!(failed_step > 0, "caught at the first step, not later");
    ensure!(
        events
            .iter()
            .any(|e| matches!(e.payload(), Some(Payload::AnalysisPassed(a)) if a.step == 0)),
        "the first step did not pass"
    );
    ensure!(
        !step_weights(&events, DeployStepStarted)
            .iter()
            .any(|(_, w)| *w == 100),
        "the failing canary was promoted"
    );
    ensure!(
        !canary_exists(&baton).await?,
        "the canary Deployment is still there"
    );
    Ok(())
}

async fn with_an_ingress_the_canary_ingress_weight_follows_each_step() -> Result<()> {
    let baton = Baton::start("cn-ing").await?;
    let client = baton.cluster.client().await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), &baton.ns.name)
        .create(&PostParams::default(), &service)
        .await?;
    let ingress: Ingress = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"rules": [{"host": "web.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]}
    }))?;
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &baton.ns.name);
    ingresses.create(&PostParams::default(), &ingress).await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &canary_settings(
                "[{weight: 20}, {weight: 60}, {weight: 100}]",
                "ingress: web",
            ),
        ))
        .await?;

    // Every weight the canary Ingress carries, as it changes.
    let (stop, mut stopped) = oneshot::channel::<()>();
    let watch = tokio::spawn(async move {
        let stream = watcher(
            ingresses,
            watcher::Config::default().fields("metadata.name=web-canary"),
        )
        .applied_objects();
        futures::pin_mut!(stream);
        let mut weights: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => return Ok::<_, anyhow::Error>(weights),
                next = stream.next() => {
                    let Some(Ok(i)) = next else { continue };
                    let ann: BTreeMap<String, String> = i.metadata.annotations.unwrap_or_default();
                    ensure!(ann.get("nginx.ingress.kubernetes.io/canary").map(String::as_str) == Some("true"), "not a canary Ingress");
                    if let Some(w) = ann.get("nginx.ingress.kubernetes.io/canary-weight") {
                        if weights.last() != Some(w) {
                            weights.push(w.clone());
                        }
                    }
                }
            }
        }
    });
    let (image, _) = baton.push("v2", &[]).await?;
    let (code, rid, out) = baton.release(&image, true).await?;
    let _ = stop.send(());
    let weights = watch.await??;
    ensure!(code == 0, "exit {code}:\n{out}");
    ensure!(
        weights == ["20", "60"],
        "the canary Ingress carried weights {weights:?}"
    );
    // Each step's ready event matches the Ingress's weight then, and the canary objects are gone.
    ensure!(
        step_weights(&baton.events(rid).await?, DeployStepReady) == [(0, 20), (1, 60), (2, 100)]
    );
    let gone = Api::<Ingress>::namespaced(client.clone(), &baton.ns.name)
        .get_opt("web-canary")
        .await?;
    ensure!(gone.is_none(), "the canary Ingress is still there");
    ensure!(
        Api::<Service>::namespaced(client, &baton.ns.name)
            .get_opt("web-canary")
            .await?
            .is_none(),
        "the canary Service is still there"
    );
    Ok(())
}

async fn a_deployer_killed_between_two_canary_steps_resumes_at_its_step() -> Result<()> {
    let mut baton = Baton::start("cn-kill").await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &canary_settings("[{weight: 25, pause: 8s}, {weight: 50}, {weight: 100}]", ""),
        ))
        .await?;
    let (image, _) = baton.push("v2", &[]).await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    // Between step 0 and step 1: step 0 passed and the timed pause began.
    baton.wait_for_event(rid, ReleasePaused, LONG).await?;
    baton.restart_agent("deployer").await?;
    let events = baton.wait_for_end(rid, LONG).await?;
    let state = fold(&events);
    ensure!(
        state.status() == Status::Succeeded,
        "ended {:?}: {:?}",
        state.status(),
        state.terminal_reason
    );
    let started = step_weights(&events, DeployStepStarted);
    ensure!(
        started == [(0, 25), (1, 50), (2, 100)],
        "steps started: {started:?}"
    );
    ensure!(
        repeated(&events).iter().all(|t| matches!(
            t,
            DeployStepStarted | DeployStepReady | AnalysisStarted | AnalysisPassed
        )),
        "{:?}",
        repeated(&events)
    );
    let paused = events
        .iter()
        .filter(|e| e.event_type == ReleasePaused)
        .count();
    let resumed = events
        .iter()
        .filter(|e| e.event_type == ReleaseResumed)
        .count();
    ensure!(
        paused == 1 && resumed == 1,
        "{paused} pauses, {resumed} resumes"
    );
    ensure!(
        !canary_exists(&baton).await?,
        "the canary Deployment is still there"
    );
    Ok(())
}
