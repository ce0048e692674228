//! Validation of payloads from the bus. What an agent acts on must make sense as a whole, or it
//! is refused with a reason (and dead-lettered) before anything is done.

use baton_proto::v1::{check, envelope::Payload, Check, ReleaseSpec, Strategy};

use crate::names::{validate_dns_label, ReleaseId};

const MAX_TEXT: usize = 4096;
const MAX_CHECKS: usize = 64;
const MAX_STEPS: usize = 32;
const MAX_ARGV: usize = 256;

/// Checks a payload's fields; the error names the first bad one.
pub fn payload(payload: &Payload) -> Result<(), String> {
    match payload {
        Payload::ReleaseRequested(r) => match &r.spec {
            Some(spec) => release_spec(spec),
            None => Err("release.requested has no spec".into()),
        },
        Payload::RollbackRequested(r) => {
            validate_dns_label("app name", &r.app).map_err(|e| format!("app: {e}"))?;
            validate_dns_label("environment name", &r.env).map_err(|e| format!("env: {e}"))?;
            if !r.namespace.is_empty() {
                validate_dns_label("namespace", &r.namespace)
                    .map_err(|e| format!("namespace: {e}"))?;
            }
            if !r.target_release_id.is_empty() {
                ReleaseId::parse(&r.target_release_id)
                    .map_err(|e| format!("target_release_id: {e}"))?;
            }
            text("reason", &r.reason)
        }
        Payload::ReleaseAbortRequested(a) => text("reason", &a.reason),
        Payload::ReleasePauseRequested(p) => text("reason", &p.reason),
        Payload::ReleaseQueued(q) => {
            ReleaseId::parse(&q.blocking_release_id)
                .map_err(|e| format!("blocking_release_id: {e}"))?;
            Ok(())
        }
        Payload::BuildSucceeded(b) => {
            if b.image_ref.is_empty() || !b.digest.starts_with("sha256:") {
                return Err("build.succeeded needs an image_ref and a sha256 digest".into());
            }
            text("image_ref", &b.image_ref)
        }
        Payload::DeployStepStarted(s) => step_weight(s.weight),
        Payload::DeployStepReady(s) => step_weight(s.weight),
        _ => Ok(()),
    }
}

/// Checks a release spec as carried by `release.requested`.
pub fn release_spec(spec: &ReleaseSpec) -> Result<(), String> {
    validate_dns_label("app name", &spec.app).map_err(|e| format!("spec.app: {e}"))?;
    validate_dns_label("environment name", &spec.env).map_err(|e| format!("spec.env: {e}"))?;
    validate_dns_label("namespace", &spec.namespace).map_err(|e| format!("spec.namespace: {e}"))?;
    if !spec.cluster.is_empty() {
        validate_dns_label("cluster name", &spec.cluster)
            .map_err(|e| format!("spec.cluster: {e}"))?;
    }
    if !spec.container.is_empty() {
        validate_dns_label("container name", &spec.container)
            .map_err(|e| format!("spec.container: {e}"))?;
    }
    image_reference(&spec.image).map_err(|e| format!("spec.image: {e}"))?;
    if Strategy::try_from(spec.strategy).is_err() {
        return Err(format!("spec.strategy: unknown strategy {}", spec.strategy));
    }
    if spec.port > 65535 {
        return Err(format!("spec.port: {} is not a TCP port", spec.port));
    }
    if let Some(canary) = &spec.canary {
        if canary.steps.len() > MAX_STEPS {
            return Err(format!("spec.canary.steps: more than {MAX_STEPS} steps"));
        }
        let mut last = 0;
        for (i, step) in canary.steps.iter().enumerate() {
            weight(step.weight).map_err(|e| format!("spec.canary.steps[{i}]: {e}"))?;
            if step.weight <= last {
                return Err(format!("spec.canary.steps[{i}]: weights must increase"));
            }
            last = step.weight;
        }
    }
    if spec.checks.len() > MAX_CHECKS {
        return Err(format!("spec.checks: more than {MAX_CHECKS} checks"));
    }
    for (i, c) in spec.checks.iter().enumerate() {
        check(c).map_err(|e| format!("spec.checks[{i}]: {e}"))?;
        if spec.checks[..i].iter().any(|other| other.name == c.name) {
            return Err(format!(
                "spec.checks[{i}]: the name {:?} is used twice",
                c.name
            ));
        }
    }
    if let Some(build) = &spec.build {
        if build.argv.len() > MAX_ARGV {
            return Err(format!("spec.build.argv: more than {MAX_ARGV} arguments"));
        }
        for a in &build.argv {
            text("spec.build.argv", a)?;
        }
    }
    text("spec.commit", &spec.commit)?;
    if !spec.ingress.is_empty() {
        validate_dns_label("ingress name", &spec.ingress)
            .map_err(|e| format!("spec.ingress: {e}"))?;
    }
    if !spec.http_route.is_empty() {
        validate_dns_label("HTTPRoute name", &spec.http_route)
            .map_err(|e| format!("spec.http_route: {e}"))?;
    }
    if !spec.ingress.is_empty() && !spec.http_route.is_empty() {
        return Err("spec.ingress and spec.http_route: a canary's traffic is split by one router, set one of them".into());
    }
    Ok(())
}

fn check(c: &Check) -> Result<(), String> {
    text("name", &c.name)?;
    match &c.kind {
        None => Err("check has no kind (http, latency, smoke, prometheus or webhook)".into()),
        Some(check::Kind::Http(h)) => {
            path(&h.path)?;
            if h.expect_status != 0 && !(100..=599).contains(&h.expect_status) {
                return Err(format!(
                    "expect_status {} is not an HTTP status",
                    h.expect_status
                ));
            }
            if !(h.url.is_empty() || h.url.starts_with("http://") || h.url.starts_with("https://"))
            {
                return Err(format!("url {:?} is not an http(s) URL", h.url));
            }
            text("url", &h.url)?;
            text("body_contains", &h.body_contains)
        }
        Some(check::Kind::Latency(l)) => {
            path(&l.path)?;
            if !(l.percentile > 0.0 && l.percentile <= 100.0) {
                return Err(format!("percentile {} is not in (0, 100]", l.percentile));
            }
            if l.threshold_ms == 0 {
                return Err("latency check needs a threshold".into());
            }
            if !(0.0..=1.0).contains(&l.max_error_rate) {
                return Err(format!(
                    "max_error_rate {} is not in [0, 1]",
                    l.max_error_rate
                ));
            }
            Ok(())
        }
        Some(check::Kind::Smoke(s)) => {
            if s.argv.is_empty() || s.argv[0].is_empty() {
                return Err("smoke check needs an argv with a program".into());
            }
            if s.argv.len() > MAX_ARGV {
                return Err(format!("smoke argv has more than {MAX_ARGV} arguments"));
            }
            s.argv.iter().try_for_each(|a| text("argv", a))
        }
        Some(check::Kind::Prometheus(p)) => {
            http_url("address", &p.address)?;
            crate::metric::check_query(&p.query).map_err(|e| format!("query {e}"))?;
            judgement(p.judgement.as_ref())
        }
        Some(check::Kind::Webhook(w)) => {
            http_url("url", &w.url)?;
            crate::metric::field_path(&w.field).map_err(|e| format!("field {e}"))?;
            judgement(w.judgement.as_ref())
        }
    }
}

fn http_url(field: &str, url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{field} {url:?} is not an http(s) URL"));
    }
    text(field, url)
}

fn judgement(j: Option<&baton_proto::v1::MetricJudgement>) -> Result<(), String> {
    let j = j.ok_or("a metric check needs a judgement (its condition)")?;
    crate::metric::Condition::parse(&j.condition).map_err(|e| format!("condition: {e}"))?;
    crate::metric::Aggregate::parse(&j.aggregate).map_err(|e| format!("aggregate: {e}"))?;
    if j.error_limit > crate::metric::MAX_ERROR_LIMIT {
        return Err(format!(
            "error_limit {} is more than {}",
            j.error_limit,
            crate::metric::MAX_ERROR_LIMIT
        ));
    }
    let max_ms = crate::limits::MAX_REQUEST_TIMEOUT.as_millis();
    if u128::from(j.timeout_ms) > max_ms {
        return Err(format!(
            "timeout {} ms is more than {max_ms} ms",
            j.timeout_ms
        ));
    }
    Ok(())
}

/// A step's share of the traffic: 0 for a step that takes none (blue-green's preview).
fn step_weight(w: u32) -> Result<(), String> {
    if w <= 100 {
        Ok(())
    } else {
        Err(format!("weight {w} is not in 0..=100"))
    }
}

fn weight(w: u32) -> Result<(), String> {
    if (1..=100).contains(&w) {
        Ok(())
    } else {
        Err(format!("weight {w} is not in 1..=100"))
    }
}

fn path(p: &str) -> Result<(), String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(format!("path {p:?} must start with '/'"));
    }
    text("path", p)
}

fn text(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_TEXT {
        return Err(format!("{field} is longer than {MAX_TEXT} bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

/// Checks an image reference's shape: `[host[:port]/]path[:tag][@sha256:<64 hex>]`.
pub fn image_reference(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("image is empty".into());
    }
    if image.len() > 512 {
        return Err("image reference is longer than 512 bytes".into());
    }
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let hex = d
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest {d:?} is not sha256:<hex>"))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest {d:?} is not sha256 followed by 64 lowercase hex digits"
            ));
        }
    }
    // A tag is after the last ':' that follows the last '/'.
    let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !tag.starts_with(['.', '-']);
        if !ok {
            return Err(format!("tag {tag:?} is not a valid image tag"));
        }
    }
    let mut parts = name.split('/').peekable();
    let mut first = true;
    while let Some(part) = parts.next() {
        let is_host = first
            && parts.peek().is_some()
            && (part.contains('.') || part.contains(':') || part == "localhost");
        first = false;
        let ok = if is_host {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        } else {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !ok {
            return Err(format!(
                "{part:?} in {image:?} is not a valid repository name component"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_specs_with_unusable_checks_are_refused() {
        use baton_proto::v1::{HttpCheck, LatencyCheck};
        let base = ReleaseSpec {
            app: "web".into(),
            env: "staging".into(),
            namespace: "web".into(),
            image: "web:v1".into(),
            ..Default::default()
        };
        let http = |name: &str, url: &str| Check {
            name: name.into(),
            kind: Some(check::Kind::Http(HttpCheck {
                path: "/health".into(),
                url: url.into(),
                ..Default::default()
            })),
        };
        let latency = |threshold_ms| Check {
            name: "p95".into(),
            kind: Some(check::Kind::Latency(LatencyCheck {
                percentile: 95.0,
                threshold_ms,
                ..Default::default()
            })),
        };
        let metric = |condition: &str| {
            Some(baton_proto::v1::MetricJudgement {
                condition: condition.into(),
                ..Default::default()
            })
        };
        let prometheus = |address: &str, query: &str, condition: &str| Check {
            name: "rate".into(),
            kind: Some(check::Kind::Prometheus(baton_proto::v1::PrometheusCheck {
                address: address.into(),
                query: query.into(),
                judgement: metric(condition),
            })),
        };
        let webhook = |field: &str, judgement| Check {
            name: "judge".into(),
            kind: Some(check::Kind::Webhook(baton_proto::v1::WebhookCheck {
                url: "http://judge:80".into(),
                field: field.into(),
                judgement,
            })),
        };
        let cases = [
            (vec![http("a", ""), latency(100)], None),
            (
                vec![prometheus("http://p:9090", "up{pod=~\"{{pods}}\"}", "< 1")],
                None,
            ),
            (vec![webhook("result.score", metric(">= 0.9"))], None),
            (
                vec![prometheus("p:9090", "up", "< 1")],
                Some("not an http(s) URL"),
            ),
            (
                vec![prometheus("http://p:9090", " ", "< 1")],
                Some("query is empty"),
            ),
            (
                vec![prometheus("http://p:9090", "{{token}}", "< 1")],
                Some("not a variable"),
            ),
            (
                vec![prometheus("http://p:9090", "up", "about 1")],
                Some("condition"),
            ),
            (vec![webhook("a..b", metric("< 1"))], Some("field")),
            (vec![webhook("ok", None)], Some("needs a judgement")),
            (vec![http("a", ""), http("a", "")], Some("used twice")),
            (vec![latency(0)], Some("needs a threshold")),
            (vec![http("a", "ftp://x")], Some("not an http(s) URL")),
        ];
        for (checks, why) in cases {
            let spec = ReleaseSpec {
                checks,
                ..base.clone()
            };
            match (release_spec(&spec), why) {
                (Ok(()), None) => {}
                (Err(e), Some(why)) => assert!(e.contains(why), "{e}"),
                (got, want) => panic!("{got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn image_references_are_checked() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let good = [
            "nginx".to_string(),
            "nginx:1.25".into(),
            "library/nginx:latest".into(),
            "127.0.0.1:5000/web:v1".into(),
            "localhost/web".into(),
            "registry.example.com/team/web:v1.2.3".into(),
            format!("127.0.0.1:5000/web@{digest}"),
            format!("web:v1@{digest}"),
        ];
        for g in &good {
            assert!(image_reference(g).is_ok(), "{g}: {:?}", image_reference(g));
        }
        let bad = [
            "",
            "Web:v1",
            "web:",
            "web:-x",
            "web@sha256:123",
            "web@md5:abc",
            "/web",
            "web//x",
            "web v1",
            "web:v1;rm -rf /",
        ];
        for b in bad {
            assert!(image_reference(b).is_err(), "{b:?} should be refused");
        }
    }
}
