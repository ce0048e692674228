//! The sandbox's Kubernetes: a real control plane and Baton's simulated nodes behave as a
//! cluster does for the images pushed to the sandbox registry.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use libtest_mimic::Trial;

use baton_tests::cluster::{deployment, shared, TestNamespace};
use baton_tests::harness::trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_three_replica_deployment_becomes_available_and_each_pod_answers_on_its_own_ip,
        a_crash_looping_image_crash_loops_with_growing_restart_counts,
        an_image_missing_from_the_registry_fails_to_pull,
        a_slow_to_start_image_becomes_ready_only_after_its_delay,
    ]
}

use baton_tests::release::PORT;

/// Waits for the first pod state of `app` in `ns` that `check` accepts, watching (not polling).
async fn wait_pod<T>(
    pods: &Api<Pod>,
    app: &str,
    timeout: Duration,
    mut check: impl FnMut(&Pod) -> Option<T>,
) -> Result<T> {
    let config = watcher::Config::default().labels(&format!("app={app}"));
    let stream = watcher(pods.clone(), config).applied_objects();
    futures::pin_mut!(stream);
    tokio::time::timeout(timeout, async {
        while let Some(pod) = stream.try_next().await? {
            if let Some(v) = check(&pod) {
                return Ok(v);
            }
        }
        anyhow::bail!("pod watch ended")
    })
    .await
    .with_context(|| format!("no pod of {app} reached the expected state within {timeout:?}"))?
}

fn container_waiting_reason(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(0)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn a_three_replica_deployment_becomes_available_and_each_pod_answers_on_its_own_ip(
) -> Result<()> {
    let cluster = shared()?;
    let ns = TestNamespace::create(&cluster, "sb-avail").await?;
    let image = format!("{}/{}:v1", cluster.registry, ns.name);
    cluster
        .registry()?
        .push_image(&ns.name, "v1", &[("BATON_SIM_HEALTH".into(), "ok".into())])
        .await?;
    let client = cluster.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", &image, 3, PORT, &[]),
        )
        .await?;

    let available = kube::runtime::wait::await_condition(
        deployments.clone(),
        "web",
        |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref())
                .and_then(|s| s.available_replicas)
                == Some(3)
        },
    );
    tokio::time::timeout(Duration::from_secs(120), available)
        .await
        .context("the Deployment never had 3 available replicas")??;

    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    ensure!(list.items.len() == 3, "{} pods", list.items.len());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let mut ips = std::collections::BTreeSet::new();
    for pod in &list.items {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .context("pod without an IP")?;
        ensure!(ip.starts_with("127."), "pod IP {ip} is not on loopback");
        ensure!(ips.insert(ip.clone()), "two pods share the IP {ip}");
        let version = http
            .get(format!("http://{ip}:{PORT}/version"))
            .send()
            .await?
            .text()
            .await?;
        ensure!(
            version.trim() == image,
            "pod at {ip} reports {version:?}, not {image}"
        );
        let health = http
            .get(format!("http://{ip}:{PORT}/health"))
            .send()
            .await?;
        ensure!(
            health.status() == 200,
            "pod at {ip}: /health answered {}",
            health.status()
        );
        let metrics = http
            .get(format!("http://{ip}:{PORT}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        ensure!(
            metrics.contains("http_requests_total{code=\"200\"}"),
            "pod at {ip}: metrics are {metrics:?}"
        );
    }
    Ok(())
}

async fn a_crash_looping_image_crash_loops_with_growing_restart_counts() -> Result<()> {
    let cluster = shared()?;
    let ns = TestNamespace::create(&cluster, "sb-crash").await?;
    cluster
        .registry()?
        .push_image(&ns.name, "v1", &[("BATON_SIM_CRASH".into(), "1".into())])
        .await?;
    let client = cluster.client().await?;
    let image = format!("{}/{}:v1", cluster.registry, ns.name);
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &deployment("crash", &image, 1, PORT, &[]),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let mut seen = Vec::new();
    let mut backoff_seen = false;
    wait_pod(&pods, "crash", Duration::from_secs(120), |pod| {
        let count = restart_count(pod);
        if seen.last() != Some(&count) {
            seen.push(count);
        }
        backoff_seen |= container_waiting_reason(pod).as_deref() == Some("CrashLoopBackOff");
        ensure_never_ready(pod);
        (count >= 3 && backoff_seen).then_some(())
    })
    .await?;
    ensure!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "restart counts did not grow: {seen:?}"
    );
    Ok(())
}

fn ensure_never_ready(pod: &Pod) {
    assert!(!is_ready(pod), "a crash-looping pod was reported ready");
}

async fn an_image_missing_from_the_registry_fails_to_pull() -> Result<()> {
    let cluster = shared()?;
    let ns = TestNamespace::create(&cluster, "sb-pull").await?;
    let client = cluster.client().await?;
    let image = format!("{}/{}-absent:v1", cluster.registry, ns.name);
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &deployment("absent", &image, 1, PORT, &[]),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let mut reasons = std::collections::BTreeSet::new();
    wait_pod(&pods, "absent", Duration::from_secs(60), |pod| {
        if let Some(r) = container_waiting_reason(pod) {
            reasons.insert(r);
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        assert_ne!(phase, "Running", "a pod whose image is absent is running");
        (reasons.contains("ErrImagePull") && reasons.contains("ImagePullBackOff")).then_some(())
    })
    .await?;
    Ok(())
}

async fn a_slow_to_start_image_becomes_ready_only_after_its_delay() -> Result<()> {
    let cluster = shared()?;
    let ns = TestNamespace::create(&cluster, "sb-slow").await?;
    cluster
        .registry()?
        .push_image(
            &ns.name,
            "v1",
            &[("BATON_SIM_STARTUP_MS".into(), "4000".into())],
        )
        .await?;
    let client = cluster.client().await?;
    let image = format!("{}/{}:v1", cluster.registry, ns.name);
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &deployment("slow", &image, 1, PORT, &[]),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    // First it runs without being ready…
    wait_pod(&pods, "slow", Duration::from_secs(60), |pod| {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        (running && !is_ready(pod)).then_some(())
    })
    .await
    .context("the pod was never running-but-not-ready")?;
    // …then it becomes ready, and the pod's own timestamps show the delay.
    let (started, ready) = wait_pod(&pods, "slow", Duration::from_secs(60), |pod| {
        if !is_ready(pod) {
            return None;
        }
        let status = pod.status.as_ref()?;
        let started = status
            .container_statuses
            .as_ref()?
            .first()?
            .state
            .as_ref()?
            .running
            .as_ref()?
            .started_at
            .clone()?;
        let ready = status
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")?
            .last_transition_time
            .clone()?;
        Some((started.0, ready.0))
    })
    .await?;
    let delay = ready.duration_since(started);
    // Timestamps have one-second resolution.
    ensure!(
        delay.as_secs() >= 3,
        "ready {delay:?} after start; the image asks for 4s"
    );
    let _ = futures::stream::iter([()]).next().await;
    Ok(())
}
