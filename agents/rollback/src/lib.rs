//! Baton's rollback agent: restores the previous revision when a release fails or on request.
//!
//! It runs as a daemon per cluster on durable consumers of the event stream (see
//! `bus-config/consumers/rollback.json` for the events it reacts to).

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::runtime::ReceiveOnly;
use baton_core::Role;

/// Command-line flags of `baton-rollback`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-rollback",
    version,
    about = "Baton's rollback agent: restores the previous revision when a release fails or on request"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let agent = Agent {
            role: Role::Rollback,
            handler: Arc::new(ReceiveOnly),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
