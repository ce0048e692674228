//! The second half of the notifier: the outbox (`BATON_NOTIFY`) out to the receivers.
//!
//! One durable consumer (`notifier-deliveries`) takes the outbox's messages; each goes to the
//! worker of its channel, which sends its channel's messages one after another, oldest stored
//! first (so each release's messages arrive in order). A receiver that fails is tried again
//! with a growing, jittered delay (its `Retry-After` when it gives one) while its messages stay
//! held — kept from redelivery by in-progress acks — and only its own channel waits: the other
//! channels' workers go on. A message is acknowledged when the receiver answered 2xx; one the
//! receiver refuses for good (another 4xx), or that still fails once `--give-up-after` has passed
//! since its event (after one attempt at least), is dead-lettered with the reason
//! (`baton.v1.dlq.notifier`). So a channel that is down for good costs each of its messages one
//! window, together, not one window after another.
//!
//! A notifier that starts while messages are still pending from one that died waits for their
//! redelivery (one ack wait) before it sends anything, so a newer message never overtakes them.
//!
//! Every attempt carries the event's id (`ce-id`, and `Idempotency-Key`): if the notifier dies
//! after a receiver took a message but before its ack, the redelivered message is sent again
//! with the same id, which a receiver uses to keep it once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use baton_core::bus::Bus;
use baton_core::busauth::{NOTIFY, NOTIFY_DURABLE};
use baton_core::metrics::Metrics;
use baton_core::notify::ChannelKind;
use baton_core::runtime::DeadLetters;
use baton_core::subject::{self, NOTIFY_PREFIX};
use baton_core::Role;
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::message::{cloudevent_source, cloudevent_type, slack_body, Outbound};
use crate::names;
use crate::secrets::Secrets;

/// How long the outbox consumer waits for an ack; held messages get an in-progress ack every
/// third of it.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages held at once (queued behind their channel's worker, or being sent).
const MAX_HELD: usize = 4096;
const MAX_BATCH: usize = 64;
const PULL_EXPIRES: Duration = Duration::from_secs(5);
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// The most a receiver's `Retry-After` is followed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How the deliveries are made.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A message still failing this long after its first attempt is dead-lettered.
    pub give_up_after: Duration,
    /// One HTTP request, connection included.
    pub request_timeout: Duration,
}

/// The outbox consumer's configuration.
pub fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(NOTIFY_DURABLE.to_owned()),
        description: Some("notifier sends the outbox's notifications to their channels".into()),
        filter_subject: subject::all_notifications(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        // The notifier gives up by time, with a dead letter; the server never drops a message.
        max_deliver: -1,
        max_ack_pending: 10_000,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// Worth another try (after `retry_after` when the receiver said so).
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The receiver refuses it: trying again would not help.
    Refused(String),
}

enum Outcome {
    Sent,
    DeadLetter { kind: &'static str, reason: String },
    Stopped,
}

/// Sends the outbox; see the module documentation.
pub struct Deliverer {
    bus: Bus,
    metrics: Metrics,
    secrets: Arc<Secrets>,
    http: reqwest::Client,
    settings: Settings,
    shutdown: CancellationToken,
    /// Messages held, by stream sequence (the newest delivery of each).
    held: Mutex<HashMap<u64, jetstream::Message>>,
    permits: Arc<Semaphore>,
    workers: Mutex<HashMap<String, Arc<ChannelQueue>>>,
    /// Nothing is sent before then: messages a notifier that died held are redelivered by then.
    settle_until: Mutex<Option<tokio::time::Instant>>,
    tasks: TaskTracker,
}

/// A channel's messages waiting for its worker, by stream sequence (oldest first).
#[derive(Default)]
struct ChannelQueue {
    waiting: Mutex<BTreeMap<u64, OwnedSemaphorePermit>>,
    wake: Notify,
}

impl ChannelQueue {
    fn pop(&self) -> Option<(u64, OwnedSemaphorePermit)> {
        self.waiting.lock().ok()?.pop_first()
    }
}

impl Deliverer {
    pub fn new(
        bus: Bus,
        metrics: Metrics,
        secrets: Arc<Secrets>,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Deliverer>> {
        baton_core::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(settings.request_timeout)
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("baton-notifier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Deliverer {
            bus,
            metrics,
            secrets,
            http,
            settings,
            shutdown,
            held: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(MAX_HELD)),
            workers: Mutex::new(HashMap::new()),
            settle_until: Mutex::new(None),
            tasks: TaskTracker::new(),
        }))
    }

    /// Consumes the outbox until shutdown, then lets the workers finish the request in hand and
    /// returns what they still hold to the server at once (for the next notifier).
    pub async fn run(self: Arc<Self>) {
        let keepalive = {
            let me = self.clone();
            tokio::spawn(async move { me.keep_alive().await })
        };
        let mut failures = 0u32;
        while !self.shutdown.is_cancelled() {
            match self.consume().await {
                Ok(()) => break,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures).min(Duration::from_secs(10));
                    tracing::warn!(error = %e, ?delay, "outbox consumer interrupted; resuming");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
        keepalive.abort();
        let held: Vec<jetstream::Message> = self
            .held
            .lock()
            .map(|mut h| h.drain().map(|(_, m)| m).collect())
            .unwrap_or_default();
        for m in held {
            let _ = tokio::time::timeout(ACK_TIMEOUT, m.ack_with(AckKind::Nak(None))).await;
        }
    }

    async fn consume(self: &Arc<Self>) -> anyhow::Result<()> {
        let stream = self.bus.jetstream().get_stream(NOTIFY).await?;
        let consumer: consumer::PullConsumer = match stream.get_consumer(NOTIFY_DURABLE).await {
            Ok(c) => c,
            Err(_) => {
                let c = stream.create_consumer(consumer_config()).await?;
                tracing::info!(consumer = NOTIFY_DURABLE, "created durable consumer");
                c
            }
        };
        let pending = consumer.cached_info().num_ack_pending;
        if pending > 0 {
            // Delivered to a notifier that is gone: they come back after their ack wait.
            if let Ok(mut s) = self.settle_until.lock() {
                *s = Some(tokio::time::Instant::now() + ACK_WAIT + Duration::from_secs(1));
            }
            tracing::info!(pending, "messages of an earlier notifier are pending: waiting one ack wait for them before sending");
        }
        tracing::info!(consumer = NOTIFY_DURABLE, "sending the outbox");
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                p = self.permits.clone().acquire_owned() => p?,
            };
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let mut batch = consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await?;
            loop {
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(()),
                    next = batch.next() => next,
                };
                match next {
                    None => break,
                    Some(Err(e)) => return Err(anyhow::anyhow!("{e}")),
                    Some(Ok(message)) => {
                        let Some(permit) = permits.pop() else {
                            continue;
                        };
                        self.receive(message, permit).await;
                    }
                }
            }
        }
    }

    /// Hands a message to its channel's worker (started on the channel's first message).
    async fn receive(self: &Arc<Self>, message: jetstream::Message, permit: OwnedSemaphorePermit) {
        let (sequence, delivered) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        let channel = message
            .subject
            .strip_prefix(NOTIFY_PREFIX)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.split('.').next())
            .filter(|c| baton_core::names::validate_dns_label("channel", c).is_ok())
            .map(str::to_owned);
        let Some(channel) = channel else {
            let reason = format!("{} is not a notification subject", message.subject);
            self.dead_letter(&message, "invalid", &reason, delivered)
                .await;
            return;
        };
        {
            let Ok(mut held) = self.held.lock() else {
                return;
            };
            // Delivered again while it waits here (its in-progress acks did not reach the
            // server in time): keep the newest delivery, and send it once.
            let again = held.insert(sequence, message).is_some();
            self.metrics.set(names::PENDING, &[], held.len() as f64);
            if again {
                return;
            }
        }
        let queue = {
            let Ok(mut workers) = self.workers.lock() else {
                return;
            };
            workers
                .entry(channel.clone())
                .or_insert_with(|| {
                    let queue = Arc::new(ChannelQueue::default());
                    let me = self.clone();
                    let (name, q) = (channel.clone(), queue.clone());
                    self.tasks.spawn(async move { me.work(name, q).await });
                    queue
                })
                .clone()
        };
        if let Ok(mut waiting) = queue.waiting.lock() {
            waiting.insert(sequence, permit);
        }
        queue.wake.notify_one();
    }

    /// One channel: its messages in order, each until sent or dead-lettered.
    async fn work(self: Arc<Self>, channel: String, queue: Arc<ChannelQueue>) {
        loop {
            let settle = self.settle_until.lock().ok().and_then(|s| *s);
            if let Some(until) = settle {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            let Some((sequence, _permit)) = queue.pop() else {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = queue.wake.notified() => {}
                }
                continue;
            };
            let Some(message) = self.held_message(sequence) else {
                continue;
            };
            let delivered = message.info().map_or(1, |i| i.delivered);
            let outbound: Outbound = match serde_json::from_slice(&message.payload) {
                Ok(o) => o,
                Err(e) => {
                    let reason = format!("not a notification: {e}");
                    self.release(sequence);
                    self.dead_letter(&message, "invalid", &reason, delivered)
                        .await;
                    continue;
                }
            };
            let trigger = outbound.notification.trigger.as_str();
            match self.deliver(&channel, &outbound).await {
                Outcome::Stopped => return,
                Outcome::Sent => {
                    // The newest delivery of it: the one the server expects the ack for.
                    let current = self.held_message(sequence).unwrap_or(message);
                    match tokio::time::timeout(ACK_TIMEOUT, current.double_ack()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "ack of a sent notification failed; it may be sent again (same id)")
                        }
                        Err(_) => tracing::warn!(
                            "ack of a sent notification timed out; it may be sent again (same id)"
                        ),
                    }
                    self.release(sequence);
                    self.metrics
                        .inc(names::SENT, &[("channel", &channel), ("trigger", trigger)]);
                    tracing::info!(%channel, trigger, id = %outbound.notification.id, release_id = %outbound.notification.release_id, "notification sent");
                }
                Outcome::DeadLetter { kind, reason } => {
                    let current = self.held_message(sequence).unwrap_or(message);
                    self.release(sequence);
                    self.metrics
                        .inc(names::GIVEN_UP, &[("channel", &channel), ("kind", kind)]);
                    self.dead_letter(&current, kind, &reason, delivered).await;
                }
            }
        }
    }

    fn held_message(&self, sequence: u64) -> Option<jetstream::Message> {
        self.held.lock().ok()?.get(&sequence).cloned()
    }

    fn release(&self, sequence: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&sequence);
            self.metrics.set(names::PENDING, &[], held.len() as f64);
        }
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        kind: &str,
        reason: &str,
        delivered: i64,
    ) {
        let dlq = DeadLetters {
            role: Role::Notifier,
            bus: &self.bus,
            metrics: &self.metrics,
        };
        dlq.send(NOTIFY_DURABLE, message, kind, reason, delivered)
            .await;
    }

    /// Tries until the receiver takes it, refuses it, or the time to give up has come (counted
    /// from the event, so the messages of a channel that is down run out together).
    async fn deliver(&self, channel: &str, outbound: &Outbound) -> Outcome {
        let give_up_at = baton_core::time::parse_rfc3339(&outbound.notification.time)
            .unwrap_or_else(|_| SystemTime::now())
            + self.settings.give_up_after;
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = match self.secrets.url(channel) {
                Some(url) => self.send(&url, outbound).await,
                None => Err(Failure::Retry {
                    reason: format!(
                        "no URL for channel {channel} in the secrets file {}",
                        self.secrets.path().display()
                    ),
                    retry_after: None,
                }),
            };
            let (reason, retry_after) = match result {
                Ok(()) => return Outcome::Sent,
                Err(Failure::Refused(reason)) => {
                    return Outcome::DeadLetter {
                        kind: "refused",
                        reason: format!("channel {channel} refused the notification: {reason}"),
                    }
                }
                Err(Failure::Retry {
                    reason,
                    retry_after,
                }) => (reason, retry_after),
            };
            self.metrics
                .inc(names::FAILED_ATTEMPTS, &[("channel", channel)]);
            let left = give_up_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Outcome::DeadLetter {
                    kind: "gave_up",
                    reason: format!(
                        "channel {channel} still failing {}s after the event ({attempt} attempts in {}s): {reason}",
                        self.settings.give_up_after.as_secs(),
                        started.elapsed().as_secs()
                    ),
                };
            }
            let delay = retry_after
                .map(|d| d.min(MAX_RETRY_AFTER))
                .unwrap_or_else(|| backoff(attempt))
                .min(left);
            tracing::warn!(channel, attempt, %reason, ?delay, id = %outbound.notification.id, "notification not taken; trying again");
            tokio::select! {
                _ = self.shutdown.cancelled() => return Outcome::Stopped,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt.
    async fn send(&self, url: &str, outbound: &Outbound) -> Result<(), Failure> {
        let n = &outbound.notification;
        let request = self
            .http
            .post(url)
            .header("Idempotency-Key", &n.id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        let request = match outbound.kind {
            ChannelKind::Slack => request.body(slack_body(n).to_string()),
            ChannelKind::Cloudevents => {
                let body = serde_json::to_string(n)
                    .map_err(|e| Failure::Refused(format!("cannot encode it: {e}")))?;
                request
                    .header("ce-specversion", "1.0")
                    .header("ce-id", &n.id)
                    .header("ce-type", cloudevent_type(n))
                    .header("ce-source", cloudevent_source(n))
                    .header("ce-subject", &n.release_id)
                    .header("ce-time", &n.time)
                    .body(body)
            }
        };
        let started = Instant::now();
        // The URL is the secret: errors are told without it.
        let response = request.send().await.map_err(|e| Failure::Retry {
            reason: e.without_url().to_string(),
            retry_after: None,
        })?;
        self.metrics
            .observe(names::SEND_SECONDS, &[], started.elapsed());
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        let reason = if body.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {body}")
        };
        match status.as_u16() {
            408 | 409 | 425 | 429 | 500..=599 => Err(Failure::Retry {
                reason,
                retry_after,
            }),
            _ => Err(Failure::Refused(reason)),
        }
    }

    /// Keeps every held message from redelivery while it waits for its channel.
    async fn keep_alive(&self) {
        let mut tick = tokio::time::interval(ACK_WAIT / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            let held: Vec<jetstream::Message> = self
                .held
                .lock()
                .map(|h| h.values().cloned().collect())
                .unwrap_or_default();
            for m in held {
                let _ = tokio::time::timeout(ACK_TIMEOUT, m.ack_with(AckKind::Progress)).await;
            }
        }
    }
}

/// 1 s, 2 s, 4 s … up to a minute, each ±20%.
fn backoff(attempt: u32) -> Duration {
    let base = FIRST_DELAY
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(10))
        .min(MAX_DELAY);
    base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_a_minute() {
        for (attempt, low, high) in [
            (1, 0.8, 1.2),
            (2, 1.6, 2.4),
            (4, 6.4, 9.6),
            (30, 48.0, 72.0),
        ] {
            let d = backoff(attempt).as_secs_f64();
            assert!((low..=high).contains(&d), "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn the_outbox_consumer_never_drops_a_message_itself() {
        let c = consumer_config();
        assert_eq!(c.max_deliver, -1);
        assert_eq!(c.durable_name.as_deref(), Some("notifier-deliveries"));
        assert_eq!(c.filter_subject, "baton.v1.notify.>");
    }
}
