//! The metrics agent's I/O: it reads the event stream into the history and answers queries.
//!
//! Three tasks share nothing but channels:
//!
//! - the **reader** follows `BATON_EVENTS` with an ordered consumer from the first event
//!   (`DeliverPolicy::All`, filter `baton.v1.events.>`) and then live, so a restarted agent
//!   rebuilds its history from the stream; after an interruption it goes on from the last stream
//!   sequence it saw;
//! - the **keeper** owns the [`History`]: it alone folds events into it, and answers queries in
//!   between, so every answer sees a consistent history. Until the reader has caught up with the
//!   stream it holds queries back (and `/readyz` says so), so no answer is built from half a
//!   history;
//! - the **responder** takes requests on `baton.v1.api.metrics.report` and
//!   `baton.v1.api.releases.list` in the queue group `baton-metrics` (one of several replicas
//!   answers each), validates them and asks the keeper.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use baton_core::bus::{Bus, EVENTS_STREAM};
use baton_core::event::Event;
use baton_core::http::ReadinessCheck;
use baton_core::metrics::Metrics;
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_core::subject::{self, EventSubject, API_PREFIX};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::{self, Query};
use crate::error::{Error, Result};
use crate::history::{Applied, History};
use crate::prom::{self, Exporter};

/// How long the reader waits for its consumer to be made or to answer.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a query may wait for the keeper (e.g. while the history is still being read).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the Prometheus figures are recomputed when nothing changed (the window slides).
const EXPORT_EVERY: Duration = Duration::from_secs(30);

enum Msg {
    Event(Box<(EventSubject, Event)>),
    /// The reader has delivered every event that was in the stream when it started.
    CaughtUp,
    Query(Query, oneshot::Sender<Vec<u8>>),
}

/// The running tasks of the metrics service.
pub struct Service {
    loaded: Arc<AtomicBool>,
    registry: Arc<OnceLock<Metrics>>,
    tasks: tokio::task::JoinSet<()>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Service {
    /// Starts the reader, keeper and responder on `bus` until `shutdown`.
    pub fn start(bus: Bus, shutdown: CancellationToken) -> Service {
        let loaded = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(OnceLock::new());
        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(keep(rx, loaded.clone(), registry.clone(), shutdown.clone()));
        tasks.spawn(read(bus.clone(), tx.clone(), shutdown.clone()));
        tasks.spawn(respond(bus, tx, registry.clone(), shutdown));
        Service {
            loaded,
            registry,
            tasks,
        }
    }

    /// The handler of the agent's durable `metrics-all` consumer. The runtime dead-letters
    /// invalid events before they reach it; valid ones are already read by the reader, so it
    /// accepts them. It also hands the keeper the runtime's metrics registry (the one `/metrics`
    /// serves), which the runtime gives only to handlers.
    /// Exports the figures on `registry` (the agent's `/metrics`) from the start, before the
    /// first event arrives.
    pub fn use_registry(&self, registry: Metrics) {
        let _ = self.registry.set(registry);
    }

    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(Accept {
            registry: self.registry.clone(),
        })
    }

    /// Ready once the history holds the whole stream as it was at start.
    pub fn readiness(&self) -> ReadinessCheck {
        let loaded = self.loaded.clone();
        Arc::new(move || {
            let loaded = loaded.load(Ordering::Relaxed);
            Box::pin(async move {
                if loaded {
                    Ok(())
                } else {
                    Err("still reading the event history".to_owned())
                }
            })
        })
    }

    /// Waits for the tasks to end (after shutdown), at most `grace`.
    pub async fn join(mut self, grace: Duration) {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("metrics tasks did not stop in time");
        }
    }
}

struct Accept {
    registry: Arc<OnceLock<Metrics>>,
}

impl Handler for Accept {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        _delivery: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            self.registry.get_or_init(|| ctx.metrics.clone());
            Ok(Handled::Done)
        })
    }
}

/// The keeper: the only task that changes the history.
async fn keep(
    mut rx: mpsc::Receiver<Msg>,
    loaded: Arc<AtomicBool>,
    registry: Arc<OnceLock<Metrics>>,
    shutdown: CancellationToken,
) {
    let mut history = History::new();
    let mut exporter = Exporter::default();
    // The histograms, filled from the first event on but shown on `/metrics` only once the
    // history is whole: a scrape never sees a restarted agent's figures half rebuilt (which
    // Prometheus would take for a counter reset).
    let timings = Metrics::new();
    let mut held: Vec<(Query, oneshot::Sender<Vec<u8>>)> = Vec::new();
    let mut changed = true;
    let mut exported_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = rx.recv() => match msg {
                None => break,
                Some(Msg::Event(boxed)) => {
                    let (subject, event) = *boxed;
                    match history.apply(&subject, &event) {
                        Applied::Folded => {
                            changed = true;
                            prom::record(&timings, &history.take_observations());
                        }
                        Applied::Duplicate => {}
                        Applied::Mismatch => tracing::warn!(
                            %subject, event_id = %event.id(),
                            "event names another environment or app than its release's first event; not folded"
                        ),
                    }
                }
                Some(Msg::CaughtUp) => {
                    if !loaded.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            releases = history.len(), events = history.events(),
                            "event history read; answering queries"
                        );
                    }
                    let now = now_ms();
                    for (query, reply) in held.drain(..) {
                        let _ = reply.send(api::answer(&history, &query, now));
                    }
                }
                Some(Msg::Query(query, reply)) => {
                    if loaded.load(Ordering::Relaxed) {
                        let _ = reply.send(api::answer(&history, &query, now_ms()));
                    } else {
                        // Askers who gave up need no answer.
                        held.retain(|(_, r)| !r.is_closed());
                        held.push((query, reply));
                    }
                }
            },
            _ = tick.tick() => {
                let due = exported_at.is_none_or(|t| t.elapsed() >= EXPORT_EVERY);
                if let (true, Some(metrics)) = (loaded.load(Ordering::Relaxed), registry.get()) {
                    if changed || due {
                        metrics.include(&timings);
                        exporter.export(metrics, &history, now_ms());
                        changed = false;
                        exported_at = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }
}

/// The reader: follows the event stream into the keeper until shutdown.
async fn read(bus: Bus, tx: mpsc::Sender<Msg>, shutdown: CancellationToken) {
    let mut last: Option<u64> = None;
    let mut caught_up = false;
    let mut failures: u32 = 0;
    while !shutdown.is_cancelled() {
        match follow(&bus, &tx, &mut last, &mut caught_up, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(
                    200u64.saturating_mul(2u64.saturating_pow(failures.min(4))),
                );
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "event stream interrupted");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!("event stream reader stopped");
}

/// Reads from the stream sequence after `last` (or from the first event) until shutdown (`Ok`)
/// or an interruption (`Err`).
async fn follow(
    bus: &Bus,
    tx: &mpsc::Sender<Msg>,
    last: &mut Option<u64>,
    caught_up: &mut bool,
    shutdown: &CancellationToken,
) -> Result<()> {
    let err = |message: String| Error::ReadStream {
        stream: EVENTS_STREAM.to_owned(),
        message,
    };
    let stream = bus
        .jetstream()
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(|e| err(e.to_string()))?;
    let deliver_policy = match *last {
        None => DeliverPolicy::All,
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    // An ordered consumer lives on one server, chosen at random among the stream's replicas
    // (nats-server 2.9 chooses one that is down as readily as the others): when it does not
    // answer soon, it is made again, most likely elsewhere, instead of waiting out the client's
    // request time-out.
    let mut consumer = tokio::time::timeout(
        CONSUMER_TIMEOUT,
        stream.create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject::all_events(),
            deliver_policy,
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| err(format!("no consumer within {CONSUMER_TIMEOUT:?}")))?
    .map_err(|e| err(e.to_string()))?;
    let pending = tokio::time::timeout(CONSUMER_TIMEOUT, consumer.info())
        .await
        .map_err(|_| err(format!("no consumer info within {CONSUMER_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?
        .num_pending;
    tracing::info!(pending, from = ?last.map(|s| s + 1), "reading the event stream");
    if pending == 0 && !*caught_up {
        *caught_up = true;
        if tx.send(Msg::CaughtUp).await.is_err() {
            return Ok(());
        }
    }
    let mut messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let message = match next {
            None => return Err(err("message stream ended".into())),
            Some(Err(e)) => return Err(err(e.to_string())),
            Some(Ok(m)) => m,
        };
        let (sequence, left) = message
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .map_err(|e| err(e.to_string()))?;
        *last = Some(sequence);
        let parsed = EventSubject::parse(&message.subject)
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
        match parsed {
            Ok(pair) => {
                if tx.send(Msg::Event(Box::new(pair))).await.is_err() {
                    return Ok(());
                }
            }
            // The durable consumer dead-letters it with the reason; the history skips it.
            Err(reason) => {
                tracing::debug!(subject = %message.subject, sequence, %reason, "skipping an invalid event")
            }
        }
        if left == 0 && !*caught_up {
            *caught_up = true;
            if tx.send(Msg::CaughtUp).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// The responder: answers queries until shutdown.
async fn respond(
    bus: Bus,
    tx: mpsc::Sender<Msg>,
    registry: Arc<OnceLock<Metrics>>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    while !shutdown.is_cancelled() {
        match serve(&bus, &tx, &registry, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(
                    200u64.saturating_mul(2u64.saturating_pow(failures.min(4))),
                );
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "query subscription interrupted");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!("query responder stopped");
}

async fn subscribe(bus: &Bus, name: &str) -> Result<async_nats::Subscriber> {
    let subject = subject::api(name);
    bus.client()
        .queue_subscribe(subject.clone(), api::QUEUE_GROUP.to_owned())
        .await
        .map_err(|e| Error::Subscribe {
            subject,
            message: e.to_string(),
        })
}

async fn serve(
    bus: &Bus,
    tx: &mpsc::Sender<Msg>,
    registry: &Arc<OnceLock<Metrics>>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let report = subscribe(bus, api::REPORT).await?;
    let releases = subscribe(bus, api::RELEASES).await?;
    tracing::info!(
        subjects = %format!("{}, {}", subject::api(api::REPORT), subject::api(api::RELEASES)),
        queue_group = api::QUEUE_GROUP,
        "answering queries"
    );
    let mut requests = futures::stream::select(report, releases);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = requests.next() => next,
        };
        let Some(message) = next else {
            return Err(Error::Subscribe {
                subject: format!("{API_PREFIX}.>"),
                message: "subscription ended".into(),
            });
        };
        // Each request on its own task: one held back while the history loads does not hold up
        // the others.
        tokio::spawn(answer(bus.clone(), tx.clone(), registry.clone(), message));
    }
}

async fn answer(
    bus: Bus,
    tx: mpsc::Sender<Msg>,
    registry: Arc<OnceLock<Metrics>>,
    message: async_nats::Message,
) {
    let Some(reply) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "a query without a reply subject; ignored");
        return;
    };
    let name = message
        .subject
        .strip_prefix(API_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(&message.subject)
        .to_owned();
    let (outcome, body) = match api::parse(&name, &message.payload) {
        Err(e) => {
            tracing::info!(query = %name, error = %e, "refused a bad query");
            ("bad_request", api::error_reply(&e.to_string()))
        }
        Ok(query) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(Msg::Query(query, reply_tx)).await.is_err() {
                (
                    "unavailable",
                    api::error_reply("the metrics agent is shutting down"),
                )
            } else {
                match tokio::time::timeout(QUERY_TIMEOUT, reply_rx).await {
                    Ok(Ok(body)) => ("ok", body),
                    Ok(Err(_)) => ("unavailable", api::error_reply("the metrics agent is shutting down")),
                    Err(_) => (
                        "unavailable",
                        api::error_reply(&format!(
                            "the metrics agent is still reading the event history; no answer within {}s",
                            QUERY_TIMEOUT.as_secs()
                        )),
                    ),
                }
            }
        }
    };
    if let Some(metrics) = registry.get() {
        metrics.inc(
            prom::names::API_REQUESTS,
            &[("query", &name), ("outcome", outcome)],
        );
    }
    if let Err(e) = bus.client().publish(reply, body.into()).await {
        tracing::warn!(query = %name, error = %e, "cannot send the answer");
    }
}
