use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    baton_sandbox::cli::init_telemetry();
    match baton_sandbox::cli::Args::parse().run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("baton-sandbox: {error:#}");
            ExitCode::FAILURE
        }
    }
}
