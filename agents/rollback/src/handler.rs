//! The rollback agent's reactions: end a release that failed before touching the cluster, or
//! restore the workload's previous revision (as `kubectl rollout undo` does, as a new revision),
//! wait until it is available again, and end the release as rolled back.

use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use baton_core::bus::LOCKS_BUCKET;
use baton_core::config::step_timeout;
use baton_core::deadline::{self, Deadline};
use baton_core::event::{timestamp_ms, Event, EventType};
use baton_core::fence::Writer;
use baton_core::fold::ReleaseState;
use baton_core::ids::EventKey;
use baton_core::lock::{self, Workload};
use baton_core::metrics::names;
use baton_core::names::ReleaseId;
use baton_core::rollout::{self, Rollout, FIELD_MANAGER, RELEASE_ANNOTATION, REVISION};
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_core::workload;
use baton_proto::v1::{envelope::Payload, *};

use crate::bluegreen;
use crate::decide::{decide, Action};
use crate::error::{Error, Result};

/// How often a release held by a person (or queued) is looked at again by its deadline watch.
const HELD_RECHECK: Duration = Duration::from_secs(120);

pub struct RollbackAgent {
    pub client: kube::Client,
}

impl Handler for RollbackAgent {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            match self.on_event(ctx, d).await {
                // The release was taken from this writer while it worked (it ended, or lost the
                // workload's lock): nothing was written, nothing more to do.
                Err(Error::Fence(baton_core::fence::FenceError::Closed { what, reason })) => {
                    tracing::info!(%what, %reason, "fenced: the rollback writes nothing more");
                    Ok(Handled::Done)
                }
                other => other.map_err(HandlerError::from),
            }
        })
    }

    /// A trigger of the rollback agent's was dead-lettered: end the release as failed with the
    /// reason, so it does not stay in flight (and its lock is freed).
    fn on_dead_letter<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: &'a Delivery,
        _category: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let reason = format!(
                "the rollback agent could not handle {} ({reason})",
                d.event.event_type
            );
            // Nothing else ends this release: the read and the publish are tried again while
            // the bus can't answer (a server down, a leader being elected) — the event's id is
            // derived, so a retry never stores it twice.
            let fail = || async {
                let (_, state) = ctx.release_state_bounded(d.subject.release_id).await?;
                if state.terminal.is_some() {
                    return Ok(());
                }
                ctx.emit(
                    d,
                    EventKey::Named("dead-letter"),
                    Payload::ReleaseFailed(ReleaseFailed {
                        reason: reason.clone(),
                    }),
                )
                .await
                .map(|_| ())
            };
            let ended = baton_core::retry::retry(
                DEAD_LETTER_PATIENCE,
                |e: &baton_core::error::Error| e.is_retryable(),
                fail,
            );
            let ended = tokio::select! {
                r = ended => r,
                () = ctx.shutdown.cancelled() => return,
            };
            if let Err(e) = ended {
                tracing::warn!(error = %e, "cannot fail the release whose trigger was dead-lettered");
            }
        })
    }
}

pub use baton_core::fence::Fencer;

/// How long the rollback agent keeps trying to end a release whose trigger was dead-lettered.
const DEAD_LETTER_PATIENCE: Duration = Duration::from_secs(600);

/// Ends a release whose workload was restored: `release.rolled_back`, or — when the rollback
/// was the agents' own, because the release passed its deadline — `release.failed` saying so.
pub(crate) async fn end_rolled_back(ctx: &AgentContext, d: &Delivery, reason: &str) -> Result<()> {
    let payload = if d.event.event_type == EventType::ReleaseRequested {
        Payload::ReleaseFailed(ReleaseFailed {
            reason: format!("{reason}; the workload was rolled back"),
        })
    } else {
        Payload::ReleaseRolledBack(ReleaseRolledBack {
            reason: reason.to_owned(),
        })
    };
    ctx.emit(d, EventKey::Once, payload).await?;
    tracing::info!("rolled back");
    Ok(())
}

/// The workload a rollback acts on.
struct Target {
    namespace: String,
    app: String,
    timeout: Duration,
    manual: bool,
}

impl RollbackAgent {
    async fn on_event(&self, ctx: &AgentContext, d: Delivery) -> Result<Handled> {
        if d.event.event_type == EventType::ReleaseRequested {
            return self.watch(ctx, &d).await;
        }
        self.on_trigger(ctx, d).await?;
        Ok(Handled::Done)
    }

    /// The deadline watch of a release: its `release.requested` comes back (a delayed
    /// redelivery, so any instance and any restart keeps the watch, with no leader) whenever the
    /// release's next deadline is due; past it, the release is ended here — rolled back first
    /// when the cluster was changed — and `release.failed` says why.
    async fn watch(&self, ctx: &AgentContext, d: &Delivery) -> Result<Handled> {
        let (events, state) = ctx.release_state_bounded(d.subject.release_id).await?;
        if state
            .spec
            .as_ref()
            .is_some_and(|s| !s.cluster.is_empty() && s.cluster != ctx.cluster)
        {
            return Ok(Handled::Done);
        }
        // A request whose spec is not its configuration's is refused here too: the dead letter
        // ends it with `release.failed` saying why, and nothing in the cluster is touched.
        if let (Some(spec), None) = (&state.spec, &state.terminal) {
            ctx.check_spec(spec).await.map_err(Error::Spec)?;
        }
        let now = now_ms();
        let waiting_for = match deadline::deadline(&state) {
            Deadline::Ended => return Ok(Handled::Done),
            Deadline::Held(why) => {
                tracing::debug!(%why, "held; no deadline while it lasts");
                return Ok(Handled::Later(HELD_RECHECK));
            }
            Deadline::At { at_ms, waiting_for } if at_ms > now => {
                tracing::debug!(in_ms = at_ms - now, %waiting_for, "deadline ahead");
                // A little after the deadline, so the event that meets it is in the stream.
                return Ok(Handled::Later(Duration::from_millis(
                    (at_ms - now) as u64 + 250,
                )));
            }
            Deadline::At { waiting_for, .. } => waiting_for,
        };
        let since = state
            .last_progress_ms
            .map(|t| (now - t) / 1000)
            .unwrap_or_default();
        let reason = format!(
            "the release passed its deadline: no progress for {since}s waiting for {waiting_for}"
        );
        tracing::warn!(%reason, "ending the release");
        ctx.metrics
            .inc(names::RELEASES_EXPIRED, &[("agent", ctx.role.as_str())]);
        let rollback_on_failure = state.spec.as_ref().is_some_and(|s| s.rollback_on_failure);
        if state.rollback_started && !state.rollback_completed {
            give_up(
                ctx,
                d,
                format!("the rollback did not complete in time ({reason})"),
            )
            .await?;
        } else if state.cluster_changed && rollback_on_failure {
            self.roll_back(ctx, d, &events, &state, reason).await?;
        } else {
            let reason = if state.cluster_changed {
                format!("{reason} (rollback_on_failure is off)")
            } else {
                reason
            };
            ctx.emit(
                d,
                EventKey::Once,
                Payload::ReleaseFailed(ReleaseFailed { reason }),
            )
            .await?;
        }
        Ok(Handled::Done)
    }

    async fn on_trigger(&self, ctx: &AgentContext, d: Delivery) -> Result<()> {
        // Bounded: the agent that ends releases must be able to end one flooded with commands
        // (its first events hold all a rollback needs).
        let (mut events, mut state) = ctx.release_state_bounded(d.subject.release_id).await?;
        // The trigger itself, in case it lies past the bound (the fold ignores a duplicate).
        state.apply(&d.event);
        if !events.iter().any(|e| e.envelope.id == d.event.envelope.id) {
            events.push(d.event.clone());
        }
        let cluster = state
            .spec
            .as_ref()
            .map(|s| s.cluster.clone())
            .or_else(|| state.rollback_request.as_ref().map(|r| r.cluster.clone()))
            .unwrap_or_default();
        if !cluster.is_empty() && cluster != ctx.cluster {
            return Ok(());
        }
        // What a rollback touches comes from the configuration the release names: a release
        // whose spec is not its configuration's is ended (by the dead letter) with nothing done.
        if let Some(spec) = &state.spec {
            ctx.check_spec(spec).await.map_err(Error::Spec)?;
        }
        match decide(d.event.event_type, &state) {
            Action::Nothing(why) => {
                tracing::debug!(why, "nothing to do");
                Ok(())
            }
            Action::Fail(reason) => {
                ctx.emit(
                    &d,
                    EventKey::Once,
                    Payload::ReleaseFailed(ReleaseFailed { reason }),
                )
                .await?;
                Ok(())
            }
            Action::RollBack { reason } => self.roll_back(ctx, &d, &events, &state, reason).await,
        }
    }

    async fn roll_back(
        &self,
        ctx: &AgentContext,
        d: &Delivery,
        events: &[Event],
        state: &ReleaseState,
        reason: String,
    ) -> Result<()> {
        let target = match (&state.spec, &state.rollback_request) {
            (Some(spec), _) => Target {
                namespace: spec.namespace.clone(),
                app: spec.app.clone(),
                timeout: step_timeout(spec.step_timeout_seconds),
                manual: false,
            },
            (None, Some(req)) if !req.namespace.is_empty() => Target {
                namespace: req.namespace.clone(),
                app: req.app.clone(),
                timeout: step_timeout(0),
                manual: true,
            },
            _ => {
                return Err(Error::Invalid(
                    "the rollback request names no namespace".into(),
                ))
            }
        };
        let cluster = state
            .spec
            .as_ref()
            .map(|s| s.cluster.clone())
            .or_else(|| state.rollback_request.as_ref().map(|r| r.cluster.clone()))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| ctx.cluster.clone());
        let fencer = Fencer {
            agent: ctx,
            release_id: d.subject.release_id,
            workload: Workload::new(&cluster, &target.namespace, &target.app),
            writer: Writer::Rollback,
            delay: None,
        };
        if target.manual {
            self.lock(ctx, d, &fencer.workload).await?;
        }
        let blue_green = match &state.spec {
            Some(spec) => Strategy::try_from(spec.strategy) == Ok(Strategy::BlueGreen),
            // A manual rollback of an app whose Service selects a colour switches colours.
            None => bluegreen::is_blue_green(&self.client, &target.namespace, &target.app).await?,
        };
        if blue_green {
            let scope = bluegreen::Scope {
                client: &self.client,
                ctx,
                ns: &target.namespace,
                app: &target.app,
                timeout: target.timeout,
                fence: &fencer,
            };
            let from = if target.manual {
                bluegreen::Away::Active
            } else {
                bluegreen::Away::Release(d.subject.release_id.to_string())
            };
            return bluegreen::roll_back(&scope, d, events, from, reason).await;
        }
        let read = |source| Error::Read {
            namespace: target.namespace.clone(),
            name: target.app.clone(),
            source,
        };
        let snap = rollout::snapshot(&self.client, &target.namespace, &target.app)
            .await
            .map_err(read)?;
        let Some(deployment) = snap.deployment.clone() else {
            return self
                .give_up(
                    ctx,
                    d,
                    format!(
                        "Deployment {}/{} does not exist",
                        target.namespace, target.app
                    ),
                )
                .await;
        };
        if let Some(spec) = &state.spec {
            match Strategy::try_from(spec.strategy).unwrap_or(Strategy::Rolling) {
                Strategy::Canary
                    if self
                        .roll_back_canary(ctx, d, state, &deployment, &reason, &fencer)
                        .await? =>
                {
                    return Ok(());
                }
                _ => {}
            }
        }
        let (started, since_ms, template) = match &state.rollback_target {
            Some(started) => {
                // Resumed after a crash: the target was decided and recorded.
                let template = rollout::replica_set_of_revision(
                    &deployment,
                    &snap.replica_sets,
                    &started.to_revision,
                )
                .and_then(|rs| rs.spec.template.clone());
                (started.clone(), state.rollback_started_ms, template)
            }
            None => {
                let rs = if target.manual {
                    let current = deployment
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(REVISION))
                        .and_then(|r| r.parse::<u64>().ok())
                        .unwrap_or(0);
                    rollout::previous_replica_set(&deployment, &snap.replica_sets, current)
                } else {
                    match state.previous_revision.as_deref() {
                        Some(prev) => {
                            rollout::replica_set_of_revision(&deployment, &snap.replica_sets, prev)
                        }
                        None => None,
                    }
                };
                let Some(rs) = rs else {
                    let why = match &state.previous_revision {
                        Some(prev) if !target.manual => format!(
                            "revision {prev} of Deployment {}/{} is gone",
                            target.namespace, target.app
                        ),
                        _ => format!(
                            "Deployment {}/{} has no previous revision to restore",
                            target.namespace, target.app
                        ),
                    };
                    return self
                        .give_up(ctx, d, format!("nothing to restore: {why}"))
                        .await;
                };
                let template = rs.spec.template.clone();
                let to_revision = rs
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION).cloned())
                    .unwrap_or_default();
                let to_image = template
                    .as_ref()
                    .map(rollout::template_images)
                    .unwrap_or_default();
                tracing::info!(%to_revision, %to_image, %reason, "rolling back");
                let started = RollbackStarted {
                    reason: reason.clone(),
                    to_revision,
                    to_image,
                };
                let e = ctx
                    .emit(d, EventKey::Once, Payload::RollbackStarted(started.clone()))
                    .await?;
                (
                    started,
                    e.envelope.time.as_ref().map(timestamp_ms),
                    template,
                )
            }
        };
        let current_images = rollout::template_images(&deployment.spec.template);
        if current_images != started.to_image {
            let Some(mut template) = template else {
                return self
                    .give_up(
                        ctx,
                        d,
                        format!("revision {} to restore is gone", started.to_revision),
                    )
                    .await;
            };
            template
                .metadata
                .get_or_insert_with(Default::default)
                .labels = rollout::without_template_hash(
                template.metadata.as_ref().and_then(|m| m.labels.clone()),
            );
            fencer
                .check(&format!("restoring Deployment {}", target.app))
                .await?;
            let patch = json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": target.app,
                    "annotations": {"kubernetes.io/change-cause": format!("baton rollback {}: back to revision {}", d.subject.release_id, started.to_revision)}
                },
                "spec": {"template": template}
            });
            Api::<Deployment>::namespaced(self.client.clone(), &target.namespace)
                .patch(
                    &target.app,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .map_err(|source| Error::Restore {
                    namespace: target.namespace.clone(),
                    name: target.app.clone(),
                    source,
                })?;
        }
        // The wait counts from the first start, so a restart keeps the deadline.
        let since = since_ms
            .map(|t| SystemTime::UNIX_EPOCH + Duration::from_millis(t.max(0) as u64))
            .unwrap_or_else(SystemTime::now);
        let outcome = rollout::wait(
            &self.client,
            &target.namespace,
            &target.app,
            since,
            target.timeout,
            &ctx.shutdown,
            |msg| {
                tracing::info!(progress = msg, "restoring");
            },
        )
        .await
        .map_err(Error::Wait)?;
        match outcome {
            Rollout::Complete { revision, .. } => {
                ctx.emit(
                    d,
                    EventKey::Once,
                    Payload::RollbackCompleted(RollbackCompleted {
                        restored_revision: revision,
                        restored_image: started.to_image.clone(),
                        ..Default::default()
                    }),
                )
                .await?;
                end_rolled_back(ctx, d, &started.reason).await
            }
            Rollout::Failed(problem) => {
                self.give_up(
                    ctx,
                    d,
                    format!("the restored revision is not healthy: {}", problem.reason),
                )
                .await
            }
            Rollout::Progressing(_) => Ok(()),
        }
    }

    /// Removes a canary; when the promotion had not reached the stable Deployment, that is the
    /// whole rollback (true). When it had, the stable Deployment is restored as a rolling one.
    async fn roll_back_canary(
        &self,
        ctx: &AgentContext,
        d: &Delivery,
        state: &ReleaseState,
        stable: &Deployment,
        reason: &str,
        fencer: &Fencer<'_>,
    ) -> Result<bool> {
        let Some(spec) = &state.spec else {
            return Ok(false);
        };
        let changed_by_this_release = stable
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(RELEASE_ANNOTATION))
            .is_some_and(|r| *r == d.subject.release_id.to_string());
        let to_revision = state.previous_revision.clone().unwrap_or_default();
        let to_image = state.previous_image.clone().unwrap_or_default();
        if !changed_by_this_release {
            ctx.emit(
                d,
                EventKey::Once,
                Payload::RollbackStarted(RollbackStarted {
                    reason: format!("{reason} (removing the canary)"),
                    to_revision: to_revision.clone(),
                    to_image: to_image.clone(),
                }),
            )
            .await?;
        }
        fencer.check("removing the canary").await?;
        workload::remove_canary(
            &self.client,
            &spec.namespace,
            &spec.app,
            &spec.ingress,
            &spec.http_route,
        )
        .await
        .map_err(|source| Error::Restore {
            namespace: spec.namespace.clone(),
            name: workload::canary_name(&spec.app),
            source,
        })?;
        if changed_by_this_release {
            return Ok(false);
        }
        tracing::info!("canary removed; the stable Deployment was never changed");
        ctx.emit(
            d,
            EventKey::Once,
            Payload::RollbackCompleted(RollbackCompleted {
                restored_revision: to_revision,
                restored_image: to_image,
                ..Default::default()
            }),
        )
        .await?;
        end_rolled_back(ctx, d, reason).await?;
        Ok(true)
    }

    /// The rollback cannot complete: say why, and end the release as failed.
    async fn give_up(&self, ctx: &AgentContext, d: &Delivery, reason: String) -> Result<()> {
        give_up(ctx, d, reason).await
    }

    /// A manual rollback drives the workload, so it takes the workload's lock like a release.
    async fn lock(&self, ctx: &AgentContext, d: &Delivery, workload: &Workload) -> Result<()> {
        let key = workload.lock_key();
        let store = ctx.bus.kv(LOCKS_BUCKET).await?;
        let me = d.subject.release_id;
        match lock::acquire(&store, &key, me).await? {
            lock::Lock::Held => Ok(()),
            lock::Lock::HeldBy(holder) => {
                let ended = match ReleaseId::parse(&holder) {
                    Ok(h) => ctx.release_state_bounded(h).await?.1.terminal.is_some(),
                    Err(_) => true,
                };
                if !ended {
                    return Err(Error::Busy { holder });
                }
                lock::release(&store, &key, &holder).await?;
                match lock::acquire(&store, &key, me).await? {
                    lock::Lock::Held => Ok(()),
                    lock::Lock::HeldBy(holder) => Err(Error::Busy { holder }),
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The rollback cannot complete: say why, and end the release as failed.
pub(crate) async fn give_up(ctx: &AgentContext, d: &Delivery, reason: String) -> Result<()> {
    tracing::warn!(%reason, "rollback failed");
    ctx.emit(
        d,
        EventKey::Once,
        Payload::RollbackFailed(RollbackFailed {
            reason: reason.clone(),
        }),
    )
    .await?;
    ctx.emit(
        d,
        EventKey::Once,
        Payload::ReleaseFailed(ReleaseFailed {
            reason: format!("rollback failed: {reason}"),
        }),
    )
    .await?;
    Ok(())
}
