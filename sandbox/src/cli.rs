//! The `baton-sandbox` command: `up` runs the whole sandbox in the foreground for people,
//! `push-image` puts an image into the sandbox registry, and the hidden `supervise` is the
//! parent of every server (see [`crate::process`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing::info;

use crate::{Sandbox, SandboxOptions};

#[derive(Debug, Parser)]
#[command(
    name = "baton-sandbox",
    version,
    about = "Baton's local sandbox: NATS, Kubernetes, a registry and simulated nodes"
)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start every server and keep them running until Ctrl-C or SIGTERM.
    Up {
        /// Also write the environment (NATS_URL=…, KUBECONFIG=…) to this file.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Simulated nodes to register.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Start only nats-server.
        #[arg(long)]
        nats_only: bool,
        /// Directory holding nats-server.conf.
        #[arg(long, env = "BATON_BUS_CONFIG")]
        bus_config: Option<PathBuf>,
        /// nats-servers: 1, or 3 for a JetStream cluster on loopback (every stream and bucket
        /// then has three replicas)
        #[arg(long = "nats-cluster", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        nats_cluster: u8,
        /// Clusters whose agents use the bus (comma-separated)
        #[arg(long, value_delimiter = ',', default_values_t = crate::DEFAULT_CLUSTERS.map(String::from))]
        clusters: Vec<String>,
    },
    /// Create an image in the registry and print its digest.
    PushImage {
        /// NAME:TAG, e.g. `shop/web:v2`.
        image: String,
        /// Environment of the image's config, K=V (repeatable); the simulated nodes read their
        /// behaviour from it.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// HOST:PORT of the registry.
        #[arg(long, env = "BATON_REGISTRY")]
        registry: String,
    },
    /// Apply Kubernetes manifests (YAML, several documents allowed) by server-side apply, as
    /// `kubectl apply --server-side` would: for setting up workloads Baton then releases.
    Apply {
        /// The manifest file
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Kubeconfig of the cluster
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        /// Wait until applied Deployments are available
        #[arg(long)]
        wait: bool,
    },
    /// Write the histories of COUNT ended releases of an app into the event stream (as the
    /// administrator), for benchmarks of how cost grows with history.
    SeedHistory {
        #[arg(long)]
        env: String,
        #[arg(long)]
        app: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        count: usize,
        #[command(flatten)]
        nats: baton_core::bus::NatsArgs,
    },
    /// Receive webhooks on ADDR (any path) and print one line per notification — Slack bodies by
    /// their text, CloudEvents by their type and fields — for trying the notifier locally.
    WebhookSink {
        /// HOST:PORT to listen on (loopback)
        #[arg(long, default_value = "127.0.0.1:9099")]
        addr: std::net::SocketAddr,
        /// One JSON object per notification instead (path, id, type, source, time, received_ms,
        /// lag_ms: from the event's time to its arrival), for benchmarks
        #[arg(long)]
        json: bool,
    },
    /// Run PROG, print its pid, and stop it when stdin closes (internal).
    #[command(hide = true)]
    Supervise {
        /// Milliseconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 5000)]
        grace_ms: u64,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Remove a sandbox directory once stdin closes (internal).
    #[command(hide = true)]
    Cleanup {
        #[arg(long, default_value_t = 7000)]
        delay_ms: u64,
        dir: PathBuf,
    },
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,async_nats=warn`); `BATON_LOG_FORMAT=json` for JSON.
pub fn init_telemetry() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // async-nats logs every (re)connection at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("BATON_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

impl Args {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Supervise { grace_ms, command } => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("failed to start the supervisor's runtime")?;
                let mut command = command.into_iter();
                let Some(program) = command.next() else {
                    bail!("supervise needs a program to run");
                };
                let code = runtime.block_on(crate::process::supervise(
                    Duration::from_millis(grace_ms),
                    program,
                    command.collect(),
                ))?;
                // Exit at once: the blocking stdin reader would otherwise hold the runtime.
                std::process::exit(code);
            }
            Command::Cleanup { delay_ms, dir } => {
                crate::process::cleanup(&dir, Duration::from_millis(delay_ms))?;
                Ok(ExitCode::SUCCESS)
            }
            command => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .context("failed to start the tokio runtime")?;
                runtime.block_on(command.run())?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

impl Command {
    async fn run(self) -> anyhow::Result<()> {
        crate::install_crypto_provider();
        match self {
            Command::Up {
                env_file,
                nodes,
                nats_only,
                bus_config,
                nats_cluster,
                clusters,
            } => {
                let mut options = if nats_only {
                    SandboxOptions::nats_only()
                } else {
                    SandboxOptions {
                        nodes,
                        ..SandboxOptions::default()
                    }
                };
                if let Some(dir) = bus_config {
                    options.bus_config_dir = dir;
                }
                options.nats_servers = usize::from(nats_cluster);
                options.clusters = clusters;
                up(env_file, options).await
            }
            Command::Apply {
                file,
                kubeconfig,
                wait,
            } => crate::manifests::apply_file(&file, &kubeconfig, wait).await,
            Command::PushImage {
                image,
                env,
                registry,
            } => push_image(&image, &env, &registry).await,
            Command::SeedHistory {
                env,
                app,
                namespace,
                count,
                nats,
            } => crate::seed::seed(&nats, &env, &app, &namespace, count).await,
            Command::WebhookSink { addr, json } => webhook_sink(addr, json).await,
            Command::Supervise { .. } | Command::Cleanup { .. } => {
                bail!("internal commands run without this runtime")
            }
        }
    }
}

/// A request header as text (empty when absent or not text).
fn header_text(headers: &axum::http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// One line for a notification a webhook received.
fn sink_line(path: &str, headers: &axum::http::HeaderMap, body: &[u8]) -> String {
    let header = |name: &str| header_text(headers, name);
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let what = match headers.get("ce-type") {
        // CloudEvents binary mode: the notification is the body.
        Some(_) => {
            let mut line = format!(
                "{} {} in {}",
                header("ce-type"),
                text(&json["app"]),
                text(&json["env"])
            );
            if let Some(step) = json["step"].as_u64() {
                line.push_str(&format!(" step {step} ({}%)", json["weight"]));
            }
            if !text(&json["reason"]).is_empty() {
                line.push_str(&format!(" — {}", text(&json["reason"])));
            }
            line
        }
        None => format!("slack: {}", text(&json["text"])),
    };
    format!("{path} [{}] {what}", header("idempotency-key"))
}

/// A notification as one JSON line, with how long after its event it arrived.
fn sink_json(path: &str, headers: &axum::http::HeaderMap) -> String {
    let header = |name: &str| header_text(headers, name);
    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let time = header("ce-time");
    let lag_ms = baton_core::time::parse_rfc3339(&time)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| received_ms - d.as_millis() as i64);
    serde_json::json!({
        "path": path,
        "id": header("idempotency-key"),
        "type": header("ce-type"),
        "source": header("ce-source"),
        "time": time,
        "received_ms": received_ms,
        "lag_ms": lag_ms,
    })
    .to_string()
}

async fn webhook_sink(addr: std::net::SocketAddr, json: bool) -> anyhow::Result<()> {
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
            if json {
                println!("{}", sink_json(uri.path(), &headers));
            } else {
                println!("{}", sink_line(uri.path(), &headers, &body));
            }
            "ok"
        },
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    info!(%addr, "receiving webhooks; Ctrl-C to stop");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn up(env_file: Option<PathBuf>, options: SandboxOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    // Listen before starting, so that a Ctrl-C during startup still cleans up.
    let mut term = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let clusters = options.clusters.clone();
    let bus_config_dir = options.bus_config_dir.clone();
    let sandbox = tokio::select! {
        sandbox = Sandbox::start(options) => sandbox.context("failed to start the sandbox")?,
        _ = term.recv() => bail!("interrupted during startup"),
        _ = int.recv() => bail!("interrupted during startup"),
    };
    // Baton's bus: streams, consumers, buckets — so agents and the CLI can start at once.
    apply_bus(&sandbox, &bus_config_dir, &clusters)
        .await
        .context("failed to apply Baton's bus definitions")?;
    let env = sandbox.env();
    if let Some(path) = &env_file {
        sandbox
            .write_env_file(path)
            .with_context(|| format!("failed to write {}", path.display()))?;
        info!(path = %path.display(), "wrote the env file");
    }
    println!("{}", env.to_env_file().trim_end());
    info!(
        logs = %sandbox.dir().join("logs").display(),
        "sandbox running; Ctrl-C to stop"
    );
    tokio::select! {
        _ = term.recv() => info!("SIGTERM; stopping"),
        _ = int.recv() => info!("SIGINT; stopping"),
    }
    sandbox.shutdown().await;
    if let Some(path) = &env_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

async fn apply_bus(
    sandbox: &Sandbox,
    bus_config_dir: &std::path::Path,
    clusters: &[String],
) -> anyhow::Result<()> {
    let args = baton_core::bus::NatsArgs {
        url: sandbox.nats_cluster().urls(),
        credentials_dir: Some(sandbox.nats().credentials_dir().to_path_buf()),
        ..Default::default()
    };
    let source = baton_core::bus::Source {
        agent: "sandbox".into(),
        cluster: "sandbox".into(),
        instance: format!("baton-sandbox/{}", std::process::id()),
    };
    let bus = baton_core::bus::Bus::connect(
        &args,
        "admin",
        source,
        baton_core::bus::InitialConnect::FailFast,
    )
    .await?;
    let defs = baton_core::busconfig::Definitions::load(bus_config_dir)?;
    let report = baton_core::busconfig::apply(bus.jetstream(), &defs, clusters).await?;
    info!(changes = report.changed(), "bus applied");
    Ok(())
}

async fn push_image(image: &str, env: &[String], registry: &str) -> anyhow::Result<()> {
    let (name, tag) = split_image(image)?;
    let env = env
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {pair:?} is not K=V"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = crate::registry::Registry::new(registry)
        .with_context(|| format!("failed to create a client for registry {registry}"))?;
    let digest = client
        .push_image(name, tag, &env)
        .await
        .with_context(|| format!("failed to push {name}:{tag} to {registry}"))?;
    println!("{digest}");
    Ok(())
}

/// `NAME:TAG` → (NAME, TAG); the tag is after the last `:` that follows the last `/`.
fn split_image(image: &str) -> anyhow::Result<(&str, &str)> {
    let last_segment = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_segment..].rfind(':') {
        Some(i) if i > 0 && last_segment + i + 1 < image.len() => {
            Ok((&image[..last_segment + i], &image[last_segment + i + 1..]))
        }
        _ => bail!("{image:?} is not NAME:TAG"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_splits_at_the_tag_colon_only() {
        for (image, expected) in [
            ("web:v1", Some(("web", "v1"))),
            ("shop/web:v1.2", Some(("shop/web", "v1.2"))),
            ("127.0.0.1:5000/web:v1", Some(("127.0.0.1:5000/web", "v1"))),
            ("127.0.0.1:5000/web", None),
            ("web", None),
            ("web:", None),
            (":v1", None),
        ] {
            assert_eq!(split_image(image).ok(), expected, "{image}");
        }
    }
}
