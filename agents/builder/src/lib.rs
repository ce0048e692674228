//! Baton's builder agent: turns a release request into an immutable image reference.
//!
//! It runs as a daemon per cluster on durable consumers of the event stream (see
//! `bus-config/consumers/builder.json` for the events it reacts to).

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::runtime::ReceiveOnly;
use baton_core::Role;

/// Command-line flags of `baton-builder`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-builder",
    version,
    about = "Baton's builder agent: turns a release request into an immutable image reference"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let agent = Agent {
            role: Role::Builder,
            handler: Arc::new(ReceiveOnly),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
