//! The limits of a release spec, in one place. The agents refuse a spec past them, and the
//! configuration ([`crate::config`], `baton config validate`) refuses every field that would
//! resolve past them, naming the field, so that no release is requested that an agent refuses
//! after the cluster was changed. The agents use these constants (by re-export), never copies.
//!
//! Pure constants: no I/O, nothing but `std`.

use std::time::Duration;

/// The longest analysis of a step (`analysis.duration`, and a canary step's own), and the longest
/// time between its rounds (`analysis.interval`): an analysis longer than a day is a mistake in
/// the spec, not a plan. The health-checker refuses either past it.
pub const MAX_ANALYSIS_SECONDS: u32 = 86_400;

/// The most failed rounds an analysis may tolerate (`analysis.failure_limit`). The configuration's
/// bound: the health-checker counts any, but more than this is never meant.
pub const MAX_FAILURE_LIMIT: u32 = 1000;

/// The longest an HTTP check's request may take (`http.timeout`), and the longest pause between
/// its retries (`http.interval`): a probe that needs more is not a health check. The
/// health-checker refuses either past it (and cuts latency requests off at it).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The most retries of an HTTP check in one round (`http.retries`): more would let a failing pod
/// pass by luck. The health-checker refuses more.
pub const MAX_HTTP_RETRIES: u32 = 10;

/// The most requests a latency check sends to each pod in one round (`latency.requests`): a check,
/// not a load test. The health-checker refuses more.
pub const MAX_LATENCY_REQUESTS: u32 = 1000;

/// The longest a smoke test may run (`smoke.timeout`): a round waits for it. The health-checker
/// refuses more.
pub const MAX_SMOKE_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest URL an HTTP check may call besides the pods (`http.url`). The health-checker
/// refuses longer ones.
pub const MAX_URL_BYTES: usize = 2048;

/// The highest TCP port (`port`, `http.port`, `latency.port`); the spec carries ports as `uint32`
/// and every agent refuses one that is not a `u16`.
pub const MAX_PORT: u32 = 65_535;

/// The most checks of a release (`checks`); the agents refuse a spec with more.
pub const MAX_CHECKS: usize = 64;

/// The most canary steps of a release (`canary.steps`); the agents refuse a spec with more.
pub const MAX_STEPS: usize = 32;

/// The most arguments of a command (`build.argv`, `smoke.argv`); the agents refuse more.
pub const MAX_ARGV: usize = 256;

/// The longest text field (a name, an argument, a path, a URL…) in bytes; the agents refuse
/// longer ones.
pub const MAX_TEXT_BYTES: usize = 4096;

/// The longest duration a whole-seconds field of the spec can carry (`uint32`: step timeout,
/// pauses, the scale-down delay, the build timeout, …), about 136 years. A longer value is
/// refused, never truncated; no agent bounds these fields more tightly.
pub const MAX_SPEC_SECONDS: u32 = u32::MAX;

/// The longest duration a milliseconds field of the spec can carry (`uint32`: a latency
/// threshold), about 49 days. A longer value is refused, never truncated.
pub const MAX_SPEC_MILLIS: u32 = u32::MAX;
