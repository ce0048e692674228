//! Canary: a `<app>-canary` Deployment beside the stable one, with the same selector labels plus
//! a track label, so the app's Service sends it a share of the traffic by replica ratio; with an
//! Ingress configured, a canary Ingress with ingress-nginx's canary annotations carries the exact
//! weight; with a Gateway API HTTPRoute configured, the route's backendRefs carry it (the stable
//! and the canary Service, set by server-side apply of the route's rules alone). The last step
//! (100%) promotes: the stable Deployment is rolled to the canary's digest with no pod
//! unavailable, the route goes back to the stable Service alone, then the canary objects are
//! removed.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use baton_core::rollout::{Problem, FIELD_MANAGER, RELEASE_ANNOTATION};
use baton_core::workload::{self, TRACK_LABEL};
use baton_proto::v1::{FailureKind, ReleaseSpec};

use crate::error::{Error, Result};
use crate::steps::{self, StepCtx, StepOutcome, StepPlan};

/// Canary pods for a weight: a share of the stable replicas, rounded up, so that a non-zero weight
/// always has at least one pod (and never more pods than the stable Deployment has).
pub fn replicas(stable: i32, weight: u32) -> i32 {
    if weight == 0 {
        return 0;
    }
    let stable = stable.max(1);
    ((i64::from(stable) * i64::from(weight) + 99) / 100).clamp(1, i64::from(stable)) as i32
}

/// The canary strategy's driver.
pub struct Canary;

impl steps::Driver for Canary {
    fn describe<'a>(
        &'a self,
        planning: &'a steps::Planning<'a>,
        _step: u32,
        weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepPlan>> {
        Box::pin(async move { Ok(describe(planning.spec, weight, last, planning.replicas)) })
    }

    fn run<'a>(
        &'a self,
        ctx: &'a StepCtx<'a>,
        _step: u32,
        weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(step(ctx, weight, last))
    }
}

pub fn describe(spec: &ReleaseSpec, weight: u32, last: bool, stable: i32) -> StepPlan {
    let action = if last {
        format!(
            "promote: roll Deployment {} to the canary's image, then remove the canary",
            spec.app
        )
    } else {
        let c = replicas(stable, weight);
        let route = if !spec.ingress.is_empty() {
            format!(", Ingress weight {weight}%")
        } else if !spec.http_route.is_empty() {
            format!(", HTTPRoute {} weight {weight}%", spec.http_route)
        } else {
            String::new()
        };
        format!("canary at {weight}%: {c} canary pod(s) beside {stable} stable{route}")
    };
    StepPlan {
        action,
        selector: HashMap::new(),
    }
}

pub async fn step(ctx: &StepCtx<'_>, weight: u32, last: bool) -> Result<StepOutcome> {
    if last {
        return promote(ctx).await;
    }
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let stable = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
        .get(app)
        .await
        .map_err(read_err(ns, "the stable Deployment"))?;
    let canary = canary_deployment(&stable, ctx, replicas(ctx.replicas, weight))?;
    let name = workload::canary_name(app);
    apply(
        ctx,
        Api::<Deployment>::namespaced(ctx.client.clone(), ns),
        &name,
        &canary,
    )
    .await?;
    let routed = if !ctx.spec.ingress.is_empty() {
        route(ctx, &stable, weight).await?
    } else if !ctx.spec.http_route.is_empty() {
        route_http(ctx, &stable, weight).await?
    } else {
        Ok(())
    };
    if let Err(reason) = routed {
        return Ok(StepOutcome::Failed(Problem {
            kind: FailureKind::Cluster,
            reason,
        }));
    }
    steps::follow(ctx, &name).await
}

/// Rolls the stable Deployment to the canary's image (never below its desired count), then
/// removes the canary.
async fn promote(ctx: &StepCtx<'_>) -> Result<StepOutcome> {
    let outcome = steps::rolling(ctx, &ctx.spec.app, Some("0")).await?;
    if let StepOutcome::Ready(_) = &outcome {
        ctx.fence.check("removing the canary").await?;
        workload::remove_canary(
            ctx.client,
            &ctx.spec.namespace,
            &ctx.spec.app,
            &ctx.spec.ingress,
            &ctx.spec.http_route,
        )
        .await
        .map_err(|source| Error::Read {
            what: "removing the canary".into(),
            namespace: ctx.spec.namespace.clone(),
            source,
        })?;
    }
    Ok(outcome)
}

async fn apply<K>(ctx: &StepCtx<'_>, api: Api<K>, name: &str, object: &Value) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.fence.check(&format!("applying {name}")).await?;
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::PatchDeployment {
        namespace: ctx.spec.namespace.clone(),
        name: name.to_owned(),
        source,
    })?;
    Ok(())
}

/// The canary Deployment: the stable one's pod template with the new image, the track label on
/// its pods and selector.
fn canary_deployment(stable: &Deployment, ctx: &StepCtx<'_>, replicas: i32) -> Result<Value> {
    let mut labels: BTreeMap<String, String> = stable
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    labels.insert(TRACK_LABEL.into(), "canary".into());
    let mut template =
        serde_json::to_value(&stable.spec.template).map_err(|source| Error::Encode {
            what: "the stable pod template",
            source,
        })?;
    template["metadata"]["labels"] = {
        let mut l: BTreeMap<String, String> = stable
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        l.insert(TRACK_LABEL.into(), "canary".into());
        json!(l)
    };
    template["metadata"]["annotations"][RELEASE_ANNOTATION] = json!(ctx.release_id);
    if let Some(containers) = template["spec"]["containers"].as_array_mut() {
        for c in containers.iter_mut().filter(|c| c["name"] == ctx.container) {
            c["image"] = json!(ctx.image_ref);
        }
    }
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload::canary_name(&ctx.spec.app),
            "labels": {TRACK_LABEL: "canary"},
            "annotations": {RELEASE_ANNOTATION: ctx.release_id},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": template,
        }
    }))
}

/// The error of a failed read of `what` in namespace `ns`.
fn read_err(ns: &str, what: &str) -> impl FnOnce(kube::Error) -> Error {
    let (what, namespace) = (what.to_owned(), ns.to_owned());
    move |source| Error::Read {
        what,
        namespace,
        source,
    }
}

/// The canary Service: the stable Service's ports, the canary's pods. `Ok(Err(reason))` when
/// the app has no Service to copy (`router` says what needed it).
async fn canary_service(
    ctx: &StepCtx<'_>,
    stable: &Deployment,
    router: &str,
) -> Result<std::result::Result<(), String>> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let Some(service) = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .get_opt(app)
        .await
        .map_err(read_err(ns, "the Service"))?
    else {
        return Ok(Err(format!(
            "{router} needs a Service {app} in {ns} to copy for the canary"
        )));
    };
    let canary = workload::canary_name(app);
    let mut selector: BTreeMap<String, String> = stable
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    selector.insert(TRACK_LABEL.into(), "canary".into());
    let ports = workload::service_ports(&service);
    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": canary, "labels": {TRACK_LABEL: "canary"}},
        "spec": {"selector": selector, "ports": ports}
    });
    apply(
        ctx,
        Api::<Service>::namespaced(ctx.client.clone(), ns),
        &canary,
        &svc,
    )
    .await?;
    Ok(Ok(()))
}

/// The canary Service, and the HTTPRoute's backendRefs split between the stable and the canary
/// Service at `weight` (the route's other fields untouched). `Ok(Err(reason))` when the route
/// or the Service is missing, or the route sends nothing to the app's Service.
async fn route_http(
    ctx: &StepCtx<'_>,
    stable: &Deployment,
    weight: u32,
) -> Result<std::result::Result<(), String>> {
    let ns = ctx.spec.namespace.as_str();
    let route = ctx.spec.http_route.as_str();
    if let Err(reason) = canary_service(ctx, stable, &format!("HTTPRoute {route}")).await? {
        return Ok(Err(reason));
    }
    ctx.fence
        .check(&format!("setting HTTPRoute {route} to {weight}%"))
        .await?;
    let set = workload::set_route_weight(ctx.client, ns, route, &ctx.spec.app, weight)
        .await
        .map_err(|source| Error::Write {
            what: format!("HTTPRoute {route}"),
            namespace: ns.to_owned(),
            source,
        })?;
    Ok(match set {
        true => Ok(()),
        false => Err(format!(
            "HTTPRoute {route} does not exist in {ns}, or none of its rules sends to Service {}",
            ctx.spec.app
        )),
    })
}

/// A canary Service and a canary Ingress (the main Ingress's rules pointed at it) with
/// ingress-nginx's canary weight. `Ok(Err(reason))` when the configured objects are missing.
async fn route(
    ctx: &StepCtx<'_>,
    stable: &Deployment,
    weight: u32,
) -> Result<std::result::Result<(), String>> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    if let Err(reason) = canary_service(ctx, stable, "the Ingress").await? {
        return Ok(Err(reason));
    }
    let Some(ingress) = Api::<Ingress>::namespaced(ctx.client.clone(), ns)
        .get_opt(&ctx.spec.ingress)
        .await
        .map_err(read_err(ns, "the Ingress"))?
    else {
        return Ok(Err(format!(
            "Ingress {} does not exist in {ns}",
            ctx.spec.ingress
        )));
    };
    let canary = workload::canary_name(app);
    let mut rules = serde_json::to_value(
        ingress
            .spec
            .as_ref()
            .and_then(|s| s.rules.clone())
            .unwrap_or_default(),
    )
    .map_err(|source| Error::Encode {
        what: "the Ingress rules",
        source,
    })?;
    point_at(&mut rules, app, &canary);
    let name = workload::canary_ingress_name(&ctx.spec.ingress);
    let class = ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.clone());
    let mut spec = json!({"rules": rules});
    if let Some(class) = class {
        spec["ingressClassName"] = json!(class);
    }
    let canary_ingress = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "labels": {TRACK_LABEL: "canary"},
            "annotations": {
                "nginx.ingress.kubernetes.io/canary": "true",
                "nginx.ingress.kubernetes.io/canary-weight": weight.to_string(),
            }
        },
        "spec": spec
    });
    apply(
        ctx,
        Api::<Ingress>::namespaced(ctx.client.clone(), ns),
        &name,
        &canary_ingress,
    )
    .await?;
    Ok(Ok(()))
}

/// Points every backend of `from` at `to`, in an Ingress's rules.
fn point_at(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some(from) && map.contains_key("port") {
                map.insert("name".into(), json!(to));
            }
            map.values_mut().for_each(|v| point_at(v, from, to));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| point_at(v, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_zero_weight_always_has_a_pod() {
        let table = [
            (3, 10, 1),
            (3, 25, 1),
            (3, 50, 2),
            (3, 75, 3),
            (4, 25, 1),
            (10, 10, 1),
            (10, 25, 3),
            (1, 10, 1),
            (0, 50, 1),
            (3, 0, 0),
        ];
        for (stable, weight, canary) in table {
            assert_eq!(
                replicas(stable, weight),
                canary,
                "{stable} stable at {weight}%"
            );
        }
    }

    #[test]
    fn ingress_backends_are_pointed_at_the_canary_service() {
        let mut rules = json!([{"host": "web.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
            {"path": "/api", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}
        ]}}]);
        point_at(&mut rules, "web", "web-canary");
        assert_eq!(
            rules[0]["http"]["paths"][0]["backend"]["service"]["name"],
            "web-canary"
        );
        assert_eq!(
            rules[0]["http"]["paths"][1]["backend"]["service"]["name"],
            "api"
        );
    }
}
