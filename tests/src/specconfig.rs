//! A release spec written back as the configuration that resolves to it (the inverse of
//! `Config::resolve`), for tests that start from a hand-made spec: see [`crate::BusEnv::configured`].
//! Zero and empty fields are left out, so the configuration's defaults apply to them.

use baton_proto::v1::{check, ReleaseSpec, Strategy};
use serde_json::{json, Map, Value};

fn ms(v: u32) -> Value {
    Value::String(format!("{v}ms"))
}

fn secs(v: u32) -> Value {
    Value::String(format!("{v}s"))
}

fn put(map: &mut Map<String, Value>, key: &str, value: Value, set: bool) {
    if set {
        map.insert(key.to_owned(), value);
    }
}

fn strategy(s: i32) -> Option<&'static str> {
    match Strategy::try_from(s).ok()? {
        Strategy::Rolling => Some("rolling"),
        Strategy::Canary => Some("canary"),
        Strategy::BlueGreen => Some("blue-green"),
        Strategy::Unspecified => None,
    }
}

/// `environments.<env>` of a spec.
pub fn environment_of(spec: &ReleaseSpec) -> Value {
    json!({
        "cluster": if spec.cluster.is_empty() { crate::CLUSTER.to_owned() } else { spec.cluster.clone() },
        "namespace": spec.namespace.clone(),
        "rollback_on_failure": spec.rollback_on_failure,
    })
}

fn analysis(a: &baton_proto::v1::AnalysisParams) -> Map<String, Value> {
    let mut m = Map::new();
    put(
        &mut m,
        "duration",
        secs(a.duration_seconds),
        a.duration_seconds > 0,
    );
    put(
        &mut m,
        "interval",
        secs(a.interval_seconds),
        a.interval_seconds > 0,
    );
    // 0 is a limit of its own (fail on the first failed round), not "unset".
    m.insert("failure_limit".into(), json!(a.failure_limit));
    m
}

/// `apps.<app>` of a spec.
pub fn app_settings_of(spec: &ReleaseSpec) -> Value {
    let mut app = Map::new();
    put(
        &mut app,
        "container",
        json!(spec.container),
        !spec.container.is_empty(),
    );
    put(&mut app, "port", json!(spec.port), spec.port > 0);
    if let Some(s) = strategy(spec.strategy) {
        app.insert("strategy".into(), json!(s));
    }
    if let Some(r) = &spec.rolling {
        let mut m = Map::new();
        put(
            &mut m,
            "max_surge",
            json!(r.max_surge),
            !r.max_surge.is_empty(),
        );
        put(
            &mut m,
            "max_unavailable",
            json!(r.max_unavailable),
            !r.max_unavailable.is_empty(),
        );
        put(&mut app, "rolling", Value::Object(m.clone()), !m.is_empty());
    }
    if let Some(c) = spec.canary.as_ref().filter(|c| !c.steps.is_empty()) {
        let steps: Vec<Value> = c
            .steps
            .iter()
            .map(|s| {
                let mut m = Map::new();
                m.insert("weight".into(), json!(s.weight));
                if s.pause_until_promoted {
                    m.insert("pause".into(), json!("until-promoted"));
                } else if s.pause_seconds > 0 {
                    m.insert("pause".into(), secs(s.pause_seconds));
                }
                if let Some(a) = &s.analysis {
                    let a = analysis(a);
                    put(&mut m, "analysis", Value::Object(a.clone()), !a.is_empty());
                }
                Value::Object(m)
            })
            .collect();
        app.insert("canary".into(), json!({ "steps": steps }));
    }
    if let Some(b) = &spec.blue_green {
        let mut m = Map::new();
        put(
            &mut m,
            "scale_down_delay",
            secs(b.scale_down_delay_seconds),
            b.scale_down_delay_seconds > 0,
        );
        m.insert(
            "post_promotion_analysis".into(),
            json!(b.post_promotion_analysis),
        );
        m.insert("auto_promote".into(), json!(!b.manual_promotion));
        app.insert("blue_green".into(), Value::Object(m));
    }
    put(
        &mut app,
        "step_timeout",
        secs(spec.step_timeout_seconds),
        spec.step_timeout_seconds > 0,
    );
    put(
        &mut app,
        "deadline_margin",
        secs(spec.deadline_margin_seconds),
        spec.deadline_margin_seconds > 0,
    );
    if let Some(a) = &spec.analysis {
        let a = analysis(a);
        put(
            &mut app,
            "analysis",
            Value::Object(a.clone()),
            !a.is_empty(),
        );
    }
    if !spec.checks.is_empty() {
        let checks: Vec<Value> = spec.checks.iter().map(check_of).collect();
        app.insert("checks".into(), Value::Array(checks));
    }
    if let Some(b) = spec.build.as_ref().filter(|b| !b.argv.is_empty()) {
        let mut m = Map::new();
        m.insert("argv".into(), json!(b.argv));
        put(
            &mut m,
            "timeout",
            secs(b.timeout_seconds),
            b.timeout_seconds > 0,
        );
        app.insert("build".into(), Value::Object(m));
    }
    put(
        &mut app,
        "ingress",
        json!(spec.ingress),
        !spec.ingress.is_empty(),
    );
    Value::Object(app)
}

fn check_of(c: &baton_proto::v1::Check) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(c.name));
    match &c.kind {
        Some(check::Kind::Http(h)) => {
            let mut k = Map::new();
            put(&mut k, "path", json!(h.path), !h.path.is_empty());
            put(
                &mut k,
                "expect_status",
                json!(h.expect_status),
                h.expect_status > 0,
            );
            put(
                &mut k,
                "body_contains",
                json!(h.body_contains),
                !h.body_contains.is_empty(),
            );
            put(&mut k, "timeout", ms(h.timeout_ms), h.timeout_ms > 0);
            put(&mut k, "retries", json!(h.retries), h.retries > 0);
            put(&mut k, "interval", ms(h.interval_ms), h.interval_ms > 0);
            put(&mut k, "url", json!(h.url), !h.url.is_empty());
            put(&mut k, "port", json!(h.port), h.port > 0);
            m.insert("http".into(), Value::Object(k));
        }
        Some(check::Kind::Latency(l)) => {
            let mut k = Map::new();
            put(&mut k, "path", json!(l.path), !l.path.is_empty());
            put(&mut k, "requests", json!(l.requests), l.requests > 0);
            put(
                &mut k,
                "percentile",
                json!(l.percentile),
                l.percentile > 0.0,
            );
            put(&mut k, "threshold", ms(l.threshold_ms), l.threshold_ms > 0);
            put(
                &mut k,
                "max_error_rate",
                json!(l.max_error_rate),
                l.max_error_rate > 0.0,
            );
            put(&mut k, "port", json!(l.port), l.port > 0);
            m.insert("latency".into(), Value::Object(k));
        }
        Some(check::Kind::Smoke(s)) => {
            let mut k = Map::new();
            k.insert("argv".into(), json!(s.argv));
            put(&mut k, "timeout", ms(s.timeout_ms), s.timeout_ms > 0);
            m.insert("smoke".into(), Value::Object(k));
        }
        Some(check::Kind::Prometheus(p)) => {
            let mut k = judgement(p.judgement.as_ref());
            k.insert("address".into(), json!(p.address));
            k.insert("query".into(), json!(p.query));
            m.insert("prometheus".into(), Value::Object(k));
        }
        Some(check::Kind::Webhook(w)) => {
            let mut k = judgement(w.judgement.as_ref());
            k.insert("url".into(), json!(w.url));
            k.insert("field".into(), json!(w.field));
            m.insert("webhook".into(), Value::Object(k));
        }
        None => {}
    }
    Value::Object(m)
}

/// A metric check's judgement as configuration fields.
fn judgement(j: Option<&baton_proto::v1::MetricJudgement>) -> Map<String, Value> {
    let mut k = Map::new();
    let Some(j) = j else { return k };
    k.insert("condition".into(), json!(j.condition));
    put(
        &mut k,
        "aggregate",
        json!(j.aggregate),
        !j.aggregate.is_empty(),
    );
    k.insert("error_limit".into(), json!(j.error_limit));
    put(
        &mut k,
        "on_error",
        json!("inconclusive"),
        j.inconclusive_on_error,
    );
    put(&mut k, "timeout", ms(j.timeout_ms), j.timeout_ms > 0);
    k
}
