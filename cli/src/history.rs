//! `baton history` and `baton metrics`: queries answered by the metrics agent over NATS.

use baton_core::bus::NatsArgs;

use crate::Output;

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub env: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    #[arg(long)]
    pub env: Option<String>,
    #[arg(long)]
    pub app: Option<String>,
    /// The window, e.g. 30d, 12h, 90d
    #[arg(long, default_value = "30d")]
    pub window: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn history(_nats: &NatsArgs, _args: HistoryArgs) -> anyhow::Result<()> {
    anyhow::bail!("history: work in progress")
}

pub async fn metrics(_nats: &NatsArgs, _args: MetricsArgs) -> anyhow::Result<()> {
    anyhow::bail!("metrics: work in progress")
}
