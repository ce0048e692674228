//! The consumer runtime every agent runs: pull from its durable consumers, decode and validate,
//! hand each event to the agent's handler, and map the result onto JetStream:
//!
//! | handler result | JetStream |
//! |---|---|
//! | `Ok(Handled::Done)` | ack (confirmed by the server) |
//! | `Ok(Handled::Later(d))` | nak with delay `d`: the same message comes back then (a timer) |
//! | still running, or queued behind another message of its key | in-progress ack every third of the ack wait |
//! | `Err(Retry)` | nak with a growing, jittered delay; after the last allowed delivery, dead letter |
//! | `Err(Permanent)`, or bytes that are not a valid event | dead letter with the reason, then term |
//! | the handler panicked | reported, nak with delay (dead letter after the last delivery) |
//!
//! Work is keyed ([`Handler::key`], by default the release id): messages of one key run one after
//! another in the order they arrived, messages of different keys run concurrently, at most
//! `max_in_flight` at once per agent. A message is pulled only when a slot is free, so the bound is
//! also the back-pressure: what the agent cannot take yet stays on the server (and each consumer's
//! `max_ack_pending` bounds it there). One release's slow or panicking handler never holds another.
//!
//! A dead letter is published (and acknowledged by the DLQ stream) before the original is
//! terminated, so nothing is lost if the agent dies in between: the original is redelivered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, AckKind};
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bus::Bus;
use crate::busconfig::ConsumerDef;
use crate::error::{Error, Result};
use crate::event::{Event, Role};
use crate::ids::EventKey;
use crate::metrics::{buckets, names, Metrics};
use crate::subject::{self, EventSubject};
use baton_proto::v1::envelope::Payload;

/// The largest part of an original message kept in a dead letter.
pub const DLQ_MAX_ORIGINAL: usize = 512 * 1024;
/// Messages one agent holds at once, by default (`--max-in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// How long an agent takes to stop after SIGTERM, by default (`--shutdown-grace`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// The most messages asked for in one pull request.
const MAX_BATCH: usize = 64;
/// How long one pull request waits on the server for messages. Its slots are held meanwhile, so
/// it is short: a consumer that could not get a slot waits at most this long for one. And a
/// request held by a server that dies is lost with it (the consumer's new leader knows nothing
/// of it): the consumer asks again, of the new leader, at most this long after.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long a consumer's (re)start waits for its stream's and its own info.
const CONSUMER_INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// Any one ack, nak or term on the wire; the broker may be gone at shutdown.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The bounds an agent's runtime works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages held at once (running, or queued behind another of their key).
    pub max_in_flight: usize,
    /// From SIGTERM to exit: handlers get most of it, the rest returns their messages.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Limits {
    /// How long work in hand may go on after a shutdown signal before it is returned: the grace
    /// less what returning the messages and closing the connection may take.
    pub fn handler_grace(&self) -> Duration {
        self.shutdown_grace
            .saturating_sub(Duration::from_secs(5))
            .max(self.shutdown_grace / 2)
    }
}

/// Why a handler did not finish its work: what the runtime must do (retry, or give up), and a
/// category for metrics (`baton_handler_errors_total{category=…}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Trying again later may work (the cluster or broker is briefly unavailable).
    #[error("{reason}")]
    Retry {
        category: &'static str,
        reason: String,
    },
    /// This message can never be handled: dead-letter it with the reason.
    #[error("{reason}")]
    Permanent {
        category: &'static str,
        reason: String,
    },
}

impl HandlerError {
    pub fn retry(category: &'static str, reason: impl Into<String>) -> Self {
        HandlerError::Retry {
            category,
            reason: reason.into(),
        }
    }

    pub fn permanent(category: &'static str, reason: impl Into<String>) -> Self {
        HandlerError::Permanent {
            category,
            reason: reason.into(),
        }
    }

    pub fn category(&self) -> &'static str {
        match self {
            HandlerError::Retry { category, .. } | HandlerError::Permanent { category, .. } => {
                category
            }
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retry { .. })
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        let category = e.category();
        if e.is_retryable() {
            HandlerError::retry(category, e.to_string())
        } else {
            HandlerError::permanent(category, e.to_string())
        }
    }
}

/// How a handler finished with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done: acknowledge it.
    Done,
    /// Nothing to do until then (a timed pause, a deadline): the message comes back after this
    /// long, from the server, so a restart keeps the timer.
    Later(Duration),
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
    ) -> BoxFuture<'a, Result<Handled, HandlerError>>;

    /// Messages of one key are handled one after another, in order; of different keys,
    /// concurrently. By default a key is a release.
    fn key(&self, delivery: &Delivery) -> String {
        delivery.subject.release_id.to_string()
    }

    /// Called after `delivery` was dead-lettered (refused, retries exhausted, or the handler
    /// panicked on its last delivery) with the error's category and the reason: the release it
    /// belongs to lost a trigger, so the agent tells it in an event of its own (e.g.
    /// `deploy.failed`), and the release ends instead of waiting forever. By default nothing.
    fn on_dead_letter<'a>(
        &'a self,
        _ctx: &'a AgentContext,
        _delivery: &'a Delivery,
        _category: &'a str,
        _reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
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
    pub limits: Limits,
    /// Checks release specs against the configuration revisions they name.
    pub specs: std::sync::Arc<crate::specguard::SpecGuard>,
}

impl AgentContext {
    /// Ok when `spec` is what the configuration revision it names resolves (see
    /// [`crate::specguard`]): to be called before acting on any part of a spec.
    pub async fn check_spec(
        &self,
        spec: &baton_proto::v1::ReleaseSpec,
    ) -> std::result::Result<(), HandlerError> {
        self.specs.check(&self.bus, spec).await
    }

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

    /// As [`release_state`](Self::release_state), but of at most the release's first
    /// [`MAX_EVENTS_PER_RELEASE`](crate::bus::MAX_EVENTS_PER_RELEASE) events — for ending a
    /// release whose history is too long to be read whole.
    pub async fn release_state_bounded(
        &self,
        release_id: crate::names::ReleaseId,
    ) -> Result<(Vec<Event>, crate::fold::ReleaseState)> {
        let (events, _) = self
            .bus
            .release_history_head(release_id, crate::bus::MAX_EVENTS_PER_RELEASE)
            .await?;
        let state = crate::fold::fold(&events);
        Ok((events, state))
    }
}

/// A consumer's settings the runtime needs for every message of it.
struct ConsumerSettings {
    durable: String,
    ack_wait: Duration,
    max_deliver: i64,
}

/// A message taken from a consumer, with its slot, waiting for or in its handler.
struct Job {
    work: Work,
    message: jetstream::Message,
    consumer: Arc<ConsumerSettings>,
    /// Stops the in-progress acks when the job is over.
    keepalive: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

/// What a job is: a valid event for the handler, or a message to dead-letter.
enum Work {
    Valid(Box<Delivery>),
    Invalid { reason: String, delivered: i64 },
}

/// Runs jobs serially per key and concurrently across keys, and owns every task it starts.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<ExecutorInner>,
}

struct ExecutorInner {
    ctx: AgentContext,
    handler: Arc<dyn Handler>,
    permits: Arc<Semaphore>,
    /// How many consumers feed this executor (each pulls at most its share of the slots).
    consumers: usize,
    /// Keys with a worker running, and the jobs queued behind the one it runs.
    queues: Mutex<HashMap<String, VecDeque<Job>>>,
    tasks: TaskTracker,
}

impl Executor {
    /// An executor fed by `consumers` consumers.
    pub fn new(ctx: AgentContext, handler: Arc<dyn Handler>, consumers: usize) -> Executor {
        let permits = Arc::new(Semaphore::new(ctx.limits.max_in_flight.max(1)));
        Executor {
            inner: Arc::new(ExecutorInner {
                ctx,
                handler,
                permits,
                consumers,
                queues: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
            }),
        }
    }

    fn ctx(&self) -> &AgentContext {
        &self.inner.ctx
    }

    /// Waits until every task of the executor has ended (after shutdown, each ends within the
    /// handler grace), or `timeout`. False when some were still running.
    pub async fn join(&self, timeout: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_ok()
    }

    fn in_flight(&self) -> usize {
        self.ctx()
            .limits
            .max_in_flight
            .max(1)
            .saturating_sub(self.inner.permits.available_permits())
    }

    /// Takes a message pulled with `permit`: invalid ones are dead-lettered, valid ones queued
    /// behind their key.
    fn receive(
        &self,
        consumer: &Arc<ConsumerSettings>,
        message: jetstream::Message,
        permit: OwnedSemaphorePermit,
    ) {
        let ctx = self.ctx();
        ctx.metrics
            .inc(names::EVENTS_RECEIVED, &[("consumer", &consumer.durable)]);
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
                // In order behind the other messages of its release, when the subject names one.
                let key = subject
                    .split('.')
                    .nth(5)
                    .map_or_else(|| "<invalid>".to_owned(), str::to_owned);
                self.enqueue(
                    key,
                    Job {
                        work: Work::Invalid { reason, delivered },
                        message,
                        consumer: consumer.clone(),
                        keepalive: CancellationToken::new(),
                        _permit: permit,
                    },
                );
                return;
            }
        };
        let delivery = Delivery {
            event,
            subject: subject_parts,
            consumer: consumer.durable.clone(),
            stream_sequence,
            delivered,
        };
        let keepalive = CancellationToken::new();
        self.inner.tasks.spawn(keep_alive(
            message.clone(),
            consumer.ack_wait,
            keepalive.clone(),
        ));
        let key = self.inner.handler.key(&delivery);
        self.enqueue(
            key,
            Job {
                work: Work::Valid(Box::new(delivery)),
                message,
                consumer: consumer.clone(),
                keepalive,
                _permit: permit,
            },
        );
    }

    /// Queues `job` behind its key, or starts the key's worker.
    fn enqueue(&self, key: String, job: Job) {
        {
            let mut queues = self
                .inner
                .queues
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(queue) = queues.get_mut(&key) {
                tracing::debug!(%key, queued = queue.len() + 1, "queued behind its key");
                queue.push_back(job);
                return;
            }
            queues.insert(key.clone(), VecDeque::new());
        }
        let this = self.clone();
        self.inner
            .tasks
            .spawn(async move { this.work(key, job).await });
        let ctx = self.ctx();
        ctx.metrics.set(
            names::IN_FLIGHT,
            &[("agent", ctx.role.as_str())],
            self.in_flight() as f64,
        );
    }

    /// The worker of one key: runs its jobs in order until none is left.
    async fn work(self, key: String, first: Job) {
        let mut job = first;
        loop {
            self.run(job).await;
            let next = {
                let mut queues = self
                    .inner
                    .queues
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => Some(next),
                    None => {
                        queues.remove(&key);
                        None
                    }
                }
            };
            match next {
                Some(next) => job = next,
                None => break,
            }
        }
        let ctx = self.ctx();
        ctx.metrics.set(
            names::IN_FLIGHT,
            &[("agent", ctx.role.as_str())],
            self.in_flight() as f64,
        );
    }

    /// Runs one job's handler in a task of its own (so a panic is contained), and settles its
    /// message.
    async fn run(&self, job: Job) {
        let ctx = self.ctx().clone();
        let durable = job.consumer.durable.clone();
        let delivery = match &job.work {
            Work::Valid(d) => (**d).clone(),
            Work::Invalid { reason, delivered } => {
                ctx.dead_letters()
                    .send(&durable, &job.message, "invalid", reason, *delivered)
                    .await;
                return;
            }
        };
        let span = tracing::info_span!(
            "handle",
            consumer = %durable,
            event_id = %delivery.event.id(),
            release_id = %delivery.event.release_id,
            subject = %delivery.subject,
            event_type = %delivery.event.event_type,
            delivered = delivery.delivered,
        );
        let result = if ctx.shutdown.is_cancelled() {
            None
        } else {
            let handler = self.inner.handler.clone();
            let task_ctx = ctx.clone();
            let delivery = delivery.clone();
            let started = Instant::now();
            let mut task = tokio::spawn(
                async move { handler.handle(&task_ctx, delivery).await }.instrument(span.clone()),
            );
            let grace = async {
                ctx.shutdown.cancelled().await;
                tokio::time::sleep(ctx.limits.handler_grace()).await;
            };
            let outcome = tokio::select! {
                r = &mut task => Some(r),
                _ = grace => {
                    task.abort();
                    None
                }
            };
            ctx.metrics.observe_in(
                names::HANDLER_SECONDS,
                buckets::HANDLER,
                &[("consumer", &durable)],
                started.elapsed(),
            );
            outcome
        };
        job.keepalive.cancel();
        settle(&ctx, self.inner.handler.as_ref(), &job, &delivery, result)
            .instrument(span)
            .await;
    }
}

/// Keeps a message from being redelivered while it is held: an in-progress ack every third of
/// the ack wait until `done`.
async fn keep_alive(message: jetstream::Message, ack_wait: Duration, done: CancellationToken) {
    let period = (ack_wait / 3).max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = ticker.tick() => {
                match tokio::time::timeout(ACK_TIMEOUT, message.ack_with(AckKind::Progress)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "in-progress ack failed"),
                    Err(_) => tracing::warn!("in-progress ack timed out"),
                }
            }
        }
    }
}

/// Sends one ack of any kind, bounded in time (the broker may be gone).
async fn send_ack(message: &jetstream::Message, kind: AckKind) {
    match tokio::time::timeout(ACK_TIMEOUT, message.ack_with(kind)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "ack failed; the message will be redelivered"),
        Err(_) => tracing::warn!("ack timed out; the message will be redelivered"),
    }
}

/// Maps a handler's result onto JetStream. `None`: the handler did not run or was stopped by
/// shutdown.
async fn settle(
    ctx: &AgentContext,
    handler: &dyn Handler,
    job: &Job,
    delivery: &Delivery,
    result: Option<std::result::Result<Result<Handled, HandlerError>, tokio::task::JoinError>>,
) {
    let durable = job.consumer.durable.as_str();
    let message = &job.message;
    let delivered = delivery.delivered;
    let max_deliver = job.consumer.max_deliver;
    let last_delivery = max_deliver > 0 && delivered >= max_deliver;
    let outcome = |o: &str| {
        ctx.metrics.inc(
            names::EVENTS_HANDLED,
            &[("consumer", durable), ("outcome", o)],
        )
    };
    match result {
        Some(Ok(Ok(Handled::Done))) => {
            match tokio::time::timeout(ACK_TIMEOUT * 2, message.double_ack()).await {
                Ok(Ok(())) => {
                    outcome("ack");
                    tracing::debug!("handled");
                }
                // The message will be redelivered and handled again: handlers are idempotent.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered")
                }
                Err(_) => tracing::warn!("ack timed out; the message will be redelivered"),
            }
        }
        Some(Ok(Ok(Handled::Later(after)))) => {
            tracing::debug!(
                after_ms = after.as_millis() as u64,
                "nothing to do yet; back later"
            );
            outcome("deferred");
            send_ack(message, AckKind::Nak(Some(after))).await;
        }
        Some(Ok(Err(e))) => {
            let kind = if e.is_retryable() {
                "retry"
            } else {
                "permanent"
            };
            ctx.metrics.inc(
                names::HANDLER_ERRORS,
                &[
                    ("consumer", durable),
                    ("kind", kind),
                    ("category", e.category()),
                ],
            );
            let category = e.category();
            match e {
                HandlerError::Retry { reason, .. } if last_delivery => {
                    let reason = format!("gave up after {delivered} deliveries: {reason}");
                    if ctx
                        .dead_letters()
                        .send(durable, message, "retries_exhausted", &reason, delivered)
                        .await
                    {
                        handler
                            .on_dead_letter(ctx, delivery, category, &reason)
                            .await;
                    }
                }
                HandlerError::Retry { reason, .. } => {
                    let delay = crate::retry::redelivery_delay(delivered);
                    tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler will retry");
                    outcome("retry");
                    send_ack(message, AckKind::Nak(Some(delay))).await;
                }
                HandlerError::Permanent { reason, .. } => {
                    tracing::warn!(%reason, "handler refused the event");
                    if ctx
                        .dead_letters()
                        .send(durable, message, "rejected", &reason, delivered)
                        .await
                    {
                        handler
                            .on_dead_letter(ctx, delivery, category, &reason)
                            .await;
                    }
                }
            }
        }
        Some(Err(join)) => {
            let reason = if join.is_panic() {
                ctx.metrics
                    .inc(names::HANDLER_PANICS, &[("consumer", durable)]);
                "the handler panicked".to_owned()
            } else {
                "the handler was cancelled".to_owned()
            };
            tracing::error!(%reason, "handler did not finish");
            if last_delivery {
                let reason = format!("gave up after {delivered} deliveries: {reason}");
                if ctx
                    .dead_letters()
                    .send(durable, message, "panicked", &reason, delivered)
                    .await
                {
                    handler
                        .on_dead_letter(ctx, delivery, "panicked", &reason)
                        .await;
                }
            } else {
                outcome("retry");
                send_ack(
                    message,
                    AckKind::Nak(Some(crate::retry::redelivery_delay(delivered))),
                )
                .await;
            }
        }
        None => {
            tracing::info!("shutting down with work in hand; returning it for redelivery");
            outcome("returned");
            send_ack(message, AckKind::Nak(None)).await;
        }
    }
}

/// Runs one consumer until shutdown, feeding `executor`. Re-establishes its pull after errors (a
/// broker restart, a deleted and re-created consumer) with back-off, without restarting the agent.
pub async fn run_consumer_with(executor: Executor, def: ConsumerDef) {
    let ctx = executor.ctx().clone();
    let mut failures: u32 = 0;
    while !ctx.shutdown.is_cancelled() {
        match consume(&executor, &def, &mut failures).await {
            Ok(()) => break,
            Err(e) => {
                failures = failures.saturating_add(1);
                ctx.metrics
                    .inc(names::CONSUMER_RESTARTS, &[("consumer", &def.durable)]);
                // Short: a consumer whose leader died answers again once its replicas have
                // elected another (nats-server takes 4 to 9 s), and every second of back-off
                // beyond that is a second the release waits.
                let wait = Duration::from_millis(
                    200u64.saturating_mul(2u64.saturating_pow(failures.min(2))),
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

/// Runs one consumer with an executor of its own, until shutdown; returns when its work in hand
/// is settled (or the shutdown grace is over).
pub async fn run_consumer(ctx: AgentContext, def: ConsumerDef, handler: Arc<dyn Handler>) {
    run_consumers(ctx, vec![def], handler).await
}

async fn consume(executor: &Executor, def: &ConsumerDef, failures: &mut u32) -> Result<()> {
    let ctx = executor.ctx();
    let err = |message: String| Error::Consumer {
        stream: def.stream.clone(),
        consumer: def.durable.clone(),
        message,
    };
    // Each answered by a leader (the stream's, the consumer's): asked again soon rather than
    // waited on while one is being elected.
    let stream = tokio::time::timeout(
        CONSUMER_INFO_TIMEOUT,
        ctx.bus.jetstream().get_stream(&def.stream),
    )
    .await
    .map_err(|_| err(format!("no stream info within {CONSUMER_INFO_TIMEOUT:?}")))?
    .map_err(|e| err(e.to_string()))?;
    let consumer: jetstream::consumer::PullConsumer =
        tokio::time::timeout(CONSUMER_INFO_TIMEOUT, stream.get_consumer(&def.durable))
            .await
            .map_err(|_| err(format!("no consumer info within {CONSUMER_INFO_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
    let settings = Arc::new(ConsumerSettings {
        durable: def.durable.clone(),
        ack_wait: consumer.cached_info().config.ack_wait,
        max_deliver: consumer.cached_info().config.max_deliver,
    });
    tracing::info!(consumer = %def.durable, "consuming");
    loop {
        // A slot first: a message is never taken before the agent can hold it.
        let first = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            p = executor.inner.permits.clone().acquire_owned() => {
                p.map_err(|e| err(e.to_string()))?
            }
        };
        let mut permits = vec![first];
        // A fair share of the slots per consumer, so that an open pull request of one consumer
        // never holds the slots another consumer of the agent needs.
        let share =
            (ctx.limits.max_in_flight / executor.inner.consumers.max(1)).clamp(1, MAX_BATCH);
        while permits.len() < share {
            match executor.inner.permits.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let mut batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(PULL_EXPIRES)
            // No idle heartbeats: async-nats' batch stream stops waking its reader after one
            // (it returns Pending without a waker), so a message that follows a heartbeat would
            // wait for the request's timer and be dropped with it. A broker that is gone is
            // noticed all the same: the request ends with its expiry and the next one fails.
            .messages()
            .await
            .map_err(|e| err(e.to_string()))?;
        loop {
            let next = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                next = batch.next() => next,
            };
            match next {
                None => break,
                Some(Err(e)) => return Err(err(e.to_string())),
                Some(Ok(message)) => {
                    *failures = 0;
                    let Some(permit) = permits.pop() else {
                        // More than asked for: leave it to the ack wait (never happens with a
                        // conforming server).
                        tracing::warn!(consumer = %def.durable, "more messages than requested");
                        continue;
                    };
                    executor.receive(&settings, message, permit);
                }
            }
        }
    }
}

/// Where an agent's dead letters go (`baton.v1.dlq.<agent>`): the runtime's, and those of parts
/// of an agent that consume outside it (the notifier's outbox).
pub struct DeadLetters<'a> {
    pub role: Role,
    pub bus: &'a Bus,
    pub metrics: &'a Metrics,
}

impl AgentContext {
    pub fn dead_letters(&self) -> DeadLetters<'_> {
        DeadLetters {
            role: self.role,
            bus: &self.bus,
            metrics: &self.metrics,
        }
    }
}

impl DeadLetters<'_> {
    /// Publishes `message` to the agent's dead-letter subject with the reason (and `kind`: why,
    /// in a word), then terminates it. If the dead letter cannot be stored, the original is
    /// nak'ed instead, so it is never lost. True when the dead letter is stored.
    pub async fn send(
        &self,
        durable: &str,
        message: &jetstream::Message,
        kind: &str,
        reason: &str,
        delivered: i64,
    ) -> bool {
        let info = message.info().ok();
        let (stream, sequence) = info
            .as_ref()
            .map(|i| (i.stream.to_owned(), i.stream_sequence))
            .unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert("Baton-Dlq-Reason", header_value(reason).as_str());
        headers.insert("Baton-Dlq-Kind", kind);
        headers.insert("Baton-Dlq-Agent", self.role.as_str());
        headers.insert("Baton-Dlq-Consumer", durable);
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
        let dlq_subject = subject::dlq(self.role);
        let publish = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(format!("dlq:{durable}:{stream}:{sequence}"));
        match self.bus.publish_raw(&dlq_subject, publish).await {
            Ok(_) => {
                self.metrics.inc(
                    names::DEAD_LETTERS,
                    &[("consumer", durable), ("kind", kind)],
                );
                self.metrics.inc(
                    names::EVENTS_HANDLED,
                    &[("consumer", durable), ("outcome", "dead_letter")],
                );
                tracing::warn!(dlq = %dlq_subject, %reason, "dead-lettered");
                match tokio::time::timeout(ACK_TIMEOUT * 2, message.double_ack_with(AckKind::Term)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "term failed after dead-lettering; a redelivery will be dead-lettered again (same id)"),
                Err(_) => tracing::warn!("term timed out after dead-lettering; a redelivery will be dead-lettered again (same id)"),
            }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the dead letter; returning the message for redelivery");
                send_ack(
                    message,
                    AckKind::Nak(Some(crate::retry::redelivery_delay(delivered))),
                )
                .await;
                false
            }
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

/// Runs every consumer of an agent until shutdown, through one executor (so the messages of one
/// release are in order across consumers); returns when the work in hand is settled, or the
/// shutdown grace is over.
pub async fn run_consumers(ctx: AgentContext, defs: Vec<ConsumerDef>, handler: Arc<dyn Handler>) {
    let grace = ctx.limits.shutdown_grace;
    let executor = Executor::new(ctx, handler, defs.len());
    let mut pulls = tokio::task::JoinSet::new();
    for def in defs {
        pulls.spawn(run_consumer_with(executor.clone(), def));
    }
    while pulls.join_next().await.is_some() {}
    if !executor.join(grace).await {
        tracing::warn!("work in hand did not settle within the shutdown grace");
    }
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
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            tracing::info!(seq = delivery.stream_sequence, "event received");
            Ok(Handled::Done)
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
