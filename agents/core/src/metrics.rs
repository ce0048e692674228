//! The agents' Prometheus metrics, on the `prometheus-client` crate: counters, gauges and
//! duration histograms, each a family of series keyed by labels chosen at run time, encoded as
//! OpenMetrics text (served with [`CONTENT_TYPE`], ending in `# EOF`). All metric names live in
//! [`names`], so they are defined once.
//!
//! A metric is registered the first time it is used, with the kind of the call (`inc`/`add`: a
//! counter, `set`: a gauge, `observe`: a histogram). Counter names keep their `_total` in
//! [`names`] (that is the name Prometheus stores); the crate's encoder adds the suffix itself, so
//! it is taken off when the counter is registered.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    /// A histogram with [`super::buckets::HANDLER`].
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

/// Upper bounds of histogram buckets, in seconds (each histogram also has `+Inf`).
pub mod buckets {
    /// Release work — a step, an analysis, a rollback, a whole release: from a tenth of a second
    /// (a rollback that is a selector switch) to an hour (the longest canary one would wait for;
    /// beyond it only the count and sum say more).
    pub const RELEASE: &[f64] = &[
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
        2700.0, 3600.0,
    ];
    /// One handler run: from a millisecond (a decision on a folded history) to two minutes.
    pub const HANDLER: &[f64] = &[
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];
}

/// The labels of one series, in the order given (the order they are encoded in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn of(pairs: &[(&str, &str)]) -> Labels {
        Labels(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for (key, value) in &self.0 {
            (key.as_str(), value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Makes a family's histograms with its buckets.
#[derive(Debug, Clone, Copy)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

type GaugeF64 = Gauge<f64, AtomicU64>;

#[derive(Clone)]
enum Kind {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, GaugeF64>),
    Histogram(Family<Labels, Histogram, Buckets>),
}

impl Kind {
    fn word(&self) -> &'static str {
        match self {
            Kind::Counter(_) => "counter",
            Kind::Gauge(_) => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
}

#[derive(Default)]
struct Inner {
    registry: Registry,
    /// By exported name (a counter's with its `_total`).
    families: HashMap<&'static str, Kind>,
    /// Other registries rendered after this one (see [`Metrics::include`]).
    included: Vec<Metrics>,
}

/// A cheap, cloneable handle to the agent's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the families whole (each update is one
        // atomic step), so the poison is no reason to stop counting.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The family of `name`, registered as `make` makes it on first use. `None` when the name is
    /// already another kind of metric (a programming error, logged).
    fn family(
        &self,
        (name, help): (&'static str, &'static str),
        make: impl FnOnce() -> Kind,
        want: fn(&Kind) -> bool,
    ) -> Option<Kind> {
        let mut inner = self.lock();
        if let Some(kind) = inner.families.get(name) {
            if want(kind) {
                return Some(kind.clone());
            }
            tracing::error!(
                metric = name,
                registered = kind.word(),
                "metric used as another kind than it was registered as"
            );
            return None;
        }
        let kind = make();
        match &kind {
            Kind::Counter(f) => {
                debug_assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
                let bare = name.strip_suffix("_total").unwrap_or(name);
                inner.registry.register(bare, help, f.clone());
            }
            Kind::Gauge(f) => inner.registry.register(name, help, f.clone()),
            Kind::Histogram(f) => inner.registry.register(name, help, f.clone()),
        }
        inner.families.insert(name, kind.clone());
        Some(kind)
    }

    fn counter_family(
        &self,
        metric: (&'static str, &'static str),
    ) -> Option<Family<Labels, Counter>> {
        match self.family(
            metric,
            || Kind::Counter(Family::default()),
            |k| matches!(k, Kind::Counter(_)),
        )? {
            Kind::Counter(f) => Some(f),
            _ => None,
        }
    }

    fn gauge_family(
        &self,
        metric: (&'static str, &'static str),
    ) -> Option<Family<Labels, GaugeF64>> {
        match self.family(
            metric,
            || Kind::Gauge(Family::default()),
            |k| matches!(k, Kind::Gauge(_)),
        )? {
            Kind::Gauge(f) => Some(f),
            _ => None,
        }
    }

    pub fn inc(&self, metric: (&'static str, &'static str), pairs: &[(&str, &str)]) {
        self.add(metric, pairs, 1);
    }

    pub fn add(&self, metric: (&'static str, &'static str), pairs: &[(&str, &str)], by: u64) {
        if let Some(f) = self.counter_family(metric) {
            f.get_or_create(&Labels::of(pairs)).inc_by(by);
        }
    }

    pub fn set(&self, metric: (&'static str, &'static str), pairs: &[(&str, &str)], value: f64) {
        if let Some(f) = self.gauge_family(metric) {
            f.get_or_create(&Labels::of(pairs)).set(value);
        }
    }

    /// Removes one series of a metric (e.g. a gauge of a release that ended), so the families
    /// hold only what is live. `true` if there was one.
    pub fn remove(&self, (name, _): (&'static str, &'static str), pairs: &[(&str, &str)]) -> bool {
        let Some(kind) = self.lock().families.get(name).cloned() else {
            return false;
        };
        let labels = Labels::of(pairs);
        match kind {
            Kind::Counter(f) => f.remove(&labels),
            Kind::Gauge(f) => f.remove(&labels),
            Kind::Histogram(f) => f.remove(&labels),
        }
    }

    /// Observes a duration of release work, in a histogram with [`buckets::RELEASE`].
    pub fn observe(
        &self,
        metric: (&'static str, &'static str),
        pairs: &[(&str, &str)],
        d: Duration,
    ) {
        self.observe_in(metric, buckets::RELEASE, pairs, d);
    }

    /// Observes a duration in a histogram with `buckets` (those of its first observation).
    pub fn observe_in(
        &self,
        metric: (&'static str, &'static str),
        buckets: &'static [f64],
        pairs: &[(&str, &str)],
        d: Duration,
    ) {
        let kind = self.family(
            metric,
            || Kind::Histogram(Family::new_with_constructor(Buckets(buckets))),
            |k| matches!(k, Kind::Histogram(_)),
        );
        if let Some(Kind::Histogram(f)) = kind {
            f.get_or_create(&Labels::of(pairs)).observe(d.as_secs_f64());
        }
    }

    /// The value of a counter (by its exported name, with `_total`), for tests and reports.
    pub fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        match self.lock().families.get(name) {
            Some(Kind::Counter(f)) => f.get(&Labels::of(pairs)).map_or(0.0, |c| c.get() as f64),
            _ => 0.0,
        }
    }

    /// The value of a gauge's series, if it has one.
    pub fn gauge(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        match self.lock().families.get(name) {
            Some(Kind::Gauge(f)) => f.get(&Labels::of(pairs)).map(|g| g.get()),
            _ => None,
        }
    }

    /// Renders `other`'s metrics after this registry's own, from now on (e.g. figures that are
    /// kept apart until they are whole). Their names must not be this registry's.
    pub fn include(&self, other: &Metrics) {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return;
        }
        let mut inner = self.lock();
        if !inner
            .included
            .iter()
            .any(|m| Arc::ptr_eq(&m.inner, &other.inner))
        {
            inner.included.push(other.clone());
        }
    }

    /// OpenMetrics text exposition 1.0.0 of this registry and those it includes, `# EOF` last.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let included = {
            let inner = self.lock();
            encode(&mut out, &inner.registry);
            inner.included.clone()
        };
        for other in included {
            encode(&mut out, &other.lock().registry);
        }
        // Writing to a String can't fail.
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

fn encode(out: &mut String, registry: &Registry) {
    if let Err(e) = prometheus_client::encoding::text::encode_registry(out, registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_text_with_the_names_of_today() {
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
        m.observe_in(
            names::HANDLER_SECONDS,
            buckets::HANDLER,
            &[],
            Duration::from_millis(500),
        );
        m.set(names::UP, &[], 1.0);
        let text = m.render();
        assert!(
            text.contains("# TYPE baton_events_received counter"),
            "{text}"
        );
        assert!(
            text.contains("baton_events_received_total{consumer=\"builder-release-requested\"} 2"),
            "{text}"
        );
        assert!(text.contains("baton_dead_letters_total{reason=\"say \\\"hi\\\"\"} 1"));
        assert!(text.contains("# TYPE baton_handler_duration_seconds histogram"));
        assert!(
            text.contains("baton_handler_duration_seconds_sum 0.5\n"),
            "{text}"
        );
        assert!(text.contains("baton_handler_duration_seconds_count 1\n"));
        assert!(text.contains("baton_handler_duration_seconds_bucket{le=\"0.25\"} 0\n"));
        assert!(text.contains("baton_handler_duration_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("baton_handler_duration_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("baton_up 1.0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(
            m.counter(
                "baton_events_received_total",
                &[("consumer", "builder-release-requested")]
            ),
            2.0
        );
    }

    #[test]
    fn release_durations_fall_in_buckets_from_a_tenth_of_a_second_to_an_hour() {
        const D: (&str, &str) = ("baton_test_duration_seconds", "test");
        let m = Metrics::new();
        for s in [0.05, 90.0, 4000.0] {
            m.observe(D, &[("app", "web")], Duration::from_secs_f64(s));
        }
        let text = m.render();
        for (le, n) in [
            ("0.1", 1),
            ("60.0", 1),
            ("120.0", 2),
            ("3600.0", 2),
            ("+Inf", 3),
        ] {
            let line =
                format!("baton_test_duration_seconds_bucket{{le=\"{le}\",app=\"web\"}} {n}\n");
            assert!(text.contains(&line), "{line:?} not in\n{text}");
        }
        assert!(text.contains("baton_test_duration_seconds_count{app=\"web\"} 3\n"));
    }

    #[test]
    fn a_removed_series_is_no_longer_rendered_and_labels_keep_their_order() {
        const G: (&str, &str) = ("baton_test_gauge", "test");
        let m = Metrics::new();
        m.set(G, &[("env", "prod"), ("app", "web")], 3.0);
        m.set(G, &[("env", "prod"), ("app", "api")], 4.0);
        assert!(m
            .render()
            .contains("baton_test_gauge{env=\"prod\",app=\"web\"} 3.0\n"));
        assert!(m.remove(G, &[("env", "prod"), ("app", "web")]));
        assert!(!m.remove(G, &[("env", "prod"), ("app", "web")]));
        let text = m.render();
        assert!(!text.contains("app=\"web\""), "{text}");
        assert!(text.contains("baton_test_gauge{env=\"prod\",app=\"api\"} 4.0\n"));
        assert_eq!(
            m.gauge("baton_test_gauge", &[("env", "prod"), ("app", "api")]),
            Some(4.0)
        );
    }

    #[test]
    fn an_included_registry_is_rendered_before_the_one_eof() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.set(names::UP, &[], 1.0);
        b.inc(names::RELEASES_EXPIRED, &[]);
        assert!(!a.render().contains("baton_releases_expired_total"));
        a.include(&b);
        a.include(&b);
        a.include(&a);
        let text = a.render();
        assert!(text.contains("baton_up 1.0\n"));
        assert_eq!(
            text.matches("baton_releases_expired_total 1\n").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_name_used_as_another_kind_is_left_alone() {
        let m = Metrics::new();
        m.set(names::UP, &[], 1.0);
        m.inc(("baton_up", "wrong"), &[]);
        assert_eq!(m.gauge("baton_up", &[]), Some(1.0));
        assert!(!m.render().contains("baton_up_total"));
    }
}
