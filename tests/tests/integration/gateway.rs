//! Gateway API: an app that names an HTTPRoute gets its canary's traffic share from the route's
//! backendRefs (the stable and the canary Service), set by server-side apply of the route's rules
//! alone. The route's other fields stay as their owner wrote them; promotion and rollback put it
//! back to the stable Service alone. Against an HTTPRoute CustomResourceDefinition installed in
//! the sandbox (`tests/fixtures/httproute-crd.yaml`).
//!
//! The sandbox's kube-apiserver serves custom resources because scripts/setup.sh builds it with
//! Debian's reflect2 1.0.2 in place of the vendored 1.0.1, which crashes under Go 1.18 and later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType;
use baton_core::workload;
use baton_tests::cluster::ClusterInfo;
use baton_tests::harness::trial;
use baton_tests::release::{app_config, Baton, PORT};
use baton_tests::{repo_root, target_bin};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DynamicObject, PostParams};
use kube::runtime::watcher;
use kube::Api;
use libtest_mimic::Trial;
use serde_json::{json, Value};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        the_routes_weights_follow_each_step_and_its_other_fields_are_untouched,
        a_rolled_back_canary_gives_the_route_back_to_the_stable_service,
        the_install_guides_check_finds_the_httproute_v1_api_the_canary_uses,
    ]
}

const END: Duration = Duration::from_secs(180);

/// Installs the CRD (once per sandbox; applying it again changes nothing) and waits until the
/// API serves it.
async fn install_crd(cluster: &ClusterInfo) -> Result<()> {
    let out = tokio::process::Command::new(target_bin("baton-sandbox")?)
        .args(["apply", "-f"])
        .arg(repo_root().join("tests/fixtures/httproute-crd.yaml"))
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "installing the HTTPRoute CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = cluster.client().await?;
    baton_tests::eventually("the HTTPRoute API", Duration::from_secs(60), || {
        let routes = workload::http_routes(&client, "default");
        async move { Ok(routes.list(&Default::default()).await.ok().map(|_| ())) }
    })
    .await
}

/// The app's Service, and an HTTPRoute `web` as its owner writes it: a parent, a host, a match,
/// a label — and the Service `web` as its one backend.
async fn start(prefix: &str) -> Result<Baton> {
    let baton = Baton::start(prefix).await?;
    install_crd(&baton.cluster).await?;
    let client = baton.cluster.client().await?;
    let ns = baton.ns.name.clone();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await?;
    let route: DynamicObject = serde_json::from_value(owners_route())?;
    workload::http_routes(&client, &ns)
        .create(&PostParams::default(), &route)
        .await
        .context("creating the HTTPRoute")?;
    baton
        .apply_config(&app_config(
            &ns,
            "strategy: canary\ncanary: {steps: [{weight: 20}, {weight: 60}, {weight: 100}]}\n\
             analysis: {duration: 2s, interval: 1s, failure_limit: 0}\nhttp_route: web",
        ))
        .await?;
    Ok(baton)
}

fn owners_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "labels": {"team": "shop"}},
        "spec": {
            "parentRefs": [{"name": "public-gateway", "namespace": "gateways"}],
            "hostnames": ["web.example"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "web", "port": PORT}]
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                    "backendRefs": [{"name": "cdn", "port": 80}]
                }
            ]
        }
    })
}

/// The (stable, canary) weight pairs seen, in order.
type Seen = Arc<Mutex<Vec<(i64, i64)>>>;

/// Every (stable, canary) weight pair the route's first rule carries, as it changes.
fn watch_weights(client: kube::Client, ns: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = workload::http_routes(&client, ns);
    let record = seen.clone();
    let task = tokio::spawn(async move {
        let config = watcher::Config::default().fields("metadata.name=web");
        let mut events = watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            let route = match event {
                Ok(watcher::Event::Apply(r)) | Ok(watcher::Event::InitApply(r)) => r,
                _ => continue,
            };
            let refs = route.data["spec"]["rules"][0]["backendRefs"].clone();
            let weight = |name: &str| {
                refs.as_array()
                    .and_then(|a| a.iter().find(|b| b["name"] == name))
                    .map(|b| b["weight"].as_i64().unwrap_or(-1))
                    .unwrap_or(0)
            };
            let pair = (weight("web"), weight("web-canary"));
            let mut seen = record.lock().unwrap_or_else(|p| p.into_inner());
            if seen.last() != Some(&pair) {
                seen.push(pair);
            }
        }
    });
    (seen, task)
}

/// The route now, with what Baton must not have touched compared to what its owner wrote, and
/// its traffic back at the stable Service alone.
async fn back_to_stable(client: &kube::Client, ns: &str) -> Result<()> {
    let route = workload::http_routes(client, ns).get("web").await?;
    let owner = owners_route();
    ensure!(
        route.data["spec"]["parentRefs"] == owner["spec"]["parentRefs"]
            && route.data["spec"]["hostnames"] == owner["spec"]["hostnames"]
            && route
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("team"))
                .map(String::as_str)
                == Some("shop"),
        "fields the owner set were changed: {:#}",
        route.data
    );
    ensure!(
        route.data["spec"]["rules"] == owner["spec"]["rules"],
        "the route's rules are not as its owner wrote them: {:#}",
        route.data["spec"]["rules"]
    );
    let canary = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt("web-canary")
        .await?;
    ensure!(canary.is_none(), "the canary Service is left behind");
    Ok(())
}

async fn the_routes_weights_follow_each_step_and_its_other_fields_are_untouched() -> Result<()> {
    let baton = start("gw-ok").await?;
    let client = baton.cluster.client().await?;
    let ns = baton.ns.name.clone();
    let (seen, watch) = watch_weights(client.clone(), &ns);
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    let events = baton.wait_for_end(rid, END).await?;
    watch.abort();
    ensure!(
        events.last().map(|e| e.event_type) == Some(EventType::ReleaseSucceeded),
        "the release ended with {:?}",
        events.last().map(|e| e.event_type)
    );
    let weights = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Owner's route (web alone, no weight), then 80/20, then 40/60, then web alone again.
    ensure!(
        weights == [(-1, 0), (80, 20), (40, 60), (-1, 0)],
        "the route carried {weights:?}"
    );
    back_to_stable(&client, &ns).await
}

async fn a_rolled_back_canary_gives_the_route_back_to_the_stable_service() -> Result<()> {
    let baton = start("gw-bad").await?;
    let client = baton.cluster.client().await?;
    let ns = baton.ns.name.clone();
    let (seen, watch) = watch_weights(client.clone(), &ns);
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    let events = baton.wait_for_end(rid, END).await?;
    watch.abort();
    ensure!(
        events.last().map(|e| e.event_type) == Some(EventType::ReleaseRolledBack),
        "the release ended with {:?}",
        events.last().map(|e| e.event_type)
    );
    let weights = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        weights.first() == Some(&(-1, 0))
            && weights.contains(&(80, 20))
            && weights.last() == Some(&(-1, 0)),
        "the route carried {weights:?}"
    );
    back_to_stable(&client, &ns).await
}

/// The Gateway API release docs/install.md points users to, and the one the stand-in CRD stands
/// in for.
const GATEWAY_API_RELEASE: &str = "v1.0.0";

/// The words of a command line as a POSIX shell splits them (spaces, single quotes).
fn shell_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    ensure!(!quoted, "an unclosed quote in {line:?}");
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// docs/install.md ("Gateway API") names Gateway API's standard-channel release, and its check
/// command, run as written against a cluster with the HTTPRoute CRD, finds the `v1` the
/// deployer and the rollback agent use.
async fn the_install_guides_check_finds_the_httproute_v1_api_the_canary_uses() -> Result<()> {
    let guide = std::fs::read_to_string(repo_root().join("docs/install.md"))?;
    let release = format!(
        "https://github.com/kubernetes-sigs/gateway-api/releases/download/{GATEWAY_API_RELEASE}/standard-install.yaml"
    );
    ensure!(
        guide.contains(&release),
        "docs/install.md does not point to {release}"
    );
    let stand_in = std::fs::read_to_string(repo_root().join("tests/fixtures/httproute-crd.yaml"))?;
    ensure!(
        stand_in.contains(&format!("standard channel {GATEWAY_API_RELEASE}")),
        "the stand-in CRD does not say it stands in for {GATEWAY_API_RELEASE}"
    );
    let check = guide
        .lines()
        .find(|l| l.starts_with("kubectl get crd httproutes.gateway.networking.k8s.io"))
        .context("docs/install.md has no command to check the HTTPRoute CRD")?;
    let argv = shell_words(check)?;
    let cluster = baton_tests::cluster::shared()?;
    install_crd(&cluster).await?;
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .await
        .with_context(|| format!("running {check}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{check}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.split_whitespace().any(|v| v == "v1"),
        "{check} printed {stdout:?}, without v1"
    );
    Ok(())
}
