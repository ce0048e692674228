//! Baton's rollback agent: ends releases that failed, restoring the previous revision when the
//! cluster was changed (`rollback_on_failure`), and carries out manual rollbacks.
//!
//! A rolling release is undone as `kubectl rollout undo` does: the previous revision's pod
//! template is applied again (a new revision), and the agent waits until the Deployment is
//! available before it ends the release as rolled back. When there is nothing to restore, or the
//! restored revision does not come up, the release ends as failed with the reason.

mod bluegreen;
mod decide;
mod error;
mod handler;

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
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
        let client = self.agent.kube_client().await?;
        let agent = Agent {
            role: Role::Rollback,
            handler: Arc::new(handler::RollbackAgent {
                client: client.clone(),
            }),
            readiness: Some(baton_core::cluster::readiness(client)),
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
