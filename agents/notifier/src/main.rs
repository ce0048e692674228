use std::process::ExitCode;

use baton_notifier::Args;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    baton_core::telemetry::init(args.agent.log_format);
    match args.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "baton-notifier failed");
            eprintln!("baton-notifier: {e:#}");
            ExitCode::FAILURE
        }
    }
}
