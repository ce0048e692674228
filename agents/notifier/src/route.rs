//! The first half of the notifier: release events in, notifications out into the outbox.
//!
//! Its durable consumer `notifier-all` reads every event (in stream order, one release after
//! another per key, as the shared runtime does). An event that is a trigger (`release.requested`,
//! `analysis.passed`, `release.paused`, and the three ends) is routed with the configuration the
//! release was resolved from (its spec's `config_revision`; the current one for a manual
//! rollback, or when that revision is no longer stored). For each channel it goes to, one message
//! is published to `baton.v1.notify.<channel>.<release>` with the Nats-Msg-Id
//! `<event id>:<channel>`, so handling the event again (a redelivery after a crash) stores nothing
//! twice. The event is acknowledged only once every channel's message is stored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use baton_core::config::store::{self, StoreError};
use baton_core::config::Config;
use baton_core::metrics::Metrics;
use baton_core::notify::Trigger;
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_core::{fold, subject};
use futures::future::BoxFuture;

use crate::message::{notification, Outbound};
use crate::names;

/// Configurations kept parsed, by revision (a release's revision is asked for with each of its
/// events).
const CACHED_REVISIONS: usize = 16;

/// Routes release events to channels.
#[derive(Default)]
pub struct Router {
    configs: Mutex<BTreeMap<u64, Arc<Config>>>,
}

fn store_error(e: StoreError) -> HandlerError {
    if e.is_retryable() {
        HandlerError::retry("config", e.to_string())
    } else {
        HandlerError::permanent("config", e.to_string())
    }
}

impl Router {
    fn cached(&self, revision: u64) -> Option<Arc<Config>> {
        self.configs.lock().ok()?.get(&revision).cloned()
    }

    fn keep(&self, revision: u64, config: Arc<Config>) {
        if let Ok(mut c) = self.configs.lock() {
            c.insert(revision, config);
            while c.len() > CACHED_REVISIONS {
                c.pop_first();
            }
        }
    }

    /// The configuration to route a release with: the revision it was resolved from, else the
    /// current one. `None` when none was ever applied.
    async fn config(
        &self,
        ctx: &AgentContext,
        revision: u64,
    ) -> Result<Option<Arc<Config>>, HandlerError> {
        if revision > 0 {
            if let Some(c) = self.cached(revision) {
                return Ok(Some(c));
            }
            match store::config_at(&ctx.bus, revision).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.keep(revision, c.clone());
                    return Ok(Some(c));
                }
                Err(StoreError::UnknownRevision { .. }) => {
                    tracing::warn!(
                        revision,
                        "the release's configuration revision is no longer stored; routing with the current one"
                    );
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        match store::current(&ctx.bus).await.map_err(store_error)? {
            None => Ok(None),
            Some((rev, c, _)) => {
                let c = self.cached(rev).unwrap_or_else(|| {
                    let c = Arc::new(c);
                    self.keep(rev, c.clone());
                    c
                });
                Ok(Some(c))
            }
        }
    }

    async fn route(&self, ctx: &AgentContext, d: &Delivery) -> Result<Handled, HandlerError> {
        let Some(trigger) = Trigger::of(d.event.event_type) else {
            return Ok(Handled::Done);
        };
        // The release as it was when this event happened: the same notification on every
        // redelivery, however far the release has moved on since.
        let mut events = ctx.bus.release_history(d.subject.release_id).await?;
        if let Some(at) = events.iter().position(|e| e.id() == d.event.id()) {
            events.truncate(at + 1);
        } else {
            events.push(d.event.clone());
        }
        let state = fold::fold(&events);
        let revision = state.spec.as_ref().map_or(0, |s| s.config_revision);
        let Some(config) = self.config(ctx, revision).await? else {
            tracing::debug!("no configuration applied: nobody to tell");
            return Ok(Handled::Done);
        };
        let routes = config.notifications();
        let (app, env) = (d.subject.app.as_str(), d.subject.env.as_str());
        for channel_name in routes.channels_for(app, env, trigger) {
            let Some(channel) = routes.channels.get(channel_name) else {
                continue;
            };
            let outbound = Outbound {
                kind: channel.kind,
                notification: notification(trigger, &d.subject, &d.event, &state, channel),
            };
            let payload = serde_json::to_vec(&outbound).map_err(|e| {
                HandlerError::permanent("encode", format!("cannot encode the notification: {e}"))
            })?;
            let mut headers = HeaderMap::new();
            headers.insert("Baton-Trigger", trigger.as_str());
            headers.insert("Baton-Event-Id", d.event.id());
            let publish = PublishMessage::build()
                .payload(payload.into())
                .headers(headers)
                .message_id(format!("{}:{channel_name}", d.event.id()));
            let target = subject::notification(channel_name, d.subject.release_id);
            let (_, duplicate) = ctx.bus.publish_raw(&target, publish).await?;
            count_queued(&ctx.metrics, channel_name, trigger, duplicate);
            tracing::info!(channel = channel_name, %trigger, duplicate, "notification queued");
        }
        Ok(Handled::Done)
    }
}

fn count_queued(m: &Metrics, channel: &str, trigger: Trigger, duplicate: bool) {
    if !duplicate {
        m.inc(
            names::QUEUED,
            &[("channel", channel), ("trigger", trigger.as_str())],
        );
    }
}

impl Handler for Router {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move { self.route(ctx, &delivery).await })
    }
}
