//! The builder's reaction to `release.requested`: fold the release, ask [`decide`] what to do,
//! and do it — run the build command when there is one, resolve the image to its digest, and
//! publish `build.started`, then `build.succeeded` or `build.failed`.
//!
//! Every outcome of the build itself (a missing image, an unreachable registry, a failing
//! command) is the release's verdict, published as `build.failed` with its reason. Only bus
//! trouble (reading the history, publishing, storing the log) makes the handler retry; its events
//! have deterministic ids, so a retry or a redelivery never publishes one twice.

use std::time::Duration;

use async_nats::jetstream::object_store::{ObjectMetadata, PutErrorKind};
use baton_core::bus::LOGS_BUCKET;
use baton_core::ids::EventKey;
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_proto::v1::envelope::Payload;
use baton_proto::v1::{BuildFailed, BuildStarted, BuildSucceeded};
use futures::future::BoxFuture;

use crate::command;
use crate::decide::{self, Backend, Next, Plan, Vars};
use crate::error::Error;
use crate::registry::RegistryClient;

/// How long storing a build log may take, and how long it is tried again.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
const STORE_RETRY: Duration = Duration::from_secs(15);

/// The builder's handler.
pub struct Builder {
    registry: RegistryClient,
}

impl Builder {
    pub fn new(registry: RegistryClient) -> Self {
        Self { registry }
    }

    async fn on_request(&self, ctx: &AgentContext, delivery: Delivery) -> Result<(), HandlerError> {
        let trigger = match delivery.event.payload() {
            Some(Payload::ReleaseRequested(r)) => r.spec.clone(),
            _ => {
                return Err(HandlerError::permanent(
                    "invalid",
                    format!("the builder does not handle {}", delivery.event.event_type),
                ))
            }
        };
        let Some(trigger) = trigger else {
            return Err(HandlerError::permanent(
                "invalid",
                "release.requested has no spec",
            ));
        };
        // The build command comes from the configuration the request names, never from the
        // request alone: a spec that differs from it is dead-lettered, and nothing runs.
        ctx.check_spec(&trigger).await?;
        let (_, state) = ctx.release_state(delivery.event.release_id).await?;
        match decide::next(&state, &trigger) {
            Next::Nothing(why) => {
                tracing::info!(why, "nothing to build");
                Ok(())
            }
            Next::Fail { reason } => {
                tracing::warn!(%reason, "build failed");
                let failed = BuildFailed {
                    reason,
                    log_object: String::new(),
                };
                ctx.emit(&delivery, EventKey::Once, Payload::BuildFailed(failed))
                    .await?;
                Ok(())
            }
            Next::Build(plan) => self.build(ctx, &delivery, plan).await,
        }
    }

    async fn build(
        &self,
        ctx: &AgentContext,
        delivery: &Delivery,
        plan: Plan,
    ) -> Result<(), HandlerError> {
        if plan.announce {
            let started = BuildStarted {
                image: plan.requested.clone(),
                backend: plan.backend.name().to_owned(),
            };
            ctx.emit(delivery, EventKey::Once, Payload::BuildStarted(started))
                .await?;
        } else {
            tracing::info!(
                "an earlier attempt started this build and left no verdict; building again"
            );
        }
        let release_id = delivery.event.release_id.to_string();
        let mut log_object = String::new();
        if let Backend::Command { argv, timeout } = &plan.backend {
            let vars = Vars {
                image: &plan.requested,
                app: delivery.subject.app.as_str(),
                env: delivery.subject.env.as_str(),
                release_id: &release_id,
            };
            let argv = decide::render_argv(argv, &vars);
            let env = [
                ("BATON_RELEASE_ID", vars.release_id),
                ("BATON_APP", vars.app),
                ("BATON_ENV", vars.env),
                ("BATON_IMAGE", vars.image),
            ];
            // The program alone: an argument may carry something not meant for logs.
            tracing::info!(
                program = argv.first().map(String::as_str).unwrap_or(""),
                args = argv.len().saturating_sub(1),
                timeout_s = timeout.as_secs(),
                "running the build command"
            );
            let output = command::run(&argv, *timeout, &env).await;
            let key = decide::log_key(&release_id);
            store_log(ctx, &key, &output.log, &release_id).await?;
            log_object = key;
            if let Some(reason) = output.end.failure() {
                tracing::warn!(%reason, %log_object, "build command failed");
                let failed = BuildFailed { reason, log_object };
                ctx.emit(delivery, EventKey::Once, Payload::BuildFailed(failed))
                    .await?;
                return Ok(());
            }
            tracing::info!(%log_object, "build command succeeded");
        }
        match self.registry.resolve(&plan.image).await {
            Ok(resolved) => {
                tracing::info!(image_ref = %resolved.image_ref, "image resolved");
                let succeeded = BuildSucceeded {
                    image_ref: resolved.image_ref,
                    digest: resolved.digest,
                    log_object,
                };
                ctx.emit(delivery, EventKey::Once, Payload::BuildSucceeded(succeeded))
                    .await?;
            }
            Err(e) => {
                tracing::warn!(reason = %e, "image not resolved; build failed");
                let failed = BuildFailed {
                    reason: e.to_string(),
                    log_object,
                };
                ctx.emit(delivery, EventKey::Once, Payload::BuildFailed(failed))
                    .await?;
            }
        }
        Ok(())
    }
}

impl Handler for Builder {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            self.on_request(ctx, delivery).await?;
            Ok(Handled::Done)
        })
    }

    /// The release's request was dead-lettered here: it can't be built, so the build fails with
    /// the reason (and the release ends). A spec refused by the configuration is not reported
    /// here: every agent refuses it alike, and the rollback agent alone ends the release, so no
    /// stage's failure lands after its `release.failed`.
    fn on_dead_letter<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: &'a Delivery,
        category: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if category == baton_core::specguard::CATEGORY {
                // The rollback agent refuses the same spec and ends the release: one report.
                tracing::info!("the spec was refused; the rollback agent ends the release");
                return;
            }
            match ctx.release_state_bounded(d.subject.release_id).await {
                Ok((_, state))
                    if state.terminal.is_none()
                        && state.image_ref.is_none()
                        && state.failure.is_none() =>
                {
                    let failed = BuildFailed {
                        reason: format!("the builder could not handle the request ({reason})"),
                        ..Default::default()
                    };
                    if let Err(e) = ctx
                        .emit(d, EventKey::Once, Payload::BuildFailed(failed))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot fail the build of a dead-lettered request");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the release to fail its build"),
            }
        })
    }
}

/// Stores a build's output in the log object store under `key`, trying again briefly.
async fn store_log(
    ctx: &AgentContext,
    key: &str,
    log: &[u8],
    release_id: &str,
) -> Result<(), Error> {
    baton_core::retry::retry(
        STORE_RETRY,
        |_: &String| true,
        || async {
            match tokio::time::timeout(STORE_TIMEOUT, put_log(ctx, key, log, release_id)).await {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {}s", STORE_TIMEOUT.as_secs())),
            }
        },
    )
    .await
    .map_err(|message| Error::StoreLog {
        bucket: LOGS_BUCKET.to_owned(),
        key: key.to_owned(),
        message,
    })
}

async fn put_log(
    ctx: &AgentContext,
    key: &str,
    log: &[u8],
    release_id: &str,
) -> Result<(), String> {
    let store = ctx
        .bus
        .jetstream()
        .get_object_store(LOGS_BUCKET)
        .await
        .map_err(|e| e.to_string())?;
    let meta = ObjectMetadata {
        name: key.to_owned(),
        description: Some(format!("build output of release {release_id}")),
        ..Default::default()
    };
    match store.put(meta, &mut &log[..]).await {
        Ok(info) => {
            tracing::info!(key, bytes = info.size, "build log stored");
            Ok(())
        }
        // A re-run replaced the object; the old chunks stay until the bucket's max age, because
        // the builder's NATS user may not purge streams (the event log's guard covers all).
        Err(e) if e.kind() == PutErrorKind::PurgeOldChunks => {
            tracing::warn!(key, error = %e, "build log replaced; the previous one's chunks were not purged");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
