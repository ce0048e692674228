//! Delivery figures over a window: the DORA keys and the plan's own report. Pure: no I/O, no
//! clock (the caller says what "now" is).
//!
//! What counts:
//!
//! - A figure is computed from the releases that **ended** in the window: their terminal event
//!   (`release.succeeded`, `release.failed`, `release.rolled_back`) is stamped at or after
//!   `now − window`. Events stamped after `now` (a publisher's clock ahead of ours) count too.
//! - **Deployments** are releases requested with a spec (`release.requested`). A **manual
//!   rollback** (a release whose first event is `rollback.requested`, with no spec) deploys
//!   nothing new, so it is *not* a deployment: it is left out of the frequency, lead time, success
//!   rate, change failure rate and deployment time. It counts as a **rollback of its app**: a
//!   completed one (ended `release.rolled_back`) adds to the rollback rate's numerator, and it
//!   restores service after a failed release of the same app and environment (see time to
//!   restore).
//! - **Deployment frequency**: succeeded deployments, and that count per day of the window.
//! - **Lead time for changes**: end − `spec.commit_time`, over succeeded deployments that carry a
//!   commit time (a commit time after the end is a bad clock and is left out).
//! - **Change failure rate**: (failed + rolled back) / ended deployments.
//! - **Time to restore**: for each rolled-back deployment, from its first failure
//!   (`deploy.failed` or `analysis.failed`) to its `release.rolled_back` (left out when no failure
//!   event was seen); for each failed deployment, from its first failure (or, without one, its
//!   end) to the end of the next release of the same app and environment that restored service —
//!   a succeeded deployment or a completed manual rollback — if there is one yet (failures not yet
//!   restored are counted as `unrestored`).
//! - **Success rate**: succeeded / ended deployments. **Rollback rate**: (rolled-back deployments +
//!   completed manual rollbacks) / ended deployments (so it can exceed 1 when people roll back
//!   more often than they deploy). **Deployment time**: request → end over succeeded deployments.
//! - Means and medians are over each figure's own samples (the median of an even count is the mean
//!   of the middle two); with no sample, or no ended deployment for a rate, the figure is `null`.
//! - **In flight**: releases (of either kind) not ended now, whatever the window.

use std::collections::HashMap;

use baton_core::event::timestamp_ms;
use baton_core::names::{AppName, EnvName};
use baton_core::Status;
use serde::{Deserialize, Serialize};

use crate::history::{Filter, History, Record};
use baton_core::time::rfc3339_ms as rfc3339;

pub const DAY_SECONDS: u64 = 86_400;

/// Count, mean and median of a duration figure, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: usize,
    pub mean_seconds: Option<f64>,
    pub median_seconds: Option<f64>,
}

impl Stats {
    /// The figure of a set of samples in milliseconds.
    pub fn of(mut samples_ms: Vec<i64>) -> Stats {
        samples_ms.sort_unstable();
        let count = samples_ms.len();
        if count == 0 {
            return Stats {
                count,
                mean_seconds: None,
                median_seconds: None,
            };
        }
        let sum: i128 = samples_ms.iter().map(|&v| i128::from(v)).sum();
        let mean_ms = sum as f64 / count as f64;
        let mid = count / 2;
        let median_ms = if count % 2 == 1 {
            samples_ms[mid] as f64
        } else {
            (samples_ms[mid - 1] as f64 + samples_ms[mid] as f64) / 2.0
        };
        Stats {
            count,
            mean_seconds: Some(mean_ms / 1000.0),
            median_seconds: Some(median_ms / 1000.0),
        }
    }
}

/// Deployments that ended in the window, by how they ended; and releases in flight now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ended: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub rolled_back: usize,
    pub in_flight: usize,
}

/// Manual rollbacks that ended in the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualRollbacks {
    pub completed: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Frequency {
    /// Succeeded deployments in the window.
    pub deployments: usize,
    pub per_day: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Restore {
    #[serde(flatten)]
    pub stats: Stats,
    /// Failed deployments with no restoring release yet.
    pub unrestored: usize,
}

/// The answer to `baton.v1.api.metrics.report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub window_seconds: u64,
    pub from: String,
    pub to: String,
    pub env: Option<String>,
    pub app: Option<String>,
    pub releases: Counts,
    pub manual_rollbacks: ManualRollbacks,
    pub deployment_frequency: Frequency,
    pub lead_time: Stats,
    pub change_failure_rate: Option<f64>,
    pub time_to_restore: Restore,
    pub success_rate: Option<f64>,
    pub rollback_rate: Option<f64>,
    pub deployment_time: Stats,
}

fn ratio(n: usize, d: usize) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// Ends of the releases that restored service, per app and environment, sorted.
fn restore_points<'a>(records: &[&'a Record]) -> HashMap<(&'a EnvName, &'a AppName), Vec<i64>> {
    let mut points: HashMap<(&EnvName, &AppName), Vec<i64>> = HashMap::new();
    for r in records {
        let restores = match r.status() {
            Status::Succeeded => !r.is_manual_rollback(),
            Status::RolledBack => r.is_manual_rollback(),
            _ => false,
        };
        if let (true, Some(end)) = (restores, r.ended_ms()) {
            points.entry((&r.env, &r.app)).or_default().push(end);
        }
    }
    for v in points.values_mut() {
        v.sort_unstable();
    }
    points
}

/// The figures of the releases `filter` selects, over `window_seconds` up to `now_ms`.
pub fn report(history: &History, filter: &Filter, window_seconds: u64, now_ms: i64) -> Report {
    let records: Vec<&Record> = history.records().filter(|r| r.matches(filter)).collect();
    report_of(&records, filter, window_seconds, now_ms)
}

/// As [`report`], over `records`: the releases `filter` selects, already picked out. (A filter
/// by environment and app keeps every release of an app and environment it keeps any of, so the
/// releases that restore a failure are among them.)
pub fn report_of(records: &[&Record], filter: &Filter, window_seconds: u64, now_ms: i64) -> Report {
    let window_ms = i64::try_from(window_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let from_ms = now_ms.saturating_sub(window_ms);
    let restores = restore_points(records);
    let mut counts = Counts::default();
    let mut manual = ManualRollbacks::default();
    let mut lead = Vec::new();
    let mut deploy_time = Vec::new();
    let mut restore = Vec::new();
    let mut unrestored = 0;
    for r in records {
        let status = r.status();
        let Some(end) = r.ended_ms() else {
            counts.in_flight += 1;
            continue;
        };
        if end < from_ms {
            continue;
        }
        if r.is_manual_rollback() {
            match status {
                Status::Failed => manual.failed += 1,
                _ => manual.completed += 1,
            }
            continue;
        }
        counts.ended += 1;
        match status {
            Status::Succeeded => {
                counts.succeeded += 1;
                if let Some(commit) = r
                    .state
                    .spec
                    .as_ref()
                    .and_then(|s| s.commit_time.as_ref())
                    .map(timestamp_ms)
                {
                    if commit <= end {
                        lead.push(end - commit);
                    }
                }
                if let Some(requested) = r.state.requested_at_ms {
                    deploy_time.push(end.saturating_sub(requested).max(0));
                }
            }
            Status::RolledBack => {
                counts.rolled_back += 1;
                if let Some(failed_at) = r.first_failure_ms {
                    restore.push(end.saturating_sub(failed_at).max(0));
                }
            }
            _ => {
                counts.failed += 1;
                let broke = r.first_failure_ms.unwrap_or(end);
                match next_restore(&restores, r, end) {
                    Some(restored) => restore.push(restored.saturating_sub(broke).max(0)),
                    None => unrestored += 1,
                }
            }
        }
    }
    let days = window_seconds as f64 / DAY_SECONDS as f64;
    Report {
        window_seconds,
        from: rfc3339(from_ms),
        to: rfc3339(now_ms),
        env: filter.env.as_ref().map(ToString::to_string),
        app: filter.app.as_ref().map(ToString::to_string),
        deployment_frequency: Frequency {
            deployments: counts.succeeded,
            per_day: if days > 0.0 {
                counts.succeeded as f64 / days
            } else {
                0.0
            },
        },
        lead_time: Stats::of(lead),
        change_failure_rate: ratio(counts.failed + counts.rolled_back, counts.ended),
        time_to_restore: Restore {
            stats: Stats::of(restore),
            unrestored,
        },
        success_rate: ratio(counts.succeeded, counts.ended),
        rollback_rate: ratio(counts.rolled_back + manual.completed, counts.ended),
        deployment_time: Stats::of(deploy_time),
        releases: counts,
        manual_rollbacks: manual,
    }
}

/// The end of the first release after `after_ms` that restored `r`'s app and environment.
fn next_restore(
    restores: &HashMap<(&EnvName, &AppName), Vec<i64>>,
    r: &Record,
    after_ms: i64,
) -> Option<i64> {
    let ends = restores.get(&(&r.env, &r.app))?;
    let i = ends.partition_point(|&e| e <= after_ms);
    ends.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    const S: i64 = 1000;
    const D: i64 = 86_400 * S;
    const NOW: i64 = 100 * D;
    const WINDOW_30D: u64 = 30 * DAY_SECONDS;

    /// staging/web: one success with a commit, a rollback, a failure restored a day later by a
    /// success with a commit, one in flight, and an old success outside 30 days; prod/api: a
    /// success without commit, then a failure restored by a manual rollback.
    fn history() -> History {
        let mut h = History::new();
        let scripts = [
            Script::release("staging", "web", NOW - 40 * D).succeed(NOW - 40 * D + 60 * S),
            Script::release("staging", "web", NOW - 10 * D)
                .commit_at(NOW - 10 * D - 3600 * S)
                .succeed(NOW - 10 * D + 600 * S),
            Script::release("staging", "web", NOW - 8 * D)
                .roll_back(NOW - 8 * D + 300 * S, NOW - 8 * D + 420 * S),
            Script::release("staging", "web", NOW - 6 * D)
                .fail(NOW - 6 * D + 100 * S, NOW - 6 * D + 200 * S),
            Script::release("staging", "web", NOW - 5 * D)
                .commit_at(NOW - 5 * D - 1800 * S)
                .succeed(NOW - 5 * D + 300 * S),
            Script::release("staging", "web", NOW - D).in_flight(),
            Script::release("prod", "api", NOW - 3 * D).succeed(NOW - 3 * D + 60 * S),
            Script::release("prod", "api", NOW - 2 * D)
                .fail(NOW - 2 * D + 30 * S, NOW - 2 * D + 40 * S),
            Script::manual_rollback("prod", "api", NOW - D).rolled_back(NOW - D + 50 * S),
        ];
        for s in &scripts {
            s.feed(&mut h);
        }
        h
    }

    fn filter(env: Option<&str>, app: Option<&str>) -> Filter {
        Filter {
            env: env.map(|e| EnvName::new(e).unwrap()),
            app: app.map(|a| AppName::new(a).unwrap()),
        }
    }

    fn stats(count: usize, mean: Option<f64>, median: Option<f64>) -> Stats {
        Stats {
            count,
            mean_seconds: mean,
            median_seconds: median,
        }
    }

    struct Expect {
        name: &'static str,
        filter: Filter,
        window: u64,
        counts: Counts,
        manual: ManualRollbacks,
        per_day: f64,
        lead: Stats,
        cfr: Option<f64>,
        restore: Stats,
        unrestored: usize,
        success: Option<f64>,
        rollback: Option<f64>,
        deploy: Stats,
    }

    #[test]
    fn figures_match_the_scripted_history() {
        let table = [
            Expect {
                name: "everything over 30 days",
                filter: filter(None, None),
                window: WINDOW_30D,
                counts: Counts {
                    ended: 6,
                    succeeded: 3,
                    failed: 2,
                    rolled_back: 1,
                    in_flight: 1,
                },
                manual: ManualRollbacks {
                    completed: 1,
                    failed: 0,
                },
                per_day: 0.1,
                lead: stats(2, Some(3150.0), Some(3150.0)),
                cfr: Some(0.5),
                restore: stats(3, Some(173_140_000.0 / 3.0 / 1000.0), Some(86_420.0)),
                unrestored: 0,
                success: Some(0.5),
                rollback: Some(2.0 / 6.0),
                deploy: stats(3, Some(320.0), Some(300.0)),
            },
            Expect {
                name: "staging only",
                filter: filter(Some("staging"), None),
                window: WINDOW_30D,
                counts: Counts {
                    ended: 4,
                    succeeded: 2,
                    failed: 1,
                    rolled_back: 1,
                    in_flight: 1,
                },
                manual: ManualRollbacks::default(),
                per_day: 2.0 / 30.0,
                lead: stats(2, Some(3150.0), Some(3150.0)),
                cfr: Some(0.5),
                restore: stats(2, Some(43_360.0), Some(43_360.0)),
                unrestored: 0,
                success: Some(0.5),
                rollback: Some(0.25),
                deploy: stats(2, Some(450.0), Some(450.0)),
            },
            Expect {
                name: "api in prod: the manual rollback restores and counts as a rollback",
                filter: filter(Some("prod"), Some("api")),
                window: WINDOW_30D,
                counts: Counts {
                    ended: 2,
                    succeeded: 1,
                    failed: 1,
                    rolled_back: 0,
                    in_flight: 0,
                },
                manual: ManualRollbacks {
                    completed: 1,
                    failed: 0,
                },
                per_day: 1.0 / 30.0,
                lead: stats(0, None, None),
                cfr: Some(0.5),
                restore: stats(1, Some(86_420.0), Some(86_420.0)),
                unrestored: 0,
                success: Some(0.5),
                rollback: Some(0.5),
                deploy: stats(1, Some(60.0), Some(60.0)),
            },
            Expect {
                name: "a 7-day window leaves the older releases out",
                filter: filter(None, None),
                window: 7 * DAY_SECONDS,
                counts: Counts {
                    ended: 4,
                    succeeded: 2,
                    failed: 2,
                    rolled_back: 0,
                    in_flight: 1,
                },
                manual: ManualRollbacks {
                    completed: 1,
                    failed: 0,
                },
                per_day: 2.0 / 7.0,
                lead: stats(1, Some(2100.0), Some(2100.0)),
                cfr: Some(0.5),
                restore: stats(2, Some(86_510.0), Some(86_510.0)),
                unrestored: 0,
                success: Some(0.5),
                rollback: Some(0.25),
                deploy: stats(2, Some(180.0), Some(180.0)),
            },
            Expect {
                name: "an environment with no releases has no rates",
                filter: filter(Some("dev"), None),
                window: WINDOW_30D,
                counts: Counts::default(),
                manual: ManualRollbacks::default(),
                per_day: 0.0,
                lead: stats(0, None, None),
                cfr: None,
                restore: stats(0, None, None),
                unrestored: 0,
                success: None,
                rollback: None,
                deploy: stats(0, None, None),
            },
        ];
        let h = history();
        for e in table {
            let r = report(&h, &e.filter, e.window, NOW);
            let name = e.name;
            assert_eq!(r.releases, e.counts, "{name}: counts");
            assert_eq!(r.manual_rollbacks, e.manual, "{name}: manual rollbacks");
            assert_eq!(
                r.deployment_frequency.deployments, e.counts.succeeded,
                "{name}"
            );
            assert_eq!(
                r.deployment_frequency.per_day, e.per_day,
                "{name}: frequency"
            );
            assert_eq!(r.lead_time, e.lead, "{name}: lead time");
            assert_eq!(r.change_failure_rate, e.cfr, "{name}: change failure rate");
            assert_eq!(
                r.time_to_restore.stats, e.restore,
                "{name}: time to restore"
            );
            assert_eq!(
                r.time_to_restore.unrestored, e.unrestored,
                "{name}: unrestored"
            );
            assert_eq!(r.success_rate, e.success, "{name}: success rate");
            assert_eq!(r.rollback_rate, e.rollback, "{name}: rollback rate");
            assert_eq!(r.deployment_time, e.deploy, "{name}: deployment time");
            assert_eq!(r.window_seconds, e.window);
            assert_eq!(r.to, "1970-04-11T00:00:00Z");
        }
    }

    #[test]
    fn a_failure_without_a_later_fix_is_unrestored_until_one_succeeds() {
        let mut h = History::new();
        Script::release("staging", "web", NOW - 2 * D)
            .fail(NOW - 2 * D + 10 * S, NOW - 2 * D + 20 * S)
            .feed(&mut h);
        // A success of another app or environment does not restore this one.
        Script::release("staging", "api", NOW - D)
            .succeed(NOW - D + 10 * S)
            .feed(&mut h);
        Script::release("prod", "web", NOW - D)
            .succeed(NOW - D + 10 * S)
            .feed(&mut h);
        // A success that ended before the failure does not either.
        Script::release("staging", "web", NOW - 3 * D)
            .succeed(NOW - 3 * D + 10 * S)
            .feed(&mut h);
        let web = filter(Some("staging"), Some("web"));
        let r = report(&h, &web, WINDOW_30D, NOW);
        assert_eq!(r.time_to_restore.stats, stats(0, None, None));
        assert_eq!(r.time_to_restore.unrestored, 1);

        Script::release("staging", "web", NOW - D / 2)
            .succeed(NOW - D / 2 + 30 * S)
            .feed(&mut h);
        let r = report(&h, &web, WINDOW_30D, NOW);
        let expected = (2 * D - D / 2 + 30 * S - 10 * S) as f64 / 1000.0;
        assert_eq!(
            r.time_to_restore.stats,
            stats(1, Some(expected), Some(expected))
        );
        assert_eq!(r.time_to_restore.unrestored, 0);
    }

    #[test]
    fn only_the_end_decides_the_window_and_bad_clocks_are_left_out() {
        let mut h = History::new();
        // Requested before the window, ended inside it: counted.
        Script::release("staging", "web", NOW - 31 * D)
            .commit_at(NOW - 31 * D)
            .succeed(NOW - 29 * D)
            .feed(&mut h);
        // A commit time after the end is a bad clock: no lead time sample.
        Script::release("staging", "web", NOW - 2 * D)
            .commit_at(NOW)
            .succeed(NOW - 2 * D + S)
            .feed(&mut h);
        // Exactly at the start of the window: counted.
        Script::release("staging", "web", NOW - 31 * D)
            .succeed(NOW - 30 * D)
            .feed(&mut h);
        let r = report(&h, &Filter::default(), WINDOW_30D, NOW);
        assert_eq!(r.releases.succeeded, 3);
        assert_eq!(
            r.lead_time,
            stats(1, Some(2.0 * 86_400.0), Some(2.0 * 86_400.0))
        );
        assert_eq!(r.deployment_time.count, 3);
        assert_eq!(r.deployment_time.median_seconds, Some(86_400.0));
    }

    #[test]
    fn a_failed_manual_rollback_is_counted_apart_and_restores_nothing() {
        let mut h = History::new();
        Script::release("prod", "api", NOW - 2 * D)
            .fail(NOW - 2 * D + S, NOW - 2 * D + 2 * S)
            .feed(&mut h);
        Script::manual_rollback("prod", "api", NOW - D)
            .failed(NOW - D + S)
            .feed(&mut h);
        let r = report(&h, &Filter::default(), WINDOW_30D, NOW);
        assert_eq!(
            r.manual_rollbacks,
            ManualRollbacks {
                completed: 0,
                failed: 1
            }
        );
        assert_eq!(r.releases.ended, 1);
        assert_eq!(r.rollback_rate, Some(0.0));
        assert_eq!(r.time_to_restore.unrestored, 1);
    }

    #[test]
    fn medians_and_means_of_samples() {
        let table: [(&[i64], Stats); 4] = [
            (&[], stats(0, None, None)),
            (&[5_000], stats(1, Some(5.0), Some(5.0))),
            (&[3_000, 1_000], stats(2, Some(2.0), Some(2.0))),
            (&[9_000, 1_000, 2_000], stats(3, Some(4.0), Some(2.0))),
        ];
        for (samples, expected) in table {
            assert_eq!(Stats::of(samples.to_vec()), expected, "{samples:?}");
        }
    }
}
