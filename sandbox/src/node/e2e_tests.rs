//! The simulator against a real control plane and registry: it needs the
//! kube binaries (scripts/setup.sh builds them) and starts a whole control plane of its own.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use super::{NodeOptions, NodeSimulator};
use crate::{Sandbox, SandboxOptions};

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pod_spec(image: &str, probe: bool) -> serde_json::Value {
    let mut container = json!({
        "name": "app",
        "image": image,
        "ports": [{ "name": "http", "containerPort": 8080 }],
        "env": [{ "name": "FROM_POD", "value": "1" }],
    });
    if probe {
        container["readinessProbe"] = json!({
            "httpGet": { "path": "/health", "port": "http" },
            "periodSeconds": 1,
            "failureThreshold": 1,
        });
    }
    json!({ "containers": [container], "terminationGracePeriodSeconds": 30 })
}

async fn create_pod(pods: &Api<Pod>, name: &str, image: &str, probe: bool) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": pod_spec(image, probe),
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
}

fn container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn waiting_reason(pod: &Pod) -> Option<String> {
    container_status(pod)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

#[tokio::test]
async fn simulated_nodes_run_deployments_and_report_status_like_a_kubelet() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("baton_sandbox=debug,kube=warn")
        .with_test_writer()
        .try_init();
    let sandbox = Sandbox::start(SandboxOptions {
        nodes: 0,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let registry = sandbox.registry_client().expect("registry");
    let client = sandbox.kube_client().expect("client");
    let host = registry.host().to_string();
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    registry
        .push_image("web", "v1", &env(&[("BATON_SIM_HEALTH", "ok")]))
        .await
        .expect("push");
    registry
        .push_image("web", "crash", &env(&[("BATON_SIM_CRASH", "1")]))
        .await
        .expect("push");
    registry
        .push_image("web", "sick", &env(&[("BATON_SIM_HEALTH", "fail")]))
        .await
        .expect("push");
    registry
        .push_image("web", "bad", &env(&[("BATON_SIM_HEALTH", "meh")]))
        .await
        .expect("push");

    let opts = NodeOptions::default();
    let sim = NodeSimulator::start(client.clone(), registry.clone(), opts)
        .await
        .expect("nodes");
    let nodes: Api<Node> = Api::all(client.clone());
    for name in sim.node_names() {
        let node = nodes.get(&name).await.expect("node");
        assert!(
            node.spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .is_empty(),
            "{name} tainted"
        );
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": "sim-e2e" } })).expect("ns");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "sim-e2e");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "sim-e2e");

    // A Deployment of 3 healthy replicas becomes available, each pod on its own address.
    let image = format!("{host}/web:v1");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "web" } },
            "template": { "metadata": { "labels": { "app": "web" } }, "spec": pod_spec(&image, true) },
        },
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    eventually("3 ready replicas", Duration::from_secs(60), || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.ready_replicas? == 3).then_some(())
    })
    .await;
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("pods");
    assert_eq!(list.items.len(), 3);
    let http = reqwest::Client::builder().no_proxy().build().expect("http");
    for pod in &list.items {
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ip = status.pod_ip.clone().expect("pod ip");
        let version = http
            .get(format!("http://{ip}:8080/version"))
            .send()
            .await
            .expect("get");
        assert_eq!(version.text().await.expect("body"), image);
        let cs = container_status(pod).expect("container status");
        assert!(
            cs.ready && cs.image_id.starts_with("docker-pullable://"),
            "{cs:?}"
        );
    }

    // Scaling down finishes the graceful deletions: no pod hangs in Terminating.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 1 } })),
        )
        .await
        .expect("scale");
    eventually("1 pod left", Duration::from_secs(30), || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (list.items.len() == 1).then_some(())
    })
    .await;

    // An image missing from the registry fails to pull, then backs off.
    create_pod(&pods, "missing", &format!("{host}/web:nope"), false).await;
    eventually("ErrImagePull", Duration::from_secs(20), || async {
        let pod = pods.get("missing").await.ok()?;
        (waiting_reason(&pod)? == "ErrImagePull").then_some(())
    })
    .await;
    eventually("ImagePullBackOff", Duration::from_secs(20), || async {
        let pod = pods.get("missing").await.ok()?;
        (waiting_reason(&pod)? == "ImagePullBackOff").then_some(())
    })
    .await;
    let pod = pods.get("missing").await.expect("pod");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));

    // A crash-looping app restarts with back-off and is never ready.
    create_pod(&pods, "crasher", &format!("{host}/web:crash"), false).await;
    let crashed = eventually(
        "2 restarts and CrashLoopBackOff",
        Duration::from_secs(30),
        || async {
            let pod = pods.get("crasher").await.ok()?;
            let cs = container_status(&pod)?;
            (cs.restart_count >= 2 && waiting_reason(&pod)? == "CrashLoopBackOff").then_some(pod)
        },
    )
    .await;
    let cs = container_status(&crashed).expect("status");
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("last state");
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
    assert!(!cs.ready);
    assert_eq!(
        crashed.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );

    // Failing health with a readiness probe: running, never ready.
    create_pod(&pods, "sick", &format!("{host}/web:sick"), true).await;
    let sick = eventually("sick pod running", Duration::from_secs(20), || async {
        let pod = pods.get("sick").await.ok()?;
        (container_status(&pod)?.started == Some(true)).then_some(pod)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sick = pods.get("sick").await.unwrap_or(sick);
    assert!(!container_status(&sick).expect("status").ready);
    let ip = sick.status.and_then(|s| s.pod_ip).expect("ip");
    let health = http
        .get(format!("http://{ip}:8080/health"))
        .send()
        .await
        .expect("get");
    assert_eq!(health.status().as_u16(), 500);
    let metrics = http
        .get(format!("http://{ip}:8080/metrics"))
        .send()
        .await
        .expect("get");
    let metrics = metrics.text().await.expect("metrics");
    assert!(
        metrics.contains("http_requests_total{code=\"500\"}"),
        "{metrics}"
    );

    // An invalid behaviour value is a config error, not a panic.
    create_pod(&pods, "broken", &format!("{host}/web:bad"), false).await;
    eventually(
        "CreateContainerConfigError",
        Duration::from_secs(20),
        || async {
            let pod = pods.get("broken").await.ok()?;
            (waiting_reason(&pod)? == "CreateContainerConfigError").then_some(())
        },
    )
    .await;

    // Plain pod deletion is finished by the node too.
    for name in ["missing", "crasher", "sick", "broken"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    eventually("pods gone", Duration::from_secs(30), || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        (list.items.len() == 1).then_some(())
    })
    .await;

    // Shutting the simulator down stops the pods' servers.
    let list = pods.list(&ListParams::default()).await.expect("pods");
    let ip = list.items[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("ip");
    let url = format!("http://{ip}:8080/health");
    assert!(http.get(&url).send().await.is_ok());
    sim.shutdown().await;
    assert!(http.get(&url).send().await.is_err(), "{url} still answers");
    sandbox.shutdown().await;
}
