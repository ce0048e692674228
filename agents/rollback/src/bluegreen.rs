//! Rolling back a blue-green release: before the switch, the new colour is scaled down and
//! nothing else moves; after it, the Service's selector goes back to the old colour at once
//! (the old colour is still scaled during the scale-down delay; if the delay has passed, it is
//! scaled up and waited for first), then the new colour is scaled down.
//!
//! The new colour is the one whose Deployment carries the release's id (`baton.dev/release-id`),
//! and where traffic goes is the Service `<app>`'s selector: everything is read again from the
//! cluster on a re-run, so a rollback agent restarted half-way finishes the same rollback, and
//! a switch the deployer made while the rollback began is switched back too.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use baton_core::event::{timestamp_ms, Event};
use baton_core::fold::ReleaseState;
use baton_core::ids::EventKey;
use baton_core::rollout::{self, Rollout, WaitError, FIELD_MANAGER, RELEASE_ANNOTATION, REVISION};
use baton_core::runtime::{AgentContext, Delivery};
use baton_core::workload::COLOUR_LABEL;
use baton_proto::v1::{
    envelope::Payload, ReleaseFailed, ReleaseRolledBack, RollbackCompleted, RollbackStarted,
};

use crate::error::{Error, Result};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The deployer's schedule of an old colour's scale-down (see the deployer's `bluegreen`).
const SCALE_DOWN_AT: &str = "baton.dev/scale-down-at";
const SCALE_DOWN_AFTER: &str = "baton.dev/scale-down-after";
/// Rounds of "switch back, scale down, look again", in case the deployer switched meanwhile.
const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Colour {
    Blue,
    Green,
}

impl Colour {
    const ALL: [Colour; 2] = [Colour::Blue, Colour::Green];

    fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }

    fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    fn parse(s: &str) -> Option<Colour> {
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

fn colour_name(app: &str, colour: Colour) -> String {
    format!("{app}-{colour}")
}

/// The Service's selector without the colour, and the colour it selects.
fn routing(
    selector: &BTreeMap<String, String>,
) -> std::result::Result<(BTreeMap<String, String>, Option<Colour>), String> {
    let mut base = selector.clone();
    let active = match base.remove(COLOUR_LABEL) {
        None => None,
        Some(v) => Some(Colour::parse(&v).ok_or_else(|| {
            format!("the Service selects {COLOUR_LABEL}={v}, which is neither blue nor green")
        })?),
    };
    Ok((base, active))
}

fn selecting(base: &BTreeMap<String, String>, colour: Colour) -> BTreeMap<String, String> {
    let mut s = base.clone();
    s.insert(COLOUR_LABEL.into(), colour.as_str().into());
    s
}

fn annotation<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    d.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn images(d: &Deployment) -> String {
    d.spec
        .template
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

/// Why the rollback stops: it cannot complete (the release fails with the reason), or an error
/// worth retrying.
enum Stop {
    GiveUp(String),
    Error(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Error(e)
    }
}

impl From<baton_core::error::Error> for Stop {
    fn from(e: baton_core::error::Error) -> Self {
        Stop::Error(Error::Bus(e))
    }
}

/// Where the rollback works.
struct Scope<'a> {
    client: &'a Client,
    ctx: &'a AgentContext,
    ns: &'a str,
    app: &'a str,
}

impl Scope<'_> {
    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), self.ns)
    }

    fn read(&self, name: &str, what: &'static str) -> impl FnOnce(kube::Error) -> Error {
        let (namespace, name) = (self.ns.to_owned(), name.to_owned());
        move |source| Error::Read {
            namespace: namespace.clone(),
            name,
            source: WaitError::Read {
                what,
                namespace,
                source,
            },
        }
    }

    /// A write refused for good (forbidden, invalid, gone) ends the rollback with the API's
    /// reason; anything else is retried.
    fn write(&self, name: &str, doing: &str) -> impl FnOnce(kube::Error) -> Stop {
        let (namespace, name, doing) = (self.ns.to_owned(), name.to_owned(), doing.to_owned());
        move |source| match &source {
            kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422) => {
                Stop::GiveUp(format!("{doing}: {}", s.message))
            }
            _ => Stop::Error(Error::Restore {
                namespace,
                name,
                source,
            }),
        }
    }

    async fn deployment(&self, name: &str) -> Result<Option<Deployment>> {
        self.deployments()
            .get_opt(name)
            .await
            .map_err(self.read(name, "the Deployment"))
    }

    /// The Service `<app>`'s selector, if the Service exists.
    async fn selector_opt(&self) -> Result<Option<BTreeMap<String, String>>> {
        Ok(Api::<Service>::namespaced(self.client.clone(), self.ns)
            .get_opt(self.app)
            .await
            .map_err(self.read(self.app, "the Service"))?
            .map(|s| s.spec.and_then(|s| s.selector).unwrap_or_default()))
    }

    /// The Service `<app>`'s selector.
    async fn selector(&self) -> std::result::Result<BTreeMap<String, String>, Stop> {
        self.selector_opt()
            .await?
            .ok_or_else(|| Stop::GiveUp(format!("Service {}/{} is gone", self.ns, self.app)))
    }

    async fn active(&self) -> std::result::Result<Option<Colour>, Stop> {
        routing(&self.selector().await?)
            .map(|(_, active)| active)
            .map_err(Stop::GiveUp)
    }

    /// Scales a Deployment (merge patch: a partial server-side apply would drop the template the
    /// deployer applied), dropping any scheduled scale-down.
    async fn scale(&self, name: &str, replicas: i32) -> std::result::Result<(), Stop> {
        let patch = json!({
            "metadata": {"annotations": {SCALE_DOWN_AT: null, SCALE_DOWN_AFTER: null}},
            "spec": {"replicas": replicas},
        });
        self.deployments()
            .patch(name, &merge_params(), &Patch::Merge(&patch))
            .await
            .map_err(self.write(name, &format!("scaling Deployment {name} to {replicas}")))?;
        Ok(())
    }
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

pub async fn roll_back(
    client: &kube::Client,
    ctx: &AgentContext,
    d: &Delivery,
    events: &[Event],
    state: &ReleaseState,
    reason: String,
) -> Result<()> {
    let Some(spec) = &state.spec else {
        return Err(Error::Invalid(
            "a blue-green rollback needs the release's spec (release.requested)".into(),
        ));
    };
    let scope = Scope {
        client,
        ctx,
        ns: &spec.namespace,
        app: &spec.app,
    };
    let timeout = match spec.step_timeout_seconds {
        0 => DEFAULT_TIMEOUT,
        s => Duration::from_secs(u64::from(s)),
    };
    match run(&scope, d, events, timeout, &reason).await {
        Ok(()) => Ok(()),
        Err(Stop::Error(e)) => Err(e),
        Err(Stop::GiveUp(why)) => give_up(ctx, d, why).await,
    }
}

async fn run(
    scope: &Scope<'_>,
    d: &Delivery,
    events: &[Event],
    timeout: Duration,
    reason: &str,
) -> std::result::Result<(), Stop> {
    let (ctx, ns, app) = (scope.ctx, scope.ns, scope.app);
    let rid = d.subject.release_id.to_string();
    let mut colours: HashMap<&'static str, Deployment> = HashMap::new();
    let mut new = None;
    for colour in Colour::ALL {
        if let Some(dep) = scope.deployment(&colour_name(app, colour)).await? {
            if annotation(&dep, RELEASE_ANNOTATION) == Some(rid.as_str()) {
                new = Some(colour);
            }
            colours.insert(colour.as_str(), dep);
        }
    }
    let Some(selector) = scope.selector_opt().await? else {
        if new.is_none() {
            // Step 0 stopped at its first look: without the Service, nothing was changed.
            ctx.emit(
                d,
                EventKey::Once,
                Payload::ReleaseFailed(ReleaseFailed {
                    reason: format!("deploy failed before changing the cluster: {reason}"),
                }),
            )
            .await?;
            return Ok(());
        }
        return Err(Stop::GiveUp(format!("Service {ns}/{app} is gone")));
    };
    let (base, _) = routing(&selector).map_err(Stop::GiveUp)?;
    let Some(new) = new else {
        return nothing_deployed(scope, d, reason).await;
    };
    let old = new.other();
    let (old_name, new_name) = (colour_name(app, old), colour_name(app, new));
    let old_dep = colours.get(old.as_str());
    let to_revision = old_dep
        .and_then(|d| annotation(d, REVISION))
        .map(|r| format!("{r} of {old_name}"))
        .unwrap_or_default();
    let to_image = old_dep.map(images).unwrap_or_default();
    let replicas = colours
        .get(new.as_str())
        .and_then(|d| d.spec.replicas)
        .filter(|r| *r > 0)
        .unwrap_or(1);
    tracing::info!(%new, %old, %reason, "rolling back a blue-green release");
    let started = ctx
        .emit(
            d,
            EventKey::Once,
            Payload::RollbackStarted(RollbackStarted {
                reason: reason.to_owned(),
                to_revision: to_revision.clone(),
                to_image: to_image.clone(),
            }),
        )
        .await?;
    // The wait for the old colour counts from the first start, so a restart keeps the deadline.
    let since = events
        .iter()
        .find(|e| matches!(e.payload(), Some(Payload::RollbackStarted(_))))
        .unwrap_or(&started)
        .envelope
        .time
        .as_ref()
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_millis(timestamp_ms(t).max(0) as u64))
        .unwrap_or_else(SystemTime::now);
    for _ in 0..ROUNDS {
        if scope.active().await? == Some(new) {
            // Traffic is on the new colour: back to the old one, once it can take it.
            available(scope, &old_name, replicas, since, timeout).await?;
            set_selector(scope, &selecting(&base, old)).await?;
            tracing::info!(colour = %old, "the Service selects the old colour again");
        }
        scope.scale(&new_name, 0).await?;
        if scope.active().await? != Some(new) {
            break;
        }
    }
    if scope.active().await? == Some(new) {
        return Err(Stop::GiveUp(format!(
            "Service {ns}/{app} keeps being switched to {new}"
        )));
    }
    // The old colour serves (again): it must not be scaled down by a schedule of an earlier
    // release.
    if old_dep.is_some_and(|d| annotation(d, SCALE_DOWN_AT).is_some()) {
        let patch =
            json!({"metadata": {"annotations": {SCALE_DOWN_AT: null, SCALE_DOWN_AFTER: null}}});
        scope
            .deployments()
            .patch(&old_name, &merge_params(), &Patch::Merge(&patch))
            .await
            .map_err(scope.write(
                &old_name,
                &format!("unscheduling the scale-down of {old_name}"),
            ))?;
    }
    let selector = scope.selector().await?;
    complete(scope, d, reason, to_revision, to_image, selector).await
}

/// Makes sure a colour has ready pods for the traffic: scaled up if the delay has passed, then
/// followed until available.
async fn available(
    scope: &Scope<'_>,
    name: &str,
    replicas: i32,
    since: SystemTime,
    timeout: Duration,
) -> std::result::Result<(), Stop> {
    let Some(dep) = scope.deployment(name).await? else {
        return Err(Stop::GiveUp(format!(
            "Deployment {}/{name} to switch back to is gone",
            scope.ns
        )));
    };
    if dep.spec.replicas.unwrap_or(1) == 0 {
        tracing::info!(
            deployment = name,
            replicas,
            "the old colour was scaled down; scaling it up"
        );
        scope.scale(name, replicas).await?;
    }
    let outcome = rollout::wait(
        scope.client,
        scope.ns,
        name,
        since,
        timeout,
        &scope.ctx.shutdown,
        |msg| {
            tracing::info!(
                deployment = name,
                progress = msg,
                "waiting for the old colour"
            )
        },
    )
    .await
    .map_err(Error::Wait)?;
    match outcome {
        Rollout::Complete { pods, .. } if !pods.is_empty() => Ok(()),
        Rollout::Complete { .. } => Err(Stop::GiveUp(format!(
            "Deployment {name} has no ready pods to switch back to"
        ))),
        Rollout::Failed(problem) => Err(Stop::GiveUp(format!(
            "the old colour {name} is not healthy: {}",
            problem.reason
        ))),
        Rollout::Progressing(msg) => Err(Stop::GiveUp(format!(
            "the old colour {name} is not available: {msg}"
        ))),
    }
}

async fn set_selector(
    scope: &Scope<'_>,
    selector: &BTreeMap<String, String>,
) -> std::result::Result<(), Stop> {
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": scope.app},
        "spec": {"selector": selector},
    });
    Api::<Service>::namespaced(scope.client.clone(), scope.ns)
        .patch(
            scope.app,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(scope.write(scope.app, &format!("switching Service {} back", scope.app)))?;
    Ok(())
}

/// The new image reached no colour (the release failed in step 0 before applying it, or while
/// adopting the plain Deployment). If the adoption was under way (the Service selects no colour
/// yet), the plain Deployment still serves: the copies made of it go, when it has ready pods.
async fn nothing_deployed(
    scope: &Scope<'_>,
    d: &Delivery,
    reason: &str,
) -> std::result::Result<(), Stop> {
    scope
        .ctx
        .emit(
            d,
            EventKey::Once,
            Payload::RollbackStarted(RollbackStarted {
                reason: reason.to_owned(),
                ..Default::default()
            }),
        )
        .await?;
    if scope.active().await?.is_none() {
        let serving = scope
            .deployment(scope.app)
            .await?
            .and_then(|p| p.status)
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if serving > 0 {
            for colour in Colour::ALL {
                let name = colour_name(scope.app, colour);
                if scope
                    .deployment(&name)
                    .await?
                    .is_some_and(|c| c.spec.replicas.unwrap_or(1) > 0)
                {
                    tracing::info!(deployment = %name, "the adoption did not finish; scaling the copy down");
                    scope.scale(&name, 0).await?;
                }
            }
        }
    }
    let selector = scope.selector().await?;
    complete(scope, d, reason, String::new(), String::new(), selector).await
}

async fn complete(
    scope: &Scope<'_>,
    d: &Delivery,
    reason: &str,
    restored_revision: String,
    restored_image: String,
    selector: BTreeMap<String, String>,
) -> std::result::Result<(), Stop> {
    scope
        .ctx
        .emit(
            d,
            EventKey::Once,
            Payload::RollbackCompleted(RollbackCompleted {
                restored_revision,
                restored_image,
                selector: selector.into_iter().collect(),
            }),
        )
        .await?;
    scope
        .ctx
        .emit(
            d,
            EventKey::Once,
            Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: reason.to_owned(),
            }),
        )
        .await?;
    tracing::info!("rolled back");
    Ok(())
}

use crate::handler::give_up;

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
    fn the_selector_splits_into_the_app_and_its_colour() {
        let (base, active) = routing(&labels(&[("app", "web"), (COLOUR_LABEL, "green")])).unwrap();
        assert_eq!(base, labels(&[("app", "web")]));
        assert_eq!(active, Some(Colour::Green));
        assert_eq!(
            selecting(&base, active.unwrap().other()),
            labels(&[("app", "web"), (COLOUR_LABEL, "blue")])
        );
        assert_eq!(routing(&labels(&[("app", "web")])).unwrap().1, None);
        assert!(routing(&labels(&[(COLOUR_LABEL, "red")])).is_err());
    }
}
