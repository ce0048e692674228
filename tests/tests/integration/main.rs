//! Baton's integration tests, against the real servers of the sandbox.

// A test binary with its own harness (no cfg(test)), where a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod agents;
mod bluegreen;
mod builder;
mod bus;
mod canary;
mod cli;
mod compose;
mod config;
mod control;
mod crash;
mod demo;
mod garbage;
mod gateway;
mod health;
mod install;
mod metric;
mod metrics;
mod notify;
mod release;
mod replicated;
mod runtime;
mod sandbox;
mod scale;
mod security;
mod watch;

use baton_tests::harness::run;

fn main() -> std::process::ExitCode {
    let mut trials = Vec::new();
    trials.extend(bus::trials());
    trials.extend(agents::trials());
    trials.extend(builder::trials());
    trials.extend(canary::trials());
    trials.extend(cli::trials());
    trials.extend(sandbox::trials());
    trials.extend(compose::trials());
    trials.extend(config::trials());
    trials.extend(runtime::trials());
    trials.extend(release::trials());
    trials.extend(crash::trials());
    trials.extend(demo::trials());
    trials.extend(garbage::trials());
    trials.extend(health::trials());
    trials.extend(metrics::trials());
    trials.extend(control::trials());
    trials.extend(bluegreen::trials());
    trials.extend(scale::trials());
    trials.extend(security::trials());
    trials.extend(replicated::trials());
    trials.extend(install::trials());
    trials.extend(watch::trials());
    trials.extend(gateway::trials());
    trials.extend(metric::trials());
    trials.extend(notify::trials());
    run(trials)
}

/// `trial("module::name", module::name)` for each test function.
#[macro_export]
macro_rules! trials {
    ($($test:ident),* $(,)?) => {
        vec![$(trial(concat!(module_path!(), "::", stringify!($test)).trim_start_matches("integration::"), $test)),*]
    };
}
