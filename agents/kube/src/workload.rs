//! Names and shared operations of the objects Baton makes beside an app's Deployment: the canary
//! (`<app>-canary`, its Service and Ingress) and the blue-green colours.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::DeleteParams;
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

/// Deletes the canary Deployment, its Service and its Ingress (those that exist).
pub async fn remove_canary(
    client: &Client,
    namespace: &str,
    app: &str,
    ingress: &str,
) -> Result<(), kube::Error> {
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

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
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
