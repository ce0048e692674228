//! Node objects: registration, the Ready condition, and clearing the not-ready taint that
//! admission puts on every new node (the node lifecycle controller, which would normally lift
//! it, is off in the sandbox).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{call_api, now_time, NodeError, Result};

/// Taints that mean "this node isn't working" and that a healthy kubelet's node sheds.
const NOT_READY_TAINTS: [&str; 3] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/network-unavailable",
];

pub(super) const KUBELET_VERSION: &str = "v1.20.2";

/// Creates (or takes over) node `name`, reports it Ready and removes the not-ready taint, then
/// checks the API server agrees.
/// `since` is when the nodes became Ready (the condition's lastTransitionTime).
pub(super) async fn register(
    api: &Api<Node>,
    name: &str,
    since: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let node: Node =
        serde_json::from_value(node_object(name)).map_err(|e| NodeError::NotReady {
            name: name.to_string(),
            reason: format!("building the node object: {e}"),
        })?;
    let post = PostParams::default();
    let params = PatchParams::default();
    match call_api("create node", name, cancel, || api.create(&post, &node)).await {
        Ok(_) => tracing::debug!(node = name, "created node"),
        Err(NodeError::Kube {
            source: kube::Error::Api(status),
            ..
        }) if status.is_already_exists() => {
            let labels = Patch::Merge(
                json!({ "metadata": { "labels": node_object(name)["metadata"]["labels"] } }),
            );
            call_api("label node", name, cancel, || {
                api.patch(name, &params, &labels)
            })
            .await?;
            tracing::debug!(node = name, "took over existing node");
        }
        Err(error) => return Err(error),
    }

    report_ready(api, name, since, cancel).await?;
    clear_not_ready_taints(api, name, cancel).await?;

    let node = call_api("get node", name, cancel, || api.get(name)).await?;
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = not_ready_taints(&node).next().is_some();
    if !ready || tainted {
        return Err(NodeError::NotReady {
            name: name.to_string(),
            reason: format!("ready={ready}, not-ready taint present={tainted}"),
        });
    }
    Ok(())
}

/// Refreshes every node's Ready condition until cancelled.
pub(super) async fn heartbeat(
    api: Api<Node>,
    names: Vec<String>,
    since: String,
    period: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        for name in &names {
            if let Err(error) = report_ready(&api, name, &since, &cancel).await {
                if !cancel.is_cancelled() {
                    tracing::warn!(node = %name, %error, "node heartbeat failed");
                }
            }
        }
    }
}

async fn report_ready(
    api: &Api<Node>,
    name: &str,
    since: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let status = Patch::Merge(node_status(name, since, &now_time()));
    let params = PatchParams::default();
    call_api("report status of node", name, cancel, || {
        api.patch_status(name, &params, &status)
    })
    .await
    .map(drop)
}

async fn clear_not_ready_taints(
    api: &Api<Node>,
    name: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    // Read-modify-write guarded by resourceVersion; a conflict is retried with a fresh read.
    call_api("clear taints of node", name, cancel, || async {
        let node = api.get(name).await?;
        if not_ready_taints(&node).next().is_none() {
            return Ok(());
        }
        let keep: Vec<&Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter(|t| !NOT_READY_TAINTS.contains(&t.key.as_str()))
            .collect();
        let patch = json!({
            "metadata": { "resourceVersion": node.metadata.resource_version },
            "spec": { "taints": if keep.is_empty() { Value::Null } else { json!(keep) } },
        });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    })
    .await
}

fn not_ready_taints(node: &Node) -> impl Iterator<Item = &Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| NOT_READY_TAINTS.contains(&t.key.as_str()))
}

fn node_object(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": "amd64",
                "node.baton.dev/simulated": "true",
            },
        },
        "spec": {},
    })
}

/// The status a healthy kubelet posts. `since` is when the node became Ready.
fn node_status(name: &str, since: &str, now: &str) -> Value {
    let resources = json!({
        "cpu": "8",
        "memory": "32Gi",
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        })
    };
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "baton simulated kubelet is posting ready status"),
            ],
            "addresses": [
                { "type": "InternalIP", "address": "127.0.0.1" },
                { "type": "Hostname", "address": name },
            ],
            "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "Baton simulated node",
                "containerRuntimeVersion": "baton-sim://0.1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_status_parses_as_a_ready_node() {
        let value = node_status("n-0", "2024-01-01T00:00:00Z", "2024-01-01T00:00:10Z");
        let mut node: Node = serde_json::from_value(node_object("n-0")).expect("node");
        node.status = serde_json::from_value(value["status"].clone()).expect("status");
        let status = node.status.expect("status");
        let ready = status
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Ready");
        assert_eq!(ready.map(|c| c.status), Some("True".to_string()));
        assert_eq!(
            status.node_info.expect("info").kubelet_version,
            KUBELET_VERSION
        );
        assert_eq!(status.allocatable.expect("allocatable")["pods"].0, "110");
    }

    #[test]
    fn only_not_ready_taints_are_cleared() {
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": "n" },
            "spec": { "taints": [
                { "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" },
                { "key": "dedicated", "value": "x", "effect": "NoSchedule" },
            ]},
        }))
        .expect("node");
        let keys: Vec<&str> = not_ready_taints(&node).map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["node.kubernetes.io/not-ready"]);
    }
}
