//! A Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler (v1.20, built by `scripts/setup.sh`), with one admin token in
//! `system:masters`. There are no kubelets: the sandbox's simulated nodes stand in for them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::{debug, info};

use crate::bins;
use crate::error::{Result, SandboxError};
use crate::process::{self, ManagedProcess, ProcessSpec, DEFAULT_GRACE};

const ETCD_TIMEOUT: Duration = Duration::from_secs(30);
const APISERVER_TIMEOUT: Duration = Duration::from_secs(90);
const SERVICE_ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// Controllers that need a cloud, kubelets or a network the sandbox doesn't have.
const CONTROLLERS: &str = "*,-nodeipam,-nodelifecycle,-attachdetach,-persistentvolume-binder,\
                           -route,-service,-cloud-node-lifecycle";

#[derive(Debug)]
pub struct KubeCluster {
    server: String,
    token: String,
    kubeconfig_path: PathBuf,
    config: kube::Config,
    // Stopped in reverse order of start.
    scheduler: ManagedProcess,
    controller_manager: ManagedProcess,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
}

/// etcd and kube-apiserver up and answering, before the controllers start.
struct ApiServer {
    etcd: ManagedProcess,
    apiserver: ManagedProcess,
    server: String,
    token: String,
    cert_dir: PathBuf,
    sa_key: PathBuf,
}

impl KubeCluster {
    /// Starts the control plane with its data, certificates, kubeconfig and logs under `dir`,
    /// and returns once the apiserver is ready and the `default` ServiceAccount of the
    /// `default` namespace has its token (the ServiceAccount admission plugin of 1.20 admits
    /// no pod before that). Must run inside a tokio runtime.
    pub async fn start(dir: &Path, http: &reqwest::Client) -> Result<Self> {
        crate::install_crypto_provider();
        let started = Instant::now();
        let binaries = Binaries::find()?;
        let dir = dir.join("kube");
        let logs = dir.join("logs");
        for path in [&dir, &logs] {
            std::fs::create_dir_all(path).map_err(|source| SandboxError::Io {
                what: "create the control plane's directories",
                path: path.clone(),
                source,
            })?;
        }

        let api = start_apiserver(&binaries, &dir, &logs, http).await?;

        let ca_path = dir.join("ca.crt");
        let served = api.cert_dir.join("apiserver.crt");
        let ca = std::fs::read_to_string(&served).map_err(|source| SandboxError::Io {
            what: "read the apiserver's self-signed certificate",
            path: served.clone(),
            source,
        })?;
        write_file(&ca_path, &ca, "write the cluster CA")?;
        let kubeconfig_path = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig_path, &api.server, &ca_path, &api.token)?;
        let config = load_config(&kubeconfig_path).await?;

        let kubeconfig_arg = format!("--kubeconfig={}", kubeconfig_path.display());
        let controller_manager = ManagedProcess::spawn(
            ProcessSpec::new(
                "kube-controller-manager",
                &binaries.controller_manager,
                logs.join("kube-controller-manager.log"),
            )
            .arg(&kubeconfig_arg)
            .args([
                "--port=0",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-namespace-syncs=10",
            ])
            .arg(format!("--controllers={}", CONTROLLERS.replace(' ', "")))
            .arg(format!(
                "--service-account-private-key-file={}",
                api.sa_key.display()
            ))
            .arg(format!("--root-ca-file={}", served.display())),
        )?;
        let scheduler = ManagedProcess::spawn(
            ProcessSpec::new(
                "kube-scheduler",
                &binaries.scheduler,
                logs.join("kube-scheduler.log"),
            )
            .arg(&kubeconfig_arg)
            .args([
                "--port=0",
                "--secure-port=0",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
            ]),
        )?;

        let mut cluster = Self {
            server: api.server,
            token: api.token,
            kubeconfig_path,
            config,
            scheduler,
            controller_manager,
            apiserver: api.apiserver,
            etcd: api.etcd,
        };
        cluster.wait_for_service_account_token().await?;
        info!(server = %cluster.server, elapsed = ?started.elapsed(), "Kubernetes control plane ready");
        Ok(cluster)
    }

    /// `https://127.0.0.1:PORT`
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The admin bearer token (group `system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The client configuration of the kubeconfig.
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// A new client (cheap). Must be called inside a tokio runtime: the client's worker task
    /// runs on it.
    pub fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config.clone()).map_err(|source| SandboxError::KubeClient {
            path: self.kubeconfig_path.clone(),
            source,
        })
    }

    /// Stops the controllers, then the apiserver, then etcd.
    pub async fn stop(self) -> Result<()> {
        let Self {
            scheduler,
            controller_manager,
            apiserver,
            etcd,
            ..
        } = self;
        let (a, b) = tokio::join!(
            scheduler.stop(DEFAULT_GRACE),
            controller_manager.stop(DEFAULT_GRACE)
        );
        a.and(b)?;
        apiserver.stop(DEFAULT_GRACE).await?;
        etcd.stop(DEFAULT_GRACE).await
    }

    pub(crate) fn begin_stop(&mut self) {
        self.scheduler.begin_stop();
        self.controller_manager.begin_stop();
        self.apiserver.begin_stop();
        self.etcd.begin_stop();
    }

    async fn wait_for_service_account_token(&mut self) -> Result<()> {
        let client = self.client()?;
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client, "default");
        let started = Instant::now();
        let mut last_error;
        loop {
            for process in [&mut self.controller_manager, &mut self.scheduler] {
                if let Some(status) = process.try_status() {
                    return Err(SandboxError::Exited {
                        name: process.name().to_string(),
                        status: status.to_string(),
                        log: process.server_log(),
                    });
                }
            }
            match accounts.get_opt("default").await {
                Ok(Some(account)) if account.secrets.as_ref().is_some_and(|s| !s.is_empty()) => {
                    debug!(elapsed = ?started.elapsed(), "default service account has its token");
                    return Ok(());
                }
                Ok(Some(_)) => last_error = "default service account has no token yet".into(),
                Ok(None) => last_error = "default service account not created yet".into(),
                Err(error) => last_error = error.to_string(),
            }
            if started.elapsed() >= SERVICE_ACCOUNT_TIMEOUT {
                return Err(SandboxError::Timeout {
                    what: format!(
                        "the default service account token (kube-controller-manager log: {})",
                        self.controller_manager.log_path().display()
                    ),
                    waited: SERVICE_ACCOUNT_TIMEOUT,
                    last_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
}

impl Binaries {
    fn find() -> Result<Self> {
        Ok(Self {
            etcd: bins::etcd()?,
            apiserver: bins::kube("kube-apiserver")?,
            controller_manager: bins::kube("kube-controller-manager")?,
            scheduler: bins::kube("kube-scheduler")?,
        })
    }
}

/// Starts etcd and the apiserver together (the apiserver retries until etcd answers) and waits
/// for the apiserver's `/readyz`.
async fn start_apiserver(
    binaries: &Binaries,
    dir: &Path,
    logs: &Path,
    http: &reqwest::Client,
) -> Result<ApiServer> {
    let sa_key = dir.join("service-account.key");
    generate_service_account_key(&sa_key).await?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    let token_file = dir.join("tokens.csv");
    write_file(
        &token_file,
        &format!("{token},admin,admin,\"system:masters\"\n"),
        "write the apiserver token file",
    )?;
    let cert_dir = dir.join("apiserver-certs");

    let etcd_port = process::free_port()?;
    let peer_port = process::free_port()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = ManagedProcess::spawn(
        ProcessSpec::new("etcd", &binaries.etcd, logs.join("etcd.log"))
            .args(["--name", "sandbox", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("sandbox={peer_url}")])
            .args(["--log-level", "warn", "--logger", "zap"]),
    )?;

    let port = process::free_port()?;
    let server = format!("https://127.0.0.1:{port}");
    let mut apiserver = ManagedProcess::spawn(
        ProcessSpec::new(
            "kube-apiserver",
            &binaries.apiserver,
            logs.join("kube-apiserver.log"),
        )
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--secure-port={port}"))
        .args([
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--insecure-port=0",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            // 127.0.0.1 is not a valid endpoint address for the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--allow-privileged=true",
        ])
        .arg(format!("--cert-dir={}", cert_dir.display()))
        .arg(format!("--token-auth-file={}", token_file.display()))
        .arg(format!("--service-account-key-file={}", sa_key.display()))
        .arg(format!(
            "--service-account-signing-key-file={}",
            sa_key.display()
        )),
    )?;

    let health = format!("{etcd_url}/health");
    process::wait_ready(&mut etcd, "/health", ETCD_TIMEOUT, || {
        process::probe_http(http, &health, None)
    })
    .await?;
    let readyz = format!("{server}/readyz");
    process::wait_ready(&mut apiserver, "/readyz", APISERVER_TIMEOUT, || {
        process::probe_http(http, &readyz, Some(&token))
    })
    .await?;
    Ok(ApiServer {
        etcd,
        apiserver,
        server,
        token,
        cert_dir,
        sa_key,
    })
}

/// An ECDSA P-256 key: the apiserver signs service-account tokens with it, reads the public
/// half from the same file to verify them, and the controller-manager signs legacy token
/// secrets with it.
async fn generate_service_account_key(path: &Path) -> Result<()> {
    let output = tokio::process::Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(path)
        .output()
        .await
        .map_err(|source| SandboxError::Spawn {
            name: "openssl (service-account key)".to_string(),
            program: PathBuf::from("openssl"),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Command {
            command: format!(
                "openssl ecparam -name prime256v1 -genkey -noout -out {}",
                path.display()
            ),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn write_kubeconfig(path: &Path, server: &str, ca_path: &Path, token: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "baton-sandbox",
            "cluster": { "server": server, "certificate-authority": ca_path },
        }],
        "users": [{ "name": "admin", "user": { "token": token } }],
        "contexts": [{
            "name": "baton-sandbox",
            "context": { "cluster": "baton-sandbox", "user": "admin", "namespace": "default" },
        }],
        "current-context": "baton-sandbox",
    });
    let yaml = serde_yaml_ng::to_string(&config).map_err(|e| SandboxError::Io {
        what: "serialize the kubeconfig",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_file(path, &yaml, "write the kubeconfig")
}

async fn load_config(path: &Path) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| SandboxError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| SandboxError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
}

fn write_file(path: &Path, contents: &str, what: &'static str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|source| SandboxError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })
}
