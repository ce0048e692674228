use std::process::ExitCode;

use baton_cli::Cli;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit 1 like every other error (2 means "rolled back" for `release --wait`).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    baton_core::telemetry::init_with_default(baton_core::telemetry::LogFormat::Plain, "warn");
    match cli.run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}
