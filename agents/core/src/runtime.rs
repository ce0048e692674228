//! The consumer loop every agent runs: pull from its durable consumers, decode and validate,
//! hand the event to the agent's handler, and map the result onto JetStream:
//!
//! | handler result | JetStream |
//! |---|---|
//! | `Ok` | ack (confirmed by the server) |
//! | still running | in-progress ack every third of the ack wait, so the message is not redelivered |
//! | `Err(Retry)` | nak with a growing, jittered delay; after the last allowed delivery, dead letter |
//! | `Err(Permanent)`, or bytes that are not a valid event | dead letter with the reason, then term |
//!
//! A dead letter is published (and acknowledged by the DLQ stream) before the original is
//! terminated, so nothing is lost if the agent dies in between: the original is redelivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, AckKind};
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::Bus;
use crate::busconfig::ConsumerDef;
use crate::error::{Error, Result};
use crate::event::{Event, Role};
use crate::ids::EventKey;
use crate::metrics::{names, Metrics};
use crate::subject::{self, EventSubject};
use baton_proto::v1::envelope::Payload;

/// The largest part of an original message kept in a dead letter.
pub const DLQ_MAX_ORIGINAL: usize = 512 * 1024;
/// How long work in hand may go on after a shutdown signal before it is nak'ed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Why a handler did not finish its work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Trying again later may work (the cluster or broker is briefly unavailable).
    #[error("{0}")]
    Retry(String),
    /// This message can never be handled: dead-letter it with the reason.
    #[error("{0}")]
    Permanent(String),
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        if e.is_retryable() {
            HandlerError::Retry(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

/// One delivery of a valid event.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Event,
    pub subject: EventSubject,
    pub consumer: String,
    pub stream_sequence: u64,
    /// 1 on the first delivery.
    pub delivered: i64,
}

/// What an agent does with an event.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What handlers get besides the event: the bus, metrics and the shutdown signal.
#[derive(Clone)]
pub struct AgentContext {
    pub role: Role,
    /// The cluster this agent serves (`--cluster`).
    pub cluster: String,
    pub bus: Bus,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

impl AgentContext {
    /// Publishes an event of the same release, environment and app as `cause`, caused by it and
    /// on behalf of the same actor. `key` makes its id deterministic: handling `cause` again
    /// publishes nothing new.
    pub async fn emit(
        &self,
        cause: &Delivery,
        key: EventKey<'_>,
        payload: Payload,
    ) -> Result<Event> {
        self.emit_for(&cause.subject, &cause.event, key, payload)
            .await
    }

    /// As [`emit`](Self::emit), for a release known by its subject parts and the event to name
    /// as the cause.
    pub async fn emit_for(
        &self,
        release: &EventSubject,
        cause: &Event,
        key: EventKey<'_>,
        payload: Payload,
    ) -> Result<Event> {
        let event = Event::new(
            release.release_id,
            key,
            payload,
            self.bus.source(),
            cause.envelope.actor.clone(),
            cause.envelope.id.clone(),
        );
        let subject = EventSubject::new(
            release.env.clone(),
            release.app.clone(),
            release.release_id,
            event.event_type,
        );
        let (_, duplicate) = self.bus.publish(&subject, &event).await?;
        self.metrics.inc(
            names::EVENTS_PUBLISHED,
            &[("type", event.event_type.as_str())],
        );
        if duplicate {
            tracing::debug!(event_type = %event.event_type, "already published");
        } else {
            tracing::info!(event_type = %event.event_type, event_id = %event.id(), "published");
        }
        Ok(event)
    }

    /// The release's whole history, folded.
    pub async fn release_state(
        &self,
        release_id: crate::names::ReleaseId,
    ) -> Result<(Vec<Event>, crate::fold::ReleaseState)> {
        let events = self.bus.release_history(release_id).await?;
        let state = crate::fold::fold(&events);
        Ok((events, state))
    }
}

/// Runs one consumer until shutdown. Re-establishes its message stream after errors (a broker
/// restart, a deleted and re-created consumer) with back-off, without restarting the agent.
pub async fn run_consumer(ctx: AgentContext, def: ConsumerDef, handler: Arc<dyn Handler>) {
    let mut failures: u32 = 0;
    while !ctx.shutdown.is_cancelled() {
        match consume(&ctx, &def, handler.as_ref()).await {
            Ok(()) => break,
            Err(e) => {
                failures = failures.saturating_add(1);
                ctx.metrics
                    .inc(names::CONSUMER_RESTARTS, &[("consumer", &def.durable)]);
                let wait = Duration::from_millis(
                    200u64.saturating_mul(2u64.saturating_pow(failures.min(5))),
                );
                tracing::warn!(consumer = %def.durable, error = %e, retry_in_ms = wait.as_millis() as u64, "consumer interrupted");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!(consumer = %def.durable, "consumer stopped");
}

async fn consume(ctx: &AgentContext, def: &ConsumerDef, handler: &dyn Handler) -> Result<()> {
    let err = |message: String| Error::Consumer {
        stream: def.stream.clone(),
        consumer: def.durable.clone(),
        message,
    };
    let stream = ctx
        .bus
        .jetstream()
        .get_stream(&def.stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(&def.durable)
        .await
        .map_err(|e| err(e.to_string()))?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    let max_deliver = consumer.cached_info().config.max_deliver;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1)
        .heartbeat(Duration::from_secs(2))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(consumer = %def.durable, "consuming");
    loop {
        let next = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let message = match next {
            None => return Err(err("message stream ended".into())),
            Some(Err(e)) => return Err(err(e.to_string())),
            Some(Ok(m)) => m,
        };
        process(ctx, def, handler, message, ack_wait, max_deliver).await;
    }
}

async fn process(
    ctx: &AgentContext,
    def: &ConsumerDef,
    handler: &dyn Handler,
    message: jetstream::Message,
    ack_wait: Duration,
    max_deliver: i64,
) {
    ctx.metrics
        .inc(names::EVENTS_RECEIVED, &[("consumer", &def.durable)]);
    let (stream_sequence, delivered) = message
        .info()
        .map(|i| (i.stream_sequence, i.delivered))
        .unwrap_or((0, 1));
    let subject = message.subject.to_string();
    let parsed = EventSubject::parse(&subject)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            Event::decode(
                &message.payload,
                Some(s.event_type),
                Some(&s.release_id.to_string()),
            )
            .map(|event| (s, event))
            .map_err(|e| e.to_string())
        });
    let (subject_parts, event) = match parsed {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(%subject, stream_sequence, %reason, "invalid message");
            dead_letter(ctx, def, &message, "invalid", &reason, delivered).await;
            return;
        }
    };
    let span = tracing::info_span!(
        "handle",
        consumer = %def.durable,
        event_id = %event.id(),
        release_id = %event.release_id,
        subject = %subject,
        event_type = %event.event_type,
        delivered,
    );
    let delivery = Delivery {
        event,
        subject: subject_parts,
        consumer: def.durable.clone(),
        stream_sequence,
        delivered,
    };
    async {
        let started = Instant::now();
        let result = run_with_progress(ctx, handler, delivery, &message, ack_wait).await;
        ctx.metrics.observe(names::HANDLER_SECONDS, &[("consumer", &def.durable)], started.elapsed());
        match result {
            Some(Ok(())) => match message.double_ack().await {
                Ok(()) => {
                    ctx.metrics.inc(names::EVENTS_HANDLED, &[("consumer", &def.durable), ("outcome", "ack")]);
                    tracing::debug!("handled");
                }
                // The message will be redelivered and handled again: handlers are idempotent.
                Err(e) => tracing::warn!(error = %e, "ack failed; the message will be redelivered"),
            },
            Some(Err(HandlerError::Retry(reason))) if max_deliver > 0 && delivered >= max_deliver => {
                let reason = format!("gave up after {delivered} deliveries: {reason}");
                dead_letter(ctx, def, &message, "retries_exhausted", &reason, delivered).await;
            }
            Some(Err(HandlerError::Retry(reason))) => {
                let delay = crate::retry::redelivery_delay(delivered);
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler will retry");
                ctx.metrics.inc(names::EVENTS_HANDLED, &[("consumer", &def.durable), ("outcome", "retry")]);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Some(Err(HandlerError::Permanent(reason))) => {
                tracing::warn!(%reason, "handler refused the event");
                dead_letter(ctx, def, &message, "rejected", &reason, delivered).await;
            }
            None => {
                tracing::info!("shutting down with work in hand; returning it for redelivery");
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Runs the handler, sending in-progress acks while it works. `None` when shutdown interrupted
/// it after the grace period.
async fn run_with_progress(
    ctx: &AgentContext,
    handler: &dyn Handler,
    delivery: Delivery,
    message: &jetstream::Message,
    ack_wait: Duration,
) -> Option<Result<(), HandlerError>> {
    let period = (ack_wait / 3).max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let work = handler.handle(ctx, delivery);
    tokio::pin!(work);
    let grace = async {
        ctx.shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::pin!(grace);
    loop {
        tokio::select! {
            result = &mut work => return Some(result),
            _ = ticker.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "in-progress ack failed");
                }
            }
            _ = &mut grace => return None,
        }
    }
}

/// Publishes a message to the agent's dead-letter subject with the reason, then terminates it.
/// If the dead letter cannot be stored, the original is nak'ed instead, so it is never lost.
async fn dead_letter(
    ctx: &AgentContext,
    def: &ConsumerDef,
    message: &jetstream::Message,
    kind: &str,
    reason: &str,
    delivered: i64,
) {
    let info = message.info().ok();
    let (stream, sequence) = info
        .as_ref()
        .map(|i| (i.stream.to_owned(), i.stream_sequence))
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert("Baton-Dlq-Reason", header_value(reason).as_str());
    headers.insert("Baton-Dlq-Kind", kind);
    headers.insert("Baton-Dlq-Agent", ctx.role.as_str());
    headers.insert("Baton-Dlq-Consumer", def.durable.as_str());
    headers.insert(
        "Baton-Original-Subject",
        header_value(&message.subject).as_str(),
    );
    headers.insert("Baton-Original-Stream", stream.as_str());
    headers.insert("Baton-Original-Sequence", sequence.to_string().as_str());
    headers.insert("Baton-Delivered", delivered.to_string().as_str());
    let mut payload = message.payload.clone();
    if payload.len() > DLQ_MAX_ORIGINAL {
        headers.insert("Baton-Original-Size", payload.len().to_string().as_str());
        payload = payload.slice(..DLQ_MAX_ORIGINAL);
    }
    let dlq_subject = subject::dlq(ctx.role);
    let publish = PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(format!("dlq:{}:{stream}:{sequence}", def.durable));
    match ctx.bus.publish_raw(&dlq_subject, publish).await {
        Ok(_) => {
            ctx.metrics.inc(
                names::DEAD_LETTERS,
                &[("consumer", &def.durable), ("kind", kind)],
            );
            ctx.metrics.inc(
                names::EVENTS_HANDLED,
                &[("consumer", &def.durable), ("outcome", "dead_letter")],
            );
            tracing::warn!(dlq = %dlq_subject, %reason, "dead-lettered");
            if let Err(e) = message.double_ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "term failed after dead-lettering; a redelivery will be dead-lettered again (same id)");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store the dead letter; returning the message for redelivery");
            let _ = message
                .ack_with(AckKind::Nak(Some(crate::retry::redelivery_delay(
                    delivered,
                ))))
                .await;
        }
    }
}

/// NATS header values are one line of visible text.
fn header_value(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.chars().take(1024).collect()
}

/// Runs every consumer of an agent until shutdown.
pub async fn run_consumers(ctx: AgentContext, defs: Vec<ConsumerDef>, handler: Arc<dyn Handler>) {
    let mut tasks = tokio::task::JoinSet::new();
    for def in defs {
        tasks.spawn(run_consumer(ctx.clone(), def, handler.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// A handler that only takes delivery: the event arrived, decoded and valid, and is acknowledged.
/// Agents whose reactions are not wired yet run with it, so their consumers are live and bad
/// input is dead-lettered from the first day.
pub struct ReceiveOnly;

impl Handler for ReceiveOnly {
    fn handle<'a>(
        &'a self,
        _ctx: &'a AgentContext,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            tracing::info!(seq = delivery.stream_sequence, "event received");
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_single_lines() {
        assert_eq!(header_value("a\nb\r\tc"), "a b  c");
        assert_eq!(header_value(&"x".repeat(5000)).len(), 1024);
    }
}
