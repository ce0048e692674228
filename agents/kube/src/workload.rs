//! Names and shared operations of the objects Baton makes beside an app's Deployment: the canary
//! (`<app>-canary`, its Service and Ingress), the weights of a Gateway API HTTPRoute, and the
//! blue-green colours.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

/// The label that tells a canary's pods from the stable ones.
pub const TRACK_LABEL: &str = "baton.dev/track";
/// The label of a blue-green colour.
pub const COLOUR_LABEL: &str = "baton.dev/colour";

pub fn canary_name(app: &str) -> String {
    format!("{app}-canary")
}

pub fn canary_ingress_name(ingress: &str) -> String {
    format!("{ingress}-canary")
}

/// Deletes the canary Deployment, its Service and its Ingress (those that exist). An HTTPRoute
/// (`http_route`, when set) is first given back to the stable Service alone, so that no request
/// goes to a Service that is about to disappear.
pub async fn remove_canary(
    client: &Client,
    namespace: &str,
    app: &str,
    ingress: &str,
    http_route: &str,
) -> Result<(), kube::Error> {
    if !http_route.is_empty() {
        set_route_weight(client, namespace, http_route, app, 0).await?;
    }
    let name = canary_name(app);
    let dp = DeleteParams::background();
    ignore_missing(
        Api::<Deployment>::namespaced(client.clone(), namespace)
            .delete(&name, &dp)
            .await
            .map(|_| ()),
    )?;
    ignore_missing(
        Api::<Service>::namespaced(client.clone(), namespace)
            .delete(&name, &dp)
            .await
            .map(|_| ()),
    )?;
    if !ingress.is_empty() {
        ignore_missing(
            Api::<Ingress>::namespaced(client.clone(), namespace)
                .delete(&canary_ingress_name(ingress), &dp)
                .await
                .map(|_| ()),
        )?;
    }
    Ok(())
}

/// A Service's ports as a Service Baton makes beside it takes them (the canary's, the preview):
/// without node ports, which belong to the one Service that has them.
pub fn service_ports(service: &Service) -> Value {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let mut port = json!({"port": p.port});
                    if let Some(name) = &p.name {
                        port["name"] = json!(name);
                    }
                    if let Some(target) = &p.target_port {
                        port["targetPort"] = serde_json::to_value(target).unwrap_or(Value::Null);
                    }
                    if let Some(protocol) = &p.protocol {
                        port["protocol"] = json!(protocol);
                    }
                    if let Some(app_protocol) = &p.app_protocol {
                        port["appProtocol"] = json!(app_protocol);
                    }
                    port
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Value::Array(ports)
}

/// Gateway API's HTTPRoute (`gateway.networking.k8s.io/v1`).
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

/// The HTTPRoutes of a namespace.
pub fn http_routes(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &http_route_resource())
}

/// Whether a backendRef names the Service `name` (a Service is the default kind, in the core
/// group).
fn is_service(backend: &Value, name: &str) -> bool {
    backend.get("name").and_then(Value::as_str) == Some(name)
        && backend
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("Service")
            == "Service"
        && backend
            .get("group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
}

/// A route's rules with the traffic of every rule that sends to Service `app` split between
/// `app` (100 − `weight`) and its canary Service (`weight`); with a weight of 0, back to `app`
/// alone (as its owner wrote it, without a weight). Every other field of each rule — its
/// matches, filters, timeouts, other backends — is kept as it is. `None` when no rule sends to
/// `app`.
pub fn weighted_rules(rules: &Value, app: &str, weight: u32) -> Option<Value> {
    let canary = canary_name(app);
    let mut rules = rules.as_array()?.clone();
    let mut touched = false;
    for rule in &mut rules {
        let Some(backends) = rule.get("backendRefs").and_then(Value::as_array) else {
            continue;
        };
        let Some(stable) = backends.iter().find(|b| is_service(b, app)).cloned() else {
            continue;
        };
        touched = true;
        let mut kept: Vec<Value> = backends
            .iter()
            .filter(|b| !is_service(b, app) && !is_service(b, &canary))
            .cloned()
            .collect();
        let mut stable = stable;
        if weight == 0 {
            if let Some(o) = stable.as_object_mut() {
                o.remove("weight");
            }
            kept.insert(0, stable);
        } else {
            let mut canary_ref = json!({"name": canary});
            if let Some(port) = stable.get("port") {
                canary_ref["port"] = port.clone();
            }
            canary_ref["weight"] = json!(weight.min(100));
            stable["weight"] = json!(100 - weight.min(100));
            kept.insert(0, stable);
            kept.insert(1, canary_ref);
        }
        rule["backendRefs"] = Value::Array(kept);
    }
    touched.then_some(Value::Array(rules))
}

/// Sets the canary's share of HTTPRoute `route` (0: the stable Service alone) by server-side
/// apply of the route's rules only, with Baton's field manager: the route's other fields stay
/// as their owner wrote them. Returns false when the route does not exist or sends nothing to
/// Service `app`.
pub async fn set_route_weight(
    client: &Client,
    namespace: &str,
    route: &str,
    app: &str,
    weight: u32,
) -> Result<bool, kube::Error> {
    let api = http_routes(client, namespace);
    let Some(current) = api.get_opt(route).await? else {
        return Ok(false);
    };
    let rules = current
        .data
        .get("spec")
        .and_then(|s| s.get("rules"))
        .cloned()
        .unwrap_or(Value::Null);
    let Some(rules) = weighted_rules(&rules, app, weight) else {
        return Ok(false);
    };
    let patch = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": route},
        "spec": {"rules": rules},
    });
    api.patch(
        route,
        &PatchParams::apply(crate::rollout::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(true)
}

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_routes_weights_split_its_stable_backend_and_come_back_to_it() {
        let rules = serde_json::json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
             "backendRefs": [{"name": "web", "port": 8080}, {"name": "other", "port": 80}]},
            {"backendRefs": [{"name": "api", "port": 9000}]}
        ]);
        let at20 = super::weighted_rules(&rules, "web", 20).unwrap();
        assert_eq!(
            at20[0]["backendRefs"],
            serde_json::json!([
                {"name": "web", "port": 8080, "weight": 80},
                {"name": "web-canary", "port": 8080, "weight": 20},
                {"name": "other", "port": 80}
            ])
        );
        assert_eq!(at20[0]["matches"], rules[0]["matches"]);
        assert_eq!(at20[1], rules[1]);
        let at60 = super::weighted_rules(&at20, "web", 60).unwrap();
        assert_eq!(at60[0]["backendRefs"][1]["weight"], 60);
        assert_eq!(at60[0]["backendRefs"].as_array().map(Vec::len), Some(3));
        let back = super::weighted_rules(&at60, "web", 0).unwrap();
        assert_eq!(back, rules);
        assert!(super::weighted_rules(&rules, "shop", 10).is_none());
    }

    use super::*;

    #[test]
    fn a_service_beside_another_takes_its_ports_without_node_ports() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
                "clusterIP": "10.0.0.1"
            }
        }))
        .unwrap();
        assert_eq!(
            service_ports(&service),
            json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}])
        );
    }
}
