//! The history as Prometheus series on the agent's `/metrics`. Every name the metrics agent
//! exports is in [`names`].
//!
//! Counters (`_total`) count from the whole history; the DORA figures are gauges over the last
//! 30 days, per environment and app, computed as [`crate::dora`] does. A rate with nothing to
//! divide by is `NaN`, so a dashboard shows a gap rather than a false 0.
//!
//! Durations are histograms (buckets from 0.1 s to 1 h, [`baton_core::metrics::buckets::RELEASE`])
//! of the observations [`crate::timings`] makes, labelled `env`, `app`, `strategy` and `outcome`.
//! Each release in flight has gauges of its own (`env`, `app`, `release_id`): they are removed
//! when it ends, so the series stay as many as the releases running, whatever the history holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use baton_core::metrics::Metrics;
use baton_core::names::{AppName, EnvName};
use baton_core::Status;

use crate::dora::{self, DAY_SECONDS};
use crate::history::{Filter, History, Record};
use crate::timings::{Observation, Timing};

/// The window of the gauges.
pub const GAUGE_WINDOW_SECONDS: u64 = 30 * DAY_SECONDS;

/// Metric names and help texts, defined once.
pub mod names {
    pub const RELEASES: (&str, &str) = (
        "baton_releases_total",
        "Deployments that ended, by environment, app and status (succeeded, failed, rolled_back)",
    );
    pub const MANUAL_ROLLBACKS: (&str, &str) = (
        "baton_manual_rollbacks_total",
        "Manual rollbacks that ended, by environment, app and status (rolled_back, failed)",
    );
    pub const IN_FLIGHT: (&str, &str) = (
        "baton_releases_in_flight",
        "Releases not ended yet, by environment and app",
    );
    pub const DEPLOYMENT_FREQUENCY: (&str, &str) = (
        "baton_deployment_frequency_per_day",
        "Succeeded deployments per day over the last 30 days",
    );
    pub const LEAD_TIME: (&str, &str) = (
        "baton_lead_time_seconds",
        "Mean lead time for changes (commit to the end of its release) over the last 30 days",
    );
    pub const CHANGE_FAILURE_RATE: (&str, &str) = (
        "baton_change_failure_rate",
        "Failed and rolled-back deployments per ended deployment over the last 30 days",
    );
    pub const TIME_TO_RESTORE: (&str, &str) = (
        "baton_time_to_restore_seconds",
        "Mean time from a failure to restored service over the last 30 days",
    );
    pub const SUCCESS_RATE: (&str, &str) = (
        "baton_success_rate",
        "Succeeded deployments per ended deployment over the last 30 days",
    );
    pub const ROLLBACK_RATE: (&str, &str) = (
        "baton_rollback_rate",
        "Rollbacks (automatic and manual) per ended deployment over the last 30 days",
    );
    pub const DEPLOYMENT_DURATION: (&str, &str) = (
        "baton_deployment_duration_seconds",
        "Mean time from request to end of succeeded deployments over the last 30 days",
    );
    pub const HISTORY_EVENTS: (&str, &str) = (
        "baton_history_events_total",
        "Distinct events folded into the history",
    );
    pub const HISTORY_RELEASES: (&str, &str) =
        ("baton_history_releases", "Releases in the history");
    pub const API_REQUESTS: (&str, &str) = (
        "baton_api_requests_total",
        "Queries answered, by query and outcome (ok, bad_request, unavailable)",
    );
    pub const RELEASE_DURATION: (&str, &str) = (
        "baton_release_duration_seconds",
        "Time from a deployment's request to its end, by environment, app, strategy and outcome (succeeded, failed, rolled_back)",
    );
    pub const STEP_DURATION: (&str, &str) = (
        "baton_step_duration_seconds",
        "Time from a step's start to its new pods ready, by environment, app, strategy and outcome (ready, failed, cancelled)",
    );
    pub const ANALYSIS_DURATION: (&str, &str) = (
        "baton_analysis_duration_seconds",
        "Time from an analysis's start to its verdict, by environment, app, strategy and outcome (passed, failed, cancelled)",
    );
    pub const FAILURE_TO_ROLLBACK: (&str, &str) = (
        "baton_failure_to_rollback_seconds",
        "Time from a release's first failure to its rollback's completion, by environment, app, strategy and outcome (rolled_back, failed)",
    );
    pub const RELEASE_IN_FLIGHT: (&str, &str) = (
        "baton_release_in_flight",
        "1 for each release not ended yet, by environment, app and release id",
    );
    pub const RELEASE_STEP: (&str, &str) = (
        "baton_release_current_step",
        "The step a release in flight is at (the highest one started), by environment, app and release id",
    );
    pub const RELEASE_WEIGHT: (&str, &str) = (
        "baton_release_weight_percent",
        "The traffic share of a release in flight's current step, in percent, by environment, app and release id",
    );
}

/// The histogram of each kind of observation.
pub fn histogram_of(timing: Timing) -> (&'static str, &'static str) {
    match timing {
        Timing::Release => names::RELEASE_DURATION,
        Timing::Step => names::STEP_DURATION,
        Timing::Analysis => names::ANALYSIS_DURATION,
        Timing::FailureToRollback => names::FAILURE_TO_ROLLBACK,
    }
}

/// Records observations in their histograms.
pub fn record(m: &Metrics, observations: &[Observation]) {
    for o in observations {
        let labels = [
            ("env", o.env.as_str()),
            ("app", o.app.as_str()),
            ("strategy", o.strategy),
            ("outcome", o.outcome),
        ];
        m.observe(
            histogram_of(o.timing),
            &labels,
            Duration::from_secs_f64(o.seconds.max(0.0)),
        );
    }
}

type SeriesKey = (&'static str, Vec<(String, String)>);

/// The labels of one release's gauges.
type ReleaseKey = (String, String, String);

/// Writes the history's figures into the agent's registry. Counters there only go up by `add`,
/// so it remembers what it exported and adds the difference (the history's counts never fall).
/// It also remembers which releases have gauges, to remove them when they end.
#[derive(Debug, Default)]
pub struct Exporter {
    exported: HashMap<SeriesKey, u64>,
    in_flight: HashSet<ReleaseKey>,
}

impl Exporter {
    fn counter(
        &mut self,
        m: &Metrics,
        metric: (&'static str, &'static str),
        labels: &[(&str, &str)],
        value: u64,
    ) {
        let key = (
            metric.0,
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        let before = self.exported.get(&key).copied().unwrap_or(0);
        if value > before || !self.exported.contains_key(&key) {
            m.add(metric, labels, value - before);
            self.exported.insert(key, value);
        }
    }

    pub fn export(&mut self, m: &Metrics, history: &History, now_ms: i64) {
        let mut by_pair: BTreeMap<(&EnvName, &AppName), Vec<&Record>> = BTreeMap::new();
        for r in history.records() {
            by_pair.entry((&r.env, &r.app)).or_default().push(r);
        }
        for ((env, app), records) in &by_pair {
            let (env_s, app_s) = (env.as_str(), app.as_str());
            let ended = |status: Status, manual: bool| {
                records
                    .iter()
                    .filter(|r| r.status() == status && r.is_manual_rollback() == manual)
                    .count()
            };
            for status in [Status::Succeeded, Status::Failed, Status::RolledBack] {
                let n = ended(status, false);
                let labels = [("env", env_s), ("app", app_s), ("status", status.name())];
                self.counter(m, names::RELEASES, &labels, n as u64);
            }
            for status in [Status::RolledBack, Status::Failed] {
                let n = ended(status, true);
                if n > 0 {
                    let labels = [("env", env_s), ("app", app_s), ("status", status.name())];
                    self.counter(m, names::MANUAL_ROLLBACKS, &labels, n as u64);
                }
            }
            let filter = Filter {
                env: Some((*env).clone()),
                app: Some((*app).clone()),
            };
            let r = dora::report_of(records, &filter, GAUGE_WINDOW_SECONDS, now_ms);
            let labels = [("env", env_s), ("app", app_s)];
            let or_nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
            m.set(names::IN_FLIGHT, &labels, r.releases.in_flight as f64);
            m.set(
                names::DEPLOYMENT_FREQUENCY,
                &labels,
                r.deployment_frequency.per_day,
            );
            m.set(names::LEAD_TIME, &labels, or_nan(r.lead_time.mean_seconds));
            m.set(
                names::CHANGE_FAILURE_RATE,
                &labels,
                or_nan(r.change_failure_rate),
            );
            m.set(
                names::TIME_TO_RESTORE,
                &labels,
                or_nan(r.time_to_restore.stats.mean_seconds),
            );
            m.set(names::SUCCESS_RATE, &labels, or_nan(r.success_rate));
            m.set(names::ROLLBACK_RATE, &labels, or_nan(r.rollback_rate));
            m.set(
                names::DEPLOYMENT_DURATION,
                &labels,
                or_nan(r.deployment_time.mean_seconds),
            );
        }
        self.counter(m, names::HISTORY_EVENTS, &[], history.events());
        m.set(names::HISTORY_RELEASES, &[], history.len() as f64);
        self.export_in_flight(m, history);
    }

    /// One series per release in flight of each per-release gauge; those of releases that
    /// ended are removed.
    fn export_in_flight(&mut self, m: &Metrics, history: &History) {
        let mut now: HashSet<ReleaseKey> = HashSet::new();
        for r in history.records().filter(|r| r.ended_ms().is_none()) {
            let key = (r.env.to_string(), r.app.to_string(), r.id.to_string());
            let labels = [
                ("env", key.0.as_str()),
                ("app", key.1.as_str()),
                ("release_id", key.2.as_str()),
            ];
            m.set(names::RELEASE_IN_FLIGHT, &labels, 1.0);
            if let Some((step, weight)) = r.state.current_step().zip(r.state.current_weight()) {
                m.set(names::RELEASE_STEP, &labels, f64::from(step));
                m.set(names::RELEASE_WEIGHT, &labels, f64::from(weight));
            }
            now.insert(key);
        }
        for key in self.in_flight.difference(&now) {
            let labels = [
                ("env", key.0.as_str()),
                ("app", key.1.as_str()),
                ("release_id", key.2.as_str()),
            ];
            for metric in [
                names::RELEASE_IN_FLIGHT,
                names::RELEASE_STEP,
                names::RELEASE_WEIGHT,
            ] {
                m.remove(metric, &labels);
            }
        }
        self.in_flight = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Script;

    /// The value of one series in OpenMetrics text.
    pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
    }

    fn same(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| a == b || (a.is_nan() && b.is_nan()))
    }

    #[test]
    fn figures_are_exported_per_environment_and_app() {
        const D: i64 = 86_400_000;
        let now = 100 * D;
        let mut h = History::new();
        Script::release("staging", "web", now - 3 * D)
            .succeed(now - 3 * D + 90_000)
            .feed(&mut h);
        Script::release("staging", "web", now - 2 * D)
            .roll_back(now - 2 * D + 1_000, now - 2 * D + 61_000)
            .feed(&mut h);
        Script::release("prod", "web", now - D)
            .in_flight()
            .feed(&mut h);
        let m = Metrics::new();
        let mut e = Exporter::default();
        e.export(&m, &h, now);
        e.export(&m, &h, now);
        let text = m.render();
        let web = r#"{env="staging",app="web"}"#;
        let table = [
            (
                r#"baton_releases_total{env="staging",app="web",status="succeeded"}"#.to_owned(),
                1.0,
            ),
            (
                r#"baton_releases_total{env="staging",app="web",status="rolled_back"}"#.to_owned(),
                1.0,
            ),
            (
                r#"baton_releases_total{env="staging",app="web",status="failed"}"#.to_owned(),
                0.0,
            ),
            (format!("baton_change_failure_rate{web}"), 0.5),
            (format!("baton_success_rate{web}"), 0.5),
            (format!("baton_rollback_rate{web}"), 0.5),
            (format!("baton_time_to_restore_seconds{web}"), 60.0),
            (format!("baton_deployment_duration_seconds{web}"), 90.0),
            (format!("baton_lead_time_seconds{web}"), f64::NAN),
            (format!("baton_releases_in_flight{web}"), 0.0),
            (
                r#"baton_releases_in_flight{env="prod",app="web"}"#.to_owned(),
                1.0,
            ),
            (
                r#"baton_change_failure_rate{env="prod",app="web"}"#.to_owned(),
                f64::NAN,
            ),
            (
                format!("baton_deployment_frequency_per_day{web}"),
                1.0 / 30.0,
            ),
            ("baton_history_releases".to_owned(), 3.0),
            ("baton_history_events_total".to_owned(), h.events() as f64),
        ];
        for (series, expected) in table {
            let got = value(&text, &series);
            assert!(
                same(got, expected),
                "{series} is {got:?}, expected {expected}\n{text}"
            );
        }
        assert!(text.contains("# TYPE baton_releases counter"));
        assert!(text.contains("# TYPE baton_change_failure_rate gauge"));
    }

    #[test]
    fn durations_are_histograms_and_a_release_in_flight_has_gauges_until_it_ends() {
        use baton_proto::v1::Strategy;
        const S: i64 = 1000;
        let mut h = History::new();
        let m = Metrics::new();
        let mut e = Exporter::default();
        Script::release("staging", "web", 0)
            .succeed(90 * S)
            .feed(&mut h);
        Script::release("staging", "web", 100 * S)
            .roll_back(130 * S, 160 * S)
            .feed(&mut h);
        let canary = Script::release("prod", "web", 0)
            .with_strategy(Strategy::Canary)
            .deploy(S, Strategy::Canary)
            .step(1, 10, 2 * S)
            .ready(1, 10, 12 * S)
            .step(2, 50, 20 * S);
        canary.feed(&mut h);
        record(&m, &h.take_observations());
        e.export(&m, &h, 200 * S);
        let text = m.render();
        let id = canary.id.to_string();
        let release = format!(r#"{{env="prod",app="web",release_id="{id}"}}"#);
        let table = [
            (
                r#"baton_release_duration_seconds_count{env="staging",app="web",strategy="rolling",outcome="succeeded"}"#.to_owned(),
                1.0,
            ),
            (
                r#"baton_release_duration_seconds_sum{env="staging",app="web",strategy="rolling",outcome="succeeded"}"#.to_owned(),
                90.0,
            ),
            (
                r#"baton_release_duration_seconds_bucket{le="60.0",env="staging",app="web",strategy="rolling",outcome="succeeded"}"#.to_owned(),
                0.0,
            ),
            (
                r#"baton_release_duration_seconds_bucket{le="120.0",env="staging",app="web",strategy="rolling",outcome="succeeded"}"#.to_owned(),
                1.0,
            ),
            (
                r#"baton_release_duration_seconds_sum{env="staging",app="web",strategy="rolling",outcome="rolled_back"}"#.to_owned(),
                60.0,
            ),
            (
                r#"baton_failure_to_rollback_seconds_sum{env="staging",app="web",strategy="rolling",outcome="rolled_back"}"#.to_owned(),
                30.0,
            ),
            (
                r#"baton_step_duration_seconds_sum{env="prod",app="web",strategy="canary",outcome="ready"}"#.to_owned(),
                10.0,
            ),
            (format!("baton_release_in_flight{release}"), 1.0),
            (format!("baton_release_current_step{release}"), 2.0),
            (format!("baton_release_weight_percent{release}"), 50.0),
        ];
        for (series, expected) in table {
            let got = value(&text, &series);
            assert!(
                same(got, expected),
                "{series} is {got:?}, expected {expected}\n{text}"
            );
        }
        assert!(text.contains("# TYPE baton_release_duration_seconds histogram"));
        assert_eq!(
            text.matches("baton_release_in_flight{").count(),
            1,
            "only the release in flight has a series: {text}"
        );

        // It ends: its gauges go, its figures join the histograms.
        canary
            .ready(2, 50, 30 * S)
            .rollback_started(31 * S)
            .rolled_back(40 * S)
            .feed(&mut h);
        record(&m, &h.take_observations());
        e.export(&m, &h, 200 * S);
        let text = m.render();
        assert!(!text.contains(&id), "{text}");
        let rolled = r#"{env="prod",app="web",strategy="canary",outcome="rolled_back"}"#;
        assert!(same(
            value(
                &text,
                &format!("baton_release_duration_seconds_count{rolled}")
            ),
            1.0
        ));
        assert!(same(
            value(
                &text,
                r#"baton_step_duration_seconds_count{env="prod",app="web",strategy="canary",outcome="ready"}"#
            ),
            2.0
        ));
    }
}
