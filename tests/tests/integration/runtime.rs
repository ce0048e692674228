//! The consumer loop's mapping of handler results onto JetStream, in-process against a real
//! nats-server: in-progress acks for long work, delayed redelivery for retryable failures, dead
//! letters for permanent ones and for exhausted retries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use baton_core::busconfig::{ConsumerDef, Definitions};
use baton_core::event::{Event, EventType, Role};
use baton_core::ids::EventKey;
use baton_core::metrics::Metrics;
use baton_core::names::ReleaseId;
use baton_core::runtime::{self, AgentContext, Delivery, Handled, Handler, HandlerError, Limits};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, ReleaseRequested};
use baton_tests::harness::trial;
use baton_tests::{eventually, sample_spec, BusEnv};
use futures::future::BoxFuture;
use libtest_mimic::Trial;
use tokio_util::sync::CancellationToken;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        long_work_is_kept_alive_by_in_progress_acks_and_not_redelivered,
        a_retryable_failure_is_redelivered_and_then_handled,
        a_permanent_failure_is_dead_lettered_with_the_handler_reason,
        a_failure_that_never_clears_is_dead_lettered_after_the_last_delivery,
        messages_of_different_releases_run_side_by_side_and_of_one_release_in_order,
        a_panicking_handler_is_reported_and_its_message_redelivered_while_others_go_on,
        a_handler_that_has_nothing_to_do_yet_gets_its_message_back_later,
        no_more_messages_than_the_bound_are_taken_at_once,
        a_message_published_while_the_consumer_idles_is_handled_on_its_first_delivery,
    ]
}

/// A handler scripted per delivery: it records what it saw and answers from `script`.
struct Scripted {
    deliveries: Mutex<Vec<i64>>,
    calls: AtomicUsize,
    work: Duration,
    script: Vec<Result<(), HandlerError>>,
}

impl Handler for Scripted {
    fn handle<'a>(
        &'a self,
        _ctx: &'a AgentContext,
        d: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            if let Ok(mut v) = self.deliveries.lock() {
                v.push(d.delivered);
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.work).await;
            self.script
                .get(n)
                .cloned()
                .unwrap_or(Ok(()))
                .map(|()| Handled::Done)
        })
    }
}

struct Setup {
    env: BusEnv,
    def: ConsumerDef,
    ctx: AgentContext,
}

/// The builder's consumer, with a short ack wait and few deliveries so the test is quick.
async fn setup(ack_wait: Duration, max_deliver: i64) -> Result<Setup> {
    let env = BusEnv::start().await?;
    let mut def = Definitions::embedded()?
        .consumers_for(Role::Builder, baton_tests::CLUSTER)
        .remove(0);
    def.config["ack_wait"] = serde_json::json!(ack_wait.as_nanos() as u64);
    def.config["max_deliver"] = serde_json::json!(max_deliver);
    let admin = env.bus("admin").await?;
    let stream = admin.jetstream().get_stream(&def.stream).await?;
    stream.create_consumer(def.pull_config()?).await?;
    let bus = env.bus("builder").await?;
    let ctx = AgentContext {
        role: Role::Builder,
        cluster: baton_tests::CLUSTER.into(),
        bus,
        metrics: Metrics::new(),
        shutdown: CancellationToken::new(),
        limits: Limits::default(),
        specs: Default::default(),
    };
    Ok(Setup { env, def, ctx })
}

async fn publish_one(env: &BusEnv) -> Result<u64> {
    publish_for(env, ReleaseId::generate()).await
}

/// Publishes a `release.requested` of `rid` (a new event each time, even for the same release).
async fn publish_for(env: &BusEnv, rid: ReleaseId) -> Result<u64> {
    let cli = env.bus("cli").await?;
    let spec = sample_spec("staging", "web", "web:v1");
    let event = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        cli.source(),
        "t",
        "",
    );
    let event = if ids_used(rid) {
        // Another event of the same release: a deterministic id of its own.
        Event::new(
            rid,
            EventKey::Named(&uuid::Uuid::new_v4().to_string()),
            event
                .payload()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no payload"))?,
            cli.source(),
            "t",
            "",
        )
    } else {
        event
    };
    let subject = EventSubject::new(
        "staging".parse()?,
        "web".parse()?,
        rid,
        EventType::ReleaseRequested,
    );
    Ok(cli.publish(&subject, &event).await?.0)
}

/// Whether an event of `rid` was published by this test process already.
fn ids_used(rid: ReleaseId) -> bool {
    static SEEN: Mutex<Vec<ReleaseId>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap();
    if seen.contains(&rid) {
        true
    } else {
        seen.push(rid);
        false
    }
}

/// Runs the consumer until `done` holds, then stops it.
async fn run_until(
    setup: &Setup,
    handler: Arc<Scripted>,
    what: &str,
    done: impl Fn(&Scripted) -> bool,
) -> Result<()> {
    let task = tokio::spawn(runtime::run_consumer(
        setup.ctx.clone(),
        setup.def.clone(),
        handler.clone(),
    ));
    let result = eventually(what, Duration::from_secs(60), || {
        let ok = done(&handler);
        async move { Ok(ok.then_some(())) }
    })
    .await;
    setup.ctx.shutdown.cancel();
    let _ = task.await;
    result
}

async fn ack_floor(setup: &Setup) -> Result<u64> {
    let admin = setup.env.bus("admin").await?;
    let stream = admin.jetstream().get_stream(&setup.def.stream).await?;
    Ok(stream
        .consumer_info(&setup.def.durable)
        .await?
        .ack_floor
        .stream_sequence)
}

async fn long_work_is_kept_alive_by_in_progress_acks_and_not_redelivered() -> Result<()> {
    // Work lasting three ack waits.
    let setup = setup(Duration::from_secs(1), 5).await?;
    let seq = publish_one(&setup.env).await?;
    let handler = Arc::new(Scripted {
        deliveries: Mutex::default(),
        calls: AtomicUsize::new(0),
        work: Duration::from_secs(3),
        script: vec![],
    });
    let floor = {
        let task = tokio::spawn(runtime::run_consumer(
            setup.ctx.clone(),
            setup.def.clone(),
            handler.clone(),
        ));
        let floor = eventually(
            "the long work to be acked",
            Duration::from_secs(30),
            || async {
                let f = ack_floor(&setup).await?;
                Ok((f >= seq).then_some(f))
            },
        )
        .await;
        setup.ctx.shutdown.cancel();
        let _ = task.await;
        floor?
    };
    ensure!(floor >= seq);
    let deliveries = handler
        .deliveries
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    ensure!(
        deliveries == [1],
        "the message was delivered {deliveries:?} times; in-progress acks did not hold it"
    );
    Ok(())
}

async fn a_retryable_failure_is_redelivered_and_then_handled() -> Result<()> {
    let setup = setup(Duration::from_secs(10), 5).await?;
    publish_one(&setup.env).await?;
    let handler = Arc::new(Scripted {
        deliveries: Mutex::default(),
        calls: AtomicUsize::new(0),
        work: Duration::ZERO,
        script: vec![
            Err(HandlerError::retry("cluster", "cluster unreachable")),
            Ok(()),
        ],
    });
    run_until(&setup, handler.clone(), "a second delivery", |h| {
        h.calls.load(Ordering::SeqCst) >= 2
    })
    .await?;
    let deliveries = handler
        .deliveries
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    ensure!(deliveries == [1, 2], "deliveries {deliveries:?}");
    ensure!(
        setup.ctx.metrics.counter(
            "baton_events_handled_total",
            &[("consumer", &setup.def.durable), ("outcome", "retry")]
        ) == 1.0,
        "the retry was not counted"
    );
    Ok(())
}

async fn dead_letter_reasons(env: &BusEnv, count: usize) -> Result<Vec<String>> {
    use futures::StreamExt;
    let admin = env.bus("admin").await?;
    let stream = admin.jetstream().get_stream("BATON_DLQ").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "baton.v1.dlq.builder".into(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut reasons = Vec::new();
    while reasons.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        reasons.push(
            m.headers
                .as_ref()
                .and_then(|h| h.get("Baton-Dlq-Reason"))
                .map(|v| v.to_string())
                .unwrap_or_default(),
        );
    }
    Ok(reasons)
}

async fn a_permanent_failure_is_dead_lettered_with_the_handler_reason() -> Result<()> {
    let setup = setup(Duration::from_secs(10), 5).await?;
    let seq = publish_one(&setup.env).await?;
    let handler = Arc::new(Scripted {
        deliveries: Mutex::default(),
        calls: AtomicUsize::new(0),
        work: Duration::ZERO,
        script: vec![Err(HandlerError::permanent(
            "precheck",
            "namespace web does not exist",
        ))],
    });
    run_until(&setup, handler.clone(), "the handler to run", |h| {
        h.calls.load(Ordering::SeqCst) >= 1
    })
    .await?;
    let reasons = dead_letter_reasons(&setup.env, 1).await?;
    ensure!(reasons[0] == "namespace web does not exist", "{reasons:?}");
    // Terminated: never delivered again.
    ensure!(
        ack_floor(&setup).await? >= seq,
        "the dead-lettered message is still pending"
    );
    Ok(())
}

async fn a_failure_that_never_clears_is_dead_lettered_after_the_last_delivery() -> Result<()> {
    let setup = setup(Duration::from_secs(10), 3).await?;
    publish_one(&setup.env).await?;
    let handler = Arc::new(Scripted {
        deliveries: Mutex::default(),
        calls: AtomicUsize::new(0),
        work: Duration::ZERO,
        script: vec![Err(HandlerError::retry("registry", "registry unreachable")); 10],
    });
    run_until(&setup, handler.clone(), "three deliveries", |h| {
        h.calls.load(Ordering::SeqCst) >= 3
    })
    .await?;
    let reasons = dead_letter_reasons(&setup.env, 1).await?;
    ensure!(
        reasons[0] == "gave up after 3 deliveries: registry unreachable",
        "{reasons:?}"
    );
    ensure!(
        handler.calls.load(Ordering::SeqCst) == 3,
        "delivered after the last allowed delivery"
    );
    Ok(())
}

/// What a handler saw of each message: its release, when it started and ended, and how many
/// ran at once.
/// One handled message: (release, stream sequence, delivered, started, ended).
type Run = (ReleaseId, u64, i64, std::time::Instant, std::time::Instant);

#[derive(Default)]
struct Timeline {
    runs: Mutex<Vec<Run>>,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

/// A handler whose behaviour is chosen per message by `act` (it gets the release and the
/// delivery count): how long it works, then what it answers — or it panics.
struct Acting<F> {
    timeline: Timeline,
    act: F,
}

enum Act {
    Work(Duration),
    Later(Duration),
    Panic,
}

impl<F> Handler for Acting<F>
where
    F: Fn(ReleaseId, i64) -> Act + Send + Sync + 'static,
{
    fn handle<'a>(
        &'a self,
        _ctx: &'a AgentContext,
        d: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let now = self.timeline.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.timeline.most_at_once.fetch_max(now, Ordering::SeqCst);
            let act = (self.act)(d.subject.release_id, d.delivered);
            let out = match act {
                Act::Work(work) => {
                    tokio::time::sleep(work).await;
                    Handled::Done
                }
                Act::Later(after) => Handled::Later(after),
                Act::Panic => {
                    self.timeline.running.fetch_sub(1, Ordering::SeqCst);
                    panic!("a handler bug");
                }
            };
            self.timeline.running.fetch_sub(1, Ordering::SeqCst);
            self.timeline.runs.lock().unwrap().push((
                d.subject.release_id,
                d.stream_sequence,
                d.delivered,
                started,
                std::time::Instant::now(),
            ));
            Ok(out)
        })
    }
}

impl Timeline {
    fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }
}

async fn run_acting<F>(
    setup: &Setup,
    handler: Arc<Acting<F>>,
    what: &str,
    done: impl Fn(&Timeline) -> bool,
) -> Result<()>
where
    F: Fn(ReleaseId, i64) -> Act + Send + Sync + 'static,
{
    let task = tokio::spawn(runtime::run_consumer(
        setup.ctx.clone(),
        setup.def.clone(),
        handler.clone(),
    ));
    let result = eventually(what, Duration::from_secs(60), || {
        let ok = done(&handler.timeline);
        async move { Ok(ok.then_some(())) }
    })
    .await;
    setup.ctx.shutdown.cancel();
    let _ = task.await;
    result
}

async fn messages_of_different_releases_run_side_by_side_and_of_one_release_in_order() -> Result<()>
{
    let setup = setup(Duration::from_secs(10), 5).await?;
    let (slow, quick) = (ReleaseId::generate(), ReleaseId::generate());
    let first = publish_for(&setup.env, slow).await?;
    let second = publish_for(&setup.env, slow).await?;
    publish_for(&setup.env, quick).await?;
    let handler = Arc::new(Acting {
        timeline: Timeline::default(),
        act: move |rid: ReleaseId, _| {
            Act::Work(if rid == slow {
                Duration::from_millis(1500)
            } else {
                Duration::ZERO
            })
        },
    });
    run_acting(&setup, handler.clone(), "three messages handled", |t| {
        t.runs.lock().unwrap().len() >= 3
    })
    .await?;
    let runs = handler.timeline.runs();
    let of = |seq: u64| runs.iter().find(|r| r.1 == seq).cloned().unwrap();
    let (a1, a2) = (of(first), of(second));
    let b = runs.iter().find(|r| r.0 == quick).cloned().unwrap();
    // The other release did not wait for the slow one…
    ensure!(
        b.4 < a1.4,
        "the quick release waited for the slow one: {runs:?}"
    );
    // …and the slow release's second message waited for its first.
    ensure!(a2.3 >= a1.4, "one release's messages overlapped: {runs:?}");
    ensure!(runs.iter().all(|r| r.2 == 1), "redelivered: {runs:?}");
    Ok(())
}

async fn a_panicking_handler_is_reported_and_its_message_redelivered_while_others_go_on(
) -> Result<()> {
    let setup = setup(Duration::from_secs(10), 5).await?;
    let (buggy, fine) = (ReleaseId::generate(), ReleaseId::generate());
    publish_for(&setup.env, buggy).await?;
    publish_for(&setup.env, fine).await?;
    let handler = Arc::new(Acting {
        timeline: Timeline::default(),
        act: move |rid: ReleaseId, delivered| {
            if rid == buggy && delivered == 1 {
                Act::Panic
            } else {
                Act::Work(Duration::ZERO)
            }
        },
    });
    run_acting(&setup, handler.clone(), "both releases handled", |t| {
        let runs = t.runs.lock().unwrap();
        runs.iter().any(|r| r.0 == buggy) && runs.iter().any(|r| r.0 == fine)
    })
    .await?;
    let runs = handler.timeline.runs();
    let again = runs.iter().find(|r| r.0 == buggy).unwrap();
    ensure!(
        again.2 == 2,
        "the message of the panic was not redelivered: {runs:?}"
    );
    ensure!(
        setup.ctx.metrics.counter(
            "baton_handler_panics_total",
            &[("consumer", &setup.def.durable)]
        ) == 1.0,
        "the panic was not counted"
    );
    Ok(())
}

async fn a_handler_that_has_nothing_to_do_yet_gets_its_message_back_later() -> Result<()> {
    let setup = setup(Duration::from_secs(10), 5).await?;
    let rid = ReleaseId::generate();
    publish_for(&setup.env, rid).await?;
    let handler = Arc::new(Acting {
        timeline: Timeline::default(),
        act: |_, delivered| {
            if delivered == 1 {
                Act::Later(Duration::from_millis(500))
            } else {
                Act::Work(Duration::ZERO)
            }
        },
    });
    run_acting(&setup, handler.clone(), "the message back", |t| {
        t.runs.lock().unwrap().len() >= 2
    })
    .await?;
    let runs = handler.timeline.runs();
    ensure!(
        runs.iter().map(|r| r.2).collect::<Vec<_>>() == [1, 2],
        "{runs:?}"
    );
    ensure!(
        setup.ctx.metrics.counter(
            "baton_events_handled_total",
            &[("consumer", &setup.def.durable), ("outcome", "deferred")]
        ) == 1.0,
        "the deferral was not counted"
    );
    Ok(())
}

async fn no_more_messages_than_the_bound_are_taken_at_once() -> Result<()> {
    let mut setup = setup(Duration::from_secs(10), 5).await?;
    setup.ctx.limits.max_in_flight = 2;
    for _ in 0..6 {
        publish_one(&setup.env).await?;
    }
    let handler = Arc::new(Acting {
        timeline: Timeline::default(),
        act: |_, _| Act::Work(Duration::from_millis(300)),
    });
    run_acting(&setup, handler.clone(), "six messages handled", |t| {
        t.runs.lock().unwrap().len() >= 6
    })
    .await?;
    let most = handler.timeline.most_at_once.load(Ordering::SeqCst);
    ensure!(most == 2, "{most} messages ran at once with a bound of 2");
    let runs = handler.timeline.runs();
    ensure!(runs.iter().all(|r| r.2 == 1), "redelivered: {runs:?}");
    Ok(())
}

async fn a_message_published_while_the_consumer_idles_is_handled_on_its_first_delivery(
) -> Result<()> {
    let setup = setup(Duration::from_secs(10), 5).await?;
    let handler = Arc::new(Acting {
        timeline: Timeline::default(),
        act: |_, _| Act::Work(Duration::ZERO),
    });
    let task = tokio::spawn(runtime::run_consumer(
        setup.ctx.clone(),
        setup.def.clone(),
        handler.clone(),
    ));
    // Idle past the end of the first pull request (its expiry is 5 s), then a message.
    tokio::time::sleep(Duration::from_secs(7)).await;
    publish_one(&setup.env).await?;
    let result = eventually("the message handled", Duration::from_secs(30), || {
        let done = !handler.timeline.runs().is_empty();
        async move { Ok(done.then_some(())) }
    })
    .await;
    setup.ctx.shutdown.cancel();
    let _ = task.await;
    result?;
    let runs = handler.timeline.runs();
    // Taken by the open pull request, not lost with it and redelivered after the ack wait.
    ensure!(runs[0].2 == 1, "handled only on delivery {}", runs[0].2);
    Ok(())
}
