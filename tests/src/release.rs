//! A whole Baton for end-to-end tests: a namespace with a running Deployment, a nats-server with
//! the bus, the five agents as real processes, a configuration applied with the real `baton`, and
//! helpers to run `baton` commands and read a release's events.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::PostParams;
use kube::Api;

use baton_core::event::{Event, EventType};
use baton_core::names::ReleaseId;

use crate::cluster::{deployment, shared, ClusterInfo, TestNamespace};
use crate::{target_bin, AgentProcess, BusEnv, CLUSTER};

pub const AGENTS: [&str; 5] = [
    "builder",
    "deployer",
    "health-checker",
    "rollback",
    "metrics",
];
/// The apps' port, as Kubernetes' `containerPort` has it (an `i32`): the configuration's default.
pub const PORT: i32 = baton_core::config::DEFAULT_PORT as i32;

/// Everything an end-to-end test needs; dropped at the end of the test.
pub struct Baton {
    pub cluster: ClusterInfo,
    pub ns: TestNamespace,
    pub bus: BusEnv,
    pub agents: Vec<AgentProcess>,
    pub app: String,
    pub env: String,
    /// Images are `<registry>/<repo>:<tag>`.
    pub repo: String,
    /// What the agents' environment has beyond the bus and the cluster.
    pub agent_env: Vec<(String, String)>,
}

/// The configuration the tests apply: environment `test` (the test's namespace), environment
/// `ghost` (a namespace that does not exist), app `web` with an HTTP health check.
pub fn config_yaml(namespace: &str, analysis: &str) -> String {
    app_config(
        namespace,
        &format!("strategy: rolling\nanalysis: {analysis}"),
    )
}

/// The test configuration with app settings of the caller's (YAML lines at the app's level,
/// e.g. `strategy: canary`), after the common ones.
pub fn app_config(namespace: &str, app_settings: &str) -> String {
    let settings: String = app_settings.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"environments:
  test:
    cluster: {CLUSTER}
    namespace: {namespace}
  ghost:
    cluster: {CLUSTER}
    namespace: {namespace}-missing
apps:
  web:
    container: app
    port: {PORT}
    rolling: {{max_surge: "1", max_unavailable: "0"}}
    step_timeout: 60s
    checks:
      - name: health
        http: {{path: /health, expect_status: 200, timeout: 2s, retries: 1, interval: 200ms}}
{settings}"#
    )
}

/// A configuration of many apps in environment `test` (the test's namespace), each with the
/// common settings of [`app_config`] plus `app_settings(app)`.
pub fn fleet_config(
    namespace: &str,
    apps: &[String],
    app_settings: impl Fn(&str) -> String,
) -> String {
    let mut yaml = format!(
        "environments:\n  test:\n    cluster: {CLUSTER}\n    namespace: {namespace}\napps:\n"
    );
    for app in apps {
        let settings: String = app_settings(app)
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        yaml.push_str(&format!(
            r#"  {app}:
    container: app
    port: {PORT}
    rolling: {{max_surge: "1", max_unavailable: "0"}}
    step_timeout: 60s
    checks:
      - name: health
        http: {{path: /health, expect_status: 200, timeout: 2s, retries: 1, interval: 200ms}}
{settings}"#
        ));
    }
    yaml
}

impl Baton {
    /// Starts it all, with `web:v1` (healthy) running as a 2-replica Deployment.
    pub async fn start(prefix: &str) -> Result<Baton> {
        let baton = Baton::start_with(prefix, &["web"], 2, &[]).await?;
        baton
            .apply_config(&config_yaml(
                &baton.ns.name,
                "{duration: 3s, interval: 1s, failure_limit: 0}",
            ))
            .await?;
        Ok(baton)
    }

    /// Starts a namespace with a Deployment of `replicas` of the healthy `v1` image per app, a
    /// bus, and the five agents with `agent_env` added to their environment. No configuration
    /// is applied.
    pub async fn start_with(
        prefix: &str,
        apps: &[&str],
        replicas: i32,
        agent_env: &[(&str, &str)],
    ) -> Result<Baton> {
        Self::start_on(BusEnv::start().await?, prefix, apps, replicas, agent_env).await
    }

    /// Like [`start_with`](Self::start_with), on the bus given (e.g. a 3-server cluster).
    pub async fn start_on(
        bus: BusEnv,
        prefix: &str,
        apps: &[&str],
        replicas: i32,
        agent_env: &[(&str, &str)],
    ) -> Result<Baton> {
        let cluster = shared()?;
        let ns = TestNamespace::create(&cluster, prefix).await?;
        let repo = format!("{}-web", ns.name);
        let registry = cluster.registry()?;
        registry
            .push_image(&repo, "v1", &[("BATON_SIM_HEALTH".into(), "ok".into())])
            .await?;
        let client = cluster.client().await?;
        let deployments: Api<Deployment> = Api::namespaced(client, &ns.name);
        let v1 = format!("{}/{repo}:v1", cluster.registry);
        for app in apps {
            deployments
                .create(
                    &PostParams::default(),
                    &deployment(app, &v1, replicas, PORT, &[]),
                )
                .await?;
        }
        for app in apps {
            let available = kube::runtime::wait::await_condition(
                deployments.clone(),
                app,
                move |d: Option<&Deployment>| {
                    d.and_then(|d| d.status.as_ref())
                        .and_then(|s| s.available_replicas)
                        == Some(replicas)
                },
            );
            tokio::time::timeout(Duration::from_secs(180), available)
                .await
                .with_context(|| format!("{app}:v1 never became available"))??;
        }

        let kubeconfig = cluster.kubeconfig.display().to_string();
        let mut agents = Vec::new();
        for name in AGENTS {
            let mut env = vec![
                ("KUBECONFIG", kubeconfig.as_str()),
                ("BATON_PLAIN_HTTP_REGISTRIES", cluster.registry.as_str()),
            ];
            env.extend_from_slice(agent_env);
            agents.push(AgentProcess::start(&bus, name, &env, bus.sandbox.dir()).await?);
        }
        Ok(Baton {
            cluster,
            ns,
            bus,
            agents,
            app: apps.first().map_or("web", |a| a).to_owned(),
            env: "test".into(),
            repo,
            agent_env: agent_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
    }

    /// `baton release APP --env test --image IMAGE` plus `args`; the release id.
    pub async fn release_of(&self, app: &str, image: &str, args: &[&str]) -> Result<ReleaseId> {
        let mut all = vec!["release", app, "--env", self.env.as_str(), "--image", image];
        all.extend_from_slice(args);
        let out = self.baton(&all).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            out.status.success(),
            "baton release {app} failed: {stdout}{stderr}"
        );
        stdout
            .split_whitespace()
            .find_map(|w| ReleaseId::parse(w.trim_end_matches(':')).ok())
            .with_context(|| format!("no release id in the output: {stdout}{stderr}"))
    }

    /// The image of Deployment `app`'s `app` container.
    pub async fn image_of(&self, app: &str) -> Result<String> {
        let client = self.cluster.client().await?;
        let d = Api::<Deployment>::namespaced(client, &self.ns.name)
            .get(app)
            .await?;
        Ok(d.spec
            .template
            .spec
            .and_then(|s| s.containers.into_iter().find(|c| c.name == "app"))
            .and_then(|c| c.image)
            .unwrap_or_default())
    }

    pub async fn apply_config(&self, yaml: &str) -> Result<()> {
        let path = self
            .bus
            .sandbox
            .dir()
            .join(format!("baton-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, yaml)?;
        let out = self
            .baton(&["config", "apply", &path.display().to_string()])
            .await?;
        ensure!(
            out.status.success(),
            "config apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Pushes `<repo>:<tag>` with the given simulated behaviour; returns its reference and digest.
    pub async fn push(&self, tag: &str, env: &[(&str, &str)]) -> Result<(String, String)> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let digest = self
            .cluster
            .registry()?
            .push_image(&self.repo, tag, &env)
            .await?;
        Ok((self.image(tag), digest))
    }

    pub fn image(&self, tag: &str) -> String {
        format!("{}/{}:{tag}", self.cluster.registry, self.repo)
    }

    /// Runs the real `baton` CLI against this Baton.
    pub async fn baton(&self, args: &[&str]) -> Result<Output> {
        Ok(tokio::process::Command::new(target_bin("baton")?)
            .args(args)
            .envs(self.bus.process_env())
            .env("BATON_ACTOR", "e2e-test")
            .kill_on_drop(true)
            .output()
            .await?)
    }

    /// `baton release web --env test --image IMAGE [--wait]`; returns the exit code, the
    /// release id and the output.
    pub async fn release(&self, image: &str, wait: bool) -> Result<(i32, ReleaseId, String)> {
        let mut args = vec![
            "release",
            self.app.as_str(),
            "--env",
            self.env.as_str(),
            "--image",
            image,
            "--timeout",
            "5m",
        ];
        if wait {
            args.push("--wait");
        }
        let out = self.baton(&args).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let rid = stdout
            .split_whitespace()
            .find_map(|w| ReleaseId::parse(w.trim_end_matches(':')).ok())
            .with_context(|| format!("no release id in the output: {stdout}{stderr}"))?;
        Ok((
            out.status.code().unwrap_or(-1),
            rid,
            format!("{stdout}{stderr}"),
        ))
    }

    /// The release's events, in stream order.
    pub async fn events(&self, rid: ReleaseId) -> Result<Vec<Event>> {
        Ok(self.bus.bus("cli").await?.release_history(rid).await?)
    }

    pub async fn types(&self, rid: ReleaseId) -> Result<Vec<EventType>> {
        Ok(self
            .events(rid)
            .await?
            .iter()
            .map(|e| e.event_type)
            .collect())
    }

    pub async fn deployment(&self) -> Result<Deployment> {
        let client = self.cluster.client().await?;
        Ok(Api::<Deployment>::namespaced(client, &self.ns.name)
            .get("web")
            .await?)
    }

    /// The image of the Deployment's `app` container.
    pub async fn deployed_image(&self) -> Result<String> {
        let d = self.deployment().await?;
        Ok(d.spec
            .template
            .spec
            .and_then(|s| s.containers.into_iter().find(|c| c.name == "app"))
            .and_then(|c| c.image)
            .unwrap_or_default())
    }

    pub fn agent(&mut self, name: &str) -> Result<&mut AgentProcess> {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .with_context(|| format!("no agent {name}"))
    }

    /// Log folder of the agents (kept with the nats-server's).
    pub fn log_dir(&self) -> PathBuf {
        self.bus.sandbox.dir().to_path_buf()
    }
}

/// Whether `wanted` appears in `types` in this order (other events may come between).
pub fn in_order(types: &[EventType], wanted: &[EventType]) -> bool {
    let mut it = types.iter();
    wanted.iter().all(|w| it.any(|t| t == w))
}

impl Baton {
    /// Kills an agent with SIGKILL and starts a new one in its place (same flags, same env).
    pub async fn restart_agent(&mut self, name: &str) -> Result<()> {
        self.restart_agent_with(name, &[]).await
    }

    /// Like [`restart_agent`](Self::restart_agent), with `more` added to (or replacing part
    /// of) its environment, e.g. a `KUBECONFIG` of its own.
    pub async fn restart_agent_with(&mut self, name: &str, more: &[(&str, &str)]) -> Result<()> {
        let kubeconfig = self.cluster.kubeconfig.display().to_string();
        let registry = self.cluster.registry.clone();
        let agent = self.agent(name)?;
        agent.process.kill9().await?;
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.as_str()),
            ("BATON_PLAIN_HTTP_REGISTRIES", registry.as_str()),
        ];
        let extra = self.agent_env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env.extend_from_slice(more);
        let fresh = AgentProcess::start(&self.bus, name, &env, self.bus.sandbox.dir()).await?;
        if let Some(slot) = self.agents.iter_mut().find(|a| a.name == name) {
            *slot = fresh;
        }
        Ok(())
    }

    /// Waits until the release's history contains `t` (watching the stream, polled briefly).
    pub async fn wait_for_event(
        &self,
        rid: ReleaseId,
        t: EventType,
        timeout: Duration,
    ) -> Result<Vec<Event>> {
        crate::eventually(&format!("{t} of release {rid}"), timeout, || async move {
            let events = self.events(rid).await?;
            Ok(events.iter().any(|e| e.event_type == t).then_some(events))
        })
        .await
    }

    /// Waits until the release has ended; returns its events.
    pub async fn wait_for_end(&self, rid: ReleaseId, timeout: Duration) -> Result<Vec<Event>> {
        crate::eventually(
            &format!("the end of release {rid}"),
            timeout,
            || async move {
                let events = self.events(rid).await?;
                Ok(events
                    .iter()
                    .any(|e| e.event_type.is_terminal())
                    .then_some(events))
            },
        )
        .await
    }
}

/// Every event type that appears more than once in a history.
pub fn repeated(events: &[Event]) -> Vec<EventType> {
    let mut seen = std::collections::BTreeMap::new();
    for e in events {
        *seen.entry(e.event_type).or_insert(0) += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(t, _)| t)
        .collect()
}

/// The payload of the first event of a variant in a history, or an error naming it:
/// `first!(events, DeployFailed)?`.
#[macro_export]
macro_rules! first {
    ($events:expr, $variant:ident) => {
        $events
            .iter()
            .find_map(|e| match e.payload() {
                Some(baton_proto::v1::envelope::Payload::$variant(p)) => Some(p.clone()),
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("no {} in the history", stringify!($variant)))
    };
}
