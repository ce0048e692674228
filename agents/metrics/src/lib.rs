//! Baton's metrics agent: folds every event into history, DORA figures and Prometheus metrics.
//!
//! It runs as a daemon per cluster on durable consumers of the event stream (see
//! `bus-config/consumers/metrics.json` for the events it reacts to).

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::runtime::ReceiveOnly;
use baton_core::Role;

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
        let agent = Agent {
            role: Role::Metrics,
            handler: Arc::new(ReceiveOnly),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
