//! What every agent binary shares: its flags, and `run`, which connects, creates the agent's
//! durable consumers, serves health and metrics, and consumes until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, InitialConnect, NatsArgs};
use crate::busconfig::{self, Definitions};
use crate::error::{Error, Result};
use crate::event::Role;
use crate::http::{self, Health, ReadinessCheck};
use crate::metrics::{names, Metrics};
use crate::names::validate_dns_label;
use crate::runtime::{self, AgentContext, Handler, Limits};
use crate::telemetry::LogFormat;

/// The flags every agent takes.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The cluster this agent serves (a DNS label); agents run per cluster
    #[arg(long, env = "BATON_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Kubeconfig file for the cluster (default: $KUBECONFIG, then ~/.kube/config)
    #[arg(long, env = "KUBECONFIG", conflicts_with = "in_cluster")]
    pub kubeconfig: Option<PathBuf>,
    /// Use the pod's service account (when the agent runs inside the cluster)
    #[arg(long, env = "BATON_IN_CLUSTER")]
    pub in_cluster: bool,
    /// Address of the HTTP endpoint (/healthz, /readyz, /metrics)
    #[arg(
        long = "http-addr",
        env = "BATON_HTTP_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub http_addr: SocketAddr,
    /// Name of this instance (default: host name and process id)
    #[arg(long, env = "BATON_INSTANCE")]
    pub instance: Option<String>,
    /// Messages this agent works on at once (running, or queued behind another of the same
    /// release); more wait on the server
    #[arg(long = "max-in-flight", env = "BATON_MAX_IN_FLIGHT", default_value_t = runtime::DEFAULT_MAX_IN_FLIGHT,
          value_parser = parse_in_flight)]
    pub max_in_flight: usize,
    /// How long the agent takes at most to stop after SIGTERM (e.g. 25s); work not finished by
    /// then is returned for redelivery
    #[arg(long = "shutdown-grace", env = "BATON_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_grace)]
    pub shutdown_grace: Duration,
    /// Log format
    #[arg(long = "log-format", env = "BATON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

fn parse_in_flight(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!("{text} is not a number from 1 to 100000")),
    }
}

fn parse_grace(text: &str) -> Result<Duration, String> {
    let ms = crate::config::parse_duration_ms(text)?;
    if !(1_000..=600_000).contains(&ms) {
        return Err(format!("{text} is not between 1s and 10m"));
    }
    Ok(Duration::from_millis(ms))
}

impl AgentArgs {
    pub fn instance(&self, role: Role) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("{role}@{host}/{}", std::process::id())
        })
    }

    /// A client for the agent's cluster, from `--kubeconfig` or `--in-cluster`.
    pub async fn kube_client(&self) -> Result<kube::Client, crate::cluster::ClusterError> {
        crate::cluster::client(self.kubeconfig.as_deref(), self.in_cluster).await
    }

    pub fn validate(&self) -> Result<(), String> {
        validate_dns_label("cluster name", &self.cluster).map_err(|e| format!("--cluster: {e}"))?;
        if let Some(k) = &self.kubeconfig {
            if !k.is_file() {
                return Err(format!(
                    "--kubeconfig: {} is not a readable file",
                    k.display()
                ));
            }
        }
        Ok(())
    }
}

/// An agent: its role, its handler, and an optional readiness check of its own.
pub struct Agent {
    pub role: Role,
    pub handler: Arc<dyn Handler>,
    pub readiness: Option<ReadinessCheck>,
}

/// Runs an agent until SIGTERM/SIGINT: work in hand is finished (or returned for redelivery),
/// then the process exits, within the shutdown grace.
pub async fn run(args: AgentArgs, agent: Agent) -> Result<()> {
    let supervisor = Supervisor::start(args, agent.role).await?;
    supervisor.run(agent.handler, agent.readiness).await
}

/// The owner of everything an agent process runs: the signal, the bus connection, the consumers
/// and every background task (timers, sweeps, readers). On SIGTERM it stops pulling, lets work in
/// hand finish or returns it, stops the background tasks, and returns within the shutdown grace —
/// whether or not the broker and the API server still answer.
pub struct Supervisor {
    args: AgentArgs,
    role: Role,
    bus: Bus,
    metrics: Metrics,
    shutdown: CancellationToken,
    signalled: Arc<OnceLock<Instant>>,
    tasks: TaskTracker,
}

impl Supervisor {
    /// Validates the flags, watches for the signal and connects to the bus (retrying in the
    /// background while the broker is away).
    pub async fn start(args: AgentArgs, role: Role) -> Result<Supervisor> {
        args.validate().map_err(Error::Credentials)?;
        let shutdown = crate::shutdown::on_signal();
        let signalled = Arc::new(OnceLock::new());
        {
            let shutdown = shutdown.clone();
            let signalled = signalled.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                let _ = signalled.set(Instant::now());
            });
        }
        let source = baton_proto::v1::Source {
            agent: role.as_str().to_owned(),
            cluster: args.cluster.clone(),
            instance: args.instance(role),
        };
        tracing::info!(agent = %role, cluster = %args.cluster, instance = %source.instance, nats = %crate::names::redact_url(&args.nats.url), max_in_flight = args.max_in_flight, "starting");
        let bus = Bus::connect(&args.nats, role.as_str(), source, InitialConnect::Retry).await?;
        Ok(Supervisor {
            args,
            role,
            bus,
            metrics: Metrics::new(),
            shutdown,
            signalled,
            tasks: TaskTracker::new(),
        })
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The registry `/metrics` serves.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Cancelled on SIGTERM/SIGINT: every background task watches it.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_in_flight: self.args.max_in_flight,
            shutdown_grace: self.args.shutdown_grace,
        }
    }

    /// Runs a background task of the agent until it ends; it must end soon after
    /// [`shutdown`](Self::shutdown) is cancelled. Joined (with a timeout) before the agent exits.
    pub fn spawn(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.spawn(async move {
            task.await;
            tracing::debug!(task = name, "background task ended");
        });
    }

    /// The tracker of the agent's supervised tasks, for parts that start tasks of their own
    /// (timers); joined with the rest at shutdown. Tasks must watch [`shutdown`](Self::shutdown).
    pub fn tracker(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// The time left of the shutdown grace (all of it before the signal).
    fn grace_left(&self) -> Duration {
        let grace = self.args.shutdown_grace;
        match self.signalled.get() {
            Some(at) => grace.saturating_sub(at.elapsed()),
            None => grace,
        }
    }

    /// Creates the agent's consumers, serves health and metrics, and consumes until the signal.
    pub async fn run(
        self,
        handler: Arc<dyn Handler>,
        readiness: Option<ReadinessCheck>,
    ) -> Result<()> {
        let role = self.role;
        self.metrics
            .set(names::UP, &[("agent", role.as_str())], 1.0);
        let consumers_ready = Arc::new(AtomicBool::new(false));
        let health = Health {
            bus: self.bus.clone(),
            metrics: self.metrics.clone(),
            consumers_ready: consumers_ready.clone(),
            extra: readiness,
        };
        let server = http::serve(self.args.http_addr, health, self.shutdown.clone()).await?;

        // The streams may not exist yet (`baton bus apply` runs beside the agents): wait for them.
        let defs = Definitions::embedded()?;
        let consumers = loop {
            match busconfig::ensure_consumers(self.bus.jetstream(), &defs, role, &self.args.cluster)
                .await
            {
                Ok(c) => break Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up consumers yet; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break None,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        };
        if let Some(consumers) = consumers {
            consumers_ready.store(true, Ordering::Relaxed);
            let ctx = AgentContext {
                role,
                cluster: self.args.cluster.clone(),
                bus: self.bus.clone(),
                metrics: self.metrics.clone(),
                shutdown: self.shutdown.clone(),
                limits: self.limits(),
                specs: Default::default(),
            };
            runtime::run_consumers(ctx, consumers, handler).await;
        }
        // Stopping: background tasks, then what is on the wire, then the endpoint — each bounded
        // by what is left of the grace.
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.grace_left(), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the shutdown grace");
        }
        let flush = self.grace_left().min(Duration::from_secs(2));
        match tokio::time::timeout(flush, self.bus.client().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flush at shutdown failed"),
            Err(_) => tracing::warn!("flush at shutdown timed out (is the broker gone?)"),
        }
        let stop = self.grace_left().min(Duration::from_secs(2));
        if tokio::time::timeout(stop, server).await.is_err() {
            tracing::warn!("http endpoint did not stop in time");
        }
        tracing::info!(agent = %role, "stopped");
        Ok(())
    }
}
