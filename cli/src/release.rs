//! `baton release`, `status`, `logs`, `rollback`: requesting releases and following them.

use std::process::ExitCode;

use baton_core::bus::NatsArgs;

use crate::Output;

#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// The app to release (a DNS label, as in the configuration)
    pub app: String,
    /// The environment to release to
    #[arg(long)]
    pub env: String,
    /// The image to release (a tag or a digest)
    #[arg(long)]
    pub image: String,
    /// Follow the release to its end; exit 0 when it succeeded, 2 when rolled back, 1 when failed
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The release id
    pub id: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The release id
    pub id: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The app to roll back
    pub app: String,
    /// The environment
    #[arg(long)]
    pub env: String,
    /// Why (kept in the history)
    #[arg(long, default_value = "requested by a person")]
    pub reason: String,
    /// Follow the rollback to its end
    #[arg(long)]
    pub wait: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn release(_nats: &NatsArgs, _args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("release: work in progress")
}

pub async fn status(_nats: &NatsArgs, _args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("status: work in progress")
}

pub async fn logs(_nats: &NatsArgs, _args: LogsArgs) -> anyhow::Result<()> {
    anyhow::bail!("logs: work in progress")
}

pub async fn rollback(_nats: &NatsArgs, _args: RollbackArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("rollback: work in progress")
}
