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
mod steps;

use std::sync::Arc;

use baton_core::agent::{AgentArgs, Supervisor};
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
    /// Fault injection for tests of fencing: wait this long (e.g. 3s) before every cluster write,
    /// as a stalled process would. Never set in production.
    #[arg(long = "fault-write-delay", env = "BATON_FAULT_WRITE_DELAY", value_parser = parse_delay, hide = true)]
    pub fault_write_delay: Option<std::time::Duration>,
}

fn parse_delay(text: &str) -> Result<std::time::Duration, String> {
    baton_core::config::parse_duration_ms(text).map(std::time::Duration::from_millis)
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.agent.kube_client().await?;
        let supervisor = Supervisor::start(self.agent.clone(), Role::Deployer).await?;
        // Blue-green scale-downs whose timer died with an earlier process.
        supervisor.spawn(
            "blue-green sweep",
            bluegreen::sweep(client.clone(), supervisor.shutdown()),
        );
        let handler =
            handler::Deployer::new(client.clone(), supervisor.tracker(), self.fault_write_delay);
        supervisor
            .run(
                Arc::new(handler),
                Some(baton_core::cluster::readiness(client)),
            )
            .await?;
        Ok(())
    }
}
