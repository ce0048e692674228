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
use baton_core::runtime::{self, AgentContext, Delivery, Handler, HandlerError};
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
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if let Ok(mut v) = self.deliveries.lock() {
                v.push(d.delivered);
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.work).await;
            self.script.get(n).cloned().unwrap_or(Ok(()))
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
    };
    Ok(Setup { env, def, ctx })
}

async fn publish_one(env: &BusEnv) -> Result<u64> {
    let cli = env.bus("cli").await?;
    let rid = ReleaseId::generate();
    let spec = sample_spec("staging", "web", "web:v1");
    let event = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        cli.source(),
        "t",
        "",
    );
    let subject = EventSubject::new(
        "staging".parse()?,
        "web".parse()?,
        rid,
        EventType::ReleaseRequested,
    );
    Ok(cli.publish(&subject, &event).await?.0)
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
            Err(HandlerError::Retry("cluster unreachable".into())),
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
        script: vec![Err(HandlerError::Permanent(
            "namespace web does not exist".into(),
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
        script: vec![Err(HandlerError::Retry("registry unreachable".into())); 10],
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
