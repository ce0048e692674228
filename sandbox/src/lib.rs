//! Baton's sandbox: the real servers Baton talks to, started on random loopback ports for tests
//! and the demo (DESIGN.md §8) — nats-server with JetStream and Baton's bus configuration, a
//! Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), an
//! OCI registry, and simulated nodes standing in for kubelets. Everything lives in one
//! temporary directory, and every server dies with the process that started it.

pub mod bins;
pub mod cli;
pub mod error;
pub mod kube;
pub mod manifests;
pub mod nats;
pub mod node;
pub mod process;
pub mod prometheus;
pub mod registry;
pub mod registry_server;
pub mod seed;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

pub use crate::error::{Result, SandboxError};
pub use crate::kube::KubeCluster;
pub use crate::nats::{NatsCluster, NatsServer, DEFAULT_CLUSTERS, NATS_USERS};
pub use crate::prometheus::PrometheusServer;
pub use crate::registry_server::RegistryServer;

/// Installs rustls' ring provider as the process default (kube and reqwest are built without
/// one). Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The workspace's `bus-config/` directory, unless `BATON_BUS_CONFIG` says otherwise.
pub fn default_bus_config_dir() -> PathBuf {
    std::env::var_os("BATON_BUS_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bus-config"))
}

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Simulated nodes to register (needs `kube` and `registry`).
    pub nodes: usize,
    /// Start the Kubernetes control plane.
    pub kube: bool,
    /// Start the OCI registry.
    pub registry: bool,
    /// Directory holding `nats-server.conf`.
    pub bus_config_dir: PathBuf,
    /// Behaviour of the simulated nodes; `nodes` above overrides its node count.
    pub node_options: node::NodeOptions,
    /// nats-servers: 1 for a single server, 3 for a JetStream cluster (streams and buckets
    /// then get the cluster's replicas from bus-config/replicas.json).
    pub nats_servers: usize,
    /// The clusters whose agents use this bus (their users may use their consumers).
    pub clusters: Vec<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            kube: true,
            registry: true,
            bus_config_dir: default_bus_config_dir(),
            node_options: node::NodeOptions::default(),
            nats_servers: 1,
            clusters: DEFAULT_CLUSTERS.iter().map(|c| c.to_string()).collect(),
        }
    }
}

impl SandboxOptions {
    /// Only nats-server: what most bus tests need, in well under a second.
    pub fn nats_only() -> Self {
        Self {
            nodes: 0,
            kube: false,
            registry: false,
            ..Self::default()
        }
    }
}

/// Where the sandbox's servers are, as the agents and the CLI take it from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxEnv {
    pub nats_url: String,
    pub kubeconfig: Option<PathBuf>,
    /// `127.0.0.1:PORT`
    pub registry: Option<String>,
    /// Directory of `<user>.nk` nkey seeds: every user's, for the sandbox's operator.
    pub credentials: PathBuf,
    /// Directory of one folder per user holding only that user's seed (`<user>/<user>.nk`):
    /// an agent is given its own.
    pub user_credentials: Option<PathBuf>,
}

impl SandboxEnv {
    /// `(NAME, value)` pairs: `NATS_URL`, `KUBECONFIG`, `BATON_REGISTRY`, `BATON_CREDENTIALS`.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![("NATS_URL", self.nats_url.clone())];
        if let Some(kubeconfig) = &self.kubeconfig {
            vars.push(("KUBECONFIG", kubeconfig.display().to_string()));
        }
        if let Some(registry) = &self.registry {
            vars.push(("BATON_REGISTRY", registry.clone()));
        }
        vars.push(("BATON_CREDENTIALS", self.credentials.display().to_string()));
        if let Some(dir) = &self.user_credentials {
            vars.push(("BATON_USER_CREDENTIALS", dir.display().to_string()));
        }
        vars
    }

    /// `NAME=value` lines, quoted for the shell where needed (`set -a; . file; set +a`).
    pub fn to_env_file(&self) -> String {
        self.vars()
            .into_iter()
            .fold(String::new(), |mut out, (name, value)| {
                let _ = writeln!(out, "{name}={}", shell_quote(&value));
                out
            })
    }
}

fn shell_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/:._-+@%,=".contains(c));
    if plain {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// All the servers, in one temporary directory. Dropping it stops them (blocking briefly);
/// [`Sandbox::shutdown`] does the same without blocking the runtime.
pub struct Sandbox {
    // Dropped in this order: the nodes stop before the control plane goes away.
    nodes: Option<node::NodeSimulator>,
    nats: NatsCluster,
    kube: Option<KubeCluster>,
    registry: Option<RegistryServer>,
    // Last, so that it is removed after the servers have stopped.
    dir: tempfile::TempDir,
    _janitor: Option<process::Janitor>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("dir", &self.dir.path())
            .field("nats", &self.nats.urls())
            .field("kube", &self.kube.as_ref().map(KubeCluster::server))
            .field(
                "registry",
                &self.registry.as_ref().map(RegistryServer::host_port),
            )
            .field("nodes", &self.nodes.is_some())
            .finish()
    }
}

impl Sandbox {
    /// Starts what `options` asks for, concurrently where possible: nats-server and the
    /// registry come up while etcd and the apiserver do.
    pub async fn start(options: SandboxOptions) -> Result<Self> {
        install_crypto_provider();
        if options.nodes > 0 && !(options.kube && options.registry) {
            return Err(SandboxError::InvalidOptions {
                reason: format!(
                    "{} simulated nodes need both kube and the registry",
                    options.nodes
                ),
            });
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("baton-sandbox-")
            .tempdir()
            .map_err(|source| SandboxError::Io {
                what: "create the sandbox's temporary directory",
                path: std::env::temp_dir(),
                source,
            })?;
        let janitor = process::Janitor::spawn(dir.path());
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).map_err(|source| SandboxError::Io {
            what: "create the logs dir",
            path: logs.clone(),
            source,
        })?;
        let http = reqwest::Client::builder()
            // Only for readiness probes on loopback, against the apiserver's self-signed cert.
            .tls_danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(SandboxError::HttpClient)?;
        info!(dir = %dir.path().display(), "starting sandbox");

        let path = dir.path();
        let (nats, kube, registry) = tokio::join!(
            NatsCluster::start(
                path,
                &options.bus_config_dir,
                options.nats_servers,
                &options.clusters
            ),
            async {
                match options.kube {
                    true => KubeCluster::start(path, &http).await.map(Some),
                    false => Ok(None),
                }
            },
            async {
                match options.registry {
                    true => RegistryServer::start(path, &http).await.map(Some),
                    false => Ok(None),
                }
            },
        );
        // On error, whatever did start is stopped as the results drop.
        let (nats, kube, registry) = (nats?, kube?, registry?);

        let mut sandbox = Self {
            nats,
            kube,
            registry,
            nodes: None,
            dir,
            _janitor: janitor,
        };
        if options.nodes > 0 {
            let client = sandbox.kube_client()?;
            let registry = sandbox.registry_client()?;
            let node_options = node::NodeOptions {
                count: options.nodes,
                ..options.node_options
            };
            let nodes = node::NodeSimulator::start(client, registry, node_options)
                .await
                .map_err(SandboxError::Nodes)?;
            sandbox.nodes = Some(nodes);
        }
        info!(elapsed = ?started.elapsed(), "sandbox ready");
        Ok(sandbox)
    }

    /// One full sandbox per process (3 nodes, kube, registry), started on first use and never
    /// dropped: for tests that share it. It runs on a runtime of its own, so it outlives each
    /// `#[tokio::test]`'s runtime; create clients per test with [`kube_client`](Self::kube_client)
    /// and [`nats_client`](Self::nats_client). When the test binary exits, the servers die with
    /// it and the janitor removes the directory. May be called from inside a runtime (it
    /// blocks the calling thread during startup).
    pub fn shared() -> std::result::Result<&'static Sandbox, &'static SandboxError> {
        static SHARED: std::sync::OnceLock<Result<Sandbox>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| run_forever(Sandbox::start(SandboxOptions::default())))
            .as_ref()
    }

    /// Like [`shared`](Self::shared), with nats-server alone.
    pub fn shared_nats_only() -> std::result::Result<&'static Sandbox, &'static SandboxError> {
        static SHARED: std::sync::OnceLock<Result<Sandbox>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| run_forever(Sandbox::start(SandboxOptions::nats_only())))
            .as_ref()
    }

    /// A sandbox with nats-server alone.
    pub async fn start_nats_only() -> Result<Self> {
        Self::start(SandboxOptions::nats_only()).await
    }

    /// The sandbox's temporary directory (logs are in `logs/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The (first) nats-server.
    pub fn nats(&self) -> &NatsServer {
        self.nats.first()
    }

    /// Every nats-server of the bus.
    pub fn nats_cluster(&self) -> &NatsCluster {
        &self.nats
    }

    pub fn kube(&self) -> Option<&KubeCluster> {
        self.kube.as_ref()
    }

    pub fn registry(&self) -> Option<&RegistryServer> {
        self.registry.as_ref()
    }

    /// `127.0.0.1:PORT` of the registry.
    pub fn registry_host(&self) -> Option<&str> {
        self.registry.as_ref().map(RegistryServer::host_port)
    }

    pub fn nodes(&self) -> Option<&node::NodeSimulator> {
        self.nodes.as_ref()
    }

    /// A client of the sandbox's registry.
    pub fn registry_client(&self) -> Result<registry::Registry> {
        self.registry
            .as_ref()
            .ok_or(SandboxError::Disabled {
                component: "the registry",
            })?
            .client()
    }

    /// A new Kubernetes client with the admin token. Must be called inside a tokio runtime.
    pub fn kube_client(&self) -> Result<::kube::Client> {
        self.kube
            .as_ref()
            .ok_or(SandboxError::Disabled {
                component: "Kubernetes",
            })?
            .client()
    }

    /// A NATS client connected as `user` (one of [`NATS_USERS`]).
    pub async fn nats_client(&self, user: &str) -> Result<async_nats::Client> {
        self.nats.connect(user).await
    }

    pub fn env(&self) -> SandboxEnv {
        SandboxEnv {
            nats_url: self.nats.urls(),
            kubeconfig: self
                .kube
                .as_ref()
                .map(|k| k.kubeconfig_path().to_path_buf()),
            registry: self.registry_host().map(str::to_string),
            credentials: self.nats.first().credentials_dir().to_path_buf(),
            user_credentials: self
                .nats
                .first()
                .credentials_dir_of("admin")
                .parent()
                .map(Path::to_path_buf),
        }
    }

    /// Writes [`SandboxEnv::to_env_file`] to `path`.
    pub fn write_env_file(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.env().to_env_file()).map_err(|source| SandboxError::Io {
            what: "write the env file",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Stops the nodes, the control plane, the registry and nats-server, then removes the
    /// directory.
    pub async fn shutdown(mut self) {
        if let Some(nodes) = self.nodes.take() {
            nodes.shutdown().await;
        }
        let kube = self.kube.take();
        let registry = self.registry.take();
        let (kube, registry, nats) = tokio::join!(
            async {
                match kube {
                    Some(kube) => kube.stop().await,
                    None => Ok(()),
                }
            },
            async {
                match registry {
                    Some(registry) => registry.stop().await,
                    None => Ok(()),
                }
            },
            self.nats.stop(),
        );
        for result in [kube, registry, nats] {
            if let Err(error) = result {
                warn!(error = %error, "while stopping the sandbox");
            }
        }
        info!(dir = %self.dir.path().display(), "sandbox stopped");
    }
}

/// Runs `start` on a runtime kept for the rest of the process (the sandbox's background tasks
/// live there) and waits for its result without entering a runtime on this thread.
fn run_forever<F>(start: F) -> Result<Sandbox>
where
    F: std::future::Future<Output = Result<Sandbox>> + Send + 'static,
{
    static RUNTIME: std::sync::OnceLock<std::io::Result<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("baton-sandbox")
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|error| SandboxError::Io {
            what: "start the shared sandbox's runtime",
            path: PathBuf::new(),
            source: std::io::Error::new(error.kind(), error.to_string()),
        })?;
    let (sender, receiver) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = sender.send(start.await);
    });
    receiver
        .recv()
        .map_err(|_| SandboxError::SharedStartupPanicked)?
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SIGTERM everything at once; each server's own drop then waits for it.
        if let Some(kube) = self.kube.as_mut() {
            kube.begin_stop();
        }
        if let Some(registry) = self.registry.as_mut() {
            registry.begin_stop();
        }
        self.nats.begin_stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_quotes_only_what_the_shell_would_split() {
        let env = SandboxEnv {
            nats_url: "nats://127.0.0.1:4222".into(),
            kubeconfig: Some(PathBuf::from("/tmp/my sandbox/kubeconfig")),
            registry: Some("127.0.0.1:5000".into()),
            credentials: PathBuf::from("/tmp/it's/credentials"),
            user_credentials: None,
        };
        assert_eq!(
            env.to_env_file(),
            "NATS_URL=nats://127.0.0.1:4222\n\
             KUBECONFIG='/tmp/my sandbox/kubeconfig'\n\
             BATON_REGISTRY=127.0.0.1:5000\n\
             BATON_CREDENTIALS='/tmp/it'\\''s/credentials'\n"
        );
    }

    #[test]
    fn env_file_leaves_out_what_was_not_started() {
        let env = SandboxEnv {
            nats_url: "nats://127.0.0.1:4222".into(),
            kubeconfig: None,
            registry: None,
            credentials: PathBuf::from("/tmp/c"),
            user_credentials: None,
        };
        assert_eq!(
            env.to_env_file(),
            "NATS_URL=nats://127.0.0.1:4222\nBATON_CREDENTIALS=/tmp/c\n"
        );
    }
}
