//! Running one step of a strategy on the cluster.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use baton_core::fence::{self, Fence, Writer};
use baton_core::lock::Workload;
use baton_core::names::ReleaseId;
use baton_core::rollout::{self, Problem, Rollout};
use baton_core::runtime::AgentContext;
use baton_proto::v1::{PodRef, ReleaseSpec, Strategy};

use crate::error::{Error, Result};
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

/// The deployer's fence: before a write, the release must still own the workload and be neither
/// aborted, failed nor ended.
pub struct Fencer<'a> {
    pub agent: &'a AgentContext,
    pub release_id: ReleaseId,
    pub workload: Workload,
    /// Fault injection (`BATON_FAULT_WRITE_DELAY`): a pause before each check, as a slow or
    /// stalled process would take, for tests of the fence.
    pub delay: Option<Duration>,
}

impl Fencer<'_> {
    /// `Err(Error::Fenced)` when `what` must not be written.
    pub async fn check(&self, what: &str) -> Result<()> {
        if let Some(delay) = self.delay {
            tracing::warn!(
                what,
                delay_ms = delay.as_millis() as u64,
                "fault injection: waiting before the write"
            );
            tokio::time::sleep(delay).await;
        }
        match fence::confirm(
            self.agent,
            self.release_id,
            &self.workload,
            Writer::Deployer,
        )
        .await?
        {
            Fence::Clear => Ok(()),
            Fence::Closed(reason) => {
                tracing::warn!(what, %reason, "fenced: writing nothing");
                Err(Error::Fenced {
                    what: what.to_owned(),
                    reason,
                })
            }
        }
    }
}

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

pub fn describe(
    strategy: Strategy,
    spec: &ReleaseSpec,
    step: u32,
    weight: u32,
    last: bool,
    replicas: i32,
) -> StepPlan {
    match strategy {
        Strategy::Canary => canary::describe(spec, weight, last, replicas),
        Strategy::BlueGreen => bluegreen::describe(spec, step, last),
        _ => StepPlan {
            action: format!("rolling update of Deployment {}", spec.app),
            selector: HashMap::new(),
        },
    }
}

/// Runs a step: changes the cluster, then follows it until ready or failed.
pub async fn run(
    strategy: Strategy,
    ctx: &StepCtx<'_>,
    step: u32,
    weight: u32,
    last: bool,
) -> Result<StepOutcome> {
    match strategy {
        Strategy::Canary => canary::step(ctx, weight, last).await,
        Strategy::BlueGreen => bluegreen::step(ctx, step, last).await,
        _ => rolling(ctx, &ctx.spec.app, None).await,
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
