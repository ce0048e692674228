//! A `nats-server` with JetStream and Baton's bus configuration: one nkey user per part of
//! Baton, generated fresh for each sandbox, whose public keys reach the configuration through
//! `BATON_NKEY_<USER>` and whose seeds are written to `<credentials dir>/<user>.nk`.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tracing::info;

use crate::bins;
use crate::error::{Result, SandboxError};
use crate::process::{self, ManagedProcess, ProcessSpec, DEFAULT_GRACE};

/// The users of `bus-config/nats-server.conf`.
pub use baton_core::bus::NATS_USERS;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or deliberately stopped) nats-server on a loopback port.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    url: String,
    program: PathBuf,
    config: PathBuf,
    store_dir: PathBuf,
    credentials_dir: PathBuf,
    log_path: PathBuf,
    /// user → seed
    seeds: BTreeMap<&'static str, String>,
    /// `BATON_NKEY_<USER>` → public key
    env: Vec<(String, String)>,
    process: Mutex<Option<ManagedProcess>>,
}

impl NatsServer {
    /// Starts nats-server with `<bus_config_dir>/nats-server.conf`, keeping its JetStream store,
    /// credentials and log under `dir`.
    pub async fn start(dir: &Path, bus_config_dir: &Path) -> Result<Self> {
        let program = bins::nats_server()?;
        let config = bus_config_dir.join("nats-server.conf");
        if !config.is_file() {
            return Err(SandboxError::Io {
                what: "find the NATS configuration (set BATON_BUS_CONFIG to the bus-config dir)",
                path: config,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let store_dir = dir.join("nats-store");
        let credentials_dir = dir.join("credentials");
        let logs_dir = dir.join("logs");
        for (what, path) in [
            ("create the JetStream store dir", &store_dir),
            ("create the credentials dir", &credentials_dir),
            ("create the logs dir", &logs_dir),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|source| SandboxError::Io {
                    what,
                    path: path.clone(),
                    source,
                })?;
        }

        let mut seeds = BTreeMap::new();
        let mut env = Vec::new();
        for user in NATS_USERS {
            let key = nkeys::KeyPair::new_user();
            let seed = key.seed().map_err(|source| SandboxError::Nkey {
                user: user.to_string(),
                source,
            })?;
            write_secret(&credentials_dir.join(format!("{user}.nk")), &seed)?;
            env.push((nkey_env_var(user), key.public_key()));
            seeds.insert(user, seed);
        }

        let port = process::free_port()?;
        let server = Self {
            port,
            url: format!("nats://127.0.0.1:{port}"),
            program,
            config,
            store_dir,
            credentials_dir,
            log_path: logs_dir.join("nats-server.log"),
            seeds,
            env,
            process: Mutex::new(None),
        };
        server.start_again().await?;
        Ok(server)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding `<user>.nk`, one nkey seed per user.
    pub fn credentials_dir(&self) -> &Path {
        &self.credentials_dir
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The nkey seed of `user` (one of [`NATS_USERS`]).
    pub fn seed(&self, user: &str) -> Result<&str> {
        self.seeds
            .get(user)
            .map(String::as_str)
            .ok_or_else(|| SandboxError::UnknownUser {
                user: user.to_string(),
                known: NATS_USERS.join(", "),
            })
    }

    /// Pid of the nats-server process, if it is running.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let process = guard.as_mut()?;
        process.is_running().then(|| process.pid())
    }

    /// SIGKILLs the nats-server process itself (not its supervisor) and waits until it is gone.
    pub async fn kill9(&self) -> Result<()> {
        let taken = self.lock().take();
        if let Some(mut process) = taken {
            let status = process.kill9().await?;
            info!(pid = process.pid(), %status, "nats-server killed");
        }
        Ok(())
    }

    /// Stops nats-server gracefully (SIGTERM).
    pub async fn stop(&self) -> Result<()> {
        let taken = self.lock().take();
        match taken {
            Some(process) => process.stop(DEFAULT_GRACE).await,
            None => Ok(()),
        }
    }

    /// Starts nats-server again on the same port with the same store (after
    /// [`kill9`](Self::kill9) or [`stop`](Self::stop)), and waits until JetStream answers.
    pub async fn start_again(&self) -> Result<()> {
        if let Some(pid) = self.pid() {
            return Err(SandboxError::AlreadyRunning {
                name: "nats-server".to_string(),
                pid,
            });
        }
        let spec = ProcessSpec::new("nats-server", &self.program, self.log_path.clone())
            .arg("-c")
            .arg(&self.config)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store_dir);
        let spec = self
            .env
            .iter()
            .fold(spec, |spec, (k, v)| spec.env(k.clone(), v.clone()));
        let mut process = ManagedProcess::spawn(spec)?;
        let port = self.port;
        let url = self.url.clone();
        let seed = self.seed("admin")?.to_string();
        process::wait_ready(&mut process, "JetStream", STARTUP_TIMEOUT, || {
            let (url, seed) = (url.clone(), seed.clone());
            async move {
                process::probe_tcp(port).await?;
                let client = async_nats::ConnectOptions::with_nkey(seed)
                    .connection_timeout(Duration::from_secs(2))
                    .connect(&url)
                    .await
                    .map_err(|e| format!("connect to {url}: {e}"))?;
                // A raw request: async-nats 0.51's `query_account` can't parse the account
                // info of nats-server 2.9.
                let reply = client
                    .request("$JS.API.INFO", bytes::Bytes::new())
                    .await
                    .map_err(|e| format!("JetStream account info: {e}"))?;
                let info: serde_json::Value = serde_json::from_slice(&reply.payload)
                    .map_err(|e| format!("JetStream account info: {e}"))?;
                match info.get("error") {
                    None => Ok(()),
                    Some(error) => Err(format!("JetStream account info: {error}")),
                }
            }
        })
        .await?;
        *self.lock() = Some(process);
        Ok(())
    }

    /// Stops nats-server gracefully and starts it again with the same port and store.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// A client connected as `user` (one of [`NATS_USERS`]). It pings every second so that a
    /// killed server is noticed quickly, and reconnects forever.
    pub async fn connect(&self, user: &str) -> Result<async_nats::Client> {
        let seed = self.seed(user)?.to_string();
        async_nats::ConnectOptions::with_nkey(seed)
            .name(format!("baton-sandbox-{user}"))
            .ping_interval(Duration::from_secs(1))
            .connection_timeout(Duration::from_secs(5))
            .connect(&self.url)
            .await
            .map_err(|source| SandboxError::NatsConnect {
                url: self.url.clone(),
                user: user.to_string(),
                source,
            })
    }

    /// Sends SIGTERM without waiting (part of stopping the whole sandbox in parallel).
    pub(crate) fn begin_stop(&self) {
        if let Some(process) = self.lock().as_mut() {
            process.begin_stop();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<ManagedProcess>> {
        // A panic while holding this lock leaves the Option intact; keep using it.
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `BATON_NKEY_HEALTH_CHECKER` for `health-checker`.
pub fn nkey_env_var(user: &str) -> String {
    format!("BATON_NKEY_{}", user.to_uppercase().replace('-', "_"))
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|source| SandboxError::Io {
            what: "write an nkey seed",
            path: path.to_path_buf(),
            source,
        })
}
