//! The sandbox's OCI registry: Debian's `docker-registry` (CNCF distribution 2.8) with
//! filesystem storage in the sandbox's directory and deletes enabled.

use std::path::Path;
use std::time::Duration;

use crate::bins;
use crate::error::{Result, SandboxError};
use crate::process::{self, ManagedProcess, ProcessSpec, DEFAULT_GRACE};
use crate::registry::Registry;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct RegistryServer {
    host_port: String,
    process: ManagedProcess,
}

impl RegistryServer {
    /// Starts docker-registry with its config, storage and log under `dir`, and waits until
    /// `/v2/` answers.
    pub async fn start(dir: &Path, http: &reqwest::Client) -> Result<Self> {
        let program = bins::docker_registry()?;
        let root = dir.join("registry");
        let logs = dir.join("logs");
        for path in [&root, &logs] {
            std::fs::create_dir_all(path).map_err(|source| SandboxError::Io {
                what: "create the registry's directories",
                path: path.clone(),
                source,
            })?;
        }
        let port = process::free_port()?;
        let host_port = format!("127.0.0.1:{port}");
        let config = serde_json::json!({
            "version": 0.1,
            "log": { "level": "info", "accesslog": { "disabled": true } },
            "storage": {
                "filesystem": { "rootdirectory": root },
                "delete": { "enabled": true },
                "cache": { "blobdescriptor": "inmemory" },
            },
            "http": { "addr": host_port },
        });
        let config_path = dir.join("registry.yml");
        // JSON is YAML, and serde_yaml_ng would quote nothing differently here.
        std::fs::write(&config_path, config.to_string()).map_err(|source| SandboxError::Io {
            what: "write the registry config",
            path: config_path.clone(),
            source,
        })?;
        let spec = ProcessSpec::new("docker-registry", program, logs.join("registry.log"))
            .arg("serve")
            .arg(&config_path);
        let mut process = ManagedProcess::spawn(spec)?;
        let url = format!("http://{host_port}/v2/");
        process::wait_ready(&mut process, "/v2/", STARTUP_TIMEOUT, || {
            process::probe_http(http, &url, None)
        })
        .await?;
        Ok(Self { host_port, process })
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/app:v1`).
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A client of this registry.
    pub fn client(&self) -> Result<Registry> {
        Registry::new(&self.host_port).map_err(|source| SandboxError::Registry {
            host_port: self.host_port.clone(),
            source,
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.process.stop(DEFAULT_GRACE).await
    }

    pub(crate) fn begin_stop(&mut self) {
        self.process.begin_stop();
    }
}
