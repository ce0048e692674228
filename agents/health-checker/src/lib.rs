//! Baton's health-checker agent: runs the checks and analysis on the new pods and gives verdicts.
//!
//! On `deploy.step_ready` it analyses the step's new pods (DESIGN.md §6): every interval for the
//! analysis' duration, HTTP checks and latency checks straight to the pods' IPs, smoke tests as
//! argvs without a shell, and the pods' health as the cluster reports it; too many failed rounds
//! fail the step at once. It publishes `analysis.started`, then `analysis.passed` or
//! `analysis.failed` with the measurements that explain the verdict.
//!
//! `analysis` decides (pure), `checks` observes, `handler` wires both to the bus.

pub mod analysis;
pub mod checks;
pub mod error;
pub mod handler;

use std::sync::Arc;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::Role;

pub use error::{Error, Result};

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
        // The pod-health check reads the cluster: without it the agent cannot judge anything.
        let kube = self.agent.kube_client().await.map_err(Error::from)?;
        let checker = checks::Checker::new(kube.clone())?;
        let agent = Agent {
            role: Role::HealthChecker,
            handler: Arc::new(handler::HealthChecker::new(checker)),
            readiness: Some(baton_core::cluster::readiness(kube)),
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
