//! Baton's deployer agent: runs the pre-checks, then drives the release strategy on the cluster
//! step by step.
//!
//! One release at a time per app and environment (a lock in the `BATON_LOCKS` bucket); a second
//! request is queued (`release.queued`) and goes ahead when the first ends. A rolling update is
//! a server-side apply of the image digest, followed like `kubectl rollout status` but failing
//! fast on crash loops, pull failures and unready pods past the step timeout.

mod bluegreen;
mod canary;
mod cluster;
mod decide;
mod error;
mod handler;
mod lock;
mod steps;

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::Role;

/// Command-line flags of `baton-deployer`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-deployer",
    version,
    about = "Baton's deployer agent: pre-checks, then the release strategy on the cluster step by step"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.agent.kube_client().await?;
        // Blue-green scale-downs whose timer died with an earlier process.
        tokio::spawn(bluegreen::sweep(client.clone()));
        let agent = Agent {
            role: Role::Deployer,
            handler: Arc::new(handler::Deployer::new(client.clone())),
            readiness: Some(baton_core::cluster::readiness(client)),
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
