use std::time::{Duration, UNIX_EPOCH};

use super::*;

const FULL: &str = r#"
environments:
  staging:
    cluster: sandbox
    namespace: shop-staging
    strategy: rolling
  production:
    cluster: prod-eu
    namespace: shop
    rollback_on_failure: true
apps:
  web:
    container: app
    port: 8080
    strategy: canary
    rolling: {max_surge: "25%", max_unavailable: "0"}
    canary: {steps: [{weight: 10}, {weight: 50, pause: 5m}, {weight: 100, pause: until-promoted}]}
    blue_green: {scale_down_delay: 5m, post_promotion_analysis: true, auto_promote: false}
    step_timeout: 5m
    analysis: {duration: 30s, interval: 5s, failure_limit: 1}
    checks:
      - name: health
        http: {path: /health, expect_status: 200, body_contains: ok, timeout: 2s, retries: 3, interval: 1s, url: "", port: 8080}
      - name: p95
        latency: {path: /health, requests: 50, percentile: 95, threshold: 250ms, max_error_rate: 0.01}
      - name: smoke
        smoke: {argv: ["/usr/local/bin/smoke", "--quick"], timeout: 30s}
    build: {argv: ["make", "image", "TAG={image}"], timeout: 15m}
    ingress: web
    environments:
      production: {analysis: {duration: 2m}, step_timeout: 10m}
  api:
    port: 9000
"#;

/// A small valid file; tests append to it or replace parts of it.
const BASE: &str = "environments:
  staging: {cluster: sandbox, namespace: shop-staging}
  production: {cluster: prod-eu, namespace: shop}
apps:
  web:
";

fn image() -> Overrides {
    Overrides {
        image: "registry.example.com/web:v2".into(),
        ..Default::default()
    }
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that `text` is refused with a problem at `path` whose message contains `message`.
#[track_caller]
fn refused(text: &str, path: &str, message: &str) {
    let found = problems(text);
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    let shown: String = text.chars().take(2000).collect();
    assert!(
        found
            .iter()
            .any(|p| p.starts_with(&prefix) && p.contains(message)),
        "expected a problem `{prefix}…{message}…` for\n{shown}\nfound: {found:#?}"
    );
}

fn app_field(extra: &str) -> String {
    format!("{BASE}    {}\n", extra.replace('\n', "\n    "))
}

#[test]
fn the_full_example_parses_and_resolves_every_field() {
    let config = parse(FULL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.environments().keys().collect::<Vec<_>>(),
        ["production", "staging"]
    );
    assert_eq!(config.apps().keys().collect::<Vec<_>>(), ["api", "web"]);

    let spec = config.resolve("web", "production", &image()).unwrap();
    assert_eq!(spec.app, "web");
    assert_eq!(spec.env, "production");
    assert_eq!(spec.cluster, "prod-eu");
    assert_eq!(spec.namespace, "shop");
    assert_eq!(spec.image, "registry.example.com/web:v2");
    assert_eq!(spec.container, "app");
    assert_eq!(spec.port, 8080);
    assert_eq!(spec.strategy, Strategy::Canary as i32);
    assert!(spec.rollback_on_failure);
    assert_eq!(
        spec.step_timeout_seconds, 600,
        "production overrides 5m with 10m"
    );
    let analysis = spec.analysis.unwrap();
    assert_eq!(
        (
            analysis.duration_seconds,
            analysis.interval_seconds,
            analysis.failure_limit
        ),
        (120, 5, 1),
        "the override's duration is merged with the app's interval and failure limit"
    );
    let rolling = spec.rolling.clone().unwrap();
    assert_eq!(
        (rolling.max_surge.as_str(), rolling.max_unavailable.as_str()),
        ("25%", "0")
    );
    let steps = spec.canary.clone().unwrap().steps;
    assert_eq!(
        steps,
        vec![
            CanaryStep {
                weight: 10,
                pause_seconds: 0,
                pause_until_promoted: false,
                ..Default::default()
            },
            CanaryStep {
                weight: 50,
                pause_seconds: 300,
                pause_until_promoted: false,
                ..Default::default()
            },
            CanaryStep {
                weight: 100,
                pause_seconds: 0,
                pause_until_promoted: true,
                ..Default::default()
            },
        ]
    );
    assert!(
        spec.blue_green.is_none(),
        "only the chosen strategy's parameters are carried"
    );
    let bg = config
        .resolve(
            "web",
            "production",
            &Overrides {
                strategy: Some(Strategy::BlueGreen),
                ..image()
            },
        )
        .unwrap();
    assert_eq!(
        bg.blue_green,
        Some(BlueGreenParams {
            scale_down_delay_seconds: 300,
            post_promotion_analysis: true,
            manual_promotion: true,
        }),
        "auto_promote: false is a manual promotion"
    );
    assert_eq!(spec.checks.len(), 3);
    assert_eq!(
        spec.checks[0],
        Check {
            name: "health".into(),
            kind: Some(check::Kind::Http(HttpCheck {
                path: "/health".into(),
                expect_status: 200,
                body_contains: "ok".into(),
                timeout_ms: 2000,
                retries: 3,
                interval_ms: 1000,
                url: String::new(),
                port: 8080,
            })),
        }
    );
    assert_eq!(
        spec.checks[1].kind,
        Some(check::Kind::Latency(LatencyCheck {
            path: "/health".into(),
            requests: 50,
            percentile: 95.0,
            threshold_ms: 250,
            max_error_rate: 0.01,
            port: 8080,
        }))
    );
    assert_eq!(
        spec.checks[2].kind,
        Some(check::Kind::Smoke(SmokeCheck {
            argv: vec!["/usr/local/bin/smoke".into(), "--quick".into()],
            timeout_ms: 30_000,
        }))
    );
    assert_eq!(
        spec.build,
        Some(BuildParams {
            argv: vec!["make".into(), "image".into(), "TAG={image}".into()],
            timeout_seconds: 900,
        })
    );
    assert_eq!(spec.ingress, "web");
    assert_eq!(spec.config_revision, 0);
    assert!(crate::validate::release_spec(&spec).is_ok());
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let config = parse(BASE).unwrap();
    let spec = config.resolve("web", "staging", &image()).unwrap();
    assert_eq!(
        spec.container, "web",
        "the container defaults to the app name"
    );
    assert_eq!(spec.port, 8080);
    assert_eq!(spec.strategy, Strategy::Rolling as i32);
    assert!(spec.rollback_on_failure);
    assert_eq!(spec.step_timeout_seconds, 300);
    let rolling = spec.rolling.unwrap();
    assert_eq!(
        (rolling.max_surge.as_str(), rolling.max_unavailable.as_str()),
        ("25%", "0")
    );
    assert_eq!(
        spec.analysis,
        Some(AnalysisParams {
            duration_seconds: 30,
            interval_seconds: 5,
            failure_limit: 1
        })
    );
    assert!(spec.checks.is_empty());
    assert!(
        spec.build.is_none(),
        "no build: the pushed image is resolved"
    );
    assert!(spec.canary.is_none() && spec.blue_green.is_none());
    assert_eq!(spec.ingress, "");

    let canary = config
        .resolve(
            "web",
            "staging",
            &Overrides {
                strategy: Some(Strategy::Canary),
                ..image()
            },
        )
        .unwrap();
    let weights: Vec<u32> = canary
        .canary
        .unwrap()
        .steps
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(weights, DEFAULT_CANARY_WEIGHTS);

    let bg = config
        .resolve(
            "web",
            "staging",
            &Overrides {
                strategy: Some(Strategy::BlueGreen),
                ..image()
            },
        )
        .unwrap();
    assert_eq!(
        bg.blue_green,
        Some(BlueGreenParams {
            scale_down_delay_seconds: 300,
            post_promotion_analysis: true,
            manual_promotion: false,
        })
    );
}

#[test]
fn check_defaults_and_check_ports_follow_the_app_port() {
    let text = app_field(
        "port: 9000\nchecks:\n  - name: h\n    http: {}\n  - name: l\n    latency: {threshold: 1s, port: 9100}\n  - name: s\n    smoke: {argv: [/bin/true]}",
    );
    let spec = parse(&text)
        .unwrap_or_else(|e| panic!("{e}"))
        .resolve("web", "staging", &image())
        .unwrap();
    assert_eq!(
        spec.checks[0].kind,
        Some(check::Kind::Http(HttpCheck {
            path: "/".into(),
            expect_status: 200,
            body_contains: String::new(),
            timeout_ms: 2000,
            retries: 3,
            interval_ms: 1000,
            url: String::new(),
            port: 9000,
        }))
    );
    assert_eq!(
        spec.checks[1].kind,
        Some(check::Kind::Latency(LatencyCheck {
            path: "/".into(),
            requests: 20,
            percentile: 95.0,
            threshold_ms: 1000,
            max_error_rate: 0.0,
            port: 9100,
        }))
    );
    assert_eq!(
        spec.checks[2].kind,
        Some(check::Kind::Smoke(SmokeCheck {
            argv: vec!["/bin/true".into()],
            timeout_ms: 30_000
        }))
    );
}

/// App strategy, environment strategy, the app's override for the environment, the request's
/// strategy, and the strategy that results.
type Layers = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<Strategy>,
    Strategy,
);

#[test]
fn layers_apply_in_order_app_then_environment_then_app_environment_then_request() {
    // (app strategy, environment strategy, app override for the environment, request) → result
    let table: &[Layers] = &[
        (None, None, None, None, Strategy::Rolling),
        (Some("canary"), None, None, None, Strategy::Canary),
        (
            Some("canary"),
            Some("blue-green"),
            None,
            None,
            Strategy::BlueGreen,
        ),
        (None, Some("blue-green"), None, None, Strategy::BlueGreen),
        (
            Some("canary"),
            Some("blue-green"),
            Some("rolling"),
            None,
            Strategy::Rolling,
        ),
        (
            Some("canary"),
            Some("blue-green"),
            Some("rolling"),
            Some(Strategy::Canary),
            Strategy::Canary,
        ),
        (
            None,
            None,
            None,
            Some(Strategy::BlueGreen),
            Strategy::BlueGreen,
        ),
        (
            Some("blue-green"),
            None,
            None,
            Some(Strategy::Unspecified),
            Strategy::BlueGreen,
        ),
    ];
    for (app, env, app_env, request, want) in table {
        let mut text =
            String::from("environments:\n  staging:\n    cluster: sandbox\n    namespace: s\n");
        if let Some(e) = env {
            text.push_str(&format!("    strategy: {e}\n"));
        }
        text.push_str("apps:\n  web:\n    port: 8080\n");
        if let Some(a) = app {
            text.push_str(&format!("    strategy: {a}\n"));
        }
        if let Some(o) = app_env {
            text.push_str(&format!(
                "    environments:\n      staging: {{strategy: {o}}}\n"
            ));
        }
        let config = parse(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let spec = config
            .resolve(
                "web",
                "staging",
                &Overrides {
                    strategy: *request,
                    ..image()
                },
            )
            .unwrap();
        assert_eq!(
            spec.strategy, *want as i32,
            "app {app:?}, env {env:?}, app-env {app_env:?}, request {request:?}"
        );
    }
}

#[test]
fn environment_overrides_touch_only_their_environment_and_merge_nested_settings() {
    let text = "environments:
  staging: {cluster: sandbox, namespace: s, rollback_on_failure: false}
  production: {cluster: prod, namespace: p}
apps:
  web:
    port: 8080
    rolling: {max_surge: 1, max_unavailable: \"10%\"}
    analysis: {duration: 1m, interval: 10s, failure_limit: 2}
    checks:
      - {name: a, http: {path: /a}}
    environments:
      production:
        port: 8443
        rolling: {max_unavailable: 0}
        analysis: {failure_limit: 0}
        checks:
          - {name: b, http: {path: /b}}
";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let staging = config.resolve("web", "staging", &image()).unwrap();
    let production = config.resolve("web", "production", &image()).unwrap();

    assert!(
        !staging.rollback_on_failure,
        "the environment turns rollback off"
    );
    assert!(production.rollback_on_failure, "on by default");
    assert_eq!((staging.port, production.port), (8080, 8443));
    assert_eq!(
        staging
            .rolling
            .as_ref()
            .map(|r| (r.max_surge.as_str(), r.max_unavailable.as_str())),
        Some(("1", "10%"))
    );
    assert_eq!(
        production
            .rolling
            .as_ref()
            .map(|r| (r.max_surge.as_str(), r.max_unavailable.as_str())),
        Some(("1", "0"))
    );
    assert_eq!(
        production.analysis,
        Some(AnalysisParams {
            duration_seconds: 60,
            interval_seconds: 10,
            failure_limit: 0
        })
    );
    let names = |s: &ReleaseSpec| s.checks.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&staging), ["a"]);
    assert_eq!(names(&production), ["b"], "lists are replaced whole");
    let port = |s: &ReleaseSpec| match &s.checks[0].kind {
        Some(check::Kind::Http(h)) => h.port,
        _ => 0,
    };
    assert_eq!((port(&staging), port(&production)), (8080, 8443));
}

#[test]
fn request_overrides_set_the_image_commit_and_commit_time() {
    let config = parse(BASE).unwrap().with_revision(7);
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let spec = config
        .resolve(
            "web",
            "production",
            &Overrides {
                image: "web:v3".into(),
                strategy: None,
                commit: Some("abc123".into()),
                commit_time: Some(at),
                canary_steps: None,
            },
        )
        .unwrap();
    assert_eq!(spec.image, "web:v3");
    assert_eq!(spec.commit, "abc123");
    assert_eq!(spec.commit_time.map(|t| t.seconds), Some(1_700_000_000));
    assert_eq!(spec.config_revision, 7);
}

#[test]
fn resolving_an_unknown_app_or_environment_names_the_known_ones() {
    let config = parse(BASE).unwrap();
    let e = config.resolve("shop", "staging", &image()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "app: no app \"shop\" in the configuration (known: web)"
    );
    let e = config.resolve("web", "prod", &image()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment: no environment \"prod\" in the configuration (known: production, staging)"
    );
    let e = config.resolve("shop", "prod", &image()).unwrap_err();
    assert_eq!(e.len(), 2, "both are named: {e}");
}

#[test]
fn a_bad_image_in_the_request_is_refused_by_the_release_spec_check() {
    let config = parse(BASE).unwrap();
    for image in ["", "Web:v1", "web:v1;rm -rf /"] {
        let e = config
            .resolve(
                "web",
                "staging",
                &Overrides {
                    image: image.into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("spec.image"), "{image:?}: {e}");
    }
}

#[test]
fn every_validation_rule_names_its_field() {
    let env = |extra: &str| {
        format!("environments:\n  staging: {{cluster: sandbox, namespace: s{extra}}}\napps: {{}}\n")
    };
    let table: Vec<(String, &str, &str)> = vec![
        // the file as a whole
        ("".into(), "", "the file is empty"),
        ("[1, 2]".into(), "", "must be a mapping"),
        ("environments: {a: {cluster: c, namespace: n}}\nversion: 2\n".into(), "version", "unknown field"),
        ("apps: {}\n".into(), "environments", "required"),
        ("environments: {}\n".into(), "environments", "at least one environment"),
        ("environments: [a]\n".into(), "environments", "mapping of names"),
        ("environments: {a: {cluster: c, namespace: n}}\napps: [web]\n".into(), "apps", "mapping of names"),
        ("a: [\n".into(), "", "not valid YAML"),
        // environments
        ("environments:\n  Prod: {cluster: c, namespace: n}\n".into(), "environments.Prod", "not a DNS label"),
        ("environments:\n  staging: {namespace: n}\n".into(), "environments.staging.cluster", "required"),
        ("environments:\n  staging: {cluster: c}\n".into(), "environments.staging.namespace", "required"),
        ("environments:\n  staging:\n".into(), "environments.staging.cluster", "required"),
        (env(", colour: blue"), "environments.staging.colour", "unknown field"),
        ("environments:\n  staging: {cluster: Sandbox, namespace: n}\n".into(), "environments.staging.cluster", "not a DNS label"),
        ("environments:\n  staging: {cluster: c, namespace: shop_staging}\n".into(), "environments.staging.namespace", "not a DNS label"),
        (format!("environments:\n  staging: {{cluster: c, namespace: {}}}\n", "a".repeat(64)), "environments.staging.namespace", "longer than 63"),
        (env(", rollback_on_failure: yes"), "environments.staging.rollback_on_failure", "true or false"),
        (env(", strategy: big-bang"), "environments.staging.strategy", "unknown strategy"),
        ("environments:\n  staging: 3\n".into(), "environments.staging", "must be a mapping"),
        // apps
        (format!("{BASE}  Web: {{}}\n"), "apps.Web", "not a DNS label"),
        (app_field("colour: blue"), "apps.web.colour", "unknown field"),
        (app_field("container: App"), "apps.web.container", "not a DNS label"),
        (app_field("ingress: web_in"), "apps.web.ingress", "not a DNS label"),
        (app_field("port: 0"), "apps.web.port", "TCP port"),
        (app_field("port: 70000"), "apps.web.port", "TCP port"),
        (app_field("port: \"80\""), "apps.web.port", "TCP port"),
        (app_field("strategy: recreate"), "apps.web.strategy", "unknown strategy"),
        (app_field("step_timeout: 5"), "apps.web.step_timeout", "duration"),
        (app_field("step_timeout: 5 minutes"), "apps.web.step_timeout", "not a duration"),
        (app_field("step_timeout: 1500ms"), "apps.web.step_timeout", "whole number of seconds"),
        (app_field("step_timeout: 0s"), "apps.web.step_timeout", "longer than 0"),
        // rolling
        (app_field("rolling: {max_surge: \"125%\"}"), "apps.web.rolling.max_surge", "percentage"),
        (app_field("rolling: {max_surge: \"-1\"}"), "apps.web.rolling.max_surge", "percentage"),
        (app_field("rolling: {max_unavailable: lots}"), "apps.web.rolling.max_unavailable", "percentage"),
        (app_field("rolling: {max_unavailable: 0.5}"), "apps.web.rolling.max_unavailable", "percentage"),
        (app_field("rolling: {max_surge: 1, surge: 2}"), "apps.web.rolling.surge", "unknown field"),
        (app_field("rolling: {max_surge: 0, max_unavailable: \"0%\"}"), "apps.web.rolling", "cannot both be 0"),
        // canary
        (app_field("canary: {}"), "apps.web.canary.steps", "required"),
        (app_field("canary: {steps: []}"), "apps.web.canary.steps", "must not be empty"),
        (app_field("canary: {steps: [{weight: 0}]}"), "apps.web.canary.steps[0].weight", "from 1 to 100"),
        (app_field("canary: {steps: [{weight: 101}]}"), "apps.web.canary.steps[0].weight", "from 1 to 100"),
        (app_field("canary: {steps: [{weight: 50}, {weight: 20}]}"), "apps.web.canary.steps[1].weight", "weights must increase"),
        (app_field("canary: {steps: [{weight: 50}, {weight: 50}]}"), "apps.web.canary.steps[1].weight", "weights must increase"),
        (app_field("canary: {steps: [{pause: 5m}]}"), "apps.web.canary.steps[0].weight", "required"),
        (app_field("canary: {steps: [{weight: 10, pause: forever}]}"), "apps.web.canary.steps[0].pause", "not a duration"),
        (app_field("canary: {steps: [{weight: 10, pause: 5}]}"), "apps.web.canary.steps[0].pause", "until-promoted"),
        (app_field("canary: {steps: [{weight: 10, hold: 5m}]}"), "apps.web.canary.steps[0].hold", "unknown field"),
        // blue-green
        (app_field("blue_green: {scale_down_delay: soon}"), "apps.web.blue_green.scale_down_delay", "not a duration"),
        (app_field("blue_green: {post_promotion_analysis: 1}"), "apps.web.blue_green.post_promotion_analysis", "true or false"),
        (app_field("blue_green: {auto_promote: later}"), "apps.web.blue_green.auto_promote", "true or false"),
        // analysis
        (app_field("analysis: {interval: 0s}"), "apps.web.analysis.interval", "longer than 0"),
        (app_field("analysis: {failure_limit: -1}"), "apps.web.analysis.failure_limit", "whole number"),
        (app_field("analysis: {duration: 10s, interval: 20s}"), "apps.web.analysis", "longer than duration"),
        (app_field("analysis: {count: 3}"), "apps.web.analysis.count", "unknown field"),
        // checks
        (app_field("checks: {name: x}"), "apps.web.checks", "list of checks"),
        (app_field("checks: [{http: {}}]"), "apps.web.checks[0].name", "required"),
        (app_field("checks: [{name: \"a b\", http: {}}]"), "apps.web.checks[0].name", "not a check name"),
        (app_field("checks: [{name: a, http: {}}, {name: a, http: {}}]"), "apps.web.checks[1].name", "already the name of apps.web.checks[0]"),
        (app_field("checks: [{name: a}]"), "apps.web.checks[0]", "needs one of http, latency, smoke, prometheus or webhook"),
        (app_field("checks: [{name: a, prometheus: {query: up, condition: \"< 1\"}}]"), "apps.web.checks[0].prometheus.address", "required"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", condition: \"< 1\"}}]"), "apps.web.checks[0].prometheus.query", "required"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: \"x{{secret}}\", condition: \"< 1\"}}]"), "apps.web.checks[0].prometheus.query", "not a variable"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://u:pw@p:9090\", query: up, condition: \"< 1\"}}]"), "apps.web.checks[0].prometheus.address", "credentials"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up}}]"), "apps.web.checks[0].prometheus.condition", "required"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up, condition: \"result ~ 1\"}}]"), "apps.web.checks[0].prometheus.condition", "is not a condition"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up, condition: \"< 1\", aggregate: median}}]"), "apps.web.checks[0].prometheus.aggregate", "not one of each, sum"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up, condition: \"< 1\", error_limit: 101}}]"), "apps.web.checks[0].prometheus.error_limit", "from 0 to 100"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up, condition: \"< 1\", on_error: pause}}]"), "apps.web.checks[0].prometheus.on_error", "not fail or inconclusive"),
        (app_field("checks: [{name: a, prometheus: {address: \"http://p:9090\", query: up, condition: \"< 1\", timeout: 2m}}]"), "apps.web.checks[0].prometheus.timeout", "1m"),
        (app_field("checks: [{name: a, webhook: {url: \"http://j:80\", condition: \"< 1\"}}]"), "apps.web.checks[0].webhook.field", "required"),
        (app_field("checks: [{name: a, webhook: {url: \"http://j:80\", field: \"a..b\", condition: \"< 1\"}}]"), "apps.web.checks[0].webhook.field", "dotted path"),
        (app_field("checks: [{name: a, webhook: {field: ok, condition: \"== 1\"}}]"), "apps.web.checks[0].webhook.url", "required"),
        (app_field("checks: [{name: a, http: {}, smoke: {argv: [x]}}]"), "apps.web.checks[0]", "exactly one kind"),
        (app_field("checks: [{name: a, http: {path: health}}]"), "apps.web.checks[0].http.path", "must start with '/'"),
        (app_field("checks: [{name: a, http: {expect_status: 99}}]"), "apps.web.checks[0].http.expect_status", "from 100 to 599"),
        (app_field("checks: [{name: a, http: {timeout: 0ms}}]"), "apps.web.checks[0].http.timeout", "longer than 0"),
        (app_field("checks: [{name: a, http: {retries: 1000}}]"), "apps.web.checks[0].http.retries", "from 0 to 10,"),
        (app_field("checks: [{name: a, http: {port: 0}}]"), "apps.web.checks[0].http.port", "TCP port"),
        (app_field("checks: [{name: a, http: {url: \"ftp://x\"}}]"), "apps.web.checks[0].http.url", "http:// or https://"),
        (app_field("checks: [{name: a, http: {url: \"https://\"}}]"), "apps.web.checks[0].http.url", "with a host"),
        (app_field("checks: [{name: a, http: {method: POST}}]"), "apps.web.checks[0].http.method", "unknown field"),
        (app_field("checks: [{name: a, latency: {threshold: 1s, percentile: 0}}]"), "apps.web.checks[0].latency.percentile", "must be in (0, 100]"),
        (app_field("checks: [{name: a, latency: {threshold: 1s, percentile: 100.5}}]"), "apps.web.checks[0].latency.percentile", "must be in (0, 100]"),
        (app_field("checks: [{name: a, latency: {threshold: 1s, max_error_rate: 2}}]"), "apps.web.checks[0].latency.max_error_rate", "must be in [0, 1]"),
        (app_field("checks: [{name: a, latency: {threshold: 1s, requests: 0}}]"), "apps.web.checks[0].latency.requests", "from 1 to"),
        (app_field("checks: [{name: a, latency: {}}]"), "apps.web.checks[0].latency.threshold", "required"),
        (app_field("checks: [{name: a, latency: {threshold: 1s, path: x}}]"), "apps.web.checks[0].latency.path", "must start with '/'"),
        (app_field("checks: [{name: a, smoke: {}}]"), "apps.web.checks[0].smoke.argv", "required"),
        (app_field("checks: [{name: a, smoke: {argv: []}}]"), "apps.web.checks[0].smoke.argv", "must not be empty"),
        (app_field("checks: [{name: a, smoke: {argv: \"make test\"}}]"), "apps.web.checks[0].smoke.argv", "list of strings"),
        (app_field("checks: [{name: a, smoke: {argv: [\"\"]}}]"), "apps.web.checks[0].smoke.argv[0]", "program must not be empty"),
        (app_field("checks: [{name: a, smoke: {argv: [x, [y]]}}]"), "apps.web.checks[0].smoke.argv[1]", "must be a string"),
        (app_field("checks: [{name: a, smoke: {argv: [x], timeout: 1d}}]"), "apps.web.checks[0].smoke.timeout", "not a duration"),
        // build
        (app_field("build: {timeout: 1m}"), "apps.web.build.argv", "required"),
        (app_field("build: {argv: []}"), "apps.web.build.argv", "must not be empty"),
        (app_field("build: {argv: [make], timeout: 0s}"), "apps.web.build.timeout", "longer than 0"),
        (app_field("build: {argv: [make], shell: true}"), "apps.web.build.shell", "unknown field"),
        // per-environment overrides
        (app_field("analysis: {duration: 10s}\nenvironments:\n  production: {analysis: {interval: 20s}}"), "apps.web.environments.production.analysis", "longer than duration"),
        (app_field("environments:\n  prod: {port: 80}"), "apps.web.environments.prod", "no such environment (defined: production, staging)"),
        (app_field("environments:\n  production: {port: -80}"), "apps.web.environments.production.port", "TCP port"),
        (app_field("environments:\n  production: {environments: {}}"), "apps.web.environments.production.environments", "unknown field"),
        (app_field("environments:\n  production: {colour: red}"), "apps.web.environments.production.colour", "unknown field"),
        (app_field("environments:\n  production: {strategy: canary, canary: {steps: [{weight: 10}, {weight: 5}]}}"), "apps.web.environments.production.canary.steps[1].weight", "weights must increase"),
        (app_field("environments:\n  production: {rolling: {max_surge: 0}}\nrolling: {max_unavailable: 0}"), "apps.web.environments.production.rolling", "cannot both be 0"),
        // YAML tags are not part of the format
        (app_field("port: !int 80"), "apps.web.port", "YAML tags such as !int are not supported"),
    ];
    for (text, path, message) in &table {
        refused(text, path, message);
    }
}

#[test]
fn every_wrong_field_is_named_at_once() {
    let text = "environments:
  staging: {cluster: sandbox, namespace: shop-staging}
  Prod: {cluster: prod, namespace: shop}
apps:
  web:
    colour: blue
    port: 0
    checks:
      - name: health
        http: {path: health}
      - name: p95
        latency: {path: /health, percentile: 120, threshold: 250ms}
    canary: {steps: [{weight: 50}, {weight: 10}]}
    environments:
      qa: {port: 80}
  api:
    rolling: {max_surge: 0, max_unavailable: \"0%\"}
";
    let e = parse(text).unwrap_err();
    let lines: Vec<String> = e.to_string().lines().map(str::to_owned).collect();
    let expected = [
        "environments.Prod: not a DNS label",
        "apps.web.colour: unknown field",
        "apps.web.port: must be a TCP port",
        "apps.web.checks[0].http.path: \"health\" must start with '/'",
        "apps.web.checks[1].latency.percentile: must be in (0, 100]",
        "apps.web.canary.steps[1].weight: 10 is not above the previous step's 50",
        "apps.web.environments.qa: no such environment",
        "apps.api.rolling: max_surge and max_unavailable cannot both be 0",
    ];
    for want in expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in\n{e}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "one line per problem:\n{e}");
    assert_eq!(e.len(), expected.len());
}

#[test]
fn secrets_are_refused_wherever_they_appear() {
    let hint = "secrets never go in the configuration";
    let table: Vec<(String, &str)> = vec![
        (app_field("password: hunter2"), "apps.web.password"),
        (app_field("api_token: abc"), "apps.web.api_token"),
        (
            app_field("env: {DB_PASSWORD: x, LOG: debug}"),
            "apps.web.env.DB_PASSWORD",
        ),
        (
            app_field("checks: [{name: a, http: {path: /, authorization: Bearer x}}]"),
            "apps.web.checks[0].http.authorization",
        ),
        (
            app_field("build: {argv: [make], registry_secret: x}"),
            "apps.web.build.registry_secret",
        ),
        (
            "environments:\n  staging: {cluster: c, namespace: n, kube_token: x}\n".into(),
            "environments.staging.kube_token",
        ),
        (format!("{BASE}secrets: {{a: b}}\n"), "secrets"),
        (
            format!("{BASE}extra: [{{nested: {{Private-Key: x}}}}]\n"),
            "extra[0].nested.Private-Key",
        ),
        (
            app_field("checks: [{name: a, http: {url: \"https://bob:pw@example.com/health\"}}]"),
            "apps.web.checks[0].http.url",
        ),
        (
            app_field("checks: [{name: a, smoke: {argv: [smoke, \"--token=abc123\"]}}]"),
            "apps.web.checks[0].smoke.argv[1]",
        ),
        (
            app_field("build: {argv: [make, \"PASSWORD=x\"]}"),
            "apps.web.build.argv[1]",
        ),
    ];
    for (text, path) in &table {
        refused(text, path, hint);
        refused(text, path, "credential files");
    }
    // A secret-looking key is reported as a secret, not also as an unknown field.
    let found = problems(&app_field("password: hunter2"));
    assert_eq!(found.len(), 1, "{found:?}");
    // Placeholders and names that merely contain a word are fine in argv.
    assert!(problems(&app_field(
        "build: {argv: [make, \"TAG={image}\", \"--token-file\", /run/token]}"
    ))
    .is_empty());
}

#[test]
fn names_of_apps_and_environments_are_not_taken_for_secrets() {
    let text = "environments:
  auth-staging: {cluster: sandbox, namespace: auth}
apps:
  auth: {port: 8080}
  token-service: {}
";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.resolve("auth", "auth-staging", &image()).is_ok());
}

#[test]
fn yaml_merge_keys_share_settings_between_apps() {
    let text = "environments:
  staging: {cluster: sandbox, namespace: s}
apps:
  web: &defaults
    port: 9090
    step_timeout: 2m
  api:
    <<: *defaults
    port: 9191
";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let api = config.resolve("api", "staging", &image()).unwrap();
    assert_eq!((api.port, api.step_timeout_seconds), (9191, 120));
}

#[test]
fn durations_are_parsed_with_units() {
    let table: &[(&str, Option<u64>)] = &[
        ("500ms", Some(500)),
        ("30s", Some(30_000)),
        ("5m", Some(300_000)),
        ("1h", Some(3_600_000)),
        ("1m30s", Some(90_000)),
        ("0s", Some(0)),
        ("", None),
        ("5", None),
        ("m", None),
        ("1.5s", None),
        ("-1s", None),
        ("5 m", None),
        ("1d", None),
        ("10us", None),
        ("9999999999999h", None),
    ];
    for (text, want) in table {
        assert_eq!(parse_duration_ms(text).ok(), *want, "{text:?}");
    }
}

#[test]
fn percentages_are_normalised() {
    let config = parse(&app_field(
        "rolling: {max_surge: \"007%\", max_unavailable: 2}",
    ))
    .unwrap();
    let spec = config.resolve("web", "staging", &image()).unwrap();
    let rolling = spec.rolling.unwrap();
    assert_eq!(
        (rolling.max_surge.as_str(), rolling.max_unavailable.as_str()),
        ("7%", "2")
    );
}

#[test]
fn an_oversized_file_is_refused_before_it_is_parsed() {
    let text = format!("{BASE}# {}\n", "x".repeat(MAX_FILE_BYTES));
    refused(&text, "", "more than the limit");
}

#[test]
fn problems_display_one_per_line_with_their_path() {
    let e = ConfigErrors {
        problems: vec![
            Problem {
                path: "apps.web.port".into(),
                message: "must be a TCP port".into(),
            },
            Problem {
                path: String::new(),
                message: "whole file".into(),
            },
        ],
    };
    assert_eq!(
        e.to_string(),
        "apps.web.port: must be a TCP port\nwhole file"
    );
}

#[test]
fn strategy_names_round_trip() {
    for s in [Strategy::Rolling, Strategy::Canary, Strategy::BlueGreen] {
        assert_eq!(parse_strategy(strategy_name(s)), Some(s));
    }
    assert_eq!(parse_strategy("blue_green"), None);
}

#[test]
fn the_example_file_of_the_repository_is_valid() {
    let text = include_str!("../../../../examples/baton.yaml");
    let config = parse(text).unwrap_or_else(|e| panic!("examples/baton.yaml:\n{e}"));
    for app in config.apps().keys() {
        for env in config.environments().keys() {
            config
                .resolve(app, env, &image())
                .unwrap_or_else(|e| panic!("{app} in {env}: {e}"));
        }
    }
}

/// One limit of the release spec, as the configuration enforces it: the field (with `{v}` for
/// the value), the value at the limit and just past it, where the problem is reported and the
/// range it names, and what the resolved spec carries at the limit.
struct Limit {
    field: &'static str,
    at: String,
    past: String,
    path: &'static str,
    range: String,
    carried: fn(&ReleaseSpec) -> u64,
    want: u64,
}

fn seconds_text(s: u64) -> String {
    format!("{s}s")
}

fn ms_text(ms: u64) -> String {
    format!("{ms}ms")
}

fn list(n: usize, item: impl Fn(usize) -> String) -> String {
    (0..n).map(item).collect::<Vec<_>>().join(", ")
}

fn http_of(s: &ReleaseSpec) -> &HttpCheck {
    match &s.checks[0].kind {
        Some(check::Kind::Http(h)) => h,
        other => panic!("not an http check: {other:?}"),
    }
}

fn latency_of(s: &ReleaseSpec) -> &LatencyCheck {
    match &s.checks[0].kind {
        Some(check::Kind::Latency(l)) => l,
        other => panic!("not a latency check: {other:?}"),
    }
}

fn smoke_of(s: &ReleaseSpec) -> &SmokeCheck {
    match &s.checks[0].kind {
        Some(check::Kind::Smoke(c)) => c,
        other => panic!("not a smoke check: {other:?}"),
    }
}

fn step_analysis(s: &ReleaseSpec) -> AnalysisParams {
    s.canary
        .as_ref()
        .and_then(|c| c.steps[0].analysis)
        .unwrap_or_default()
}

fn limits() -> Vec<Limit> {
    use crate::limits::*;
    let analysis = u64::from(MAX_ANALYSIS_SECONDS);
    let request_ms = u64::try_from(MAX_REQUEST_TIMEOUT.as_millis()).unwrap();
    let smoke_ms = u64::try_from(MAX_SMOKE_TIMEOUT.as_millis()).unwrap();
    let spec_s = u64::from(MAX_SPEC_SECONDS);
    let spec_ms = u64::from(MAX_SPEC_MILLIS);
    let analysis_range = format!("must be from 1s to {}", human_ms(analysis * 1000));
    let request_range = format!("must be from 1ms to {}", human_ms(request_ms));
    let spec_s_range =
        |min: &str| format!("must be from {min} to {spec_s}s (the most a release spec carries)");
    let url = |n: usize| {
        let head = "https://checks.example.com/";
        format!("\"{head}{}\"", "a".repeat(n - head.len()))
    };
    let port = |field: &'static str, path: &'static str, carried: fn(&ReleaseSpec) -> u64| Limit {
        field,
        at: MAX_PORT.to_string(),
        past: (MAX_PORT + 1).to_string(),
        path,
        range: format!("must be a TCP port (1 to {MAX_PORT})"),
        carried,
        want: u64::from(MAX_PORT),
    };
    vec![
        // the analysis: the health-checker refuses more than a day
        Limit {
            field: "analysis: {duration: {v}, interval: 1s}",
            at: seconds_text(analysis),
            past: seconds_text(analysis + 1),
            path: "apps.web.analysis.duration",
            range: analysis_range.clone(),
            carried: |s| s.analysis.unwrap().duration_seconds.into(),
            want: analysis,
        },
        Limit {
            field: "analysis: {duration: 24h, interval: {v}}",
            at: seconds_text(analysis),
            past: seconds_text(analysis + 1),
            path: "apps.web.analysis.interval",
            range: analysis_range.clone(),
            carried: |s| s.analysis.unwrap().interval_seconds.into(),
            want: analysis,
        },
        Limit {
            field: "strategy: canary\ncanary: {steps: [{weight: 10, analysis: {duration: {v}}}]}",
            at: seconds_text(analysis),
            past: seconds_text(analysis + 1),
            path: "apps.web.canary.steps[0].analysis.duration",
            range: analysis_range.clone(),
            carried: |s| step_analysis(s).duration_seconds.into(),
            want: analysis,
        },
        Limit {
            field: "strategy: canary\ncanary: {steps: [{weight: 10, analysis: {duration: 24h, \
                    interval: {v}}}]}",
            at: seconds_text(analysis),
            past: seconds_text(analysis + 1),
            path: "apps.web.canary.steps[0].analysis.interval",
            range: analysis_range,
            carried: |s| step_analysis(s).interval_seconds.into(),
            want: analysis,
        },
        Limit {
            field: "analysis: {failure_limit: {v}}",
            at: MAX_FAILURE_LIMIT.to_string(),
            past: (MAX_FAILURE_LIMIT + 1).to_string(),
            path: "apps.web.analysis.failure_limit",
            range: format!("must be a whole number from 0 to {MAX_FAILURE_LIMIT}"),
            carried: |s| s.analysis.unwrap().failure_limit.into(),
            want: MAX_FAILURE_LIMIT.into(),
        },
        Limit {
            field:
                "strategy: canary\ncanary: {steps: [{weight: 10, analysis: {failure_limit: {v}}}]}",
            at: MAX_FAILURE_LIMIT.to_string(),
            past: (MAX_FAILURE_LIMIT + 1).to_string(),
            path: "apps.web.canary.steps[0].analysis.failure_limit",
            range: format!("must be a whole number from 0 to {MAX_FAILURE_LIMIT}"),
            carried: |s| step_analysis(s).failure_limit.into(),
            want: MAX_FAILURE_LIMIT.into(),
        },
        // checks: what the health-checker's plan refuses
        Limit {
            field: "checks: [{name: a, http: {timeout: {v}}}]",
            at: ms_text(request_ms),
            past: ms_text(request_ms + 1),
            path: "apps.web.checks[0].http.timeout",
            range: request_range.clone(),
            carried: |s| http_of(s).timeout_ms.into(),
            want: request_ms,
        },
        Limit {
            field: "checks: [{name: a, http: {interval: {v}}}]",
            at: ms_text(request_ms),
            past: ms_text(request_ms + 1),
            path: "apps.web.checks[0].http.interval",
            range: request_range,
            carried: |s| http_of(s).interval_ms.into(),
            want: request_ms,
        },
        Limit {
            field: "checks: [{name: a, http: {retries: {v}}}]",
            at: MAX_HTTP_RETRIES.to_string(),
            past: (MAX_HTTP_RETRIES + 1).to_string(),
            path: "apps.web.checks[0].http.retries",
            range: format!("must be a whole number from 0 to {MAX_HTTP_RETRIES}"),
            carried: |s| http_of(s).retries.into(),
            want: MAX_HTTP_RETRIES.into(),
        },
        Limit {
            field: "checks: [{name: a, http: {url: {v}}}]",
            at: url(MAX_URL_BYTES),
            past: url(MAX_URL_BYTES + 1),
            path: "apps.web.checks[0].http.url",
            range: format!("at most {MAX_URL_BYTES}"),
            carried: |s| http_of(s).url.len() as u64,
            want: MAX_URL_BYTES as u64,
        },
        Limit {
            field: "checks: [{name: a, latency: {threshold: 1s, requests: {v}}}]",
            at: MAX_LATENCY_REQUESTS.to_string(),
            past: (MAX_LATENCY_REQUESTS + 1).to_string(),
            path: "apps.web.checks[0].latency.requests",
            range: format!("must be a whole number from 1 to {MAX_LATENCY_REQUESTS}"),
            carried: |s| latency_of(s).requests.into(),
            want: MAX_LATENCY_REQUESTS.into(),
        },
        Limit {
            field: "checks: [{name: a, latency: {threshold: {v}}}]",
            at: ms_text(spec_ms),
            past: ms_text(spec_ms + 1),
            path: "apps.web.checks[0].latency.threshold",
            range: format!("must be from 1ms to {spec_ms}ms (the most a release spec carries)"),
            carried: |s| latency_of(s).threshold_ms.into(),
            want: spec_ms,
        },
        Limit {
            field: "checks: [{name: a, smoke: {argv: [smoke], timeout: {v}}}]",
            at: ms_text(smoke_ms),
            past: ms_text(smoke_ms + 1),
            path: "apps.web.checks[0].smoke.timeout",
            range: format!("must be from 1ms to {}", human_ms(smoke_ms)),
            carried: |s| smoke_of(s).timeout_ms.into(),
            want: smoke_ms,
        },
        port("port: {v}", "apps.web.port", |s| s.port.into()),
        port(
            "checks: [{name: a, http: {port: {v}}}]",
            "apps.web.checks[0].http.port",
            |s| http_of(s).port.into(),
        ),
        port(
            "checks: [{name: a, latency: {threshold: 1s, port: {v}}}]",
            "apps.web.checks[0].latency.port",
            |s| latency_of(s).port.into(),
        ),
        // lists and text: what every agent's release spec check refuses
        Limit {
            field: "checks: [{v}]",
            at: list(MAX_CHECKS, |i| format!("{{name: c{i}, http: {{}}}}")),
            past: list(MAX_CHECKS + 1, |i| format!("{{name: c{i}, http: {{}}}}")),
            path: "apps.web.checks",
            range: format!("more than {MAX_CHECKS} checks"),
            carried: |s| s.checks.len() as u64,
            want: MAX_CHECKS as u64,
        },
        Limit {
            field: "strategy: canary\ncanary: {steps: [{v}]}",
            at: list(MAX_STEPS, |i| format!("{{weight: {}}}", i + 1)),
            past: list(MAX_STEPS + 1, |i| format!("{{weight: {}}}", i + 1)),
            path: "apps.web.canary.steps",
            range: format!("more than {MAX_STEPS} steps"),
            carried: |s| s.canary.as_ref().map_or(0, |c| c.steps.len() as u64),
            want: MAX_STEPS as u64,
        },
        Limit {
            field: "build: {argv: [{v}]}",
            at: list(MAX_ARGV, |i| format!("a{i}")),
            past: list(MAX_ARGV + 1, |i| format!("a{i}")),
            path: "apps.web.build.argv",
            range: format!("more than {MAX_ARGV} arguments"),
            carried: |s| s.build.as_ref().map_or(0, |b| b.argv.len() as u64),
            want: MAX_ARGV as u64,
        },
        Limit {
            field: "checks: [{name: a, smoke: {argv: [{v}]}}]",
            at: list(MAX_ARGV, |i| format!("a{i}")),
            past: list(MAX_ARGV + 1, |i| format!("a{i}")),
            path: "apps.web.checks[0].smoke.argv",
            range: format!("more than {MAX_ARGV} arguments"),
            carried: |s| smoke_of(s).argv.len() as u64,
            want: MAX_ARGV as u64,
        },
        Limit {
            field: "checks: [{name: a, http: {body_contains: {v}}}]",
            at: "x".repeat(MAX_TEXT_BYTES),
            past: "x".repeat(MAX_TEXT_BYTES + 1),
            path: "apps.web.checks[0].http.body_contains",
            range: format!("longer than {MAX_TEXT_BYTES} bytes"),
            carried: |s| http_of(s).body_contains.len() as u64,
            want: MAX_TEXT_BYTES as u64,
        },
        // whole-seconds fields no agent bounds: the most the spec's uint32 carries, not truncated
        Limit {
            field: "step_timeout: {v}",
            at: seconds_text(spec_s),
            past: seconds_text(spec_s + 1),
            path: "apps.web.step_timeout",
            range: spec_s_range("1s"),
            carried: |s| s.step_timeout_seconds.into(),
            want: spec_s,
        },
        Limit {
            field: "deadline_margin: {v}",
            at: seconds_text(spec_s),
            past: seconds_text(spec_s + 1),
            path: "apps.web.deadline_margin",
            range: spec_s_range("1s"),
            carried: |s| s.deadline_margin_seconds.into(),
            want: spec_s,
        },
        Limit {
            field: "strategy: blue-green\nblue_green: {scale_down_delay: {v}}",
            at: seconds_text(spec_s),
            past: seconds_text(spec_s + 1),
            path: "apps.web.blue_green.scale_down_delay",
            range: spec_s_range("0s"),
            carried: |s| s.blue_green.unwrap().scale_down_delay_seconds.into(),
            want: spec_s,
        },
        Limit {
            field: "strategy: canary\ncanary: {steps: [{weight: 10, pause: {v}}]}",
            at: seconds_text(spec_s),
            past: seconds_text(spec_s + 1),
            path: "apps.web.canary.steps[0].pause",
            range: spec_s_range("0s"),
            carried: |s| {
                s.canary
                    .as_ref()
                    .map_or(0, |c| c.steps[0].pause_seconds.into())
            },
            want: spec_s,
        },
        Limit {
            field: "build: {argv: [make], timeout: {v}}",
            at: seconds_text(spec_s),
            past: seconds_text(spec_s + 1),
            path: "apps.web.build.timeout",
            range: spec_s_range("1s"),
            carried: |s| s.build.as_ref().map_or(0, |b| b.timeout_seconds.into()),
            want: spec_s,
        },
    ]
}

#[test]
fn every_limit_of_the_agents_is_accepted_at_the_limit_and_refused_past_it_by_its_path() {
    for limit in limits() {
        let at = app_field(&limit.field.replace("{v}", &limit.at));
        let config = parse(&at).unwrap_or_else(|e| panic!("{} at the limit:\n{e}", limit.path));
        for env in ["staging", "production"] {
            let spec = config
                .resolve("web", env, &image())
                .unwrap_or_else(|e| panic!("{} at the limit in {env}:\n{e}", limit.path));
            assert_eq!(
                (limit.carried)(&spec),
                limit.want,
                "{}: the spec carries the value at the limit whole",
                limit.path
            );
        }
        let past = app_field(&limit.field.replace("{v}", &limit.past));
        refused(&past, limit.path, &limit.range);
    }
}

#[test]
fn an_analysis_interval_longer_than_its_duration_is_refused_where_it_is_merged() {
    let canary =
        |step: &str| format!("strategy: canary\ncanary: {{steps: [{step}, {{weight: 100}}]}}");
    // (the app's fields, where the problem is, what it says); None: accepted.
    let table: Vec<(String, Option<(&str, &str)>)> = vec![
        ("analysis: {duration: 10s, interval: 10s}".into(), None),
        (
            "analysis: {duration: 10s, interval: 11s}".into(),
            Some((
                "apps.web.analysis",
                "interval (11s) is longer than duration (10s)",
            )),
        ),
        // A canary step's own analysis replaces the app's field by field, as the health-checker
        // merges them.
        (
            canary("{weight: 10, analysis: {duration: 5m, interval: 5m}}"),
            None,
        ),
        (canary("{weight: 10, analysis: {duration: 1m}}"), None),
        (
            canary("{weight: 10, analysis: {interval: 1m}}"),
            Some((
                "apps.web.canary.steps[0].analysis",
                "interval (60s) is longer than duration (30s, from analysis.duration)",
            )),
        ),
        (
            format!(
                "analysis: {{interval: 10s}}\n{}",
                canary("{weight: 10, analysis: {duration: 5s}}")
            ),
            Some((
                "apps.web.canary.steps[0].analysis",
                "interval (10s, from analysis.interval) is longer than duration (5s)",
            )),
        ),
        (
            canary("{weight: 10, analysis: {duration: 1m, interval: 2m}}"),
            Some((
                "apps.web.canary.steps[0].analysis",
                "interval (120s) is longer than duration (60s)",
            )),
        ),
        // Only a canary runs its steps' own analyses.
        (
            "strategy: rolling\ncanary: {steps: [{weight: 10, analysis: {interval: 1m}}]}".into(),
            None,
        ),
        (
            "canary: {steps: [{weight: 10, analysis: {interval: 1m}}]}\n\
             environments:\n  production: {strategy: canary}"
                .into(),
            Some((
                "apps.web.environments.production.canary.steps[0].analysis",
                "longer than duration (30s, from analysis.duration)",
            )),
        ),
        // A duration of 0 would be read as unset (the health-checker's default, or the app's).
        (
            "analysis: {duration: 0s}".into(),
            Some(("apps.web.analysis.duration", "must be longer than 0")),
        ),
        (
            canary("{weight: 10, analysis: {duration: 0s}}"),
            Some((
                "apps.web.canary.steps[0].analysis.duration",
                "must be longer than 0",
            )),
        ),
    ];
    for (fields, want) in &table {
        let text = app_field(fields);
        match want {
            None => assert!(
                problems(&text).is_empty(),
                "{fields}: {:?}",
                problems(&text)
            ),
            Some((path, message)) => refused(&text, path, message),
        }
    }
}

#[test]
fn a_fragment_in_a_check_path_is_refused_as_the_health_checker_refuses_it() {
    refused(
        &app_field("checks: [{name: a, http: {path: \"/health#x\"}}]"),
        "apps.web.checks[0].http.path",
        "must not contain '#'",
    );
    refused(
        &app_field("checks: [{name: a, latency: {threshold: 1s, path: \"/#\"}}]"),
        "apps.web.checks[0].latency.path",
        "must not contain '#'",
    );
}

#[test]
fn a_request_may_choose_its_canarys_steps_but_not_their_analysis() {
    let cfg = parse(
        "environments:\n  prod: {cluster: c1, namespace: shop}\napps:\n  web:\n    strategy: canary\n    canary:\n      steps: [{weight: 10, analysis: {duration: 5m}}, {weight: 100}]\n",
    )
    .unwrap()
    .with_revision(7);
    let own = |steps: Vec<(u32, u32)>| Overrides {
        canary_steps: Some(
            steps
                .into_iter()
                .map(|(weight, pause_seconds)| CanaryStep {
                    weight,
                    pause_seconds,
                    ..Default::default()
                })
                .collect(),
        ),
        ..image()
    };
    // The configured steps, and steps of the request's own, both verify.
    let configured = cfg.resolve("web", "prod", &image()).unwrap();
    assert_eq!(cfg.verify(&configured), Ok(()));
    let chosen = cfg
        .resolve("web", "prod", &own(vec![(30, 60), (100, 0)]))
        .unwrap();
    let weights: Vec<u32> = chosen
        .canary
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(weights, [30, 100]);
    assert_eq!(cfg.verify(&chosen), Ok(()));
    // A step's analysis is the configuration's alone.
    let mut forged = chosen.clone();
    forged.canary.as_mut().unwrap().steps[0].analysis = Some(AnalysisParams {
        duration_seconds: 1,
        ..Default::default()
    });
    assert_eq!(
        cfg.verify(&forged),
        Err(SpecMismatch::Fields(vec!["canary"]))
    );
    // As are the commands and the namespace.
    let mut forged = configured.clone();
    forged.namespace = "kube-system".into();
    forged.build = Some(BuildParams {
        argv: vec!["/bin/true".into()],
        timeout_seconds: 60,
    });
    assert_eq!(
        cfg.verify(&forged),
        Err(SpecMismatch::Fields(vec!["namespace", "build"]))
    );
    // Another revision's spec is not this one's.
    let other = cfg.clone().with_revision(8);
    assert!(matches!(
        other.verify(&configured),
        Err(SpecMismatch::Revision { spec: 7, config: 8 })
    ));
    // Steps for a release that is not a canary are refused when resolving.
    let rolling = Overrides {
        strategy: Some(Strategy::Rolling),
        ..own(vec![(50, 0), (100, 0)])
    };
    let err = cfg
        .resolve("web", "prod", &rolling)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only a canary release has steps"), "{err}");
}

#[test]
fn metric_checks_resolve_with_their_judgement() {
    let text = app_field(
        r#"checks:
  - name: error-rate
    prometheus:
      address: http://prometheus.monitoring:9090
      query: sum(rate(http_requests_total{code="500",pod=~"{{pods}}"}[{{window}}]))
      condition: "result<0.01"
      aggregate: max
      on_error: inconclusive
  - name: score
    webhook:
      url: https://judge.example.com/score
      field: result.score
      condition: ">= 0.9"
      error_limit: 0
      timeout: 2s"#,
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let spec = config.resolve("web", "staging", &image()).unwrap();
    assert_eq!(
        spec.checks[0].kind,
        Some(check::Kind::Prometheus(PrometheusCheck {
            address: "http://prometheus.monitoring:9090".into(),
            query: r#"sum(rate(http_requests_total{code="500",pod=~"{{pods}}"}[{{window}}]))"#
                .into(),
            judgement: Some(MetricJudgement {
                condition: "result < 0.01".into(),
                aggregate: "max".into(),
                error_limit: 4,
                inconclusive_on_error: true,
                timeout_ms: 5000,
            }),
        }))
    );
    assert_eq!(
        spec.checks[1].kind,
        Some(check::Kind::Webhook(WebhookCheck {
            url: "https://judge.example.com/score".into(),
            field: "result.score".into(),
            judgement: Some(MetricJudgement {
                condition: "result >= 0.9".into(),
                aggregate: String::new(),
                error_limit: 0,
                inconclusive_on_error: false,
                timeout_ms: 2000,
            }),
        }))
    );
    assert!(crate::validate::release_spec(&spec).is_ok());
    // A spec re-resolved from the same configuration verifies.
    let config = config.with_revision(3);
    let spec = config.resolve("web", "staging", &image()).unwrap();
    assert!(config.verify(&spec).is_ok());
}

fn notifications(section: &str) -> String {
    format!(
        "{BASE}    port: 8080\n  api: {{}}\nnotifications:\n  {}\n",
        section.replace('\n', "\n  ")
    )
}

#[test]
fn notifications_route_releases_to_channels() {
    use crate::notify::{ChannelKind, Trigger};
    let text = notifications(
        "link: https://baton.example.com/releases/{{release_id}}\n\
         channels:\n  web-team: {kind: slack}\n  audit: {kind: cloudevents, link: \"https://audit.example.com/{{app}}/{{env}}\"}\n\
         routes:\n  - {channel: web-team, apps: [web], environments: [production], on: [requested, failed, rolled_back]}\n  - {channel: audit}",
    );
    let config = parse(&text).expect("valid");
    let n = config.notifications();
    assert_eq!(n.channels["web-team"].kind, ChannelKind::Slack);
    assert_eq!(
        n.channels["web-team"].link.as_deref(),
        Some("https://baton.example.com/releases/{{release_id}}"),
        "the section's link is the default"
    );
    assert_eq!(
        n.channels["audit"].link.as_deref(),
        Some("https://audit.example.com/{{app}}/{{env}}")
    );
    assert_eq!(
        n.channels_for("web", "production", Trigger::Failed),
        ["audit", "web-team"]
    );
    assert_eq!(
        n.channels_for("web", "production", Trigger::Step),
        ["audit"]
    );
    assert_eq!(
        n.channels_for("api", "staging", Trigger::Requested),
        ["audit"]
    );
    // No section: nobody is told.
    let plain = parse(&format!("{BASE}    port: 8080\n")).expect("valid");
    assert!(plain.notifications().routes.is_empty());
}

#[test]
fn bad_notifications_are_refused_with_their_field() {
    let ch = "channels: {team: {kind: slack}}\n";
    let table: Vec<(String, &str, &str)> = vec![
        (notifications("colour: red"), "notifications.colour", "unknown field"),
        (notifications("channels: {Team: {kind: slack}}\nroutes: []"), "notifications.channels.Team", "not a DNS label"),
        (notifications("channels: {team: {}}\nroutes: []"), "notifications.channels.team.kind", "required"),
        (notifications("channels: {team: {kind: teams}}\nroutes: []"), "notifications.channels.team.kind", "not a channel kind"),
        (notifications("channels: {team: {kind: slack, url: \"https://hooks.example.com/x\"}}\nroutes: []"), "notifications.channels.team.url", "unknown field"),
        (notifications("channels: {team: {kind: slack, webhook_token: x}}\nroutes: []"), "notifications.channels.team.webhook_token", "secrets never go"),
        (notifications("channels: {team: {kind: slack, link: \"ftp://x/{{release_id}}\"}}\nroutes: []"), "notifications.channels.team.link", "http:// or https://"),
        (notifications("link: \"https://x.example.com/{{version}}\"\nchannels: {team: {kind: slack}}\nroutes: []"), "notifications.link", "not a variable"),
        (notifications(ch), "notifications.routes", "required with channels"),
        (notifications(&format!("{ch}routes: {{channel: team}}")), "notifications.routes", "list of routes"),
        (notifications(&format!("{ch}routes: [{{apps: [web]}}]")), "notifications.routes[0].channel", "required"),
        (notifications(&format!("{ch}routes: [{{channel: ops}}]")), "notifications.routes[0].channel", "not defined (defined: team)"),
        (notifications(&format!("{ch}routes: [{{channel: team, apps: [shop]}}]")), "notifications.routes[0].apps[0]", "app \"shop\", which is not defined"),
        (notifications(&format!("{ch}routes: [{{channel: team, apps: []}}]")), "notifications.routes[0].apps", "lists no app"),
        (notifications(&format!("{ch}routes: [{{channel: team, environments: [prod]}}]")), "notifications.routes[0].environments[0]", "not defined"),
        (notifications(&format!("{ch}routes: [{{channel: team, on: [deployed]}}]")), "notifications.routes[0].on[0]", "not a trigger"),
        (notifications(&format!("{ch}routes: [{{channel: team, on: failed}}]")), "notifications.routes[0].on", "list of triggers"),
        (notifications(&format!("{ch}routes: [{{channel: team, on: []}}]")), "notifications.routes[0].on", "lists no trigger"),
        (notifications(&format!("{ch}routes: [{{channel: team, when: always}}]")), "notifications.routes[0].when", "unknown field"),
    ];
    for (text, path, message) in &table {
        refused(text, path, message);
    }
}
