//! The Kubernetes control plane of the sandbox, and the environment it hands to agents.

use std::collections::BTreeMap;

use baton_sandbox::{Sandbox, SandboxOptions};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::Api;

#[tokio::test]
async fn sandbox_runs_a_pod_from_its_registry_on_a_simulated_node() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let client = sandbox.kube_client().unwrap();

    let pods: Api<Pod> = Api::all(client.clone());
    pods.list(&ListParams::default()).await.unwrap();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": "sandbox-test" },
    }))
    .unwrap();
    namespaces
        .patch(
            "sandbox-test",
            &PatchParams::apply("baton-sandbox-test").force(),
            &Patch::Apply(&namespace),
        )
        .await
        .unwrap();
    assert!(namespaces.get_opt("sandbox-test").await.unwrap().is_some());
    namespaces
        .delete("sandbox-test", &DeleteParams::default())
        .await
        .unwrap();
    // The namespace controller of kube-controller-manager finalizes the deletion.
    let gone = tokio::time::timeout(Duration::from_secs(60), async {
        while namespaces.get_opt("sandbox-test").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "namespace sandbox-test was never deleted");

    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );

    let registry = sandbox.registry_client().unwrap();
    let digest = registry.push_image("sandbox/web", "v1", &[]).await.unwrap();
    let image = registry.reference("sandbox/web", "v1");
    assert_eq!(
        registry.inspect(&image).await.unwrap().unwrap().digest,
        digest
    );

    // The `default` namespace's service account has its token, so the pod is admitted at once.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "web" },
        "spec": { "containers": [{ "name": "web", "image": image }] },
    }))
    .unwrap();
    pods.patch(
        "web",
        &PatchParams::apply("baton-sandbox-test"),
        &Patch::Apply(&pod),
    )
    .await
    .unwrap();
    let running = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let pod = pods.get("web").await.unwrap();
            let status = pod.status.unwrap_or_default();
            if status.phase.as_deref() == Some("Running") && status.pod_ip.is_some() {
                return pod.spec.unwrap().node_name.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("pod web never ran");
    assert!(running.starts_with("baton-node-"), "{running}");

    let env_file = sandbox.dir().join("sandbox.env");
    sandbox.write_env_file(&env_file).unwrap();
    let env: BTreeMap<String, String> = std::fs::read_to_string(&env_file)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(env["NATS_URL"], sandbox.nats().url());
    assert_eq!(env["BATON_REGISTRY"], registry.host());
    let kubeconfig = std::path::PathBuf::from(&env["KUBECONFIG"]);
    // What an agent does with KUBECONFIG.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    pods.list(&ListParams::default()).await.unwrap();
    sandbox.shutdown().await;
}
