//! The install for a real cluster (`deploy/`): the manifests render with `kubectl kustomize`,
//! apply to the sandbox's API server (which authorizes by RBAC), and every agent then runs on
//! its own ServiceAccount's token, with only the permissions the manifests grant: rolling,
//! canary (with an Ingress) and blue-green releases succeed, and what an agent has no business
//! doing is refused by the API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType;
use baton_tests::harness::trial;
use baton_tests::release::{app_config, config_yaml, Baton, AGENTS, PORT};
use baton_tests::{repo_root, target_bin};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::PostParams;
use kube::Api;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        the_example_overlay_renders,
        the_grafana_dashboard_component_renders_the_dashboard_for_grafanas_sidecar,
        every_strategy_runs_with_each_agent_on_its_own_service_account,
    ]
}

const END: Duration = Duration::from_secs(180);

async fn run(
    program: &Path,
    args: &[&str],
    kubeconfig: Option<&Path>,
) -> Result<(bool, String, String)> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn kubectl() -> PathBuf {
    PathBuf::from("kubectl")
}

/// A copy of `deploy/` to work in (an overlay needs files the repository does not hold).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `kubectl kustomize deploy/overlays/example` after the two steps docs/install.md asks for
/// first: `baton bus credentials` into the overlay, `baton bus auth` for its cluster.
async fn the_example_overlay_renders() -> Result<()> {
    let work = std::env::temp_dir().join(format!("baton-deploy-{}", uuid::Uuid::new_v4().simple()));
    let result = render_example(&work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn render_example(work: &Path) -> Result<()> {
    let deploy = work.join("deploy");
    copy_tree(&repo_root().join("deploy"), &deploy)?;
    let overlay = deploy.join("overlays/example");
    let credentials = overlay.join("credentials");
    let (ok, _, err) = run(
        &target_bin("baton")?,
        &[
            "bus",
            "credentials",
            "--out",
            &credentials.display().to_string(),
        ],
        None,
    )
    .await?;
    ensure!(ok, "baton bus credentials: {err}");
    ensure!(
        credentials.join("webhooks.yaml").is_file(),
        "baton bus credentials made no webhooks.yaml for the notifier"
    );
    let (ok, rendered, err) = run(
        &kubectl(),
        &["kustomize", &overlay.display().to_string()],
        None,
    )
    .await?;
    ensure!(ok, "kubectl kustomize deploy/overlays/example: {err}");
    for wanted in [
        "kind: StatefulSet",
        "name: baton-nats",
        "kind: RoleBinding",
        "BATON_CLUSTER: example",
        "name: baton-nats-deployer",
        "name: baton-notifier",
        "name: baton-nats-notifier",
        "name: baton-notifier-webhooks",
    ] {
        ensure!(
            rendered.contains(wanted),
            "the rendered overlay lacks {wanted:?}"
        );
    }
    // The committed auth.conf is what `baton bus auth` makes for the overlay's cluster.
    let (ok, auth, err) = run(
        &target_bin("baton")?,
        &["bus", "auth", "--clusters", "example"],
        None,
    )
    .await?;
    ensure!(ok, "{err}");
    ensure!(
        std::fs::read_to_string(overlay.join("auth.conf"))? == auth,
        "deploy/overlays/example/auth.conf is stale: run `baton bus auth --clusters example --out deploy/overlays/example/auth.conf`"
    );
    // No seed in what is rendered for the people's roles: the cli and config seeds stay out.
    let cli_seed = std::fs::read_to_string(credentials.join("cli.nk"))?;
    ensure!(
        !rendered.contains(cli_seed.trim()),
        "the cli seed is in the cluster"
    );
    Ok(())
}

/// An overlay with `components/grafana-dashboard` renders one ConfigMap, labelled for Grafana's
/// dashboard sidecar, holding `deploy/grafana/baton.json` as it is.
async fn the_grafana_dashboard_component_renders_the_dashboard_for_grafanas_sidecar() -> Result<()>
{
    let work = std::env::temp_dir().join(format!("baton-deploy-{}", uuid::Uuid::new_v4().simple()));
    let result = async {
        let deploy = work.join("deploy");
        copy_tree(&repo_root().join("deploy"), &deploy)?;
        let overlay = deploy.join("overlays/grafana");
        std::fs::create_dir_all(&overlay)?;
        std::fs::write(
            overlay.join("kustomization.yaml"),
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncomponents:\n  - ../../components/grafana-dashboard\n",
        )?;
        let (ok, rendered, err) =
            run(&kubectl(), &["kustomize", &overlay.display().to_string()], None).await?;
        ensure!(ok, "kubectl kustomize with components/grafana-dashboard: {err}");
        let map: serde_json::Value = serde_yaml_ng::from_str(&rendered)?;
        ensure!(
            map["kind"] == "ConfigMap"
                && map["metadata"]["name"] == "baton-grafana-dashboard"
                && map["metadata"]["namespace"] == "baton"
                && map["metadata"]["labels"]["grafana_dashboard"] == "1",
            "rendered:\n{rendered}"
        );
        let file = std::fs::read_to_string(repo_root().join("deploy/grafana/baton.json"))?;
        ensure!(
            map["data"]["baton.json"].as_str() == Some(file.as_str()),
            "the ConfigMap does not hold deploy/grafana/baton.json as it is"
        );
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A kubeconfig like the admin's, with `token` as its user.
fn kubeconfig_with_token(admin: &Path, token: &str, out: &Path) -> Result<()> {
    let mut config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(admin)?)?;
    let users = config
        .get_mut("users")
        .and_then(|u| u.as_sequence_mut())
        .context("the kubeconfig has no users")?;
    for user in users {
        if let Some(u) = user.get_mut("user").and_then(|u| u.as_mapping_mut()) {
            u.clear();
            u.insert("token".into(), token.into());
        }
    }
    std::fs::write(out, serde_yaml_ng::to_string(&config)?)?;
    Ok(())
}

async fn every_strategy_runs_with_each_agent_on_its_own_service_account() -> Result<()> {
    let mut baton = Baton::start_with("install", &["web"], 2, &[]).await?;
    let admin = baton.cluster.kubeconfig.clone();
    let ns = baton.ns.name.clone();
    // An overlay of the test's own beside the example, in a copy of deploy/.
    let deploy = baton.bus.sandbox.dir().join("deploy");
    copy_tree(&repo_root().join("deploy"), &deploy)?;
    let work = deploy.join("overlays/test");
    std::fs::create_dir_all(&work)?;

    // The base, with the example overlay's bindings for this test's namespace.
    let bindings =
        std::fs::read_to_string(repo_root().join("deploy/overlays/example/app-namespaces.yaml"))?
            .replace("namespace: shop", &format!("namespace: {ns}"))
            .replace("values: [shop]", &format!("values: [{ns}]"));
    std::fs::write(work.join("app-namespaces.yaml"), bindings)?;
    std::fs::write(
        work.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\n  - app-namespaces.yaml\n\
             configMapGenerator:\n  - name: baton-agents\n    namespace: baton\n    behavior: merge\n    literals:\n      - BATON_CLUSTER={}\n",
            baton_tests::CLUSTER
        ),
    )?;
    let (ok, rendered, err) = run(
        &kubectl(),
        &["kustomize", &work.display().to_string()],
        None,
    )
    .await?;
    ensure!(ok, "kubectl kustomize: {err}");
    // The sandbox's API server (Kubernetes 1.20) serves PodDisruptionBudgets as policy/v1beta1
    // only; the manifests are for current clusters (policy/v1, the same fields).
    let manifests = work.join("rendered.yaml");
    std::fs::write(
        &manifests,
        rendered.replace("apiVersion: policy/v1\n", "apiVersion: policy/v1beta1\n"),
    )?;
    let sandbox_bin = target_bin("baton-sandbox")?;
    let (ok, out, err) = run(
        &sandbox_bin,
        &[
            "apply",
            "-f",
            &manifests.display().to_string(),
            "--kubeconfig",
            &admin.display().to_string(),
        ],
        None,
    )
    .await?;
    ensure!(ok, "applying the install: {out}{err}");
    let result = with_installed(&mut baton, &admin, &ns, &work).await;
    // The install is cluster-wide in part (ClusterRoles and their bindings): removed again.
    let _ = run(
        &kubectl(),
        &[
            "delete",
            "-f",
            &manifests.display().to_string(),
            "--ignore-not-found",
            "--wait=false",
        ],
        Some(&admin),
    )
    .await;
    result
}

async fn with_installed(baton: &mut Baton, admin: &Path, ns: &str, work: &Path) -> Result<()> {
    // Each agent on its own ServiceAccount's token (a TokenRequest, as `kubectl create token`
    // makes one).
    let accounts: Api<ServiceAccount> = Api::namespaced(baton.cluster.client().await?, "baton");
    let mut kubeconfigs = Vec::new();
    for agent in AGENTS {
        let sa = format!("baton-{agent}");
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(7200),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = accounts
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token for {sa}"))?
            .status
            .and_then(|s| s.token)
            .with_context(|| format!("no token for {sa}"))?;
        let path = work.join(format!("{agent}.kubeconfig"));
        kubeconfig_with_token(admin, &token, &path)?;
        kubeconfigs.push((agent, path));
    }
    for (agent, path) in &kubeconfigs {
        let path = path.display().to_string();
        baton
            .restart_agent_with(agent, &[("KUBECONFIG", path.as_str())])
            .await
            .with_context(|| format!("starting {agent} on its own token"))?;
    }
    let kubeconfig_of = |name: &str| {
        kubeconfigs
            .iter()
            .find(|(a, _)| *a == name)
            .map(|(_, p)| p.clone())
            .context("no kubeconfig")
    };

    // What an agent has no business doing is refused.
    let refused = |agent: &'static str, args: Vec<String>| {
        let kubeconfig = kubeconfig_of(agent);
        async move {
            let kubeconfig = kubeconfig?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out, err) = run(&kubectl(), &args, Some(&kubeconfig)).await?;
            ensure!(!ok, "{agent} may {args:?}: {out}");
            ensure!(
                err.contains("forbidden") || err.contains("Forbidden"),
                "{agent} {args:?}: {err}"
            );
            Ok::<(), anyhow::Error>(())
        }
    };
    let patch = r#"{"metadata":{"labels":{"touched":"yes"}}}"#;
    refused(
        "health-checker",
        vec![
            "-n".into(),
            ns.into(),
            "patch".into(),
            "deployment".into(),
            "web".into(),
            "-p".into(),
            patch.into(),
        ],
    )
    .await?;
    refused(
        "builder",
        vec!["-n".into(), ns.into(), "get".into(), "pods".into()],
    )
    .await?;
    refused(
        "metrics",
        vec!["-n".into(), ns.into(), "get".into(), "deployments".into()],
    )
    .await?;
    refused(
        "rollback",
        vec![
            "-n".into(),
            ns.into(),
            "create".into(),
            "configmap".into(),
            "x".into(),
        ],
    )
    .await?;
    refused(
        "deployer",
        vec![
            "-n".into(),
            "kube-system".into(),
            "get".into(),
            "pods".into(),
        ],
    )
    .await?;
    refused(
        "deployer",
        vec!["-n".into(), ns.into(), "get".into(), "secrets".into()],
    )
    .await?;
    // …while what it needs is allowed.
    let hc = kubeconfig_of("health-checker")?;
    let (ok, _, err) = run(&kubectl(), &["-n", ns, "get", "pods"], Some(&hc)).await?;
    ensure!(ok, "the health-checker cannot list pods: {err}");

    // Rolling.
    baton
        .apply_config(&config_yaml(
            ns,
            "{duration: 2s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    succeeds(baton, "v2").await.context("the rolling release")?;

    // Canary, with an Ingress whose canary twin carries the weights.
    let client = baton.cluster.client().await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await?;
    let ingress: Ingress = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"rules": [{"host": "web.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": PORT}}}}
        ]}}]}
    }))?;
    Api::<Ingress>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ingress)
        .await?;
    baton
        .apply_config(&app_config(
            ns,
            "strategy: canary\ncanary: {steps: [{weight: 25}, {weight: 100}]}\n\
             analysis: {duration: 2s, interval: 1s, failure_limit: 0}\ningress: web",
        ))
        .await?;
    let events = succeeds(baton, "v3").await.context("the canary release")?;
    ensure!(
        events
            .iter()
            .filter(|e| e.event_type == EventType::DeployStepReady)
            .count()
            >= 2,
        "the canary did not go through its steps"
    );
    let canary_ingress = Api::<Ingress>::namespaced(client.clone(), ns)
        .get_opt("web-canary")
        .await?;
    ensure!(
        canary_ingress.is_none(),
        "the canary Ingress is left behind"
    );

    // Blue-green, switching the Service.
    baton
        .apply_config(&app_config(
            ns,
            "strategy: blue-green\nblue_green: {scale_down_delay: 0ms, post_promotion_analysis: true}\n\
             analysis: {duration: 2s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    succeeds(baton, "v4")
        .await
        .context("the blue-green release")?;
    Ok(())
}

/// Releases a healthy `tag` and waits for `release.succeeded`.
async fn succeeds(baton: &Baton, tag: &str) -> Result<Vec<baton_core::event::Event>> {
    let (image, _) = baton.push(tag, &[("BATON_SIM_HEALTH", "ok")]).await?;
    let rid = baton.release_of("web", &image, &[]).await?;
    let events = baton.wait_for_end(rid, END).await?;
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        types.last() == Some(&EventType::ReleaseSucceeded),
        "release {rid} ended with {types:?}; the deployer's log ends:\n{}",
        baton
            .log_dir()
            .join("deployer.log")
            .to_str()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|l| l.lines().rev().take(15).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    );
    Ok(events)
}
