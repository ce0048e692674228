//! Baton's health-checker agent: runs the checks and analysis on the new pods and gives verdicts.
//!
//! It runs as a daemon per cluster on durable consumers of the event stream (see
//! `bus-config/consumers/health-checker.json` for the events it reacts to).

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::runtime::ReceiveOnly;
use baton_core::Role;

/// Command-line flags of `baton-health-checker`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-health-checker",
    version,
    about = "Baton's health-checker agent: runs the checks and analysis on the new pods and gives verdicts"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let agent = Agent {
            role: Role::HealthChecker,
            handler: Arc::new(ReceiveOnly),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
