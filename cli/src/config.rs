//! `baton config`: the app and environment configuration, versioned in a KV bucket.

use std::path::PathBuf;

use baton_core::bus::NatsArgs;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file; every wrong field is named
    Validate { file: PathBuf },
    /// Validate, then store a file as the new revision
    Apply { file: PathBuf },
    /// Print the current configuration (or a past revision)
    Show {
        #[arg(long)]
        revision: Option<u64>,
    },
    /// List the stored revisions
    History,
    /// Make a past revision current again (as a new revision)
    Rollback {
        #[arg(long)]
        revision: u64,
    },
}

pub async fn run(_nats: &NatsArgs, _cmd: ConfigCommand) -> anyhow::Result<()> {
    anyhow::bail!("config: work in progress")
}
