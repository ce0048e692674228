//! What a simulated container does, chosen by its env, and the kubelet's back-off arithmetic.
//! Pure: no clock, no randomness, no I/O — callers pass elapsed times and random draws in.

use std::fmt;
use std::time::Duration;

pub(crate) const HEALTH: &str = "BATON_SIM_HEALTH";
pub(crate) const LATENCY_MS: &str = "BATON_SIM_LATENCY_MS";
pub(crate) const STARTUP_MS: &str = "BATON_SIM_STARTUP_MS";
pub(crate) const FAIL_AFTER_MS: &str = "BATON_SIM_FAIL_AFTER_MS";
pub(crate) const CRASH: &str = "BATON_SIM_CRASH";
pub(crate) const READY: &str = "BATON_SIM_READY";

/// How long a crash-looping container runs before it exits.
pub(crate) const CRASH_RUN_TIME: Duration = Duration::from_secs(1);
/// Longest delay any of the millisecond variables may ask for (a day): larger values are
/// certainly mistakes, and would overflow instants on some platforms.
const MAX_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Health {
    Ok,
    Fail,
    /// Fails this share of `/health` requests, at random.
    Flaky(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Behaviour {
    pub health: Health,
    pub latency: Duration,
    pub startup: Duration,
    pub fail_after: Option<Duration>,
    pub crash: bool,
    pub ready: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            health: Health::Ok,
            latency: Duration::ZERO,
            startup: Duration::ZERO,
            fail_after: None,
            crash: false,
            ready: true,
        }
    }
}

/// An env value the simulator can't act on; shown to users as a kubelet's
/// `CreateContainerConfigError` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BehaviourError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl fmt::Display for BehaviourError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: expected {}",
            self.var, self.value, self.expected
        )
    }
}

impl std::error::Error for BehaviourError {}

impl Behaviour {
    /// Reads the `BATON_SIM_*` variables; the last occurrence of a name wins, empty means unset,
    /// other variables are ignored.
    pub(crate) fn from_env(env: &[(String, String)]) -> Result<Self, BehaviourError> {
        let mut behaviour = Self::default();
        for (key, value) in env {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            let err = |var, expected| BehaviourError {
                var,
                value: value.to_string(),
                expected,
            };
            match key.as_str() {
                HEALTH => {
                    behaviour.health = parse_health(value)
                        .ok_or_else(|| err(HEALTH, "ok, fail or flaky:<share between 0 and 1>"))?;
                }
                LATENCY_MS => {
                    behaviour.latency = parse_ms(value)
                        .ok_or_else(|| err(LATENCY_MS, "milliseconds, 0..=86400000"))?;
                }
                STARTUP_MS => {
                    behaviour.startup = parse_ms(value)
                        .ok_or_else(|| err(STARTUP_MS, "milliseconds, 0..=86400000"))?;
                }
                FAIL_AFTER_MS => {
                    behaviour.fail_after = Some(
                        parse_ms(value)
                            .ok_or_else(|| err(FAIL_AFTER_MS, "milliseconds, 0..=86400000"))?,
                    );
                }
                CRASH => {
                    behaviour.crash = parse_bool(value).ok_or_else(|| err(CRASH, "1 or 0"))?;
                }
                READY => {
                    behaviour.ready = parse_bool(value).ok_or_else(|| err(READY, "1 or 0"))?;
                }
                _ => {}
            }
        }
        Ok(behaviour)
    }

    /// Whether the app is still starting `elapsed` after its container started.
    pub(crate) fn is_starting(&self, elapsed: Duration) -> bool {
        elapsed < self.startup
    }

    /// Whether `/health` fails `elapsed` after start; `draw` is uniform in `[0, 1)`.
    pub(crate) fn health_fails(&self, elapsed: Duration, draw: f64) -> bool {
        if self.fail_after.is_some_and(|after| elapsed >= after) {
            return true;
        }
        match self.health {
            Health::Ok => false,
            Health::Fail => true,
            Health::Flaky(share) => draw < share,
        }
    }

    /// Readiness as far as the app itself decides it (probes come on top).
    pub(crate) fn is_ready(&self, elapsed: Duration) -> bool {
        self.ready && !self.crash && !self.is_starting(elapsed)
    }

    /// When a crash-looping container exits, counted from its start.
    pub(crate) fn exits_after(&self) -> Option<Duration> {
        self.crash.then_some(CRASH_RUN_TIME)
    }

    /// What the app answers on `path`.
    pub(crate) fn route(&self, path: &str, elapsed: Duration, draw: f64) -> Reply {
        if self.is_starting(elapsed) {
            return Reply::Starting;
        }
        match path {
            "/health" => Reply::Health {
                ok: !self.health_fails(elapsed, draw),
            },
            "/version" => Reply::Version,
            "/metrics" => Reply::Metrics,
            _ => Reply::NotFound,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// 503 before the startup delay has passed.
    Starting,
    Health {
        ok: bool,
    },
    Version,
    Metrics,
    NotFound,
}

impl Reply {
    pub(crate) fn status(self) -> u16 {
        match self {
            Self::Starting => 503,
            Self::Health { ok: true } | Self::Version | Self::Metrics => 200,
            Self::Health { ok: false } => 500,
            Self::NotFound => 404,
        }
    }
}

fn parse_health(value: &str) -> Option<Health> {
    match value {
        "ok" => Some(Health::Ok),
        "fail" => Some(Health::Fail),
        _ => {
            let share: f64 = value.strip_prefix("flaky:")?.trim().parse().ok()?;
            (0.0..=1.0).contains(&share).then_some(Health::Flaky(share))
        }
    }
}

fn parse_ms(value: &str) -> Option<Duration> {
    let ms: u64 = value.parse().ok()?;
    (ms <= MAX_MS).then(|| Duration::from_millis(ms))
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// The kubelet's back-off before the `failures`-th retry (1-based): `base`, doubling per
/// failure, capped at `max`. The kubelet uses 10s and 5min for both crash loops and image pulls.
pub(crate) fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.checked_mul(1u32 << doublings)
        .map_or(max, |d| d.min(max))
}

/// The pod's env as a container sees it: the image's `Env`, overridden by the pod spec's literal
/// values by name (as the runtime does); names keep their first position.
pub(crate) fn merge_env(
    image: &[(String, String)],
    pod: &[(String, String)],
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = Vec::with_capacity(image.len() + pod.len());
    for (key, value) in image.iter().chain(pod) {
        match merged.iter_mut().find(|(k, _)| k == key) {
            Some(existing) => existing.1.clone_from(value),
            None => merged.push((key.clone(), value.clone())),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn env_values_select_the_behaviour() {
        let cases: Vec<(Vec<(String, String)>, Behaviour)> = vec![
            (env(&[]), Behaviour::default()),
            (env(&[("OTHER", "x"), (HEALTH, "ok")]), Behaviour::default()),
            (
                env(&[(HEALTH, "fail")]),
                Behaviour {
                    health: Health::Fail,
                    ..Default::default()
                },
            ),
            (
                env(&[(HEALTH, "flaky:0.25")]),
                Behaviour {
                    health: Health::Flaky(0.25),
                    ..Default::default()
                },
            ),
            (
                env(&[(HEALTH, "flaky:1")]),
                Behaviour {
                    health: Health::Flaky(1.0),
                    ..Default::default()
                },
            ),
            (
                env(&[(LATENCY_MS, "150")]),
                Behaviour {
                    latency: MS(150),
                    ..Default::default()
                },
            ),
            (
                env(&[(STARTUP_MS, "2000")]),
                Behaviour {
                    startup: MS(2000),
                    ..Default::default()
                },
            ),
            (
                env(&[(FAIL_AFTER_MS, "0")]),
                Behaviour {
                    fail_after: Some(Duration::ZERO),
                    ..Default::default()
                },
            ),
            (
                env(&[(CRASH, "1")]),
                Behaviour {
                    crash: true,
                    ..Default::default()
                },
            ),
            (env(&[(CRASH, "0")]), Behaviour::default()),
            (
                env(&[(READY, "0")]),
                Behaviour {
                    ready: false,
                    ..Default::default()
                },
            ),
            (env(&[(READY, "true")]), Behaviour::default()),
            (
                env(&[(HEALTH, "fail"), (HEALTH, "ok")]),
                Behaviour::default(),
            ),
            (
                env(&[(HEALTH, ""), (LATENCY_MS, " ")]),
                Behaviour::default(),
            ),
        ];
        for (vars, expected) in cases {
            assert_eq!(Behaviour::from_env(&vars), Ok(expected), "{vars:?}");
        }
    }

    #[test]
    fn invalid_env_values_name_the_variable_and_what_was_expected() {
        let cases = [
            (HEALTH, "bogus"),
            (HEALTH, "flaky"),
            (HEALTH, "flaky:1.5"),
            (HEALTH, "flaky:-0.1"),
            (HEALTH, "flaky:nan"),
            (LATENCY_MS, "-1"),
            (LATENCY_MS, "1.5"),
            (STARTUP_MS, "soon"),
            (FAIL_AFTER_MS, "86400001"),
            (CRASH, "yes"),
            (READY, "2"),
        ];
        for (var, value) in cases {
            let err = Behaviour::from_env(&env(&[(var, value)])).expect_err(value);
            assert_eq!(err.var, var);
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid {var} \"{value}\": expected")),
                "{err}"
            );
        }
    }

    #[test]
    fn health_follows_the_mode_and_the_fail_after_delay() {
        let ok = Behaviour::default();
        let fail = Behaviour {
            health: Health::Fail,
            ..Default::default()
        };
        let flaky = Behaviour {
            health: Health::Flaky(0.3),
            ..Default::default()
        };
        let later = Behaviour {
            fail_after: Some(MS(500)),
            ..Default::default()
        };
        let cases = [
            (&ok, MS(0), 0.0, false),
            (&fail, MS(0), 0.99, true),
            (&flaky, MS(0), 0.29, true),
            (&flaky, MS(0), 0.3, false),
            (&later, MS(499), 0.0, false),
            (&later, MS(500), 0.99, true),
        ];
        for (behaviour, elapsed, draw, fails) in cases {
            assert_eq!(
                behaviour.health_fails(elapsed, draw),
                fails,
                "{behaviour:?} at {elapsed:?}"
            );
        }
    }

    #[test]
    fn routes_answer_like_the_simulated_app() {
        let slow = Behaviour {
            startup: MS(1000),
            health: Health::Fail,
            ..Default::default()
        };
        let cases = [
            ("/health", MS(999), Reply::Starting, 503),
            ("/version", MS(0), Reply::Starting, 503),
            ("/health", MS(1000), Reply::Health { ok: false }, 500),
            ("/version", MS(1000), Reply::Version, 200),
            ("/metrics", MS(1000), Reply::Metrics, 200),
            ("/", MS(1000), Reply::NotFound, 404),
            ("/healthz", MS(1000), Reply::NotFound, 404),
        ];
        for (path, elapsed, reply, status) in cases {
            let got = slow.route(path, elapsed, 0.5);
            assert_eq!(got, reply, "{path} at {elapsed:?}");
            assert_eq!(got.status(), status);
        }
    }

    #[test]
    fn readiness_needs_startup_done_no_crash_loop_and_ready_not_disabled() {
        let cases = [
            (Behaviour::default(), MS(0), true),
            (
                Behaviour {
                    startup: MS(100),
                    ..Default::default()
                },
                MS(99),
                false,
            ),
            (
                Behaviour {
                    startup: MS(100),
                    ..Default::default()
                },
                MS(100),
                true,
            ),
            (
                Behaviour {
                    ready: false,
                    ..Default::default()
                },
                MS(5000),
                false,
            ),
            (
                Behaviour {
                    crash: true,
                    ..Default::default()
                },
                MS(10),
                false,
            ),
            // Failing health alone doesn't make a container unready: only a probe does.
            (
                Behaviour {
                    health: Health::Fail,
                    ..Default::default()
                },
                MS(0),
                true,
            ),
        ];
        for (behaviour, elapsed, ready) in cases {
            assert_eq!(
                behaviour.is_ready(elapsed),
                ready,
                "{behaviour:?} at {elapsed:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let s = Duration::from_secs;
        let cases = [
            (s(1), s(30), 0, s(1)),
            (s(1), s(30), 1, s(1)),
            (s(1), s(30), 2, s(2)),
            (s(1), s(30), 3, s(4)),
            (s(1), s(30), 5, s(16)),
            (s(1), s(30), 6, s(30)),
            (s(1), s(30), 1000, s(30)),
            (s(10), s(300), 6, s(300)),
            (s(10), s(300), 5, s(160)),
        ];
        for (base, max, failures, expected) in cases {
            assert_eq!(
                backoff(base, max, failures),
                expected,
                "{failures} failures"
            );
        }
    }

    #[test]
    fn pod_env_overrides_image_env_by_name() {
        let image = env(&[("A", "1"), ("B", "2"), ("B", "3")]);
        let pod = env(&[("B", "pod"), ("C", "4")]);
        assert_eq!(
            merge_env(&image, &pod),
            env(&[("A", "1"), ("B", "pod"), ("C", "4")])
        );
        assert_eq!(merge_env(&[], &[]), vec![]);
    }
}
