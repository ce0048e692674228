//! Running one step of a strategy on the cluster.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use baton_core::rollout::{self, Problem, Rollout};
use baton_proto::v1::{PodRef, ReleaseSpec, Strategy};

use crate::error::Result;
use crate::{bluegreen, canary, cluster};

/// What a step needs to know.
pub struct StepCtx<'a> {
    pub client: &'a kube::Client,
    pub spec: &'a ReleaseSpec,
    /// The app's container in the pod template.
    pub container: &'a str,
    /// `repo@sha256:…`
    pub image_ref: &'a str,
    pub release_id: &'a str,
    /// Replicas of the workload when the release began (`deploy.started`).
    pub replicas: i32,
    /// When the step began (its event), for its deadline.
    pub started: SystemTime,
    pub timeout: Duration,
    pub shutdown: &'a CancellationToken,
    /// Checked before every write.
    pub fence: &'a Fencer<'a>,
}

pub use baton_core::fence::Fencer;

/// How a step ended.
#[derive(Debug)]
pub enum StepOutcome {
    /// The step's pods are ready; the health-checker analyses these.
    Ready(Vec<PodRef>),
    Failed(Problem),
}

/// A step's description for its `deploy.step_started` event.
pub struct StepPlan {
    pub action: String,
    pub selector: HashMap<String, String>,
}

/// What describing a step needs (before the step starts).
pub struct Planning<'a> {
    pub client: &'a kube::Client,
    pub spec: &'a ReleaseSpec,
    pub release_id: &'a str,
    /// Replicas of the workload when the release began (`deploy.started`).
    pub replicas: i32,
}

/// A release that has just succeeded.
pub struct Succeeded<'a> {
    pub client: &'a kube::Client,
    pub spec: &'a ReleaseSpec,
    pub release_id: &'a str,
    /// When `release.succeeded` was published (ms).
    pub at_ms: i64,
    pub shutdown: &'a CancellationToken,
    /// Where timers of the strategy run (the supervisor's tasks).
    pub timers: &'a TaskTracker,
}

/// A release strategy as the deployer drives it — one interface, so that the deployer has no
/// special case for any strategy. The steps themselves come from the plan
/// (`baton_core::control::plan`); a driver describes, runs and follows up each of them.
pub trait Driver: Send + Sync {
    /// The step's description for its `deploy.step_started`: what it will do, and the Service
    /// selector it sets, if any.
    fn describe<'a>(
        &'a self,
        planning: &'a Planning<'a>,
        step: u32,
        weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepPlan>>;

    /// Runs the step: changes the cluster (each write fenced), then follows it until ready or
    /// failed.
    fn run<'a>(
        &'a self,
        ctx: &'a StepCtx<'a>,
        step: u32,
        weight: u32,
        last: bool,
    ) -> BoxFuture<'a, Result<StepOutcome>>;

    /// What the strategy does once its release succeeded (nothing by default). It must not hold
    /// the workload back: the next release of the app may start right after.
    fn after_success<'a>(&'a self, _release: &'a Succeeded<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The driver of a strategy.
pub fn driver(strategy: Strategy) -> &'static dyn Driver {
    match strategy {
        Strategy::Canary => &canary::Canary,
        Strategy::BlueGreen => &bluegreen::BlueGreen,
        Strategy::Rolling | Strategy::Unspecified => &Rolling,
    }
}

/// A rolling update: one step at 100%, the new image applied and followed.
pub struct Rolling;

impl Driver for Rolling {
    fn describe<'a>(
        &'a self,
        planning: &'a Planning<'a>,
        _step: u32,
        _weight: u32,
        _last: bool,
    ) -> BoxFuture<'a, Result<StepPlan>> {
        Box::pin(async move {
            Ok(StepPlan {
                action: format!("rolling update of Deployment {}", planning.spec.app),
                selector: HashMap::new(),
            })
        })
    }

    fn run<'a>(
        &'a self,
        ctx: &'a StepCtx<'a>,
        _step: u32,
        _weight: u32,
        _last: bool,
    ) -> BoxFuture<'a, Result<StepOutcome>> {
        Box::pin(rolling(ctx, &ctx.spec.app, None))
    }
}

/// A rolling update of `name` to the new image (with `max_unavailable` forced when given), followed
/// to the end.
pub async fn rolling(
    ctx: &StepCtx<'_>,
    name: &str,
    max_unavailable: Option<&str>,
) -> Result<StepOutcome> {
    let mut spec = ctx.spec.clone();
    spec.app = name.to_owned();
    if let Some(mu) = max_unavailable {
        spec.rolling
            .get_or_insert_with(Default::default)
            .max_unavailable = mu.to_owned();
    }
    ctx.fence
        .check(&format!("applying the new image to Deployment {name}"))
        .await?;
    cluster::apply_image(
        ctx.client,
        &spec,
        ctx.container,
        ctx.image_ref,
        ctx.release_id,
    )
    .await?;
    follow(ctx, name).await
}

/// Follows Deployment `name` until its rollout completes or fails.
pub async fn follow(ctx: &StepCtx<'_>, name: &str) -> Result<StepOutcome> {
    let outcome = rollout::wait(
        ctx.client,
        &ctx.spec.namespace,
        name,
        ctx.started,
        ctx.timeout,
        ctx.shutdown,
        |msg| {
            tracing::info!(deployment = name, progress = msg, "rolling out");
        },
    )
    .await?;
    Ok(match outcome {
        Rollout::Complete { pods, .. } => StepOutcome::Ready(pods),
        Rollout::Failed(problem) => StepOutcome::Failed(problem),
        // `wait` returns only when the rollout is done.
        Rollout::Progressing(msg) => StepOutcome::Failed(Problem {
            kind: baton_proto::v1::FailureKind::Timeout,
            reason: msg,
        }),
    })
}
