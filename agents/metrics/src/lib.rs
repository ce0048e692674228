//! Baton's metrics agent: folds every event into history, DORA figures and Prometheus metrics.
//!
//! It publishes nothing on the event stream (DESIGN.md §3); it answers queries. At start it
//! reads the whole `BATON_EVENTS` stream into an in-memory history of releases (each folded with
//! `baton_core::fold`), then follows it live, so a restart rebuilds everything from the stream.
//! It serves the figures on `/metrics` ([`prom`]) and over NATS request/reply ([`api`]); the
//! figures themselves are computed in [`dora`], with no I/O. Its durable consumer `metrics-all`
//! runs through the shared runtime, which dead-letters invalid events.

pub mod api;
pub mod dora;
pub mod error;
pub mod history;
pub mod prom;
pub mod service;
#[cfg(test)]
mod testing;
mod time;

use std::time::Duration;

use anyhow::Context;
use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::bus::{Bus, InitialConnect};
use baton_core::Role;

use crate::service::Service;

/// Command-line flags of `baton-metrics`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-metrics",
    version,
    about = "Baton's metrics agent: folds every event into history, DORA figures and Prometheus metrics"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.agent.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        // The runtime's `run` keeps its connection and shutdown token to itself, so the reader
        // and responder have a connection and a signal watcher of their own.
        let shutdown = baton_core::shutdown::on_signal();
        let source = baton_proto::v1::Source {
            agent: Role::Metrics.as_str().to_owned(),
            cluster: self.agent.cluster.clone(),
            instance: self.agent.instance(Role::Metrics),
        };
        let bus = Bus::connect(
            &self.agent.nats,
            Role::Metrics.as_str(),
            source,
            InitialConnect::Retry,
        )
        .await
        .context("connecting the metrics service to NATS")?;
        let service = Service::start(bus, shutdown.clone());
        let agent = Agent {
            role: Role::Metrics,
            handler: service.handler(),
            readiness: Some(service.readiness()),
        };
        let metrics = baton_core::metrics::Metrics::new();
        service.use_registry(metrics.clone());
        let result = agent::run_with_metrics(self.agent, agent, metrics).await;
        shutdown.cancel();
        service.join(Duration::from_secs(5)).await;
        result?;
        Ok(())
    }
}
