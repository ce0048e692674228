//! A Prometheus server for metric analysis: Debian's `prometheus`, its storage in a directory of
//! its own, scraping the simulated pods' `/metrics` every second (or, for the dashboard's test,
//! fixed targets such as the agents).
//!
//! Debian builds Prometheus without its Kubernetes service discovery, so the pods are found here
//! instead: a watch of the pods of the given namespaces on the sandbox's API server keeps a
//! file-based discovery file (`targets.json`) up to date, which Prometheus follows. Each series
//! carries the pod's `namespace` and `pod` names and its `app`, `baton_dev_track` and
//! `baton_dev_colour` labels, as Kubernetes discovery with the usual relabelling would give.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::Api;
use serde_json::{json, Value};

use crate::bins;
use crate::error::{Result, SandboxError};
use crate::process::{self, ManagedProcess, ProcessSpec, DEFAULT_GRACE};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the pods are scraped: an analysis' rounds are seconds apart.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// The pod labels copied onto the series, and the names they get there.
const POD_LABELS: [(&str, &str); 3] = [
    ("app", "app"),
    ("baton.dev/track", "baton_dev_track"),
    ("baton.dev/colour", "baton_dev_colour"),
];

#[derive(Debug)]
pub struct PrometheusServer {
    url: String,
    process: ManagedProcess,
    /// The pod watch, when it scrapes pods.
    discovery: Option<Discovery>,
}

/// The task that keeps the discovery file up to date, ended with the server.
#[derive(Debug)]
struct Discovery(tokio::task::JoinHandle<()>);

impl Drop for Discovery {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PrometheusServer {
    /// Starts Prometheus under `dir` (configuration, discovery file, storage and log), scraping
    /// every running pod of `namespaces` (as `kube` sees them) on `pod_port`, and waits until it
    /// is ready.
    pub async fn start(
        dir: &Path,
        kube: kube::Client,
        namespaces: &[&str],
        pod_port: u16,
        http: &reqwest::Client,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| SandboxError::Io {
            what: "create Prometheus' directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let targets = dir.join("targets.json");
        write_targets(&targets, &BTreeMap::new())?;
        let (url, process) = launch(
            dir,
            json!({
                "job_name": "pods",
                "file_sd_configs": [{ "files": [&targets], "refresh_interval": interval() }],
            }),
            http,
        )
        .await?;
        let namespaces: Vec<String> = namespaces.iter().map(|n| (*n).to_owned()).collect();
        let discovery = Discovery(tokio::spawn(discover(kube, namespaces, pod_port, targets)));
        Ok(Self {
            url,
            process,
            discovery: Some(discovery),
        })
    }

    /// Starts Prometheus under `dir` scraping `targets` (`host:port`, each `/metrics`) as job
    /// `job`, as it would scrape Baton's agents through their ServiceMonitor, and waits until it
    /// is ready.
    pub async fn start_static(
        dir: &Path,
        job: &str,
        targets: &[String],
        http: &reqwest::Client,
    ) -> Result<Self> {
        let (url, process) = launch(
            dir,
            json!({ "job_name": job, "static_configs": [{ "targets": targets }] }),
            http,
        )
        .await?;
        Ok(Self {
            url,
            process,
            discovery: None,
        })
    }

    /// `http://127.0.0.1:PORT`, the address of its HTTP API.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills it at once (kill -9), as a crash would.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(d) = &self.discovery {
            d.0.abort();
        }
        self.process.kill9().await.map(|_| ())
    }

    pub async fn stop(self) -> Result<()> {
        drop(self.discovery);
        self.process.stop(DEFAULT_GRACE).await
    }
}

fn interval() -> String {
    format!("{}s", SCRAPE_INTERVAL.as_secs())
}

/// Writes the configuration with one scrape job (scraped every [`SCRAPE_INTERVAL`]), starts
/// Prometheus and waits until it is ready: its URL and process.
async fn launch(
    dir: &Path,
    mut job: Value,
    http: &reqwest::Client,
) -> Result<(String, ManagedProcess)> {
    let program = bins::prometheus()?;
    let data = dir.join("data");
    let logs = dir.join("logs");
    for path in [&data, &logs] {
        std::fs::create_dir_all(path).map_err(|source| SandboxError::Io {
            what: "create Prometheus' directories",
            path: path.clone(),
            source,
        })?;
    }
    let interval = interval();
    job["scrape_interval"] = json!(interval);
    job["scrape_timeout"] = json!(interval);
    let config = json!({
        "global": { "scrape_interval": interval, "evaluation_interval": interval },
        "scrape_configs": [job],
    });
    let config_path = dir.join("prometheus.yml");
    // JSON is YAML.
    std::fs::write(&config_path, config.to_string()).map_err(|source| SandboxError::Io {
        what: "write Prometheus' configuration",
        path: config_path.clone(),
        source,
    })?;
    let listen = process::free_port()?;
    let spec = ProcessSpec::new("prometheus", program, logs.join("prometheus.log"))
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{listen}"))
        .arg("--storage.tsdb.retention.time=1d")
        .arg("--log.level=warn");
    let mut process = ManagedProcess::spawn(spec)?;
    let url = format!("http://127.0.0.1:{listen}");
    let ready = format!("{url}/-/ready");
    process::wait_ready(&mut process, "/-/ready", STARTUP_TIMEOUT, || {
        process::probe_http(http, &ready, None)
    })
    .await?;
    Ok((url, process))
}

/// One scrape target: `ip:port` and its labels.
type Targets = BTreeMap<String, (String, BTreeMap<String, String>)>;

/// Follows the pods of `namespaces`, rewriting the discovery file whenever the running ones
/// change. A watch that fails is started again (the watcher backs off).
async fn discover(kube: kube::Client, namespaces: Vec<String>, pod_port: u16, file: PathBuf) {
    let streams = namespaces.iter().map(|ns| {
        let api: Api<Pod> = Api::namespaced(kube.clone(), ns);
        watcher(api, watcher::Config::default()).boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut targets = Targets::new();
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                let key = key(&pod);
                match target(&pod, pod_port) {
                    Some(t) => targets.insert(key, t.clone()) != Some(t),
                    None => targets.remove(&key).is_some(),
                }
            }
            Ok(watcher::Event::Delete(pod)) => targets.remove(&key(&pod)).is_some(),
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => true,
            Err(e) => {
                tracing::debug!(error = %e, "watching pods for Prometheus");
                false
            }
        };
        if changed {
            if let Err(e) = write_targets(&file, &targets) {
                tracing::warn!(error = %e, "writing Prometheus' targets");
            }
        }
    }
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A running pod with an IP, as a target.
fn target(pod: &Pod, pod_port: u16) -> Option<(String, BTreeMap<String, String>)> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let mut labels = BTreeMap::from([
        (
            "namespace".to_owned(),
            pod.metadata.namespace.clone().unwrap_or_default(),
        ),
        (
            "pod".to_owned(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ]);
    let own = pod.metadata.labels.clone().unwrap_or_default();
    for (from, to) in POD_LABELS {
        if let Some(v) = own.get(from) {
            labels.insert(to.to_owned(), v.clone());
        }
    }
    Some((format!("{ip}:{pod_port}"), labels))
}

/// Writes the discovery file whole (a new file renamed over the old: Prometheus never reads
/// half of one).
fn write_targets(file: &Path, targets: &Targets) -> Result<()> {
    let groups: Vec<Value> = targets
        .values()
        .map(|(address, labels)| json!({ "targets": [address], "labels": labels }))
        .collect();
    let partial = file.with_extension("json.partial");
    let io = |source| SandboxError::Io {
        what: "write Prometheus' targets",
        path: file.to_path_buf(),
        source,
    };
    std::fs::write(&partial, Value::Array(groups).to_string()).map_err(io)?;
    std::fs::rename(&partial, file).map_err(io)
}
