//! What every agent binary shares: its flags, and `run`, which connects, creates the agent's
//! durable consumers, serves health and metrics, and consumes until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Bus, InitialConnect, NatsArgs};
use crate::busconfig::{self, Definitions};
use crate::error::{Error, Result};
use crate::event::Role;
use crate::http::{self, Health, ReadinessCheck};
use crate::metrics::{names, Metrics};
use crate::names::validate_dns_label;
use crate::runtime::{self, AgentContext, Handler};
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
    /// Log format
    #[arg(long = "log-format", env = "BATON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
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
/// then the process exits.
pub async fn run(args: AgentArgs, agent: Agent) -> Result<()> {
    run_with_metrics(args, agent, Metrics::new()).await
}

/// As [`run`], with a metrics registry the caller keeps too (to export figures of its own on
/// `/metrics` from tasks beside the consumers).
pub async fn run_with_metrics(args: AgentArgs, agent: Agent, metrics: Metrics) -> Result<()> {
    args.validate().map_err(Error::Credentials)?;
    let role = agent.role;
    let shutdown = crate::shutdown::on_signal();
    let source = baton_proto::v1::Source {
        agent: role.as_str().to_owned(),
        cluster: args.cluster.clone(),
        instance: args.instance(role),
    };
    tracing::info!(agent = %role, cluster = %args.cluster, instance = %source.instance, nats = %args.nats.url, "starting");
    let bus = Bus::connect(&args.nats, role.as_str(), source, InitialConnect::Retry).await?;
    metrics.set(names::UP, &[("agent", role.as_str())], 1.0);
    let consumers_ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        bus: bus.clone(),
        metrics: metrics.clone(),
        consumers_ready: consumers_ready.clone(),
        extra: agent.readiness,
    };
    let server = http::serve(args.http_addr, health, shutdown.clone()).await?;

    // The streams may not exist yet (`baton bus apply` runs beside the agents): wait for them.
    let defs = Definitions::embedded()?;
    let consumers = loop {
        match busconfig::ensure_consumers(bus.jetstream(), &defs, role, &args.cluster).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up consumers yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = server.await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    consumers_ready.store(true, Ordering::Relaxed);
    let ctx = AgentContext {
        role,
        cluster: args.cluster.clone(),
        bus: bus.clone(),
        metrics,
        shutdown: shutdown.clone(),
    };
    runtime::run_consumers(ctx, consumers, agent.handler).await;
    // Make sure acks and naks are on the wire before the process ends.
    if let Err(e) = bus.client().flush().await {
        tracing::warn!(error = %e, "flush at shutdown failed");
    }
    let _ = server.await;
    tracing::info!(agent = %role, "stopped");
    Ok(())
}
