//! A small Prometheus registry: counters and duration summaries, rendered as text exposition.
//! All metric names live in [`names`], so they are defined once.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every metric name Baton's runtime exports, with its help text.
pub mod names {
    pub const EVENTS_RECEIVED: (&str, &str) = (
        "baton_events_received_total",
        "Messages delivered to this agent's consumers",
    );
    pub const EVENTS_HANDLED: (&str, &str) = (
        "baton_events_handled_total",
        "Messages handled, by outcome (ack, deferred, retry, dead_letter, returned)",
    );
    pub const DEAD_LETTERS: (&str, &str) = (
        "baton_dead_letters_total",
        "Messages dead-lettered, by reason kind",
    );
    pub const EVENTS_PUBLISHED: (&str, &str) =
        ("baton_events_published_total", "Events published, by type");
    pub const HANDLER_SECONDS: (&str, &str) = (
        "baton_handler_duration_seconds",
        "Time spent handling one message",
    );
    pub const CONSUMER_RESTARTS: (&str, &str) = (
        "baton_consumer_restarts_total",
        "Times a consumer's message stream was re-established",
    );
    pub const UP: (&str, &str) = ("baton_up", "1 while the agent runs");
    pub const HANDLER_PANICS: (&str, &str) = (
        "baton_handler_panics_total",
        "Handlers that panicked (their message was returned for redelivery)",
    );
    pub const HANDLER_ERRORS: (&str, &str) = (
        "baton_handler_errors_total",
        "Handler errors, by kind (retry, permanent) and category",
    );
    pub const IN_FLIGHT: (&str, &str) = (
        "baton_messages_in_flight",
        "Messages this agent holds now (running or queued behind another of the same key)",
    );
    pub const RELEASES_EXPIRED: (&str, &str) = (
        "baton_releases_expired_total",
        "Releases ended by the agents because they passed their deadline or lost their trigger",
    );
}

type Labels = Vec<(String, String)>;
/// Metric name → (help, series by labels).
type Family<V> = BTreeMap<&'static str, (&'static str, BTreeMap<Labels, V>)>;

#[derive(Default)]
struct Inner {
    counters: Family<f64>,
    gauges: Family<f64>,
    /// (sum of seconds, count)
    summaries: Family<(f64, u64)>,
}

/// A cheap, cloneable handle to the agent's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn inc(&self, metric: (&'static str, &'static str), pairs: &[(&str, &str)]) {
        self.add(metric, pairs, 1.0);
    }

    pub fn add(&self, (name, help): (&'static str, &'static str), pairs: &[(&str, &str)], by: f64) {
        if let Ok(mut inner) = self.inner.lock() {
            let entry = inner
                .counters
                .entry(name)
                .or_insert_with(|| (help, BTreeMap::new()));
            *entry.1.entry(labels(pairs)).or_insert(0.0) += by;
        }
    }

    pub fn set(
        &self,
        (name, help): (&'static str, &'static str),
        pairs: &[(&str, &str)],
        value: f64,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            let entry = inner
                .gauges
                .entry(name)
                .or_insert_with(|| (help, BTreeMap::new()));
            entry.1.insert(labels(pairs), value);
        }
    }

    pub fn observe(
        &self,
        (name, help): (&'static str, &'static str),
        pairs: &[(&str, &str)],
        d: Duration,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            let entry = inner
                .summaries
                .entry(name)
                .or_insert_with(|| (help, BTreeMap::new()));
            let s = entry.1.entry(labels(pairs)).or_insert((0.0, 0));
            s.0 += d.as_secs_f64();
            s.1 += 1;
        }
    }

    /// The value of a counter, for tests and reports.
    pub fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        let key = labels(pairs);
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.counters.get(name).and_then(|(_, m)| m.get(&key).copied()))
            .unwrap_or(0.0)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(inner) = self.inner.lock() else {
            return out;
        };
        for (kind, map) in [("counter", &inner.counters), ("gauge", &inner.gauges)] {
            for (name, (help, series)) in map {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (l, v) in series {
                    let _ = writeln!(out, "{name}{} {v}", render_labels(l));
                }
            }
        }
        for (name, (help, series)) in &inner.summaries {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
            for (l, (sum, count)) in series {
                let _ = writeln!(out, "{name}_sum{} {sum}", render_labels(l));
                let _ = writeln!(out, "{name}_count{} {count}", render_labels(l));
            }
        }
        out
    }
}

fn render_labels(l: &Labels) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.inc(
            names::EVENTS_RECEIVED,
            &[("consumer", "builder-release-requested")],
        );
        m.inc(
            names::EVENTS_RECEIVED,
            &[("consumer", "builder-release-requested")],
        );
        m.inc(names::DEAD_LETTERS, &[("reason", "say \"hi\"")]);
        m.observe(names::HANDLER_SECONDS, &[], Duration::from_millis(500));
        m.set(names::UP, &[], 1.0);
        let text = m.render();
        assert!(text.contains("# TYPE baton_events_received_total counter"));
        assert!(
            text.contains("baton_events_received_total{consumer=\"builder-release-requested\"} 2")
        );
        assert!(text.contains("baton_dead_letters_total{reason=\"say \\\"hi\\\"\"} 1"));
        assert!(text.contains("baton_handler_duration_seconds_sum 0.5"));
        assert!(text.contains("baton_handler_duration_seconds_count 1"));
        assert!(text.contains("baton_up 1"));
        assert_eq!(
            m.counter(
                "baton_events_received_total",
                &[("consumer", "builder-release-requested")]
            ),
            2.0
        );
    }
}
