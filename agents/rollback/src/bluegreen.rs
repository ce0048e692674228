//! Rolling back a blue-green release: before the switch, the new colour is scaled down and
//! nothing else moves; after it, the Service's selector goes back to the old colour at once
//! (the old colour is still scaled during the scale-down delay; if the delay has passed, it is
//! scaled up and waited for first), then the new colour is scaled down.
//!
//! The colour to roll back from is, for a release, the one whose Deployment carries the
//! release's id (`baton.dev/release-id`); for a manual `baton rollback` of a blue-green app, the
//! colour the Service `<app>` selects. Where traffic goes is the Service's selector: everything
//! is read again from the cluster on a re-run, so a rollback agent restarted half-way finishes
//! the same rollback, and a switch the deployer made while the rollback began is switched back
//! too.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Patch;
use kube::{Api, Client};
use serde_json::json;

use baton_core::bluegreen::{
    self, annotation, deployment_name, images, merge_params, Colour, Routing, SCALE_DOWN_AT,
};
use baton_core::event::{timestamp_ms, Event};
use baton_core::ids::EventKey;
use baton_core::rollout::{self, Rollout, RELEASE_ANNOTATION, REVISION};
use baton_core::runtime::{AgentContext, Delivery};
use baton_proto::v1::{envelope::Payload, ReleaseFailed, RollbackCompleted, RollbackStarted};

use crate::error::{Error, Result};

/// On the colour a manual rollback moves the traffic away from: the rollback's id.
const ROLLED_BACK_BY: &str = "baton.dev/rolled-back-by";
/// Rounds of "switch back, scale down, look again", in case the deployer switched meanwhile.
const ROUNDS: usize = 3;

/// Which colour the rollback moves the traffic away from.
pub enum Away {
    /// The colour a release deployed (its id, as annotated on the colour).
    Release(String),
    /// The colour the Service selects now (a manual rollback of the app).
    Active,
}

/// Whether the app is released blue-green now: its Service selects a colour.
pub async fn is_blue_green(client: &Client, ns: &str, app: &str) -> Result<bool> {
    Ok(bluegreen::routing(client, ns, app)
        .await
        .map_err(|source| Error::Cluster {
            doing: format!("reading Service {app}"),
            namespace: ns.to_owned(),
            source,
        })?
        .and_then(|r| r.ok())
        .is_some_and(|r| r.active.is_some()))
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
pub struct Scope<'a> {
    pub client: &'a Client,
    pub ctx: &'a AgentContext,
    pub ns: &'a str,
    pub app: &'a str,
    /// How long the old colour may take to be available again.
    pub timeout: Duration,
    /// Checked before every write.
    pub fence: &'a crate::handler::Fencer<'a>,
}

impl Scope<'_> {
    /// The fence before a write.
    async fn fence(&self, what: &str) -> std::result::Result<(), Stop> {
        self.fence
            .check(what)
            .await
            .map_err(|e| Stop::Error(e.into()))
    }

    fn read(&self, what: &str) -> impl FnOnce(kube::Error) -> Error {
        let (doing, namespace) = (format!("reading {what}"), self.ns.to_owned());
        move |source| Error::Cluster {
            doing,
            namespace,
            source,
        }
    }

    /// A write refused for good (forbidden, invalid, gone) ends the rollback with the API's
    /// reason; anything else is retried.
    fn write(&self, doing: &str) -> impl FnOnce(kube::Error) -> Stop {
        let (namespace, doing) = (self.ns.to_owned(), doing.to_owned());
        move |source| match &source {
            kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422) => {
                Stop::GiveUp(format!("{doing}: {}", s.message))
            }
            _ => Stop::Error(Error::Cluster {
                doing,
                namespace,
                source,
            }),
        }
    }

    async fn deployment(&self, name: &str) -> Result<Option<Deployment>> {
        Api::<Deployment>::namespaced(self.client.clone(), self.ns)
            .get_opt(name)
            .await
            .map_err(self.read(&format!("Deployment {name}")))
    }

    /// How the Service `<app>` routes, if the Service exists.
    async fn routing_opt(&self) -> std::result::Result<Option<Routing>, Stop> {
        match bluegreen::routing(self.client, self.ns, self.app)
            .await
            .map_err(self.read(&format!("Service {}", self.app)))?
        {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some(r)),
            Some(Err(why)) => Err(Stop::GiveUp(why)),
        }
    }

    /// How the Service `<app>` routes.
    async fn routing(&self) -> std::result::Result<Routing, Stop> {
        self.routing_opt()
            .await?
            .ok_or_else(|| Stop::GiveUp(format!("Service {}/{} is gone", self.ns, self.app)))
    }

    async fn active(&self) -> std::result::Result<Option<Colour>, Stop> {
        Ok(self.routing().await?.active)
    }

    /// Scales a colour, dropping any scheduled scale-down.
    async fn scale(&self, name: &str, replicas: i32) -> std::result::Result<(), Stop> {
        self.fence(&format!("scaling Deployment {name} to {replicas}"))
            .await?;
        bluegreen::scale(self.client, self.ns, name, replicas)
            .await
            .map_err(self.write(&format!("scaling Deployment {name} to {replicas}")))
    }
}

/// Rolls back: moves the traffic away from the colour `from` names, and ends the release as
/// rolled back (or failed, with the reason, when that cannot be done).
pub async fn roll_back(
    scope: &Scope<'_>,
    d: &Delivery,
    events: &[Event],
    from: Away,
    reason: String,
) -> Result<()> {
    match run(scope, d, events, &from, &reason).await {
        Ok(()) => Ok(()),
        Err(Stop::Error(e)) => Err(e),
        Err(Stop::GiveUp(why)) => give_up(scope.ctx, d, why).await,
    }
}

async fn run(
    scope: &Scope<'_>,
    d: &Delivery,
    events: &[Event],
    from: &Away,
    reason: &str,
) -> std::result::Result<(), Stop> {
    let (ctx, ns, app) = (scope.ctx, scope.ns, scope.app);
    let rid = d.subject.release_id.to_string();
    let colours: HashMap<&'static str, Deployment> = bluegreen::colours(scope.client, ns, app)
        .await
        .map_err(scope.read(&format!("the colours of {app}")))?
        .into_iter()
        .map(|(c, d)| (c.as_str(), d))
        .collect();
    let marked = |key: &str, value: &str| {
        Colour::ALL.into_iter().find(|c| {
            colours
                .get(c.as_str())
                .is_some_and(|d| annotation(d, key) == Some(value))
        })
    };
    let routing = scope.routing_opt().await?;
    let new = match from {
        Away::Release(release) => marked(RELEASE_ANNOTATION, release),
        // A rollback restarted after its switch finds the colour it marked, not the active one.
        Away::Active => marked(ROLLED_BACK_BY, &rid).or(routing.as_ref().and_then(|r| r.active)),
    };
    let Some(routing) = routing else {
        if new.is_none() && matches!(from, Away::Release(_)) {
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
    let Some(new) = new else {
        if matches!(from, Away::Active) {
            return Err(Stop::GiveUp(format!(
                "Service {ns}/{app} selects no colour to roll back from"
            )));
        }
        return nothing_deployed(scope, d, reason).await;
    };
    let old = new.other();
    let (old_name, new_name) = (deployment_name(app, old), deployment_name(app, new));
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
    if matches!(from, Away::Active) && marked(ROLLED_BACK_BY, &rid) != Some(new) {
        // Recorded before anything moves, so a re-run rolls back from the same colour.
        let patch = json!({"metadata": {"annotations": {ROLLED_BACK_BY: rid}}});
        scope
            .fence(&format!("marking Deployment {new_name} as rolled back"))
            .await?;
        Api::<Deployment>::namespaced(scope.client.clone(), ns)
            .patch(&new_name, &merge_params(), &Patch::Merge(&patch))
            .await
            .map_err(scope.write(&format!("marking Deployment {new_name} as rolled back")))?;
    }
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
            available(scope, &old_name, replicas, since).await?;
            scope
                .fence(&format!("switching Service {app} back to {old}"))
                .await?;
            bluegreen::set_selector(scope.client, ns, app, &routing.selecting(old))
                .await
                .map_err(scope.write(&format!("switching Service {app} back to {old}")))?;
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
        scope
            .fence(&format!("unscheduling the scale-down of {old_name}"))
            .await?;
        bluegreen::clear_marks(scope.client, ns, &old_name)
            .await
            .map_err(scope.write(&format!("unscheduling the scale-down of {old_name}")))?;
    }
    let selector = scope.routing().await?.selector();
    complete(scope, d, reason, to_revision, to_image, selector).await
}

/// Makes sure a colour has ready pods for the traffic: scaled up if the delay has passed, then
/// followed until available.
async fn available(
    scope: &Scope<'_>,
    name: &str,
    replicas: i32,
    since: SystemTime,
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
        scope.timeout,
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
                let name = deployment_name(scope.app, colour);
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
    let selector = scope.routing().await?.selector();
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
    crate::handler::end_rolled_back(scope.ctx, d, reason).await?;
    Ok(())
}

use crate::handler::give_up;
