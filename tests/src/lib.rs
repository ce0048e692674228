//! Support for Baton's integration tests: the real servers of the sandbox, Baton's own binaries
//! as real processes, and waiting on events instead of sleeping.
//!
//! NATS is per test (a nats-server starts in milliseconds, and a test can kill it). The
//! Kubernetes control plane, registry and simulated nodes are shared by the whole test binary —
//! started once on first use, on a runtime of their own — and each test works in its own
//! namespace with its own image names.

pub mod cluster;
pub mod compose;
pub mod dashboard;
pub mod docs;

pub use compose::repo_root;
pub mod harness;
pub mod pod;
pub mod release;
pub mod specconfig;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use baton_core::bus::{Bus, InitialConnect, NatsArgs, Source};
use baton_core::busconfig::{self, Definitions};
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, ReleaseRequested, ReleaseSpec};
use baton_sandbox::process::{ManagedProcess, ProcessSpec};
use baton_sandbox::{Sandbox, SandboxOptions};

/// A built binary of the workspace (`cargo build --workspace` puts them in target/<profile>/).
pub fn target_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BATON_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "binary {name} not found near {}; run `cargo build --workspace` first",
                exe.display()
            )
        })
}

/// The cluster name the agents of the tests serve (`--cluster`).
pub const CLUSTER: &str = "sandbox";

/// A nats-server of its own with Baton's bus applied.
pub struct BusEnv {
    pub sandbox: Sandbox,
    /// The configuration [`BusEnv::configured`] has stored so far (every app and environment
    /// of the specs it was given).
    configured: tokio::sync::Mutex<serde_json::Value>,
}

impl BusEnv {
    pub async fn start() -> Result<BusEnv> {
        Self::start_servers(1).await
    }

    /// A bus of `servers` nats-servers: 3 for a JetStream cluster whose streams and buckets
    /// have three replicas.
    pub async fn start_servers(servers: usize) -> Result<BusEnv> {
        let sandbox = Sandbox::start(SandboxOptions {
            nats_servers: servers,
            ..SandboxOptions::nats_only()
        })
        .await
        .context("starting nats-server")?;
        let env = BusEnv {
            sandbox,
            configured: tokio::sync::Mutex::new(serde_json::json!({
                "environments": {}, "apps": {}
            })),
        };
        let admin = env.bus("admin").await?;
        busconfig::apply(
            admin.jetstream(),
            &Definitions::embedded()?,
            &[CLUSTER.to_owned()],
        )
        .await
        .context("applying the bus")?;
        Ok(env)
    }

    /// Connection flags as the binaries take them.
    pub fn nats_args(&self) -> NatsArgs {
        NatsArgs {
            url: self.sandbox.nats_cluster().urls(),
            credentials_dir: Some(self.sandbox.nats().credentials_dir().to_path_buf()),
            ..NatsArgs::default()
        }
    }

    /// A bus connection as `user` (its own nkey).
    pub async fn bus(&self, user: &str) -> Result<Bus> {
        let source = Source {
            agent: user.to_owned(),
            cluster: "test".into(),
            instance: "test".into(),
        };
        Ok(Bus::connect(&self.nats_args(), user, source, InitialConnect::FailFast).await?)
    }

    /// Environment for a Baton binary talking to this bus.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            ("NATS_URL".into(), self.sandbox.nats_cluster().urls()),
            (
                "BATON_CREDENTIALS".into(),
                self.sandbox.nats().credentials_dir().display().to_string(),
            ),
            ("BATON_LOG".into(), "info,async_nats=warn".into()),
        ]
    }
}

impl BusEnv {
    /// Stores, as a new configuration revision, the app and environment settings that resolve
    /// to `spec` (on top of what earlier calls stored), and returns the spec as that revision
    /// resolves it: what a test publishes in place of a hand-made spec, since agents act only
    /// on a spec its configuration revision backs. A spec the configuration can't express
    /// (an invalid one, kept for the test of its refusal) is returned as it is.
    pub async fn configured(&self, spec: ReleaseSpec) -> Result<ReleaseSpec> {
        use baton_core::config::{self, store, Overrides};
        let mut doc = self.configured.lock().await;
        let mut next = doc.clone();
        next["environments"][&spec.env] = specconfig::environment_of(&spec);
        next["apps"][&spec.app] = specconfig::app_settings_of(&spec);
        let text = serde_json::to_string_pretty(&next)?;
        if config::parse(&text).is_err() {
            return Ok(spec);
        }
        let bus = self.bus("config").await?;
        let applied = store::apply(&bus, &text, "tests").await?;
        *doc = next;
        let overrides = Overrides {
            image: spec.image.clone(),
            strategy: baton_proto::v1::Strategy::try_from(spec.strategy).ok(),
            commit: (!spec.commit.is_empty()).then(|| spec.commit.clone()),
            commit_time: spec
                .commit_time
                .and_then(|t| std::time::SystemTime::try_from(t).ok()),
            // The steps are the configuration's (written above).
            canary_steps: None,
        };
        let resolved = config::parse(&text)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_revision(applied.revision)
            .resolve(&spec.app, &spec.env, &overrides)
            .map_err(|e| anyhow::anyhow!("the stored configuration does not resolve: {e}"))?;
        Ok(resolved)
    }
}

/// One of Baton's agents running as a real process.
pub struct AgentProcess {
    pub name: String,
    pub http: SocketAddr,
    pub process: ManagedProcess,
    client: reqwest::Client,
}

impl AgentProcess {
    /// Starts `baton-<agent>` with the bus's environment (plus `extra`), and waits until its
    /// `/readyz` says it is connected and consuming.
    pub async fn start(
        bus: &BusEnv,
        agent: &str,
        extra: &[(&str, &str)],
        log_dir: &std::path::Path,
    ) -> Result<AgentProcess> {
        let port = baton_sandbox::process::free_port()?;
        let http: SocketAddr = ([127, 0, 0, 1], port).into();
        let bin = target_bin(&format!("baton-{agent}"))?;
        let mut spec = ProcessSpec::new(agent, bin, log_dir.join(format!("{agent}.log"))).args([
            "--http-addr",
            &http.to_string(),
            "--cluster",
            CLUSTER,
        ]);
        for (k, v) in bus.process_env() {
            spec = spec.env(k, v);
        }
        // An agent is given its own seed and nothing else (the folder the sandbox made for it).
        spec = spec.env(
            "BATON_CREDENTIALS",
            bus.sandbox
                .nats()
                .credentials_dir_of(agent)
                .display()
                .to_string(),
        );
        for (k, v) in extra {
            spec = spec.env(*k, *v);
        }
        let process = ManagedProcess::spawn(spec)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut agent_process = AgentProcess {
            name: agent.to_owned(),
            http,
            process,
            client,
        };
        agent_process.wait_ready(Duration::from_secs(60)).await?;
        Ok(agent_process)
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.process.is_running() {
                bail!(
                    "{} exited before it was ready:\n{}",
                    self.name,
                    self.process.log_tail(40)
                );
            }
            if let Ok(r) = self
                .client
                .get(format!("http://{}/readyz", self.http))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}:\n{}",
                    self.name,
                    self.process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent's Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .client
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The value of one series of the agent's metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Waits until a metric series reaches `at_least` (the agent reports progress on /metrics).
    pub async fn wait_metric(&self, series: &str, at_least: f64, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.metric(series).await?;
            if v >= at_least {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{}: {series} is {v}, expected at least {at_least} within {timeout:?}; its log ends:\n{}",
                    self.name,
                    self.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid release spec for tests.
pub fn sample_spec(env: &str, app: &str, image: &str) -> baton_proto::v1::ReleaseSpec {
    baton_proto::v1::ReleaseSpec {
        app: app.into(),
        env: env.into(),
        namespace: app.into(),
        image: image.into(),
        strategy: baton_proto::v1::Strategy::Rolling as i32,
        rollback_on_failure: true,
        ..Default::default()
    }
}

/// A dead letter as stored (`baton.v1.dlq.<agent>`): its reason and where the original came from.
pub struct DeadLetter {
    pub reason: String,
    pub original_subject: String,
    pub payload_len: usize,
}

/// The first `count` dead letters of `agent`, in order (an error when fewer arrive).
pub async fn dead_letters(
    js: &async_nats::jetstream::Context,
    agent: &str,
    count: usize,
) -> Result<Vec<DeadLetter>> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let stream = js.get_stream("BATON_DLQ").await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("baton.v1.dlq.{agent}"),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(60), messages.next())
            .await
            .with_context(|| format!("only {} of {count} dead letters arrived", out.len()))?
            .context("dead letter stream ended")??;
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        out.push(DeadLetter {
            reason: header("Baton-Dlq-Reason"),
            original_subject: header("Baton-Original-Subject"),
            payload_len: m.payload.len(),
        });
    }
    Ok(out)
}

/// Publishes a `release.requested` of `spec` as `actor` on the subject of the spec's environment
/// and app, as a hand-made request would be (the CLI checks nothing of it); its release id.
pub async fn publish_request(cli: &Bus, spec: ReleaseSpec, actor: &str) -> Result<ReleaseId> {
    let rid = ReleaseId::generate();
    let subject = EventSubject::new(
        EnvName::new(&spec.env)?,
        AppName::new(&spec.app)?,
        rid,
        EventType::ReleaseRequested,
    );
    let event = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        cli.source(),
        actor,
        "",
    );
    cli.publish(&subject, &event).await?;
    Ok(rid)
}

/// The server leading `stream`'s replicas, and those following it, by name.
pub async fn stream_roles(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Result<(String, Vec<String>)> {
    let info = js.get_stream(stream).await?.info().await?.clone();
    let cluster = info.cluster.context("the stream has no cluster info")?;
    let leader = cluster.leader.context("the stream has no leader")?;
    let followers = cluster.replicas.iter().map(|p| p.name.clone()).collect();
    Ok((leader, followers))
}

/// What a command printed, standard output then standard error.
pub fn out_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
