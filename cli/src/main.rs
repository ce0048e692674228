use std::process::ExitCode;

use baton_cli::Cli;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    baton_core::telemetry::init_with_default(baton_core::telemetry::LogFormat::Plain, "warn");
    match cli.run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}
