//! The install for a real cluster (`deploy/`): the manifests render with `kubectl kustomize`,
//! apply to the sandbox's API server (which authorizes by RBAC), and every agent then runs on
//! its own ServiceAccount's token, with only the permissions the manifests grant: rolling,
//! canary (with an Ingress) and blue-green releases succeed, and what an agent has no business
//! doing is refused by the API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use baton_core::event::EventType;
use baton_sandbox::process::{ManagedProcess, ProcessSpec};
use baton_tests::harness::trial;
use baton_tests::pod::{
    env_from, volume_content, ApiServer, Manifests, PodIdentity, PodProcess, PodStart,
    VolumeContent,
};
use baton_tests::release::{app_config, config_yaml, Baton, AGENTS, PORT};
use baton_tests::{repo_root, target_bin};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        the_example_overlay_renders,
        the_grafana_dashboard_component_renders_the_dashboard_for_grafanas_sidecar,
        every_strategy_runs_with_each_agent_on_its_own_service_account,
        every_agent_of_the_example_overlay_comes_up_ready_as_its_rendered_deployment_says,
    ]
}

/// The tests that put the install's namespace `baton` (and its ServiceAccounts) in the shared
/// cluster take turns: one removes it when it ends.
static BATON_NAMESPACE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// A token of ServiceAccount `sa`, valid `seconds` (a TokenRequest, as `kubectl create token`
/// and the kubelet's projected token make one).
async fn service_account_token(
    accounts: &Api<ServiceAccount>,
    sa: &str,
    seconds: i64,
) -> Result<String> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(seconds),
            ..Default::default()
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token for {sa}"))?
        .status
        .and_then(|s| s.token)
        .with_context(|| format!("no token for {sa}"))
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
    let result = check_example(&work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// `baton bus credentials` into a copy of the example overlay, then `kubectl kustomize`: the
/// overlay's folder and what it renders.
async fn render_example(work: &Path) -> Result<(PathBuf, String)> {
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
    let (ok, rendered, err) = run(
        &kubectl(),
        &["kustomize", &overlay.display().to_string()],
        None,
    )
    .await?;
    ensure!(ok, "kubectl kustomize deploy/overlays/example: {err}");
    Ok((overlay, rendered))
}

async fn check_example(work: &Path) -> Result<()> {
    let (overlay, rendered) = render_example(work).await?;
    let credentials = overlay.join("credentials");
    ensure!(
        credentials.join("webhooks.yaml").is_file(),
        "baton bus credentials made no webhooks.yaml for the notifier"
    );
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
    let _baton_namespace = BATON_NAMESPACE.lock().await;
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
        let token = service_account_token(&accounts, &sa, 7200).await?;
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

/// The six agents of the example overlay.
const DEPLOYMENTS: [&str; 6] = [
    "baton-builder",
    "baton-deployer",
    "baton-health-checker",
    "baton-rollback",
    "baton-metrics",
    "baton-notifier",
];
/// The agents that call the Kubernetes API, and only they, mount their ServiceAccount's token.
const WITH_TOKEN: [&str; 3] = ["baton-deployer", "baton-health-checker", "baton-rollback"];

/// Every agent Deployment of the rendered example overlay, started as a kubelet would start its
/// pod (`tests/src/pod.rs`): the command and args, the environment (the ConfigMap of `envFrom`,
/// `env`), user and groups, and the files of its Secret volumes at the paths it mounts them
/// (items, modes, read-only), with its ServiceAccount's token where the pod mounts one. Each
/// must come up ready on its readiness probe, against a nats-server that has the overlay's
/// users (auth.conf and the public keys of the rendered NATS StatefulSet) and a bus made by the
/// overlay's `baton-bus-apply` Job, run the same way. A wrong Secret, key, path or flag fails.
async fn every_agent_of_the_example_overlay_comes_up_ready_as_its_rendered_deployment_says(
) -> Result<()> {
    let work = std::env::temp_dir().join(format!("baton-pods-{}", uuid::Uuid::new_v4().simple()));
    let result = agents_as_rendered(&work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn agents_as_rendered(work: &Path) -> Result<()> {
    let (_, rendered) = render_example(work).await?;
    let manifests = Manifests::parse(&rendered)?;
    let cluster = baton_tests::cluster::shared()?;
    let api = ApiServer::from_kubeconfig(&cluster.kubeconfig)?;
    let (_nats, nats_url) = start_nats(&manifests, work).await?;

    // The one value of the rendered environment that cannot work here: NATS_URL names the
    // NATS StatefulSet's pods by the cluster's DNS (baton-nats-N.baton-nats), which do not
    // exist outside a cluster; it is pointed at the loopback nats-server that stands in for
    // them. Everything else is as rendered.
    let agents: ConfigMap = manifests
        .all::<ConfigMap>("ConfigMap")?
        .into_iter()
        .find(|c| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("baton-agents-"))
        })
        .context("no ConfigMap baton-agents in the rendered overlay")?;
    let rendered_url = agents
        .data
        .as_ref()
        .and_then(|d| d.get("NATS_URL"))
        .context("the ConfigMap baton-agents has no NATS_URL")?;
    ensure!(
        rendered_url.split(',').all(|u| u.contains(".baton-nats:")),
        "NATS_URL is {rendered_url:?}, not the in-cluster servers this test replaces"
    );
    let substitute = [("NATS_URL", nats_url)];
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let start = |template: &k8s_openapi::api::core::v1::PodTemplateSpec,
                 pod_name: &'static str,
                 token: Option<String>| {
        let (manifests, api, substitute) = (&manifests, &api, &substitute);
        let log = logs.join(format!("{pod_name}.log"));
        let template = template.clone();
        async move {
            PodProcess::start(PodStart {
                manifests,
                template: &template,
                pod: PodIdentity {
                    namespace: "baton",
                    pod_name,
                },
                substitute,
                api,
                token: token.as_deref(),
                log,
            })
            .await
        }
    };

    // The bus: the overlay's Job, run as its pod template says.
    let job: Job = manifests
        .get("Job", "baton", "baton-bus-apply")?
        .context("no Job baton-bus-apply in the rendered overlay")?;
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .context("the Job has no template")?;
    let mut bus_apply = start(&template, "baton-bus-apply", None).await?;
    let status = bus_apply.wait_exit(Duration::from_secs(120)).await?;
    ensure!(
        status.success(),
        "the Job baton-bus-apply failed ({status}); its log ends:\n{}",
        bus_apply.log_tail(30)
    );

    // Tokens are issued for the rendered ServiceAccounts, in the namespace baton.
    let _baton_namespace = BATON_NAMESPACE.lock().await;
    let client = cluster.client().await?;
    let accounts = manifests.all::<ServiceAccount>("ServiceAccount")?;
    put_service_accounts(&client, &manifests, &accounts).await?;
    let result = async {
        let deployments = manifests.all::<Deployment>("Deployment")?;
        let mut names: Vec<&str> = deployments
            .iter()
            .filter_map(|d| d.metadata.name.as_deref())
            .collect();
        names.sort_unstable();
        let mut wanted = DEPLOYMENTS;
        wanted.sort_unstable();
        ensure!(
            names == wanted,
            "the example overlay renders the Deployments {names:?}, not the six agents"
        );
        let sa_api: Api<ServiceAccount> = Api::namespaced(client.clone(), "baton");
        for name in DEPLOYMENTS {
            let deployment = deployments
                .iter()
                .find(|d| d.metadata.name.as_deref() == Some(name))
                .with_context(|| format!("no Deployment {name}"))?;
            let template = deployment.spec.template.clone();
            let sa = template
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .with_context(|| format!("{name} names no ServiceAccount"))?;
            // As the kubelet asks for the projected token (`expirationSeconds: 3607`).
            let token = service_account_token(&sa_api, &sa, 3607).await?;
            // Each pod has a network of its own, where the manifest's port is free; here they
            // share the host's, so they run one after another, on a port nothing else holds.
            let probe_port = 9090;
            ensure!(
                tokio::net::TcpStream::connect(("127.0.0.1", probe_port))
                    .await
                    .is_err(),
                "port {probe_port} is taken on this host: {name} cannot be probed"
            );
            let mut pod = start(&template, name, Some(token)).await?;
            ensure!(
                pod.token_mounted == WITH_TOKEN.contains(&name),
                "{name}: the ServiceAccount token is {}mounted",
                if pod.token_mounted { "" } else { "not " }
            );
            let url = pod
                .wait_ready(Duration::from_secs(60))
                .await
                .with_context(|| {
                    format!("{name}, started as its Deployment says ({:?})", pod.argv)
                })?;
            ensure!(
                url.starts_with(&format!("http://127.0.0.1:{probe_port}/")),
                "{name} is probed at {url}"
            );
            if let Some(liveness) = pod.container.liveness_probe.clone() {
                let status = pod.probe(&liveness).await?;
                ensure!(status == 200, "{name}: the liveness probe answers {status}");
            }
            // SIGTERM, as a rollout or a drain stops it: it exits within its grace period.
            let grace = template
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30);
            let status = pod.stop(Duration::from_secs(u64::try_from(grace)?)).await?;
            ensure!(
                status.is_some(),
                "{name} did not exit within {grace}s of SIGTERM"
            );
        }
        Ok(())
    }
    .await;
    for sa in &accounts {
        if let Some(name) = sa.metadata.name.as_deref() {
            let _ = Api::<ServiceAccount>::namespaced(client.clone(), "baton")
                .delete(name, &Default::default())
                .await;
        }
    }
    result
}

/// The rendered namespace and ServiceAccounts in the shared cluster (after the other install
/// test's removal of the namespace, which it does not wait for, has ended).
async fn put_service_accounts(
    client: &kube::Client,
    manifests: &Manifests,
    accounts: &[ServiceAccount],
) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Some(ns) = namespaces.get_opt("baton").await? {
        if ns.metadata.deletion_timestamp.is_some() {
            let uid = ns.metadata.uid.clone().unwrap_or_default();
            tokio::time::timeout(
                Duration::from_secs(120),
                kube::runtime::wait::await_condition(
                    namespaces.clone(),
                    "baton",
                    kube::runtime::wait::conditions::is_deleted(&uid),
                ),
            )
            .await
            .context("the namespace baton is still being removed")??;
        }
    }
    let apply = PatchParams::apply("baton-tests").force();
    let namespace: Namespace = manifests
        .get("Namespace", "default", "baton")?
        .context("no Namespace baton in the rendered overlay")?;
    namespaces
        .patch("baton", &apply, &Patch::Apply(&namespace))
        .await?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), "baton");
    for sa in accounts {
        let name = sa
            .metadata
            .name
            .as_deref()
            .context("a nameless ServiceAccount")?;
        api.patch(name, &apply, &Patch::Apply(sa)).await?;
    }
    Ok(())
}

/// A nats-server with the users of the rendered NATS StatefulSet: the auth.conf of its config
/// volume and the public keys of its `envFrom` Secret (the overlay's `baton-nats-auth` and
/// `baton-nats-nkeys`, made by `baton bus auth` and `baton bus credentials`), beside the
/// sandbox's server configuration (the component's nats.conf routes to the cluster's pods).
async fn start_nats(manifests: &Manifests, work: &Path) -> Result<(ManagedProcess, String)> {
    let sts: StatefulSet = manifests
        .get("StatefulSet", "baton", "baton-nats")?
        .context("no StatefulSet baton-nats in the rendered overlay")?;
    let spec = sts
        .spec
        .template
        .spec
        .context("the StatefulSet has no pod spec")?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "config")
        .context("the NATS StatefulSet has no config volume")?;
    let VolumeContent::Files(files) = volume_content(manifests, "baton", volume)? else {
        bail!("the NATS config volume holds no files");
    };
    let auth = files
        .iter()
        .find(|f| f.path == Path::new("auth.conf"))
        .context("the NATS config volume has no auth.conf")?;
    let container = spec.containers.first().context("no NATS container")?;
    let keys = env_from(
        manifests,
        "baton",
        container.env_from.as_deref().unwrap_or_default(),
    )?;
    let conf = work.join("nats");
    std::fs::create_dir_all(&conf)?;
    std::fs::copy(
        repo_root().join("bus-config/nats-server.conf"),
        conf.join("nats-server.conf"),
    )?;
    std::fs::write(conf.join("auth.conf"), &auth.bytes)?;
    let store = work.join("nats-store");
    std::fs::create_dir_all(&store)?;
    let port = baton_sandbox::process::free_port()?;
    let mut process_spec = ProcessSpec::new(
        "nats-server",
        baton_sandbox::bins::nats_server()?,
        work.join("nats-server.log"),
    )
    .arg("-c")
    .arg(conf.join("nats-server.conf"))
    .args(["-a", "127.0.0.1", "-p"])
    .arg(port.to_string())
    .arg("-sd")
    .arg(&store);
    for (k, v) in keys {
        process_spec = process_spec.env(k, v);
    }
    let mut process = ManagedProcess::spawn(process_spec)?;
    baton_sandbox::process::wait_ready(
        &mut process,
        "nats-server",
        Duration::from_secs(30),
        || baton_sandbox::process::probe_tcp(port),
    )
    .await?;
    Ok((process, format!("nats://127.0.0.1:{port}")))
}
