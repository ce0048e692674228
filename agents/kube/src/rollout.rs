//! Following a Deployment's rollout like `kubectl rollout status`, but failing fast: new pods
//! that crash-loop, cannot pull their image, or stay unready past the step timeout end the wait
//! at once instead of after the progress deadline.
//!
//! [`assess`] is the pure judgement over a snapshot (no I/O, table-tested); [`wait`] feeds it
//! snapshots whenever the Deployment, its ReplicaSets or its pods change.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use baton_proto::v1::{FailureKind, PodRef};

/// The revision annotation the Deployment controller keeps on Deployments and ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The one field manager of Baton's changes to workloads (server-side apply).
pub const FIELD_MANAGER: &str = "baton";
/// The annotation naming the release that made a template.
pub const RELEASE_ANNOTATION: &str = "baton.dev/release-id";

/// Why a rollout cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: FailureKind,
    pub reason: String,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq)]
pub enum Rollout {
    Progressing(String),
    /// Every replica runs the new template and is available.
    Complete {
        revision: String,
        pods: Vec<PodRef>,
    },
    Failed(Problem),
}

/// A point-in-time view of a Deployment and what belongs to it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub deployment: Option<Deployment>,
    pub replica_sets: Vec<ReplicaSet>,
    pub pods: Vec<Pod>,
}

fn revision_of(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.annotations.as_ref()?.get(REVISION).map(String::as_str)
}

/// The ReplicaSet of the Deployment's current template (same revision), if the controller made it.
pub fn current_replica_set<'a>(
    deployment: &Deployment,
    sets: &'a [ReplicaSet],
) -> Option<&'a ReplicaSet> {
    replica_set_of_revision(deployment, sets, revision_of(&deployment.metadata)?)
}

/// The ReplicaSets the Deployment owns.
fn owned<'a>(
    deployment: &Deployment,
    sets: &'a [ReplicaSet],
) -> impl Iterator<Item = &'a ReplicaSet> + 'a {
    let uid = deployment.metadata.uid.clone().unwrap_or_default();
    sets.iter().filter(move |rs| {
        rs.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| !uid.is_empty() && o.uid == uid)
    })
}

/// The ReplicaSet of a given revision.
pub fn replica_set_of_revision<'a>(
    deployment: &Deployment,
    sets: &'a [ReplicaSet],
    revision: &str,
) -> Option<&'a ReplicaSet> {
    owned(deployment, sets).find(|rs| revision_of(&rs.metadata) == Some(revision))
}

/// The highest revision below `below` among the Deployment's ReplicaSets: what `rollout undo` restores.
pub fn previous_replica_set<'a>(
    deployment: &Deployment,
    sets: &'a [ReplicaSet],
    below: u64,
) -> Option<&'a ReplicaSet> {
    owned(deployment, sets)
        .filter_map(|rs| {
            revision_of(&rs.metadata)
                .and_then(|r| r.parse::<u64>().ok())
                .map(|r| (r, rs))
        })
        .filter(|(r, _)| *r < below)
        .max_by_key(|(r, _)| *r)
        .map(|(_, rs)| rs)
}

fn pods_of<'a>(rs: &ReplicaSet, pods: &'a [Pod]) -> Vec<&'a Pod> {
    let Some(uid) = rs.metadata.uid.as_deref() else {
        return Vec::new();
    };
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .collect()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

/// What is wrong with a new pod, if anything is for certain (no waiting for a deadline).
fn pod_problem(pod: &Pod) -> Option<Problem> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    for c in statuses {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        let reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or("");
        let message = waiting.and_then(|w| w.message.as_deref()).unwrap_or("");
        let crashed_before = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some();
        let terminated_now = c.state.as_ref().and_then(|s| s.terminated.as_ref());
        if reason == "CrashLoopBackOff"
            || (c.restart_count > 0 && crashed_before)
            || terminated_now.is_some_and(|t| t.exit_code != 0)
        {
            return Some(Problem {
                kind: FailureKind::CrashLoop,
                reason: format!(
                    "pod {} container {} is crash-looping ({} restarts)",
                    pod_name(pod),
                    c.name,
                    c.restart_count
                ),
            });
        }
        if matches!(
            reason,
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull"
        ) {
            return Some(Problem {
                kind: FailureKind::ImagePull,
                reason: format!(
                    "pod {} cannot pull image {}: {reason} {message}",
                    pod_name(pod),
                    c.image
                )
                .trim_end()
                .to_owned(),
            });
        }
        if matches!(
            reason,
            "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError"
        ) {
            return Some(Problem {
                kind: FailureKind::Cluster,
                reason: format!(
                    "pod {} container {} cannot start: {reason} {message}",
                    pod_name(pod),
                    c.name
                )
                .trim_end()
                .to_owned(),
            });
        }
    }
    None
}

/// Judges a rollout from a snapshot. `started` is when the step began (from its event, so a
/// restarted agent keeps the same deadline); `timeout` is the step timeout.
pub fn assess(
    snapshot: &Snapshot,
    started: SystemTime,
    now: SystemTime,
    timeout: Duration,
) -> Rollout {
    let Some(d) = &snapshot.deployment else {
        return Rollout::Failed(Problem {
            kind: FailureKind::Cluster,
            reason: "the Deployment is gone".into(),
        });
    };
    let desired = d.spec.replicas.unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let overdue = now.duration_since(started).unwrap_or_default() > timeout;
    let generation = d.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return if overdue {
            Rollout::Failed(Problem {
                kind: FailureKind::Timeout,
                reason: format!(
                    "the Deployment controller did not take the change within {}s",
                    timeout.as_secs()
                ),
            })
        } else {
            Rollout::Progressing("waiting for the controller to see the change".into())
        };
    }
    if let Some(c) =
        status.conditions.iter().flatten().find(|c| {
            c.type_.as_deref() == Some("Progressing") && c.status.as_deref() == Some("False")
        })
    {
        return Rollout::Failed(Problem {
            kind: FailureKind::Timeout,
            reason: format!(
                "rollout stopped progressing: {}",
                c.message.clone().unwrap_or_default()
            ),
        });
    }
    let Some(rs) = current_replica_set(d, &snapshot.replica_sets) else {
        return if overdue {
            Rollout::Failed(Problem {
                kind: FailureKind::Timeout,
                reason: format!(
                    "no ReplicaSet for the new template within {}s",
                    timeout.as_secs()
                ),
            })
        } else {
            Rollout::Progressing("waiting for the new ReplicaSet".into())
        };
    };
    let new_pods = pods_of(rs, &snapshot.pods);
    if let Some(problem) = new_pods.iter().find_map(|p| pod_problem(p)) {
        return Rollout::Failed(problem);
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let ready_new: Vec<&&Pod> = new_pods.iter().filter(|p| is_ready(p)).collect();
    let complete = updated == desired
        && total == desired
        && available == desired
        && ready_new.len() as i32 >= desired;
    if complete {
        let mut pods: Vec<PodRef> = ready_new
            .iter()
            .map(|p| PodRef {
                name: pod_name(p).to_owned(),
                ip: p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default(),
                image: p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .map(|c| c.image.clone())
                    .unwrap_or_default(),
            })
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        return Rollout::Complete {
            revision: revision_of(&rs.metadata).unwrap_or_default().to_owned(),
            pods,
        };
    }
    if overdue {
        let unready: Vec<&str> = new_pods
            .iter()
            .filter(|p| !is_ready(p))
            .map(|p| pod_name(p))
            .collect();
        return Rollout::Failed(Problem {
            kind: FailureKind::Timeout,
            reason: format!(
                "not ready after the step timeout of {}s: {updated}/{desired} updated, {available} available{}",
                timeout.as_secs(),
                if unready.is_empty() { String::new() } else { format!(", unready pods {}", unready.join(", ")) }
            ),
        });
    }
    Rollout::Progressing(format!(
        "{updated}/{desired} updated, {available}/{desired} available, {} old",
        (total - updated).max(0)
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("reading {what} in {namespace}: {source}")]
    Read {
        what: &'static str,
        namespace: String,
        source: kube::Error,
    },
    #[error("interrupted by shutdown")]
    Shutdown,
}

/// Reads a snapshot of Deployment `name` in `namespace`.
pub async fn snapshot(client: &Client, namespace: &str, name: &str) -> Result<Snapshot, WaitError> {
    let read = |what: &'static str| {
        move |source| WaitError::Read {
            what,
            namespace: namespace.to_owned(),
            source,
        }
    };
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(read("the Deployment"))?;
    let Some(d) = deployment else {
        return Ok(Snapshot::default());
    };
    let selector = d
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let lp = ListParams::default().labels(&selector);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await
        .map_err(read("ReplicaSets"))?
        .items;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await
        .map_err(read("pods"))?
        .items;
    Ok(Snapshot {
        deployment: Some(d),
        replica_sets,
        pods,
    })
}

/// Follows a rollout until it completes or fails; `progress` is called with each new message.
/// Woken by changes of the namespace's Deployments and pods (and once a second for the timeout).
pub async fn wait(
    client: &Client,
    namespace: &str,
    name: &str,
    started: SystemTime,
    timeout: Duration,
    shutdown: &CancellationToken,
    mut progress: impl FnMut(&str),
) -> Result<Rollout, WaitError> {
    let deployments = watcher(
        Api::<Deployment>::namespaced(client.clone(), namespace),
        watcher::Config::default(),
    )
    .map(|_| ());
    let pods = watcher(
        Api::<Pod>::namespaced(client.clone(), namespace),
        watcher::Config::default(),
    )
    .map(|_| ());
    let ticks = tokio_stream_interval(Duration::from_secs(1));
    let mut wakeups = Box::pin(futures::stream::select(
        futures::stream::select(deployments, pods),
        ticks,
    ));
    let mut last = String::new();
    loop {
        let snap = snapshot(client, namespace, name).await?;
        match assess(&snap, started, SystemTime::now(), timeout) {
            Rollout::Progressing(msg) => {
                if msg != last {
                    progress(&msg);
                    last = msg;
                }
            }
            done => return Ok(done),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(WaitError::Shutdown),
            _ = wakeups.next() => {}
        }
    }
}

fn tokio_stream_interval(period: Duration) -> impl futures::Stream<Item = ()> {
    futures::stream::unfold(tokio::time::interval(period), |mut i| async move {
        i.tick().await;
        Some(((), i))
    })
}

/// The labels of a template without the controller's `pod-template-hash` (as `rollout undo`
/// restores a template).
pub fn without_template_hash(
    labels: Option<BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    labels.map(|mut l| {
        l.remove("pod-template-hash");
        l
    })
}

/// The images of a pod template's containers, comma-separated.
pub fn template_images(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> String {
    template
        .spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(
        generation: i64,
        observed: i64,
        updated: i32,
        total: i32,
        available: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "uid": "d1", "generation": generation, "annotations": {REVISION: "2"}},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": {}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total, "availableReplicas": available}
        }))
        .unwrap()
    }

    fn rs(uid: &str, revision: &str) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": format!("web-{uid}"), "uid": uid, "annotations": {REVISION: revision},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d1"}]},
            "spec": {"selector": {"matchLabels": {"app": "web"}}}
        }))
        .unwrap()
    }

    fn pod(name: &str, rs_uid: &str, ready: bool, container: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": rs_uid}]},
            "status": {"podIP": "127.16.0.1",
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                       "containerStatuses": [container]}
        }))
        .unwrap()
    }

    fn running() -> serde_json::Value {
        json!({"name": "app", "image": "web@sha256:1", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}})
    }

    fn snap(d: Deployment, pods: Vec<Pod>) -> Snapshot {
        Snapshot {
            deployment: Some(d),
            replica_sets: vec![rs("old", "1"), rs("new", "2")],
            pods,
        }
    }

    #[test]
    fn rollouts_are_judged_from_snapshots() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let soon = t0 + Duration::from_secs(5);
        let late = t0 + Duration::from_secs(120);
        let timeout = Duration::from_secs(60);
        let ready = |n: &str| pod(n, "new", true, running());
        let starting = |n: &str| {
            pod(
                n,
                "new",
                false,
                json!({"name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"running": {}}}),
            )
        };
        let crash = pod(
            "c",
            "new",
            false,
            json!({"name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 1}}}),
        );
        let pull = pod(
            "p",
            "new",
            false,
            json!({"name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}),
        );
        let cases: Vec<(&str, Snapshot, SystemTime, &str)> = vec![
            (
                "complete",
                snap(
                    deployment(2, 2, 3, 3, 3),
                    vec![ready("a"), ready("b"), ready("c")],
                ),
                soon,
                "complete",
            ),
            (
                "controller has not seen the change",
                snap(deployment(3, 2, 3, 3, 3), vec![]),
                soon,
                "progressing",
            ),
            (
                "...for too long",
                snap(deployment(3, 2, 3, 3, 3), vec![]),
                late,
                "timeout",
            ),
            (
                "old pods still there",
                snap(
                    deployment(2, 2, 3, 4, 3),
                    vec![ready("a"), ready("b"), ready("c")],
                ),
                soon,
                "progressing",
            ),
            (
                "new pods starting",
                snap(
                    deployment(2, 2, 3, 3, 1),
                    vec![ready("a"), starting("b"), starting("c")],
                ),
                soon,
                "progressing",
            ),
            (
                "new pods unready past the timeout",
                snap(deployment(2, 2, 3, 3, 1), vec![ready("a"), starting("b")]),
                late,
                "timeout",
            ),
            (
                "a crash loop fails at once",
                snap(deployment(2, 2, 1, 4, 3), vec![crash]),
                soon,
                "crash",
            ),
            (
                "a pull failure fails at once",
                snap(deployment(2, 2, 1, 4, 3), vec![pull]),
                soon,
                "pull",
            ),
            (
                "an old pod crashing is not the new one's fault",
                snap(
                    deployment(2, 2, 3, 3, 3),
                    vec![ready("a"), ready("b"), ready("c"), {
                        let mut p = pod("o", "old", false, running());
                        p.status
                            .as_mut()
                            .unwrap()
                            .container_statuses
                            .as_mut()
                            .unwrap()[0]
                            .restart_count = 5;
                        p
                    }],
                ),
                soon,
                "complete",
            ),
        ];
        for (name, s, now, expected) in cases {
            let got = assess(&s, t0, now, timeout);
            let kind = match &got {
                Rollout::Complete { pods, revision } => {
                    assert_eq!(revision, "2", "{name}");
                    assert_eq!(pods.len(), 3, "{name}");
                    "complete"
                }
                Rollout::Progressing(_) => "progressing",
                Rollout::Failed(p) if p.kind == FailureKind::CrashLoop => "crash",
                Rollout::Failed(p) if p.kind == FailureKind::ImagePull => "pull",
                Rollout::Failed(p) if p.kind == FailureKind::Timeout => "timeout",
                Rollout::Failed(_) => "other",
            };
            assert_eq!(kind, expected, "{name}: {got:?}");
        }
    }

    #[test]
    fn the_previous_revision_is_the_highest_below() {
        let d = deployment(2, 2, 3, 3, 3);
        let sets = vec![rs("a", "1"), rs("b", "3"), rs("c", "2")];
        assert_eq!(
            previous_replica_set(&d, &sets, 3)
                .and_then(|r| r.metadata.uid.clone())
                .as_deref(),
            Some("c")
        );
        assert_eq!(previous_replica_set(&d, &sets, 1), None);
        assert_eq!(
            replica_set_of_revision(&d, &sets, "1")
                .and_then(|r| r.metadata.uid.clone())
                .as_deref(),
            Some("a")
        );
    }
}
