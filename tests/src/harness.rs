//! The test binary's harness (libtest-mimic): the same command line and summary as `cargo test`,
//! plus a teardown after the last test, which libtest lacks — the shared sandbox is stopped and
//! its directory removed before the process exits.

use std::future::Future;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed, Trial};

/// An async test: each runs on a runtime of its own.
pub fn trial<F, Fut>(name: &str, test: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    Trial::test(name, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Failed::from(format!("cannot build a runtime: {e}")))?;
        runtime
            .block_on(test())
            .map_err(|e| Failed::from(format!("{e:#}")))
    })
}

/// Runs the trials, then tears the shared sandbox down.
pub fn run(trials: Vec<Trial>) -> ExitCode {
    baton_sandbox::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_test_writer()
        .try_init();
    let mut args = Arguments::from_args();
    // Most tests wait on servers, not on the CPU: run more of them at once than there are cores.
    if args.test_threads.is_none() {
        args.test_threads = Some(
            std::env::var("BATON_TEST_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(6),
        );
    }
    let conclusion = libtest_mimic::run(&args, trials);
    crate::cluster::shutdown();
    conclusion.exit_code()
}
