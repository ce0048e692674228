//! Baton's deployer agent: runs pre-checks, then drives the release strategy on the cluster step by step.
//!
//! It runs as a daemon per cluster on durable consumers of the event stream (see
//! `bus-config/consumers/deployer.json` for the events it reacts to).

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::runtime::ReceiveOnly;
use baton_core::Role;

/// Command-line flags of `baton-deployer`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-deployer",
    version,
    about = "Baton's deployer agent: runs pre-checks, then drives the release strategy on the cluster step by step"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let agent = Agent {
            role: Role::Deployer,
            handler: Arc::new(ReceiveOnly),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
