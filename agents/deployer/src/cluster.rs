//! The deployer's work on the cluster: pre-checks, and applying a new image by server-side apply.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use baton_core::bluegreen::{self, Colour};
use baton_core::control;
use baton_proto::v1::{ReleaseSpec, Strategy};

use crate::canary;

use crate::error::{Error, Result};

use baton_core::rollout::{FIELD_MANAGER, RELEASE_ANNOTATION};

/// What the pre-checks found.
pub struct Checked {
    /// The Deployment serving the app: `<app>`, or its active colour.
    pub name: String,
    pub deployment: Deployment,
    pub container: String,
    /// The colour the Service `<app>` selects, for an app released blue-green.
    pub colour: Option<Colour>,
}

fn read(what: &str, namespace: &str) -> impl FnOnce(kube::Error) -> Error {
    let (what, namespace) = (what.to_owned(), namespace.to_owned());
    move |source| Error::Read {
        what,
        namespace,
        source,
    }
}

/// Runs the pre-checks; `Ok(Err(reason))` when the release must not go ahead.
pub async fn prechecks(
    client: &Client,
    spec: &ReleaseSpec,
) -> Result<std::result::Result<Checked, String>> {
    let ns = spec.namespace.as_str();
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Ok(Err(format!("cluster unreachable: {e}"))),
        Err(_) => return Ok(Err("cluster unreachable: no answer within 10s".into())),
    }
    let checked = match workload(client, spec).await? {
        Ok(checked) => checked,
        Err(reason) => return Ok(Err(reason)),
    };
    let replicas = checked.deployment.spec.replicas.unwrap_or(1);
    let idle = match (&checked.colour, control::strategy(spec)) {
        (Some(active), Strategy::BlueGreen) => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(&bluegreen::deployment_name(&spec.app, active.other()))
            .await
            .map_err(read("the idle colour", ns))?
            .and_then(|d| d.spec.replicas)
            .unwrap_or(0),
        _ => 0,
    };
    let (extra, what) = extra_pods(spec, replicas, idle);
    let per_pod = pod_requests(&checked.deployment);
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(read("resource quotas", ns))?;
    for quota in &quotas.items {
        if let Some(reason) = quota_shortfall(quota, extra, &what, &per_pod) {
            return Ok(Err(reason));
        }
    }
    Ok(Ok(checked))
}

/// The Deployment that runs the app now, and the container a release sets the image of:
/// `<app>`, or for blue-green the colour the Service `<app>` selects. A release by another
/// strategy of an app the Service routes by colour is refused: it would change a Deployment
/// that serves nobody.
pub async fn workload(
    client: &Client,
    spec: &ReleaseSpec,
) -> Result<std::result::Result<Checked, String>> {
    let ns = spec.namespace.as_str();
    let app = spec.app.as_str();
    if Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .map_err(read("the namespace", ns))?
        .is_none()
    {
        return Ok(Err(format!("namespace {ns} does not exist")));
    }
    let active = bluegreen::routing(client, ns, app)
        .await
        .map_err(read(&format!("Service {app}"), ns))?
        .and_then(|r| r.ok())
        .and_then(|r| r.active);
    let strategy = control::strategy(spec);
    let name = match active {
        Some(colour) if strategy == Strategy::BlueGreen => bluegreen::deployment_name(app, colour),
        Some(colour) => {
            return Ok(Err(format!(
                "app {app} is released blue-green (Service {app} selects Deployment {}): \
                 release it with the blue-green strategy, or point the Service back at \
                 Deployment {app} first",
                bluegreen::deployment_name(app, colour)
            )))
        }
        None => app.to_owned(),
    };
    let Some(deployment) = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&name)
        .await
        .map_err(read("the Deployment", ns))?
    else {
        return Ok(Err(match active {
            Some(colour) => format!(
                "Service {app} selects {colour}, but Deployment {name} does not exist in \
                 namespace {ns}"
            ),
            None => format!("Deployment {name} does not exist in namespace {ns}"),
        }));
    };
    let containers: Vec<String> = deployment
        .spec
        .template
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let container = if !spec.container.is_empty() {
        spec.container.clone()
    } else if containers.len() == 1 {
        containers[0].clone()
    } else {
        app.to_owned()
    };
    if !containers.contains(&container) {
        return Ok(Err(format!(
            "Deployment {ns}/{name} has no container {container} (it has {})",
            containers.join(", ")
        )));
    }
    Ok(Ok(Checked {
        name,
        deployment,
        container,
        colour: active,
    }))
}

/// Extra pods a rolling update may run at once (maxSurge rounds up, as Kubernetes does).
pub fn surge_pods(spec: &ReleaseSpec, replicas: i32) -> i64 {
    let max_surge = spec
        .rolling
        .as_ref()
        .map(|r| r.max_surge.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("25%");
    match max_surge.strip_suffix('%').map(str::parse::<i64>) {
        Some(Ok(pct)) => (i64::from(replicas) * pct + 99) / 100,
        _ => max_surge.parse::<i64>().unwrap_or(1),
    }
}

/// The most pods a release runs at once beside the `replicas` serving now, and what they are.
/// A rolling update surges; a canary runs its largest step beside the stable pods, then the
/// promotion surges while it is still there; blue-green runs a whole second colour (`idle`:
/// the pods the idle colour still has, which the quota counts already; rolling it to the new
/// image surges by a quarter, the Deployment default).
pub fn extra_pods(spec: &ReleaseSpec, replicas: i32, idle: i32) -> (i64, String) {
    let surge = surge_pods(spec, replicas);
    match control::strategy(spec) {
        Strategy::Canary => {
            let canary = control::plan(spec)
                .iter()
                .filter(|s| s.weight < 100)
                .map(|s| i64::from(canary::replicas(replicas, s.weight)))
                .max()
                .unwrap_or(0);
            (
                canary + surge,
                format!("a canary of up to {canary} pod(s) and the promotion's surge of {surge}"),
            )
        }
        Strategy::BlueGreen => {
            let (replicas, idle) = (i64::from(replicas.max(1)), i64::from(idle.max(0)));
            let roll = if idle > 0 { (replicas + 3) / 4 } else { 0 };
            (
                (replicas - idle).max(0) + roll,
                format!("a second colour of {replicas} pod(s)"),
            )
        }
        _ => (surge, format!("the surge of {surge} pod(s)")),
    }
}

/// The CPU (millicores) and memory (bytes) one pod of the template requests.
fn pod_requests(d: &Deployment) -> BTreeMap<&'static str, i64> {
    let mut out = BTreeMap::new();
    for c in d
        .spec
        .template
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
    {
        let Some(requests) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) else {
            continue;
        };
        if let Some(q) = requests.get("cpu").and_then(|q| parse_cpu(&q.0)) {
            *out.entry("cpu").or_insert(0) += q;
        }
        if let Some(q) = requests.get("memory").and_then(|q| parse_bytes(&q.0)) {
            *out.entry("memory").or_insert(0) += q;
        }
    }
    out
}

/// Whether a quota can't hold `surge` more pods; the reason names the quota and resource.
fn quota_shortfall(
    quota: &ResourceQuota,
    extra: i64,
    what: &str,
    per_pod: &BTreeMap<&'static str, i64>,
) -> Option<String> {
    let name = quota.metadata.name.clone().unwrap_or_default();
    let hard = quota
        .status
        .as_ref()
        .and_then(|s| s.hard.clone())
        .or_else(|| quota.spec.as_ref().and_then(|s| s.hard.clone()))?;
    let used = quota
        .status
        .as_ref()
        .and_then(|s| s.used.clone())
        .unwrap_or_default();
    let checks: [(&str, Option<i64>, Parse); 6] = [
        ("pods", Some(1), parse_count),
        ("count/pods", Some(1), parse_count),
        ("requests.cpu", per_pod.get("cpu").copied(), parse_cpu),
        ("cpu", per_pod.get("cpu").copied(), parse_cpu),
        (
            "requests.memory",
            per_pod.get("memory").copied(),
            parse_bytes,
        ),
        ("memory", per_pod.get("memory").copied(), parse_bytes),
    ];
    for (resource, each, parse) in checks {
        let (Some(limit), Some(each)) = (hard.get(resource).and_then(|q| parse(&q.0)), each) else {
            continue;
        };
        let in_use = used.get(resource).and_then(|q| parse(&q.0)).unwrap_or(0);
        let need = each * extra;
        if in_use + need > limit {
            return Some(format!(
                "resource quota {name} cannot hold {what}: {resource} would be {} of {}",
                in_use + need,
                limit
            ));
        }
    }
    None
}

/// Reads a quantity of one resource kind.
type Parse = fn(&str) -> Option<i64>;

fn parse_count(s: &str) -> Option<i64> {
    s.parse().ok()
}

fn parse_cpu(s: &str) -> Option<i64> {
    match s.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => s.parse::<f64>().ok().map(|c| (c * 1000.0).round() as i64),
    }
}

fn parse_bytes(s: &str) -> Option<i64> {
    let units: [(&str, i64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    units.iter().find_map(|(suffix, mult)| {
        let n = s.strip_suffix(suffix)?;
        n.parse::<f64>().ok().map(|v| (v * *mult as f64) as i64)
    })
}

fn int_or_percent(s: &str) -> serde_json::Value {
    match s.parse::<i64>() {
        Ok(n) => json!(n),
        Err(_) => json!(s),
    }
}

/// Server-side apply of the new image (and the rolling parameters) to the Deployment, annotated
/// with the release. Applying the same thing twice changes nothing.
pub async fn apply_image(
    client: &Client,
    spec: &ReleaseSpec,
    container: &str,
    image_ref: &str,
    release_id: &str,
) -> Result<()> {
    let ns = spec.namespace.as_str();
    let rolling = spec.rolling.clone().unwrap_or_default();
    let mut strategy = json!({"type": "RollingUpdate"});
    let mut params = serde_json::Map::new();
    if !rolling.max_surge.is_empty() {
        params.insert("maxSurge".into(), int_or_percent(&rolling.max_surge));
    }
    if !rolling.max_unavailable.is_empty() {
        params.insert(
            "maxUnavailable".into(),
            int_or_percent(&rolling.max_unavailable),
        );
    }
    if !params.is_empty() {
        strategy["rollingUpdate"] = serde_json::Value::Object(params);
    }
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": spec.app,
            "annotations": {
                RELEASE_ANNOTATION: release_id,
                "kubernetes.io/change-cause": format!("baton release {release_id}: {image_ref}"),
            }
        },
        "spec": {
            "strategy": strategy,
            "template": {
                "metadata": {"annotations": {RELEASE_ANNOTATION: release_id}},
                "spec": {"containers": [{"name": container, "image": image_ref}]}
            }
        }
    });
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            &spec.app,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::PatchDeployment {
            namespace: ns.to_owned(),
            name: spec.app.clone(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::v1::RollingParams;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_cpu("250m"), Some(250));
        assert_eq!(parse_cpu("2"), Some(2000));
        assert_eq!(parse_cpu("0.5"), Some(500));
        assert_eq!(parse_bytes("128Mi"), Some(128 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn surge_rounds_up_like_kubernetes() {
        let spec = |s: &str| ReleaseSpec {
            rolling: Some(RollingParams {
                max_surge: s.into(),
                max_unavailable: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(surge_pods(&spec("25%"), 3), 1);
        assert_eq!(surge_pods(&spec("50%"), 3), 2);
        assert_eq!(surge_pods(&spec("2"), 3), 2);
        assert_eq!(surge_pods(&ReleaseSpec::default(), 4), 1);
    }

    #[test]
    fn each_strategy_budgets_the_pods_it_adds_at_its_peak() {
        use baton_proto::v1::{CanaryParams, CanaryStep};
        let spec = |strategy: Strategy| ReleaseSpec {
            strategy: strategy as i32,
            ..Default::default()
        };
        // Rolling: the surge (25% of 4, rounded up).
        assert_eq!(extra_pods(&spec(Strategy::Rolling), 4, 0).0, 1);
        // Canary, default steps: 75% of 4 beside the stable pods, then the promotion's surge.
        let (n, what) = extra_pods(&spec(Strategy::Canary), 4, 0);
        assert_eq!(n, 3 + 1, "{what}");
        let mut small = spec(Strategy::Canary);
        small.canary = Some(CanaryParams {
            steps: vec![CanaryStep {
                weight: 10,
                ..Default::default()
            }],
        });
        assert_eq!(extra_pods(&small, 4, 0).0, 1 + 1);
        // Blue-green: a whole second colour; an idle colour still scaled is counted already,
        // but rolling it to the new image surges.
        let (n, what) = extra_pods(&spec(Strategy::BlueGreen), 4, 0);
        assert_eq!(n, 4);
        assert!(what.contains("second colour of 4"), "{what}");
        assert_eq!(extra_pods(&spec(Strategy::BlueGreen), 4, 4).0, 1);
        assert_eq!(extra_pods(&spec(Strategy::BlueGreen), 4, 2).0, 2 + 1);
    }

    #[test]
    fn a_quota_without_room_for_the_surge_is_refused() {
        let quota: ResourceQuota = serde_json::from_value(json!({
            "metadata": {"name": "small"},
            "spec": {"hard": {"pods": "3"}},
            "status": {"hard": {"pods": "3", "requests.cpu": "1"}, "used": {"pods": "3", "requests.cpu": "600m"}}
        }))
        .unwrap();
        let reason = quota_shortfall(&quota, 1, "the surge", &BTreeMap::new()).unwrap();
        assert!(
            reason.contains("small") && reason.contains("pods would be 4 of 3"),
            "{reason}"
        );
        let mut room = quota.clone();
        let q = |v: &str| k8s_openapi::apimachinery::pkg::api::resource::Quantity(v.into());
        room.status.as_mut().unwrap().used = Some(
            [
                ("pods".to_string(), q("1")),
                ("requests.cpu".to_string(), q("600m")),
            ]
            .into(),
        );
        assert_eq!(
            quota_shortfall(&room, 1, "the surge", &BTreeMap::new()),
            None
        );
        let cpu = quota_shortfall(&room, 1, "the surge", &[("cpu", 500)].into()).unwrap();
        assert!(cpu.contains("requests.cpu would be 1100 of 1000"), "{cpu}");
    }
}
