//! The shared Kubernetes sandbox: control plane, registry and simulated nodes, started once per
//! test binary on a runtime of its own (clients made on a test's runtime die with that test).
//! Each test makes its own kube client and works in a namespace of its own.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::sync::oneshot;

use baton_sandbox::{Sandbox, SandboxOptions};

/// Where the shared cluster is.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub kubeconfig: PathBuf,
    /// `127.0.0.1:PORT` of the OCI registry.
    pub registry: String,
    pub handle: tokio::runtime::Handle,
}

struct Shared {
    info: std::result::Result<ClusterInfo, String>,
    stop: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The shared cluster, started on first use.
pub fn shared() -> Result<ClusterInfo> {
    let shared = SHARED.get_or_init(start);
    shared
        .info
        .clone()
        .map_err(|e| anyhow!("the shared sandbox failed to start: {e}"))
}

fn start() -> Shared {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sandbox".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            let handle = runtime.handle().clone();
            runtime.block_on(async move {
                let sandbox = match Sandbox::start(SandboxOptions::default()).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let info = ClusterInfo {
                    kubeconfig: sandbox.env().kubeconfig.clone().unwrap_or_default(),
                    registry: sandbox.registry_host().unwrap_or_default().to_owned(),
                    handle,
                };
                let _ = ready_tx.send(Ok(info));
                let _ = stop_rx.await;
                sandbox.shutdown().await;
            });
        });
    match thread {
        Ok(thread) => {
            let info = ready_rx
                .recv()
                .unwrap_or_else(|_| Err("the sandbox thread died".into()));
            Shared {
                info,
                stop: Mutex::new(Some((stop_tx, thread))),
            }
        }
        Err(e) => Shared {
            info: Err(e.to_string()),
            stop: Mutex::new(None),
        },
    }
}

/// Stops the shared cluster (if it was started) and waits until it is gone.
pub fn shutdown() {
    if let Some(shared) = SHARED.get() {
        let taken = shared.stop.lock().ok().and_then(|mut s| s.take());
        if let Some((stop, thread)) = taken {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl ClusterInfo {
    /// A kube client for the calling test's runtime.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// A registry client.
    pub fn registry(&self) -> Result<baton_sandbox::registry::Registry> {
        Ok(baton_sandbox::registry::Registry::new(
            self.registry.clone(),
        )?)
    }
}

/// A namespace of one test, deleted when dropped (with everything in it).
pub struct TestNamespace {
    pub name: String,
    cluster: ClusterInfo,
}

impl TestNamespace {
    pub async fn create(cluster: &ClusterInfo, prefix: &str) -> Result<TestNamespace> {
        let client = cluster.client().await?;
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .context("creating namespace")?;
        Ok(TestNamespace {
            name,
            cluster: cluster.clone(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let cluster = self.cluster.clone();
        let name = self.name.clone();
        // On the shared runtime, which outlives the test's.
        self.cluster.handle.spawn(async move {
            if let Ok(client) = cluster.client().await {
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
        });
    }
}

/// A Deployment of `replicas` pods running `image`, serving HTTP on `port`, with env `env`.
pub fn deployment(
    name: &str,
    image: &str,
    replicas: i32,
    port: i32,
    env: &[(&str, &str)],
) -> k8s_openapi::api::apps::v1::Deployment {
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
    use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    let labels: std::collections::BTreeMap<String, String> =
        [("app".to_string(), name.to_string())].into();
    Deployment {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(kube::api::ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some(image.into()),
                        ports: Some(vec![ContainerPort {
                            container_port: port,
                            ..Default::default()
                        }]),
                        env: Some(
                            env.iter()
                                .map(|(k, v)| EnvVar {
                                    name: (*k).into(),
                                    value: Some((*v).into()),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}
