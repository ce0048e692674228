//! The deployer's reactions to events. Each is idempotent: it decides from the release's folded
//! history and publishes with deterministic ids, so running it twice (after a crash) does no harm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio_util::task::TaskTracker;

use baton_core::bus::LOCKS_BUCKET;
use baton_core::event::{timestamp_ms, Event, EventType};
use baton_core::fold::ReleaseState;
use baton_core::ids::EventKey;
use baton_core::lock::{self, Lock, Workload};
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::rollout;
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};

use crate::cluster;
use crate::decide::{self, Next};
use crate::error::{Error, Result};
use crate::steps;

pub struct Deployer {
    pub client: kube::Client,
    /// The agent's supervised tasks (blue-green scale-down timers).
    timers: TaskTracker,
    /// Fault injection: a pause before every fenced write (`BATON_FAULT_WRITE_DELAY`).
    write_delay: Option<Duration>,
    /// Releases this process is driving right now, each with a "poked" flag: a second trigger for
    /// the same release must not drive it twice at once, but must not be lost either — the
    /// driver looks at the history once more before it stops.
    driving: Arc<Mutex<HashMap<ReleaseId, bool>>>,
}

impl Deployer {
    pub fn new(client: kube::Client, timers: TaskTracker, write_delay: Option<Duration>) -> Self {
        Self {
            client,
            timers,
            write_delay,
            driving: Arc::default(),
        }
    }
}

impl Handler for Deployer {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move { self.on_event(ctx, d).await.map_err(HandlerError::from) })
    }

    /// A trigger of the deployer's was dead-lettered: the release cannot go on, so it fails
    /// (`deploy.failed`, and the rollback agent restores what was changed).
    fn on_dead_letter<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: &'a Delivery,
        category: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if category == baton_core::specguard::CATEGORY {
                // Refused alike by the rollback agent, which ends the release: one report.
                tracing::info!("the spec was refused; the rollback agent ends the release");
                return;
            }
            let state = match ctx.release_state_bounded(d.subject.release_id).await {
                Ok((_, state)) => state,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the release to fail it");
                    return;
                }
            };
            if state.terminal.is_some() || state.failure.is_some() || state.spec.is_none() {
                return;
            }
            let reason = format!(
                "the deployer could not handle {} ({reason})",
                d.event.event_type
            );
            if let Err(e) = self
                .fail(
                    ctx,
                    &d.subject,
                    &d.event,
                    state.current_step().unwrap_or(0),
                    FailureKind::Cluster,
                    state.cluster_changed,
                    reason,
                )
                .await
            {
                tracing::warn!(error = %e, "cannot fail the release whose trigger was dead-lettered");
            }
        })
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
    async fn on_event(&self, ctx: &AgentContext, d: Delivery) -> Result<Handled> {
        let (_, state) = ctx.release_state(d.subject.release_id).await?;
        if let Some(spec) = &state.spec {
            if !spec.cluster.is_empty() && spec.cluster != ctx.cluster {
                tracing::debug!(cluster = %spec.cluster, "release of another cluster");
                return Ok(Handled::Done);
            }
        }
        match d.event.event_type {
            EventType::ReleaseRequested => self.on_requested(ctx, &d, state).await,
            // Each of these may let the release go further: drive it as far as it goes now.
            EventType::BuildSucceeded
            | EventType::AnalysisPassed
            | EventType::AnalysisInconclusive => {
                if self.lock_for(ctx, d.subject.release_id, &state).await? == Lock::Held {
                    return self.drive(ctx, &d.subject, &d.event, state).await;
                }
                Ok(Handled::Done)
            }
            EventType::ReleasePauseRequested => {
                self.on_pause(ctx, &d, &state).await?;
                Ok(Handled::Done)
            }
            EventType::ReleaseResumeRequested | EventType::ReleasePromoteRequested => {
                self.on_resume_or_promote(ctx, &d, &state).await?;
                let (_, state) = ctx.release_state(d.subject.release_id).await?;
                if self.lock_for(ctx, d.subject.release_id, &state).await? == Lock::Held {
                    return self.drive(ctx, &d.subject, &d.event, state).await;
                }
                Ok(Handled::Done)
            }
            EventType::ReleaseSucceeded
            | EventType::ReleaseFailed
            | EventType::ReleaseRolledBack => {
                // The strategy's follow-up (blue-green: the old colour's scale-down) before a
                // queued release of the app may start. Never holds the lock back: what could not
                // be done is left to the next release of the app.
                if let Some(spec) = state
                    .spec
                    .as_ref()
                    .filter(|_| d.event.event_type == EventType::ReleaseSucceeded)
                {
                    let succeeded = steps::Succeeded {
                        client: &self.client,
                        spec,
                        release_id: &d.subject.release_id.to_string(),
                        at_ms: d.event.time_ms(),
                        shutdown: &ctx.shutdown,
                        timers: &self.timers,
                    };
                    if let Err(e) = steps::driver(decide::strategy(spec))
                        .after_success(&succeeded)
                        .await
                    {
                        tracing::warn!(error = %e, "the strategy's follow-up after success failed");
                    }
                }
                self.on_ended(ctx, &d, &state).await?;
                Ok(Handled::Done)
            }
            _ => Ok(Handled::Done),
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
        state: ReleaseState,
    ) -> Result<Handled> {
        if state.terminal.is_some() {
            return Ok(Handled::Done);
        }
        let Some(spec) = &state.spec else {
            return Ok(Handled::Done);
        };
        // The namespace and everything else it would touch come from the configuration the
        // request names: a spec that differs is dead-lettered before it takes a lock.
        ctx.check_spec(spec).await.map_err(Error::Spec)?;
        // In the workload's queue of open releases first, so that whoever ends the release
        // holding the lock finds this one.
        let workload = Workload::of_spec(spec, &ctx.cluster);
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        lock::enqueue(&store, &workload.queue_key(), d.subject.release_id).await?;
        match self.lock_for(ctx, d.subject.release_id, &state).await? {
            Lock::Held => {
                tracing::info!(%workload, "lock taken; the release goes ahead once built");
                // Built already (the build may have been quicker than this request's handling).
                self.drive(ctx, &d.subject, &d.event, state).await
            }
            Lock::HeldBy(other) => {
                tracing::info!(blocking = %other, %workload, "another release of this workload is in flight; queued");
                ctx.emit(
                    d,
                    EventKey::Once,
                    Payload::ReleaseQueued(ReleaseQueued {
                        blocking_release_id: other,
                    }),
                )
                .await?;
                Ok(Handled::Done)
            }
        }
    }

    /// Takes the workload's lock for `release`, freeing it first if its holder has ended.
    async fn lock_for(
        &self,
        ctx: &AgentContext,
        release: ReleaseId,
        state: &ReleaseState,
    ) -> Result<Lock> {
        // Only a requested, unfinished release may hold the workload: a stray event of a
        // release without its request must never lock others out.
        let Some(spec) = state.spec.as_ref().filter(|_| state.terminal.is_none()) else {
            return Ok(Lock::HeldBy(String::new()));
        };
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        let key = Workload::of_spec(spec, &ctx.cluster).lock_key();
        match lock::acquire(&store, &key, release).await? {
            Lock::HeldBy(holder) => {
                let ended = match ReleaseId::parse(&holder) {
                    Ok(h) => ctx.release_state_bounded(h).await?.1.terminal.is_some(),
                    Err(_) => true,
                };
                if ended {
                    tracing::warn!(%holder, "the lock's holder has ended; taking the lock over");
                    lock::release(&store, &key, &holder).await?;
                    Ok(lock::acquire(&store, &key, release).await?)
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
        state: ReleaseState,
    ) -> Result<Handled> {
        let rid = subject.release_id;
        {
            let Ok(mut map) = self.driving.lock() else {
                return Ok(Handled::Done);
            };
            if let Some(poked) = map.get_mut(&rid) {
                *poked = true;
                tracing::debug!("already driving this release; it will look again");
                return Ok(Handled::Done);
            }
            map.insert(rid, false);
        }
        match self.drive_steps(ctx, subject, cause, state).await {
            // The release was taken from this deployer (aborted, failed, ended, lost its lock)
            // while it worked: nothing more to do, and nothing was written.
            Err(Error::Fence(baton_core::fence::FenceError::Closed { what, reason })) => {
                tracing::info!(%what, %reason, "the release is no longer this deployer's to drive");
                Ok(Handled::Done)
            }
            // The API server refused a write or a read for good: the release fails now, with
            // the API's own words, instead of retrying what can never succeed.
            Err(e) if e.refusal().is_some() => {
                let reason = e.refusal().unwrap_or_default();
                let (_, state) = ctx.release_state(rid).await?;
                if state.failure.is_none() && state.terminal.is_none() {
                    self.fail(
                        ctx,
                        subject,
                        cause,
                        state.current_step().unwrap_or(0),
                        if state.deploy_started {
                            FailureKind::Cluster
                        } else {
                            FailureKind::Precheck
                        },
                        state.cluster_changed,
                        format!("the Kubernetes API refused it: {reason}"),
                    )
                    .await?;
                }
                Ok(Handled::Done)
            }
            other => other,
        }
    }

    /// The loop of [`drive`](Self::drive), for the release this process now drives.
    async fn drive_steps(
        &self,
        ctx: &AgentContext,
        subject: &EventSubject,
        cause: &Event,
        state: ReleaseState,
    ) -> Result<Handled> {
        let rid = subject.release_id;
        let guard = DrivingGuard(self.driving.clone(), rid);
        let workload = state
            .spec
            .as_ref()
            .map(|s| Workload::of_spec(s, &ctx.cluster))
            .ok_or(Error::NoSpec {
                release_id: rid.to_string(),
            })?;
        let mut state = state;
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
                        return Ok(Handled::Done);
                    }
                }
                // A timed pause holds nothing: the trigger comes back from the server when the
                // pause is over (so a restarted deployer keeps the timer), and the consumer goes
                // on with other releases meanwhile.
                Next::WaitFor { ms } => {
                    tracing::info!(seconds = ms / 1000, "pausing");
                    return Ok(Handled::Later(Duration::from_millis(ms.max(0) as u64)));
                }
                Next::PreCheck => self.precheck(ctx, subject, cause, &state).await?,
                Next::Step { step, weight, last } => {
                    let fence = steps::Fencer {
                        agent: ctx,
                        release_id: rid,
                        workload: workload.clone(),
                        writer: baton_core::fence::Writer::Deployer,
                        delay: self.write_delay,
                    };
                    if !self
                        .step(ctx, subject, cause, &state, &fence, step, weight, last)
                        .await?
                    {
                        return Ok(Handled::Done);
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
                Next::HoldInconclusive { step } => {
                    let why = state
                        .inconclusive_reasons
                        .get(&step)
                        .map_or("no verdict", String::as_str);
                    ctx.emit_for(
                        subject,
                        cause,
                        EventKey::Named(&format!("inconclusive-{step}")),
                        Payload::ReleasePaused(ReleasePaused {
                            step,
                            reason: format!(
                                "the analysis of step {step} was inconclusive ({why}): waiting for a person (baton promote goes on, baton abort rolls back)"
                            ),
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
                    return Ok(Handled::Done);
                }
            }
            state = ctx.release_state(rid).await?.1;
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
        state: &ReleaseState,
        fence: &steps::Fencer<'_>,
        step: u32,
        weight: u32,
        last: bool,
    ) -> Result<bool> {
        let rid = subject.release_id;
        let spec = state.spec.clone().ok_or(Error::NoSpec {
            release_id: rid.to_string(),
        })?;
        let strategy = decide::strategy(&spec);
        let replicas = state.replicas.map_or(1, |r| r as i32);
        // The step's deadline counts from its event, so a restarted deployer keeps it.
        let started_ms = match state.step_started_ms.get(&step) {
            Some(ms) => *ms,
            None => {
                let planning = steps::Planning {
                    client: &self.client,
                    spec: &spec,
                    release_id: &rid.to_string(),
                    replicas,
                };
                let plan = steps::driver(strategy)
                    .describe(&planning, step, weight, last)
                    .await?;
                tracing::info!(step, weight, action = %plan.action, "step");
                let e = ctx
                    .emit_for(
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
                    .await?;
                e.envelope.time.as_ref().map_or(0, timestamp_ms)
            }
        };
        let started = if started_ms > 0 {
            SystemTime::UNIX_EPOCH + Duration::from_millis(started_ms as u64)
        } else {
            SystemTime::now()
        };
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
            timeout: baton_core::config::step_timeout(spec.step_timeout_seconds),
            shutdown: &ctx.shutdown,
            fence,
        };
        match steps::driver(strategy)
            .run(&step_ctx, step, weight, last)
            .await?
        {
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

    /// A release ended: free its lock, take it out of its workload's queue, and start the next
    /// open release of the workload, if any. Reads only the workload's open releases.
    async fn on_ended(&self, ctx: &AgentContext, d: &Delivery, state: &ReleaseState) -> Result<()> {
        let Some(workload) = Workload::of_state(state, &ctx.cluster) else {
            return Ok(());
        };
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        let me = d.subject.release_id;
        if lock::release(&store, &workload.lock_key(), &me.to_string()).await? {
            tracing::info!(%workload, "lock freed");
        }
        let open = lock::dequeue(&store, &workload.queue_key(), me).await?;
        for candidate in open {
            let (events, state) = ctx.release_state_bounded(candidate).await?;
            if state.terminal.is_some() || state.spec.is_none() {
                // Ended without its end being handled here yet (it will be): not a candidate.
                lock::dequeue(&store, &workload.queue_key(), candidate).await?;
                continue;
            }
            let Some(first) = events.first() else {
                continue;
            };
            let names = state
                .spec
                .as_ref()
                .map(|s| (s.env.parse::<EnvName>(), s.app.parse::<AppName>()));
            let Some((Ok(env), Ok(app))) = names else {
                continue;
            };
            let subject = EventSubject::new(env, app, candidate, EventType::ReleaseRequested);
            match self.lock_for(ctx, candidate, &state).await? {
                Lock::Held => {
                    tracing::info!(next = %candidate, "starting the next queued release");
                    let cause = first.clone();
                    // A timed pause can't be due on a release that has not started.
                    self.drive(ctx, &subject, &cause, state).await?;
                }
                Lock::HeldBy(holder) => {
                    tracing::info!(%holder, "the workload's lock is taken again")
                }
            }
            break;
        }
        Ok(())
    }
}
