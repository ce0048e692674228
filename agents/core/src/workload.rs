//! Names and shared operations of the objects Baton makes beside an app's Deployment: the canary
//! (`<app>-canary`, its Service and Ingress) and the blue-green colours.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::DeleteParams;
use kube::{Api, Client};

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

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}
