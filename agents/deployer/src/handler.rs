//! The deployer's reactions to events. Each is idempotent: it decides from the release's folded
//! history and publishes with deterministic ids, so running it twice (after a crash) does no harm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use baton_core::bus::{EVENTS_STREAM, LOCKS_BUCKET};
use baton_core::event::{timestamp_ms, Event, EventType};
use baton_core::fold::ReleaseState;
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::rollout;
use baton_core::runtime::{AgentContext, Delivery, Handler, HandlerError};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};

use crate::cluster;
use crate::decide::{self, Next};
use crate::error::{Error, Result};
use crate::lock::{self, Lock};
use crate::steps;

/// The default step timeout when the spec gives none.
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Deployer {
    pub client: kube::Client,
    /// Releases this process is driving right now, each with a "poked" flag: a second trigger for
    /// the same release must not drive it twice at once, but must not be lost either — the
    /// driver looks at the history once more before it stops.
    driving: Arc<Mutex<HashMap<ReleaseId, bool>>>,
}

impl Deployer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            driving: Arc::default(),
        }
    }
}

impl Handler for Deployer {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move { self.on_event(ctx, d).await.map_err(HandlerError::from) })
    }
}

/// Frees the in-process "driving" mark when the drive ends, however it ends.
struct DrivingGuard(Arc<Mutex<HashMap<ReleaseId, bool>>>, ReleaseId);

impl DrivingGuard {
    /// Whether another trigger came while driving (and forget it).
    fn take_poke(&self) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(&self.1).map(std::mem::take))
            .unwrap_or(false)
    }
}

impl Drop for DrivingGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(&self.1);
        }
    }
}

impl Deployer {
    async fn on_event(&self, ctx: &AgentContext, d: Delivery) -> Result<()> {
        let (events, state) = ctx.release_state(d.subject.release_id).await?;
        if let Some(spec) = &state.spec {
            if !spec.cluster.is_empty() && spec.cluster != ctx.cluster {
                tracing::debug!(cluster = %spec.cluster, "release of another cluster");
                return Ok(());
            }
        }
        match d.event.event_type {
            EventType::ReleaseRequested => self.on_requested(ctx, &d, &state).await,
            // Each of these may let the release go further: drive it as far as it goes now.
            EventType::BuildSucceeded | EventType::AnalysisPassed => {
                if self
                    .lock_for(ctx, &d.subject, d.subject.release_id, &state)
                    .await?
                    == Lock::Held
                {
                    self.drive(ctx, &d.subject, &d.event, &events, state)
                        .await?;
                }
                Ok(())
            }
            EventType::ReleasePauseRequested => self.on_pause(ctx, &d, &state).await,
            EventType::ReleaseResumeRequested | EventType::ReleasePromoteRequested => {
                self.on_resume_or_promote(ctx, &d, &state).await?;
                let (events, state) = ctx.release_state(d.subject.release_id).await?;
                if self
                    .lock_for(ctx, &d.subject, d.subject.release_id, &state)
                    .await?
                    == Lock::Held
                {
                    self.drive(ctx, &d.subject, &d.event, &events, state)
                        .await?;
                }
                Ok(())
            }
            EventType::ReleaseSucceeded
            | EventType::ReleaseFailed
            | EventType::ReleaseRolledBack => {
                // Blue-green: schedule the old colour's scale-down before a queued release of the
                // app may start. Never holds the lock back: a schedule that could not be written
                // is left to the next release of the app.
                if let Some(spec) = state.spec.as_ref().filter(|s| {
                    d.event.event_type == EventType::ReleaseSucceeded
                        && decide::strategy(s) == Strategy::BlueGreen
                }) {
                    if let Err(e) = crate::bluegreen::after_success(
                        &self.client,
                        spec,
                        &d.subject.release_id.to_string(),
                        d.event.time_ms(),
                        &ctx.shutdown,
                    )
                    .await
                    {
                        tracing::warn!(error = %e, "could not schedule the old colour's scale-down");
                    }
                }
                self.on_ended(ctx, &d).await
            }
            _ => Ok(()),
        }
    }

    /// A person asks to hold the release where it is.
    async fn on_pause(&self, ctx: &AgentContext, d: &Delivery, state: &ReleaseState) -> Result<()> {
        if state.terminal.is_some() || !state.deploy_started || state.is_paused() {
            tracing::info!("nothing to pause");
            return Ok(());
        }
        let step = state.current_step().unwrap_or(0);
        let reason = match d.event.payload() {
            Some(Payload::ReleasePauseRequested(p)) if !p.reason.is_empty() => {
                format!("paused by {}: {}", d.event.envelope.actor, p.reason)
            }
            _ => format!("paused by {}", d.event.envelope.actor),
        };
        ctx.emit(
            d,
            EventKey::Named(d.event.id()),
            Payload::ReleasePaused(ReleasePaused {
                step,
                reason,
                gate: false,
            }),
        )
        .await?;
        Ok(())
    }

    /// A person resumes a paused release, or promotes one waiting at a gate (or all the way).
    async fn on_resume_or_promote(
        &self,
        ctx: &AgentContext,
        d: &Delivery,
        state: &ReleaseState,
    ) -> Result<()> {
        if state.terminal.is_some() || !state.is_paused() {
            return Ok(());
        }
        // The step that is held: the highest with a pause not yet resumed.
        let step = state
            .step_pauses
            .keys()
            .rev()
            .find(|s| state.is_paused_at(**s))
            .copied()
            .unwrap_or_else(|| state.current_step().unwrap_or(0));
        ctx.emit(
            d,
            EventKey::Named(d.event.id()),
            Payload::ReleaseResumed(ReleaseResumed { step }),
        )
        .await?;
        Ok(())
    }

    async fn on_requested(
        &self,
        ctx: &AgentContext,
        d: &Delivery,
        state: &ReleaseState,
    ) -> Result<()> {
        if state.terminal.is_some() {
            return Ok(());
        }
        match self
            .lock_for(ctx, &d.subject, d.subject.release_id, state)
            .await?
        {
            Lock::Held => {
                tracing::info!("lock taken; the release goes ahead once built");
                Ok(())
            }
            Lock::HeldBy(other) => {
                tracing::info!(blocking = %other, "another release of this app is in flight; queued");
                ctx.emit(
                    d,
                    EventKey::Once,
                    Payload::ReleaseQueued(ReleaseQueued {
                        blocking_release_id: other,
                    }),
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Takes the app's lock for `release`, freeing it first if its holder has already ended.
    async fn lock_for(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        release: ReleaseId,
        state: &ReleaseState,
    ) -> Result<Lock> {
        // Only a requested, unfinished release may hold the app: a stray event of a release
        // without its request must never lock others out.
        if state.terminal.is_some() || state.spec.is_none() {
            return Ok(Lock::HeldBy(String::new()));
        }
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        let key = lock::key(subject.env.as_str(), subject.app.as_str());
        match lock::acquire(&store, &key, release).await? {
            Lock::HeldBy(holder) => {
                let ended = match ReleaseId::parse(&holder) {
                    Ok(h) => ctx.release_state(h).await?.1.terminal.is_some(),
                    Err(_) => true,
                };
                if ended {
                    tracing::warn!(%holder, "the lock's holder has ended; taking the lock over");
                    lock::release_stale(&store, &key, &holder).await?;
                    lock::acquire(&store, &key, release).await
                } else {
                    Ok(Lock::HeldBy(holder))
                }
            }
            held => Ok(held),
        }
    }

    /// Carries the release as far as it can go now: pre-checks, the steps that are due, their
    /// gates, and the completion.
    async fn drive(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        events: &[Event],
        state: ReleaseState,
    ) -> Result<()> {
        let rid = subject.release_id;
        {
            let Ok(mut map) = self.driving.lock() else {
                return Ok(());
            };
            if let Some(poked) = map.get_mut(&rid) {
                *poked = true;
                tracing::debug!("already driving this release; it will look again");
                return Ok(());
            }
            map.insert(rid, false);
        }
        let guard = DrivingGuard(self.driving.clone(), rid);
        let mut state = state;
        let mut events = events.to_vec();
        loop {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let next = decide::next(&state, now);
            tracing::debug!(?next, "next");
            match next {
                Next::Wait(why) => {
                    if !guard.take_poke() {
                        tracing::debug!(why, "nothing to do now");
                        return Ok(());
                    }
                }
                Next::WaitFor { ms } => {
                    tracing::info!(seconds = ms / 1000, "pausing");
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Err(Error::Rollout(baton_core::rollout::WaitError::Shutdown)),
                        _ = tokio::time::sleep(Duration::from_millis(ms.clamp(0, 5_000) as u64)) => {}
                    }
                }
                Next::PreCheck => self.precheck(ctx, subject, cause, &state).await?,
                Next::Step { step, weight, last } => {
                    if !self
                        .step(ctx, subject, cause, &events, &state, step, weight, last)
                        .await?
                    {
                        return Ok(());
                    }
                }
                Next::Gate {
                    step,
                    until_promoted,
                    seconds,
                } => {
                    let reason = if until_promoted {
                        "waiting for a person to promote (baton promote)".to_owned()
                    } else {
                        format!("pause of {seconds}s after step {step}")
                    };
                    ctx.emit_for(
                        subject,
                        cause,
                        EventKey::Named(&format!("gate-{step}")),
                        Payload::ReleasePaused(ReleasePaused {
                            step,
                            reason,
                            gate: true,
                        }),
                    )
                    .await?;
                }
                Next::EndGate { step } => {
                    ctx.emit_for(
                        subject,
                        cause,
                        EventKey::Named(&format!("gate-{step}-end")),
                        Payload::ReleaseResumed(ReleaseResumed { step }),
                    )
                    .await?;
                }
                Next::Complete => {
                    self.complete(ctx, subject, cause, &state).await?;
                    return Ok(());
                }
            }
            events = ctx.bus.release_history(rid).await?;
            state = baton_core::fold::fold(&events);
        }
    }

    async fn precheck(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        state: &ReleaseState,
    ) -> Result<()> {
        let spec = state.spec.clone().ok_or(Error::NoSpec {
            release_id: subject.release_id.to_string(),
        })?;
        let checked = match cluster::prechecks(&self.client, &spec).await? {
            Err(reason) => {
                return self
                    .fail(ctx, subject, cause, 0, FailureKind::Precheck, false, reason)
                    .await;
            }
            Ok(checked) => checked,
        };
        let image = checked
            .deployment
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == checked.container))
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let revision = checked
            .deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(rollout::REVISION).cloned())
            .unwrap_or_default();
        ctx.emit_for(
            subject,
            cause,
            EventKey::Once,
            Payload::DeployStarted(DeployStarted {
                strategy: decide::strategy(&spec) as i32,
                previous_revision: revision,
                previous_image: image,
                workload: checked.name.clone(),
                replicas: checked.deployment.spec.replicas.unwrap_or(1).max(0) as u32,
            }),
        )
        .await?;
        Ok(())
    }

    /// Runs one step: change the cluster, follow it, publish ready or failed. True when ready.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        events: &[Event],
        state: &ReleaseState,
        step: u32,
        weight: u32,
        last: bool,
    ) -> Result<bool> {
        let rid = subject.release_id;
        let spec = state.spec.clone().ok_or(Error::NoSpec {
            release_id: rid.to_string(),
        })?;
        let strategy = decide::strategy(&spec);
        let replicas = events
            .iter()
            .find_map(|e| match e.payload() {
                Some(Payload::DeployStarted(d)) => Some(d.replicas as i32),
                _ => None,
            })
            .unwrap_or(1);
        let started_event = match events
            .iter()
            .find(|e| matches!(e.payload(), Some(Payload::DeployStepStarted(s)) if s.step == step))
        {
            Some(e) => e.clone(),
            None => {
                let plan = if strategy == Strategy::BlueGreen {
                    crate::bluegreen::describe_live(
                        &self.client,
                        &spec,
                        &rid.to_string(),
                        step,
                        last,
                    )
                    .await?
                } else {
                    steps::describe(strategy, &spec, step, weight, last, replicas)
                };
                tracing::info!(step, weight, action = %plan.action, "step");
                ctx.emit_for(
                    subject,
                    cause,
                    EventKey::Step(step),
                    Payload::DeployStepStarted(DeployStepStarted {
                        step,
                        weight,
                        action: plan.action,
                        selector: plan.selector,
                    }),
                )
                .await?
            }
        };
        // The step's deadline counts from its event, so a restarted deployer keeps it.
        let started = started_event
            .envelope
            .time
            .as_ref()
            .map(|t| SystemTime::UNIX_EPOCH + Duration::from_millis(timestamp_ms(t).max(0) as u64))
            .unwrap_or_else(SystemTime::now);
        let container = cluster::workload(&self.client, &spec)
            .await?
            .map(|c| c.container)
            .unwrap_or_else(|_| spec.container.clone());
        let image_ref = state.image_ref.clone().unwrap_or_default();
        let rid_text = rid.to_string();
        let step_ctx = steps::StepCtx {
            client: &self.client,
            spec: &spec,
            container: &container,
            image_ref: &image_ref,
            release_id: &rid_text,
            replicas,
            started,
            timeout: match spec.step_timeout_seconds {
                0 => DEFAULT_STEP_TIMEOUT,
                s => Duration::from_secs(u64::from(s)),
            },
            shutdown: &ctx.shutdown,
        };
        match steps::run(strategy, &step_ctx, step, weight, last).await? {
            steps::StepOutcome::Ready(pods) => {
                tracing::info!(step, pods = pods.len(), "step ready");
                ctx.emit_for(
                    subject,
                    cause,
                    EventKey::Step(step),
                    Payload::DeployStepReady(DeployStepReady { step, weight, pods }),
                )
                .await?;
                Ok(true)
            }
            steps::StepOutcome::Failed(problem) => {
                self.fail(
                    ctx,
                    subject,
                    cause,
                    step,
                    problem.kind,
                    true,
                    problem.reason,
                )
                .await?;
                Ok(false)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        step: u32,
        kind: FailureKind,
        cluster_changed: bool,
        reason: String,
    ) -> Result<()> {
        tracing::warn!(step, %reason, "deploy failed");
        ctx.emit_for(
            subject,
            cause,
            EventKey::Once,
            Payload::DeployFailed(DeployFailed {
                step,
                reason,
                kind: kind as i32,
                cluster_changed,
            }),
        )
        .await?;
        Ok(())
    }

    async fn complete(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        state: &ReleaseState,
    ) -> Result<()> {
        let image_ref = state.image_ref.clone().unwrap_or_default();
        let spec = state.spec.clone().ok_or(Error::NoSpec {
            release_id: subject.release_id.to_string(),
        })?;
        // The Deployment serving the release now: `<app>`, or the colour switched to.
        let revision = cluster::workload(&self.client, &spec)
            .await?
            .ok()
            .and_then(|c| {
                c.deployment
                    .metadata
                    .annotations
                    .and_then(|a| a.get(rollout::REVISION).cloned())
            })
            .unwrap_or_default();
        ctx.emit_for(
            subject,
            cause,
            EventKey::Once,
            Payload::DeployCompleted(DeployCompleted {
                revision,
                image_ref: image_ref.clone(),
            }),
        )
        .await?;
        ctx.emit_for(
            subject,
            cause,
            EventKey::Once,
            Payload::ReleaseSucceeded(ReleaseSucceeded { image_ref }),
        )
        .await?;
        Ok(())
    }

    /// A release ended: free its lock and start the next queued release of the app, if any.
    async fn on_ended(&self, ctx: &AgentContext, d: &Delivery) -> Result<()> {
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        let key = lock::key(d.subject.env.as_str(), d.subject.app.as_str());
        if lock::release(&store, &key, d.subject.release_id).await? {
            tracing::info!("lock freed");
        }
        for candidate in app_releases(ctx, &d.subject.env, &d.subject.app).await? {
            if candidate == d.subject.release_id {
                continue;
            }
            let (events, state) = ctx.release_state(candidate).await?;
            if state.terminal.is_some()
                || state
                    .spec
                    .as_ref()
                    .is_some_and(|s| !s.cluster.is_empty() && s.cluster != ctx.cluster)
            {
                continue;
            }
            let subject = EventSubject::new(
                d.subject.env.clone(),
                d.subject.app.clone(),
                candidate,
                EventType::ReleaseRequested,
            );
            match self.lock_for(ctx, &subject, candidate, &state).await? {
                Lock::Held => {
                    tracing::info!(next = %candidate, "starting the next queued release");
                    let cause = events.first().cloned().unwrap_or_else(|| d.event.clone());
                    self.drive(ctx, &subject, &cause, &events, state).await?;
                }
                Lock::HeldBy(holder) => tracing::info!(%holder, "the app's lock is taken again"),
            }
            break;
        }
        Ok(())
    }
}

/// The release ids of an app in an environment, in the order they were requested.
async fn app_releases(ctx: &AgentContext, env: &EnvName, app: &AppName) -> Result<Vec<ReleaseId>> {
    let messages = ctx
        .bus
        .read_events(&format!("baton.v1.events.{env}.{app}.*.release.requested"))
        .await
        .map_err(|message| {
            Error::Bus(baton_core::error::Error::Stream {
                stream: EVENTS_STREAM.into(),
                message,
            })
        })?;
    let mut ids = Vec::new();
    for m in messages {
        if let Ok(s) = EventSubject::parse(&m.subject) {
            if !ids.contains(&s.release_id) {
                ids.push(s.release_id);
            }
        }
    }
    Ok(ids)
}
