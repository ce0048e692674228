//! Baton's metrics agent: folds every event into history, DORA figures and Prometheus metrics.
//!
//! It publishes nothing on the event stream (DESIGN.md §3); it answers queries. At start it
//! reads the whole `BATON_EVENTS` stream into an in-memory history of releases (each folded with
//! `baton_core::fold`), then follows it live, so a restart rebuilds everything from the stream.
//! It serves the figures on `/metrics` ([`prom`]) and over NATS request/reply ([`api`]); the
//! figures themselves are computed in [`dora`] and the durations of release work in [`timings`],
//! with no I/O. Its durable consumer `metrics-all`
//! runs through the shared runtime, which dead-letters invalid events.

pub mod api;
pub mod dora;
pub mod error;
pub mod history;
pub mod prom;
pub mod service;
#[cfg(test)]
mod testing;
pub mod timings;

use std::time::Duration;

use anyhow::Context;
use baton_core::agent::{AgentArgs, Supervisor};
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
        let supervisor = Supervisor::start(self.agent, Role::Metrics)
            .await
            .context("starting the metrics agent")?;
        // The reader, keeper and responder share the supervisor's connection and signal, and are
        // joined by it before the agent exits.
        let service = Service::start(supervisor.bus().clone(), supervisor.shutdown());
        service.use_registry(supervisor.metrics().clone());
        let handler = service.handler();
        let readiness = service.readiness();
        let shutdown = supervisor.shutdown();
        supervisor.spawn("metrics service", async move {
            // The service's tasks run until the signal; then they get a moment to stop. (Joining
            // with a timeout before the signal would drop, and so abort, them.)
            shutdown.cancelled().await;
            service.join(Duration::from_secs(5)).await;
        });
        supervisor.run(handler, Some(readiness)).await?;
        Ok(())
    }
}
