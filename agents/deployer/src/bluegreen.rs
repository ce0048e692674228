//! Blue-green: `<app>-blue` and `<app>-green` Deployments behind the Service `<app>`, whose
//! selector names the active colour (label `baton.dev/colour`). Step 0 puts the new image on the
//! idle colour, previewed behind `<app>-preview`, where the pre-promotion analysis judges it
//! before any user sees it; step 1 switches the Service `<app>` to it (post-promotion analysis).
//! After the release succeeded, the old colour stays scaled for `scale_down_delay_seconds`, so a
//! rollback is a selector switch, then it is scaled to 0.
//!
//! Adoption: the first blue-green release of an app that has only a plain `<app>` Deployment
//! copies it to `<app>-blue` (same template, same replicas), waits until that is available (the
//! pods of both match the Service's old selector meanwhile), switches the Service to blue, then
//! scales the plain Deployment to 0. The plain Deployment is kept, as Argo Rollouts keeps a
//! Deployment named by a `workloadRef`: the pre-checks read it, and deleting an object a person
//! made is not Baton's to do. The new colour's pod template is the active colour's (what runs
//! now) with the new image.
//!
//! Writes: the colour Deployments and the preview Service by server-side apply of the whole
//! object, the Service's selector by server-side apply (the field is atomic), all with the field
//! manager `baton`. Replica counts and Baton's bookkeeping annotations are merge patches, because
//! a partial server-side apply would drop what the same manager applied before (the template).
//!
//! The delayed scale-down is written on the old colour as annotations (when, and after which
//! release), so it outlives the deployer process: a timer does it on time ([`after_success`]),
//! and the next step 0 of the app or [`sweep`] does what a dead timer left undone. It never
//! scales a colour the Service selects, nor one a newer release has deployed to since.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use baton_core::bluegreen::{
    annotation, clear_marks, deployment_name, merge_params, preview_name, release_colour,
    set_selector, Colour, Routing, ADOPTED_INTO, COLOUR_LABEL, SCALE_DOWN_AFTER, SCALE_DOWN_AT,
};
use baton_core::config::DEFAULT_SCALE_DOWN_DELAY_SECONDS;
use baton_core::names::ReleaseId;
use baton_core::rollout::{Problem, FIELD_MANAGER, RELEASE_ANNOTATION};
use baton_core::workload;
use baton_proto::v1::{FailureKind, PodRef, ReleaseSpec};

use crate::error::{Error, Result};
use crate::steps::{self, StepCtx, StepOutcome, StepPlan};

/// How often [`sweep`] looks for scale-downs that are due.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Attempts of a scale-down timer whose API calls fail, a few seconds apart.
const TIMER_ATTEMPTS: u32 = 10;
/// Writes of a scale-down that met a newer version of the Deployment.
const CONFLICT_ATTEMPTS: u32 = 5;

/// What a colour Deployment is made of.
struct ColourSpec<'a> {
    app: &'a str,
    colour: Colour,
    /// The selector to build on (the colour label is set on it).
    selector: &'a LabelSelector,
    template: &'a PodTemplateSpec,
    replicas: i32,
    /// `(container, image)` to set, for a new release.
    image: Option<(&'a str, &'a str)>,
    /// The release whose template it is (annotated on the Deployment and its pods).
    release: Option<&'a str>,
}

/// The whole colour Deployment, for a server-side apply.
fn colour_deployment(c: &ColourSpec<'_>) -> std::result::Result<Value, String> {
    let name = deployment_name(c.app, c.colour);
    let colour = c.colour.as_str();
    let mut selector = serde_json::to_value(c.selector).map_err(|e| e.to_string())?;
    selector["matchLabels"][COLOUR_LABEL] = json!(colour);
    let mut template = serde_json::to_value(c.template).map_err(|e| e.to_string())?;
    let mut labels: BTreeMap<String, String> = c
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.remove("pod-template-hash");
    // The pods must match the selector.
    labels.extend(c.selector.match_labels.clone().unwrap_or_default());
    labels.insert(COLOUR_LABEL.into(), colour.into());
    template["metadata"]["labels"] = json!(labels);
    if let Some(obj) = template["metadata"].as_object_mut() {
        obj.remove("creationTimestamp");
    }
    let mut annotations = serde_json::Map::new();
    if let Some(release) = c.release {
        template["metadata"]["annotations"][RELEASE_ANNOTATION] = json!(release);
        annotations.insert(RELEASE_ANNOTATION.into(), json!(release));
    }
    if let Some((container, image)) = c.image {
        let containers = template["spec"]["containers"]
            .as_array_mut()
            .ok_or("the pod template has no containers")?;
        let found = containers
            .iter_mut()
            .filter(|x| x["name"] == container)
            .map(|x| x["image"] = json!(image))
            .count();
        if found == 0 {
            return Err(format!("the pod template has no container {container}"));
        }
        if let Some(release) = c.release {
            annotations.insert(
                "kubernetes.io/change-cause".into(),
                json!(format!("baton release {release}: {image}")),
            );
        }
    }
    let mut metadata = json!({"name": name, "labels": {COLOUR_LABEL: colour}});
    if !annotations.is_empty() {
        metadata["annotations"] = Value::Object(annotations);
    }
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": c.replicas,
            "selector": selector,
            "template": template,
        }
    }))
}

/// The blue-green strategy's driver.
pub struct BlueGreen;

impl steps::Driver for BlueGreen {
    fn describe<'a>(
        &'a self,
        p: &'a steps::Planning<'a>,
        step: u32,
        _weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepPlan>> {
        Box::pin(describe_live(p.client, p.spec, p.release_id, step, last))
    }

    fn run<'a>(
        &'a self,
        ctx: &'a StepCtx<'a>,
        step: u32,
        _weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(self::step(ctx, step, last))
    }

    /// Schedules the old colour's scale-down after the delay.
    fn after_success<'a>(&'a self, r: &'a steps::Succeeded<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(after_success(
            r.client,
            r.spec,
            r.release_id,
            r.at_ms,
            r.shutdown,
            r.timers,
        ))
    }
}

/// The step's description for `deploy.step_started`, without looking at the cluster (which
/// colour is idle is not known here). [`describe_live`] names the colours.
pub fn describe(spec: &ReleaseSpec, step: u32, _last: bool) -> StepPlan {
    let app = &spec.app;
    let action = if step == 0 {
        format!(
            "deploy the new image as the idle colour of {app} behind Service {}",
            preview_name(app)
        )
    } else {
        format!("switch Service {app} to the new colour")
    };
    StepPlan {
        action,
        selector: HashMap::new(),
    }
}

/// The step's description with its colours, and the Service `<app>`'s selector after the step
/// when the step changes it (the adoption in step 0; the switch in step 1).
pub async fn describe_live(
    client: &Client,
    spec: &ReleaseSpec,
    release_id: &str,
    step: u32,
    last: bool,
) -> Result<StepPlan> {
    let ns = spec.namespace.as_str();
    let app = spec.app.as_str();
    let service = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(app)
        .await
        .map_err(read(&format!("Service {app}"), ns))?;
    let Some(routing) = service.as_ref().and_then(|s| Routing::of_service(s).ok()) else {
        return Ok(describe(spec, step, last));
    };
    let hashmap = |s: BTreeMap<String, String>| s.into_iter().collect::<HashMap<_, _>>();
    let preview = preview_name(app);
    if step == 0 {
        return Ok(match routing.active {
            None => StepPlan {
                action: format!(
                    "adopt Deployment {app} as {} and switch Service {app} to blue, then deploy \
                     green behind Service {preview}",
                    deployment_name(app, Colour::Blue)
                ),
                selector: hashmap(routing.selecting(Colour::Blue)),
            },
            Some(active) => {
                let new = active.other();
                StepPlan {
                    action: format!(
                        "deploy {new} ({}) behind Service {preview}; {active} keeps serving",
                        deployment_name(app, new)
                    ),
                    selector: HashMap::new(),
                }
            }
        });
    }
    let new = match release_colour(client, ns, app, release_id)
        .await
        .map_err(read(&format!("the colours of {app}"), ns))?
    {
        Some(c) => c,
        None => routing.active.map(Colour::other).unwrap_or(Colour::Green),
    };
    Ok(StepPlan {
        action: format!("switch Service {app} to {new}"),
        selector: hashmap(routing.selecting(new)),
    })
}

/// Why a step stops: a problem that fails the release, or an error worth retrying.
enum Stop {
    Failed(Problem),
    Error(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Error(e)
    }
}

impl From<baton_core::rollout::WaitError> for Stop {
    fn from(e: baton_core::rollout::WaitError) -> Self {
        Stop::Error(Error::Rollout(e))
    }
}

fn failed<T>(kind: FailureKind, reason: String) -> std::result::Result<T, Stop> {
    Err(Stop::Failed(Problem { kind, reason }))
}

fn read(what: &str, namespace: &str) -> impl FnOnce(kube::Error) -> Error {
    let (what, namespace) = (what.to_owned(), namespace.to_owned());
    move |source| Error::Read {
        what,
        namespace,
        source,
    }
}

/// A write refused for good (invalid, forbidden, gone) fails the release with the API's
/// reason; anything else is retried.
fn write(what: &str, namespace: &str) -> impl FnOnce(kube::Error) -> Stop {
    let (what, namespace) = (what.to_owned(), namespace.to_owned());
    move |source| match &source {
        kube::Error::Api(status) if matches!(status.code, 400 | 403 | 404 | 422) => {
            Stop::Failed(Problem {
                kind: FailureKind::Cluster,
                reason: format!("{what}: {}", status.message),
            })
        }
        _ => Stop::Error(Error::Write {
            what,
            namespace,
            source,
        }),
    }
}

pub async fn step(ctx: &StepCtx<'_>, step: u32, _last: bool) -> Result<StepOutcome> {
    let run = if step == 0 {
        preview(ctx).await
    } else {
        switch(ctx).await
    };
    match run {
        Ok(pods) => Ok(StepOutcome::Ready(pods)),
        Err(Stop::Failed(problem)) => Ok(StepOutcome::Failed(problem)),
        Err(Stop::Error(e)) => Err(e),
    }
}

/// The fence before a write of a step.
async fn fence(ctx: &StepCtx<'_>, what: &str) -> std::result::Result<(), Stop> {
    ctx.fence
        .check(what)
        .await
        .map_err(|e| Stop::Error(e.into()))
}

/// The ready pods of a followed colour; a colour without any (scaled to 0) cannot take traffic.
fn ready(outcome: StepOutcome, name: &str) -> std::result::Result<Vec<PodRef>, Stop> {
    match outcome {
        StepOutcome::Ready(pods) if pods.is_empty() => failed(
            FailureKind::Cluster,
            format!("Deployment {name} has no ready pods (was it scaled down?)"),
        ),
        StepOutcome::Ready(pods) => Ok(pods),
        StepOutcome::Failed(problem) => Err(Stop::Failed(problem)),
    }
}

/// The Service `<app>` and how it routes.
async fn service(ctx: &StepCtx<'_>) -> std::result::Result<(Service, Routing), Stop> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let Some(service) = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .get_opt(app)
        .await
        .map_err(read(&format!("Service {app}"), ns))?
    else {
        return failed(
            FailureKind::Precheck,
            format!("blue-green needs a Service {app} in namespace {ns} to switch"),
        );
    };
    match Routing::of_service(&service) {
        Ok(r) => Ok((service, r)),
        Err(reason) => failed(FailureKind::Precheck, reason),
    }
}

/// Step 0: the new image on the idle colour, behind the preview Service, followed to ready.
async fn preview(ctx: &StepCtx<'_>) -> std::result::Result<Vec<PodRef>, Stop> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    // What a timer of a deployer that has died since left undone.
    if let Err(e) = scale_down_due(ctx.client, ns, app).await {
        tracing::warn!(error = %e, "could not scale down an old colour now; later");
    }
    let (service, routing) = service(ctx).await?;
    let ports = workload::service_ports(&service);
    if ports.as_array().is_none_or(|p| p.is_empty()) {
        return failed(
            FailureKind::Precheck,
            format!(
                "Service {app} has no ports to give Service {}",
                preview_name(app)
            ),
        );
    }
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), ns);
    let active = match routing.active {
        Some(active) => {
            finish_adoption(ctx).await?;
            active
        }
        None => {
            adopt(ctx, &routing).await?;
            Colour::Blue
        }
    };
    let new = active.other();
    let active_name = deployment_name(app, active);
    let new_name = deployment_name(app, new);
    let Some(current) = deployments
        .get_opt(&active_name)
        .await
        .map_err(read(&format!("Deployment {active_name}"), ns))?
    else {
        return failed(
            FailureKind::Cluster,
            format!("Service {app} selects {active}, but Deployment {active_name} does not exist"),
        );
    };
    let replicas = current
        .spec
        .replicas
        .filter(|r| *r > 0)
        .unwrap_or(ctx.replicas.max(1));
    let (selector, template) = (&current.spec.selector, &current.spec.template);
    // A scale-down scheduled on this colour by an earlier release must not hit the new pods.
    fence(ctx, &format!("deploying Deployment {new_name}")).await?;
    clear_marks(ctx.client, ns, &new_name).await.map_err(write(
        &format!("Deployment {new_name} (unscheduling its scale-down)"),
        ns,
    ))?;
    let object = colour_deployment(&ColourSpec {
        app,
        colour: new,
        selector,
        template,
        replicas,
        image: Some((ctx.container, ctx.image_ref)),
        release: Some(ctx.release_id),
    })
    .or_else(|reason| {
        failed(
            FailureKind::Precheck,
            format!("Deployment {active_name}: {reason}"),
        )
    })?;
    tracing::info!(colour = %new, replicas, "deploying the new colour");
    deployments
        .patch(
            &new_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(write(
            &format!("Deployment {new_name} (applying the new image)"),
            ns,
        ))?;
    let preview = preview_name(app);
    fence(ctx, &format!("applying Service {preview}")).await?;
    let preview_service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": preview, "labels": {COLOUR_LABEL: new.as_str()}},
        "spec": {"selector": routing.selecting(new), "ports": ports},
    });
    Api::<Service>::namespaced(ctx.client.clone(), ns)
        .patch(
            &preview,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&preview_service),
        )
        .await
        .map_err(write(&format!("Service {preview} (applying it)"), ns))?;
    ready(steps::follow(ctx, &new_name).await?, &new_name)
}

/// Step 1: the Service to the new colour, once the new colour is still all there.
async fn switch(ctx: &StepCtx<'_>) -> std::result::Result<Vec<PodRef>, Stop> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let (_, routing) = service(ctx).await?;
    let Some(new) = release_colour(ctx.client, ns, app, ctx.release_id)
        .await
        .map_err(read(&format!("the colours of {app}"), ns))?
    else {
        return failed(
            FailureKind::Cluster,
            format!("no colour of {app} runs release {}", ctx.release_id),
        );
    };
    let name = deployment_name(app, new);
    let pods = ready(steps::follow(ctx, &name).await?, &name)?;
    if routing.active != Some(new) {
        tracing::info!(colour = %new, "switching the Service");
        fence(ctx, &format!("switching Service {app} to {new}")).await?;
        set_selector(ctx.client, ns, app, &routing.selecting(new))
            .await
            .map_err(write(&format!("Service {app} (switching it to {new})"), ns))?;
    }
    Ok(pods)
}

/// The plain Deployment becomes `<app>-blue` without a moment with no ready pod behind the
/// Service: blue is made from its template and replicas and followed until available, then
/// the Service selects blue, then the plain Deployment is scaled to 0 (and kept).
async fn adopt(ctx: &StepCtx<'_>, routing: &Routing) -> std::result::Result<(), Stop> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), ns);
    let Some(plain) = deployments
        .get_opt(app)
        .await
        .map_err(read(&format!("Deployment {app}"), ns))?
    else {
        return failed(
            FailureKind::Precheck,
            format!("Deployment {app} does not exist in namespace {ns}"),
        );
    };
    let spec = &plain.spec;
    let blue = deployment_name(app, Colour::Blue);
    tracing::info!(deployment = app, into = %blue, "adopting the plain Deployment");
    // Recorded first, so a restarted deployer knows to finish the hand-over.
    fence(ctx, &format!("adopting Deployment {app}")).await?;
    deployments
        .patch(
            app,
            &merge_params(),
            &Patch::Merge(json!({"metadata": {"annotations": {ADOPTED_INTO: blue}}})),
        )
        .await
        .map_err(write(&format!("Deployment {app} (marking it adopted)"), ns))?;
    clear_marks(ctx.client, ns, &blue).await.map_err(write(
        &format!("Deployment {blue} (unscheduling its scale-down)"),
        ns,
    ))?;
    let object = colour_deployment(&ColourSpec {
        app,
        colour: Colour::Blue,
        selector: &spec.selector,
        template: &spec.template,
        replicas: spec.replicas.unwrap_or(1),
        image: None,
        release: annotation(&plain, RELEASE_ANNOTATION),
    })
    .or_else(|reason| failed(FailureKind::Precheck, format!("Deployment {app}: {reason}")))?;
    deployments
        .patch(
            &blue,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(write(
            &format!("Deployment {blue} (copying Deployment {app})"),
            ns,
        ))?;
    match steps::follow(ctx, &blue).await? {
        StepOutcome::Ready(_) => {}
        StepOutcome::Failed(p) => {
            return failed(
                p.kind,
                format!("adopting Deployment {app} as {blue}: {}", p.reason),
            )
        }
    }
    fence(ctx, &format!("switching Service {app} to blue")).await?;
    set_selector(ctx.client, ns, app, &routing.selecting(Colour::Blue))
        .await
        .map_err(write(&format!("Service {app} (switching it to blue)"), ns))?;
    finish_adoption(ctx).await
}

/// Scales an adopted plain Deployment to 0, once the Service selects a colour.
async fn finish_adoption(ctx: &StepCtx<'_>) -> std::result::Result<(), Stop> {
    let ns = ctx.spec.namespace.as_str();
    let app = ctx.spec.app.as_str();
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), ns);
    let Some(plain) = deployments
        .get_opt(app)
        .await
        .map_err(read(&format!("Deployment {app}"), ns))?
    else {
        return Ok(());
    };
    let replicas = plain.spec.replicas.unwrap_or(1);
    if annotation(&plain, ADOPTED_INTO).is_some() && replicas > 0 {
        tracing::info!(deployment = app, "scaling the adopted Deployment to 0");
        fence(ctx, &format!("scaling Deployment {app} to 0")).await?;
        deployments
            .patch(
                app,
                &merge_params(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await
            .map_err(write(&format!("Deployment {app} (scaling it to 0)"), ns))?;
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long the old colour stays scaled after a release succeeded.
pub fn scale_down_delay(spec: &ReleaseSpec) -> Duration {
    Duration::from_secs(u64::from(
        spec.blue_green
            .as_ref()
            .map(|b| b.scale_down_delay_seconds)
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECONDS),
    ))
}

/// A blue-green release succeeded (`succeeded_ms`: the time of its `release.succeeded`): the old
/// colour is marked to be scaled down after the delay, and a timer of this process does it then.
/// Idempotent; cheap (the wait is not done here). Does nothing unless the Service selects the
/// release's colour.
pub async fn after_success(
    client: &Client,
    spec: &ReleaseSpec,
    release_id: &str,
    succeeded_ms: i64,
    shutdown: &CancellationToken,
    timers: &TaskTracker,
) -> Result<()> {
    let ns = spec.namespace.as_str();
    let app = spec.app.as_str();
    let Some(service) = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(app)
        .await
        .map_err(read(&format!("Service {app}"), ns))?
    else {
        return Ok(());
    };
    let Some(active) = Routing::of_service(&service).ok().and_then(|r| r.active) else {
        return Ok(());
    };
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let active_name = deployment_name(app, active);
    let serving = deployments
        .get_opt(&active_name)
        .await
        .map_err(read(&format!("Deployment {active_name}"), ns))?;
    if serving
        .as_ref()
        .and_then(|d| annotation(d, RELEASE_ANNOTATION))
        != Some(release_id)
    {
        tracing::info!(colour = %active, "the Service does not select this release's colour; nothing to scale down");
        return Ok(());
    }
    let old = deployment_name(app, active.other());
    let Some(d) = deployments
        .get_opt(&old)
        .await
        .map_err(read(&format!("Deployment {old}"), ns))?
    else {
        return Ok(());
    };
    if d.spec.replicas.unwrap_or(1) == 0 {
        return Ok(());
    }
    let deadline = succeeded_ms.saturating_add(scale_down_delay(spec).as_millis() as i64);
    if annotation(&d, SCALE_DOWN_AFTER) != Some(release_id) {
        tracing::info!(deployment = %old, delay_seconds = scale_down_delay(spec).as_secs(), "old colour kept scaled for the delay");
        deployments
            .patch(
                &old,
                &merge_params(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    SCALE_DOWN_AT: deadline.to_string(),
                    SCALE_DOWN_AFTER: release_id,
                }}})),
            )
            .await
            .map_err(read(
                &format!("Deployment {old} (scheduling its scale-down)"),
                ns,
            ))?;
    }
    let (client, ns, app, shutdown) = (
        client.clone(),
        ns.to_owned(),
        app.to_owned(),
        shutdown.clone(),
    );
    timers.spawn(async move {
        let mut due = deadline;
        let mut attempts = 0;
        loop {
            let wait = Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match scale_down_due(&client, &ns, &app).await {
                Ok(None) => return,
                Ok(Some(later)) => due = later,
                Err(e) => {
                    attempts += 1;
                    if attempts >= TIMER_ATTEMPTS {
                        tracing::warn!(error = %e, app, "giving up scaling down the old colour; the next release of the app will");
                        return;
                    }
                    tracing::warn!(error = %e, app, "scaling down the old colour failed; trying again");
                    due = now_ms() + 3_000;
                }
            }
        }
    });
    Ok(())
}

/// What to do with a colour's scheduled scale-down.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ScaleDown {
    NotScheduled,
    /// Due at this time (ms).
    Later(i64),
    Now,
    /// The schedule no longer applies: remove it.
    Cancel(&'static str),
}

fn scale_down_verdict(
    annotations: &BTreeMap<String, String>,
    replicas: i32,
    colour: Colour,
    active: Option<Colour>,
    now_ms: i64,
) -> ScaleDown {
    let Some(at) = annotations.get(SCALE_DOWN_AT) else {
        return ScaleDown::NotScheduled;
    };
    let Ok(at) = at.parse::<i64>() else {
        return ScaleDown::Cancel("the schedule is unreadable");
    };
    if active != Some(colour.other()) {
        return ScaleDown::Cancel("the Service selects it");
    }
    let newer = match (
        annotations
            .get(RELEASE_ANNOTATION)
            .and_then(|r| ReleaseId::parse(r).ok()),
        annotations
            .get(SCALE_DOWN_AFTER)
            .and_then(|r| ReleaseId::parse(r).ok()),
    ) {
        // Release ids are UUID v7: they sort by creation time.
        (Some(running), Some(after)) => running > after,
        _ => false,
    };
    if newer {
        return ScaleDown::Cancel("a newer release has deployed to it");
    }
    if replicas == 0 {
        return ScaleDown::Cancel("it is scaled down already");
    }
    if at > now_ms {
        ScaleDown::Later(at)
    } else {
        ScaleDown::Now
    }
}

/// Scales down the colours of `app` whose delay is over; returns when the next one is due.
pub async fn scale_down_due(client: &Client, ns: &str, app: &str) -> Result<Option<i64>> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let mut next: Option<i64> = None;
    for colour in Colour::ALL {
        let name = deployment_name(app, colour);
        // A conflict means the Deployment changed between the read and the write (its status,
        // or a newer release taking the colour): look again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(d) = deployments
                .get_opt(&name)
                .await
                .map_err(read(&format!("Deployment {name}"), ns))?
            else {
                break;
            };
            let annotations = d.metadata.annotations.clone().unwrap_or_default();
            if !annotations.contains_key(SCALE_DOWN_AT) {
                break;
            }
            let active = Api::<Service>::namespaced(client.clone(), ns)
                .get_opt(app)
                .await
                .map_err(read(&format!("Service {app}"), ns))?
                .and_then(|s| Routing::of_service(&s).ok())
                .and_then(|r| r.active);
            let replicas = d.spec.replicas.unwrap_or(1);
            let mut patch = json!({"metadata": {
                "resourceVersion": d.metadata.resource_version,
                "annotations": {SCALE_DOWN_AT: null, SCALE_DOWN_AFTER: null},
            }});
            let cancelled =
                match scale_down_verdict(&annotations, replicas, colour, active, now_ms()) {
                    ScaleDown::NotScheduled => break,
                    ScaleDown::Later(at) => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        break;
                    }
                    ScaleDown::Cancel(why) => Some(why),
                    ScaleDown::Now => {
                        patch["spec"] = json!({"replicas": 0});
                        None
                    }
                };
            match deployments
                .patch(&name, &merge_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    match cancelled {
                        Some(why) => {
                            tracing::info!(deployment = %name, why, "scale-down cancelled")
                        }
                        None => {
                            tracing::info!(deployment = %name, "the delay is over: old colour scaled to 0")
                        }
                    }
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < CONFLICT_ATTEMPTS => {}
                Err(e) => return Err(read(&format!("Deployment {name} (scaling it down)"), ns)(e)),
            }
        }
    }
    Ok(next)
}

/// Runs forever: does the scale-downs that are due in every namespace, at start (those whose
/// timer died with an earlier deployer process), then when the next one is due, and at least
/// every half minute. Lists the colour Deployments cluster-wide.
pub async fn sweep(client: Client, shutdown: CancellationToken) {
    let mut warned = false;
    while !shutdown.is_cancelled() {
        let next = match sweep_once(&client).await {
            Ok(next) => next,
            // Said once: without the right to list Deployments cluster-wide it fails every time.
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot look for old colours to scale down");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for old colours to scale down");
                None
            }
        };
        let wait = next
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64))
            .unwrap_or(SWEEP_INTERVAL)
            .min(SWEEP_INTERVAL);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One sweep; returns when the next scale-down is due.
async fn sweep_once(client: &Client) -> Result<Option<i64>> {
    let deployments = Api::<Deployment>::all(client.clone())
        .list(&ListParams::default().labels(COLOUR_LABEL))
        .await
        .map_err(read("the colour Deployments", "every namespace"))?
        .items;
    let now = now_ms();
    let mut next: Option<i64> = None;
    for d in &deployments {
        let Some(at) = annotation(d, SCALE_DOWN_AT).and_then(|a| a.parse::<i64>().ok()) else {
            continue;
        };
        if at > now {
            next = Some(next.map_or(at, |n| n.min(at)));
            continue;
        }
        let (Some(ns), Some(name)) = (d.metadata.namespace.as_deref(), d.metadata.name.as_deref())
        else {
            continue;
        };
        let Some(app) = Colour::ALL
            .iter()
            .find_map(|c| name.strip_suffix(&format!("-{c}")))
        else {
            continue;
        };
        match scale_down_due(client, ns, app).await {
            Ok(Some(at)) => next = Some(next.map_or(at, |n| n.min(at))),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, namespace = ns, app, "scale-down failed; next sweep")
            }
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_colour_is_the_template_with_the_colour_label_and_the_new_image() {
        let plain: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web", "pod-template-hash": "abc"}, "annotations": {RELEASE_ANNOTATION: "old"}},
                    "spec": {"containers": [{"name": "app", "image": "web:v1"}, {"name": "sidecar", "image": "proxy:1"}]}
                }
            }
        }))
        .unwrap();
        let spec = &plain.spec;
        let green = colour_deployment(&ColourSpec {
            app: "web",
            colour: Colour::Green,
            selector: &spec.selector,
            template: &spec.template,
            replicas: 3,
            image: Some(("app", "web@sha256:2")),
            release: Some("r2"),
        })
        .unwrap();
        assert_eq!(green["metadata"]["name"], "web-green");
        assert_eq!(green["metadata"]["annotations"][RELEASE_ANNOTATION], "r2");
        assert_eq!(green["spec"]["replicas"], 3);
        assert_eq!(
            green["spec"]["selector"]["matchLabels"],
            json!({"app": "web", COLOUR_LABEL: "green"})
        );
        let t = &green["spec"]["template"];
        assert_eq!(
            t["metadata"]["labels"],
            json!({"app": "web", COLOUR_LABEL: "green"})
        );
        assert_eq!(t["metadata"]["annotations"][RELEASE_ANNOTATION], "r2");
        assert_eq!(t["spec"]["containers"][0]["image"], "web@sha256:2");
        assert_eq!(t["spec"]["containers"][1]["image"], "proxy:1");
        // Adoption keeps the image and the template's own release.
        let blue = colour_deployment(&ColourSpec {
            app: "web",
            colour: Colour::Blue,
            selector: &spec.selector,
            template: &spec.template,
            replicas: 3,
            image: None,
            release: None,
        })
        .unwrap();
        assert_eq!(
            blue["spec"]["template"]["spec"]["containers"][0]["image"],
            "web:v1"
        );
        assert_eq!(
            blue["spec"]["template"]["metadata"]["annotations"][RELEASE_ANNOTATION],
            "old"
        );
        assert!(blue["metadata"].get("annotations").is_none());
        let missing = colour_deployment(&ColourSpec {
            app: "web",
            colour: Colour::Green,
            selector: &spec.selector,
            template: &spec.template,
            replicas: 3,
            image: Some(("web", "web@sha256:2")),
            release: Some("r2"),
        })
        .unwrap_err();
        assert!(missing.contains("no container web"), "{missing}");
    }

    #[test]
    fn an_old_colour_is_scaled_down_only_when_due_idle_and_not_taken_over() {
        let older = "01900000-0000-7000-8000-000000000001";
        let release = "01900000-0000-7000-8000-000000000002";
        let newer = "01900000-0000-7000-8000-000000000003";
        let marks = |running: &str| -> BTreeMap<String, String> {
            [
                (SCALE_DOWN_AT, "1000"),
                (SCALE_DOWN_AFTER, release),
                (RELEASE_ANNOTATION, running),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        use Colour::*;
        // (case, annotations, replicas, active colour, now, verdict) for the blue Deployment.
        type Case = (
            &'static str,
            BTreeMap<String, String>,
            i32,
            Option<Colour>,
            i64,
            ScaleDown,
        );
        let cases: Vec<Case> = vec![
            (
                "not scheduled",
                BTreeMap::new(),
                2,
                Some(Green),
                5000,
                ScaleDown::NotScheduled,
            ),
            (
                "before the delay",
                marks(older),
                2,
                Some(Green),
                500,
                ScaleDown::Later(1000),
            ),
            (
                "after the delay",
                marks(older),
                2,
                Some(Green),
                1000,
                ScaleDown::Now,
            ),
            (
                "the Service switched back to it",
                marks(older),
                2,
                Some(Blue),
                5000,
                ScaleDown::Cancel("the Service selects it"),
            ),
            (
                "the Service selects every colour",
                marks(older),
                2,
                None,
                5000,
                ScaleDown::Cancel("the Service selects it"),
            ),
            (
                "a newer release deployed to it",
                marks(newer),
                2,
                Some(Green),
                5000,
                ScaleDown::Cancel("a newer release has deployed to it"),
            ),
            (
                "adopted, without a release",
                {
                    let mut m = marks(older);
                    m.remove(RELEASE_ANNOTATION);
                    m
                },
                2,
                Some(Green),
                5000,
                ScaleDown::Now,
            ),
            (
                "already at 0",
                marks(older),
                0,
                Some(Green),
                5000,
                ScaleDown::Cancel("it is scaled down already"),
            ),
            (
                "unreadable",
                {
                    let mut m = marks(older);
                    m.insert(SCALE_DOWN_AT.into(), "soon".into());
                    m
                },
                2,
                Some(Green),
                5000,
                ScaleDown::Cancel("the schedule is unreadable"),
            ),
        ];
        for (name, annotations, replicas, active, now, expected) in cases {
            assert_eq!(
                scale_down_verdict(&annotations, replicas, Blue, active, now),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn steps_are_described_without_the_cluster() {
        let spec = ReleaseSpec {
            app: "web".into(),
            ..Default::default()
        };
        assert!(describe(&spec, 0, false).action.contains("web-preview"));
        assert_eq!(
            describe(&spec, 1, true).action,
            "switch Service web to the new colour"
        );
    }
}
