//! What the deployer and the rollback agent share about blue-green: the colours, the names of
//! their objects, how the Service `<app>`'s selector names the active colour, the annotations
//! of a scheduled scale-down, and the few writes both make (switching the selector, scaling a
//! colour).
//!
//! Writes use the field manager `baton`: the selector by server-side apply (the field is
//! atomic), replica counts and bookkeeping annotations by merge patch, because a partial
//! server-side apply would drop what the same manager applied before (the pod template).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::rollout::{FIELD_MANAGER, RELEASE_ANNOTATION};
pub use crate::workload::COLOUR_LABEL;

/// On an old colour: when it may be scaled down (milliseconds since the epoch).
pub const SCALE_DOWN_AT: &str = "baton.dev/scale-down-at";
/// On an old colour: the release whose success scheduled the scale-down.
pub const SCALE_DOWN_AFTER: &str = "baton.dev/scale-down-after";
/// On a plain Deployment that blue-green took over: the colour Deployment it became.
pub const ADOPTED_INTO: &str = "baton.dev/adopted-into";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Blue,
    Green,
}

impl Colour {
    pub const ALL: [Colour; 2] = [Colour::Blue, Colour::Green];

    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }

    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    pub fn parse(s: &str) -> Option<Colour> {
        match s {
            "blue" => Some(Colour::Blue),
            "green" => Some(Colour::Green),
            _ => None,
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `<app>-blue` or `<app>-green`.
pub fn deployment_name(app: &str, colour: Colour) -> String {
    format!("{app}-{colour}")
}

/// The Service that selects the new colour during a release.
pub fn preview_name(app: &str) -> String {
    format!("{app}-preview")
}

/// The Service `<app>`'s selector, split into the app's own labels and the colour it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub base: BTreeMap<String, String>,
    pub active: Option<Colour>,
}

impl Routing {
    /// Splits the selector of Service `service`; refuses a colour that is neither blue nor
    /// green, and a selector with nothing but the colour (the colours' selectors are built on
    /// the app's own labels).
    pub fn of_selector(
        service: &str,
        selector: &BTreeMap<String, String>,
    ) -> Result<Routing, String> {
        let mut base = selector.clone();
        let active = match base.remove(COLOUR_LABEL) {
            None => None,
            Some(v) => Some(Colour::parse(&v).ok_or_else(|| {
                format!(
                    "Service {service} selects {COLOUR_LABEL}={v}, which is neither blue nor green"
                )
            })?),
        };
        if base.is_empty() {
            return Err(format!(
                "Service {service} has no selector labels of its own: blue-green builds the \
                 colours' selectors on them"
            ));
        }
        Ok(Routing { base, active })
    }

    pub fn of_service(service: &Service) -> Result<Routing, String> {
        let selector = service
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        Routing::of_selector(service.metadata.name.as_deref().unwrap_or("?"), &selector)
    }

    /// The whole selector: the app's labels and the active colour, if any.
    pub fn selector(&self) -> BTreeMap<String, String> {
        match self.active {
            Some(colour) => self.selecting(colour),
            None => self.base.clone(),
        }
    }

    /// The selector that sends the traffic to `colour`.
    pub fn selecting(&self, colour: Colour) -> BTreeMap<String, String> {
        let mut s = self.base.clone();
        s.insert(COLOUR_LABEL.into(), colour.as_str().into());
        s
    }
}

/// How the Service `<app>` routes, if it exists (`Err` inside: a selector blue-green can't use).
pub async fn routing(
    client: &Client,
    ns: &str,
    app: &str,
) -> kube::Result<Option<Result<Routing, String>>> {
    Ok(Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(app)
        .await?
        .map(|s| Routing::of_service(&s)))
}

pub fn annotation<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    d.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The images of a Deployment's containers, comma-separated.
pub fn images(d: &Deployment) -> String {
    crate::rollout::template_images(&d.spec.template)
}

/// A merge patch by Baton.
pub fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Points the Service `<app>` at a selector.
pub async fn set_selector(
    client: &Client,
    ns: &str,
    app: &str,
    selector: &BTreeMap<String, String>,
) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": app},
        "spec": {"selector": selector},
    });
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(
            app,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Scales a colour Deployment, dropping any scale-down scheduled on it.
pub async fn scale(client: &Client, ns: &str, name: &str, replicas: i32) -> kube::Result<()> {
    let patch = json!({
        "metadata": {"annotations": {SCALE_DOWN_AT: null, SCALE_DOWN_AFTER: null}},
        "spec": {"replicas": replicas},
    });
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(name, &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Removes a scheduled scale-down from a colour (if it has one).
pub async fn clear_marks(client: &Client, ns: &str, name: &str) -> kube::Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let Some(d) = deployments.get_opt(name).await? else {
        return Ok(());
    };
    if annotation(&d, SCALE_DOWN_AT).is_none() && annotation(&d, SCALE_DOWN_AFTER).is_none() {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {SCALE_DOWN_AT: null, SCALE_DOWN_AFTER: null}}});
    deployments
        .patch(name, &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The colour Deployments of `app` that exist.
pub async fn colours(
    client: &Client,
    ns: &str,
    app: &str,
) -> kube::Result<Vec<(Colour, Deployment)>> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for colour in Colour::ALL {
        if let Some(d) = deployments.get_opt(&deployment_name(app, colour)).await? {
            out.push((colour, d));
        }
    }
    Ok(out)
}

/// The colour whose Deployment carries the release's template.
pub async fn release_colour(
    client: &Client,
    ns: &str,
    app: &str,
    release_id: &str,
) -> kube::Result<Option<Colour>> {
    Ok(colours(client, ns, app)
        .await?
        .into_iter()
        .find(|(_, d)| annotation(d, RELEASE_ANNOTATION) == Some(release_id))
        .map(|(c, _)| c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_selector_tells_the_app_and_the_active_colour() {
        let r = Routing::of_selector("web", &labels(&[("app", "web")])).unwrap();
        assert_eq!(r.active, None);
        assert_eq!(
            r.selecting(Colour::Blue),
            labels(&[("app", "web"), (COLOUR_LABEL, "blue")])
        );
        let r = Routing::of_selector("web", &labels(&[("app", "web"), (COLOUR_LABEL, "green")]))
            .unwrap();
        assert_eq!(r.active, Some(Colour::Green));
        assert_eq!(r.base, labels(&[("app", "web")]));
        assert_eq!(
            r.selecting(Colour::Green.other()),
            labels(&[("app", "web"), (COLOUR_LABEL, "blue")])
        );
        let bad = Routing::of_selector("web", &labels(&[("app", "web"), (COLOUR_LABEL, "red")]))
            .unwrap_err();
        assert!(bad.contains("neither blue nor green"), "{bad}");
        let bare = Routing::of_selector("web", &labels(&[(COLOUR_LABEL, "blue")])).unwrap_err();
        assert!(bare.contains("no selector labels of its own"), "{bare}");
    }

    #[test]
    fn colours_name_their_objects() {
        assert_eq!(deployment_name("web", Colour::Blue), "web-blue");
        assert_eq!(deployment_name("web", Colour::Blue.other()), "web-green");
        assert_eq!(preview_name("web"), "web-preview");
        assert_eq!(Colour::parse("green"), Some(Colour::Green));
        assert_eq!(Colour::parse("Green"), None);
    }
}
