//! The bus benchmark (`scripts/bench-bus.sh`): figures, not assertions. On a 3-server NATS
//! cluster in the sandbox, with the agents as real processes, one canary release (five steps,
//! 10% → 100%, each analysed) in each of three cases —
//!
//! - all three servers up;
//! - one server (a follower of the event stream) killed with SIGKILL, not restarted, once the
//!   streams and consumers it led have new leaders;
//! - that one back, and the event stream's leader killed in the middle of the release (at its
//!   first step ready), not restarted;
//! - all three back, then two of them killed at the release's first step ready and one of those
//!   started again 30 s later (no quorum meanwhile);
//!
//! and for each: the time from the request to the release's end, and the latency of the CLI's
//! reads (`baton status`, `logs`, `list`, `history`, each a whole process, as a person runs it)
//! made one after another while the release runs.

#![allow(clippy::unwrap_used)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use baton_core::bus::EVENTS_STREAM;
use baton_core::event::EventType;
use baton_tests::release::{app_config, Baton};
use baton_tests::BusEnv;

const END: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    baton_sandbox::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-bus: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(bench());
    drop(runtime);
    baton_tests::cluster::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-bus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The event stream's leader and its followers, by server name.
async fn roles(js: &jetstream::Context) -> Result<(String, Vec<String>)> {
    baton_tests::stream_roles(js, EVENTS_STREAM).await
}

/// Waits until every stream and every consumer of the bus has a leader again (answers its info
/// within a second): nats-server 2.9 elects a new leader 4 to 9 s after the old one is gone.
async fn settled(admin: &jetstream::Context) -> Result<()> {
    use futures::TryStreamExt;
    baton_tests::eventually(
        "every stream and consumer to have a leader",
        END,
        || async {
            let quick = Duration::from_secs(1);
            let answers = async {
                let names: Vec<String> = admin.stream_names().try_collect().await?;
                for name in names {
                    admin.get_stream(&name).await?.info().await?;
                }
                // The agents' durable consumers (an ephemeral one left on the dead server never
                // answers again; its reader made another).
                let defs = baton_core::busconfig::Definitions::embedded()?;
                for c in defs.concrete_consumers(&[baton_tests::CLUSTER.to_owned()]) {
                    admin
                        .get_stream(&c.stream)
                        .await?
                        .consumer_info(&c.durable)
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            };
            Ok(match tokio::time::timeout(quick * 20, answers).await {
                Ok(Ok(())) => Some(()),
                _ => None,
            })
        },
    )
    .await
}

/// Waits until both followers of the event stream are current again.
async fn caught_up(admin: &jetstream::Context) -> Result<()> {
    baton_tests::eventually("the restarted server to catch up", END, || async {
        let info = admin.get_stream(EVENTS_STREAM).await?.info().await?.clone();
        let cluster = info.cluster.unwrap_or_default();
        Ok(
            (cluster.replicas.len() == 2 && cluster.replicas.iter().all(|p| p.current))
                .then_some(()),
        )
    })
    .await
}

struct Figures {
    case: &'static str,
    end_s: f64,
    outcome: EventType,
    reads: Vec<Duration>,
    failed_reads: usize,
    /// The command of the slowest read.
    slowest: String,
    /// The longest wait between two events of the release, and the event that ended it.
    longest_gap: (f64, EventType),
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Figures {
    fn print(&self) {
        let mut reads = self.reads.clone();
        reads.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<38} {:>6.1} {:<18} {:>6} {:>6} {:>7.0} {:>7.0} {:>7.0} {:<8} {:.1} s before {}",
            self.case,
            self.end_s,
            self.outcome.as_str(),
            reads.len(),
            self.failed_reads,
            ms(quantile(&reads, 0.5)),
            ms(quantile(&reads, 0.99)),
            ms(reads.last().copied().unwrap_or_default()),
            self.slowest,
            self.longest_gap.0,
            self.longest_gap.1.as_str(),
        );
    }
}

/// One canary release of `image`, with the CLI reading all along; `mid` runs once its first
/// step is ready.
async fn measure<F, Fut>(baton: &Baton, case: &'static str, image: &str, mid: F) -> Result<Figures>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let rid = baton.release_of("web", image, &[]).await?;
    let id = rid.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let commands: Vec<Vec<String>> = [
            vec!["status", id.as_str()],
            vec!["logs", id.as_str()],
            vec!["list"],
            vec!["history", "--env", "test"],
        ]
        .iter()
        .map(|c| c.iter().map(|s| (*s).to_owned()).collect())
        .collect();
        async move {
            let mut reads = Vec::new();
            let mut failed = 0;
            let mut slowest = (Duration::ZERO, String::new());
            while !stop.load(Ordering::Relaxed) {
                for args in &commands {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let started = Instant::now();
                    let ok = baton
                        .baton(&args)
                        .await
                        .map(|o| o.status.success())
                        .unwrap_or(false);
                    let took = started.elapsed();
                    reads.push(took);
                    if took > slowest.0 {
                        slowest = (took, args[0].to_owned());
                    }
                    if !ok {
                        failed += 1;
                    }
                }
            }
            (reads, failed, slowest.1)
        }
    };
    let release = async {
        baton
            .wait_for_event(rid, EventType::DeployStepReady, END)
            .await?;
        mid().await?;
        let events = baton.wait_for_end(rid, END).await?;
        stop.store(true, Ordering::Relaxed);
        Ok::<_, anyhow::Error>(events)
    };
    let (events, (reads, failed_reads, slowest)) = tokio::join!(release, reader);
    let events = events?;
    let first = events.first().context("no events")?;
    let last = events.last().context("no events")?;
    let longest_gap = events
        .windows(2)
        .map(|w| {
            (
                (w[1].time_ms() - w[0].time_ms()) as f64 / 1000.0,
                w[1].event_type,
            )
        })
        .fold(
            (0.0, first.event_type),
            |a, b| if b.0 > a.0 { b } else { a },
        );
    Ok(Figures {
        slowest,
        longest_gap,
        case,
        end_s: (last.time_ms() - first.time_ms()) as f64 / 1000.0,
        outcome: last.event_type,
        reads,
        failed_reads,
    })
}

async fn bench() -> Result<()> {
    println!("== starting a 3-server bus, the sandbox's Kubernetes and the agents");
    let bus = BusEnv::start_servers(3).await?;
    let baton = Baton::start_on(bus, "bench-bus", &["web"], 2, &[]).await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            "strategy: canary\nanalysis: {duration: 2s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    let mut images = Vec::new();
    for tag in ["v2", "v3", "v4", "v5"] {
        images.push(baton.push(tag, &[("BATON_SIM_HEALTH", "ok")]).await?.0);
    }
    let admin = jetstream::new(baton.bus.sandbox.nats_cluster().connect("admin").await?);
    let cluster = baton.bus.sandbox.nats_cluster();

    println!(
        "\n{:<38} {:>6} {:<18} {:>6} {:>6} {:>7} {:>7} {:>7} {:<8} longest wait",
        "case", "end_s", "outcome", "reads", "failed", "p50_ms", "p99_ms", "max_ms", "slowest"
    );
    let all_up = measure(&baton, "three servers up", &images[0], || async { Ok(()) }).await?;
    all_up.print();

    let (_, followers) = roles(&admin).await?;
    let follower = followers.first().context("no follower")?.clone();
    let down = cluster.server(&follower).context("no such server")?;
    down.kill9().await?;
    // For good: the streams and consumers it led have elected new leaders (the moment of the
    // loss is the next case's).
    settled(&admin).await?;
    let one_down = measure(&baton, "one server down for good", &images[1], || async {
        Ok(())
    })
    .await?;
    one_down.print();

    down.start_again().await?;
    caught_up(&admin).await?;
    let (leader, _) = roles(&admin).await?;
    let killed = measure(
        &baton,
        "stream leader killed mid-release",
        &images[2],
        || async {
            cluster
                .server(&leader)
                .context("no such server")?
                .kill9()
                .await?;
            Ok(())
        },
    )
    .await?;
    killed.print();

    // Two of three down: no quorum, so no stream takes a write until one is back.
    let old_leader = cluster.server(&leader).context("no such server")?;
    old_leader.start_again().await?;
    caught_up(&admin).await?;
    let (leader, followers) = roles(&admin).await?;
    let outage = Duration::from_secs(30);
    let two_down = measure(
        &baton,
        "two servers down for 30 s mid-release",
        &images[3],
        || async {
            for name in [&leader, &followers[0]] {
                cluster
                    .server(name)
                    .context("no such server")?
                    .kill9()
                    .await?;
            }
            tokio::time::sleep(outage).await;
            cluster
                .server(&leader)
                .context("no such server")?
                .start_again()
                .await?;
            Ok(())
        },
    )
    .await?;
    two_down.print();

    println!(
        "\none server down: {:.2}x the time with all three up; slowest CLI read with at most one down: {:.0} ms",
        one_down.end_s / all_up.end_s,
        [&all_up, &one_down, &killed]
            .iter()
            .flat_map(|f| f.reads.iter())
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0
    );
    for f in [&all_up, &one_down, &killed, &two_down] {
        ensure!(
            f.outcome == EventType::ReleaseSucceeded,
            "{}: the release ended {}",
            f.case,
            f.outcome
        );
    }
    Ok(())
}
