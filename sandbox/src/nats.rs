//! nats-server with JetStream and Baton's bus configuration — one server, or a cluster of
//! several on loopback — with one nkey user per part of Baton, generated fresh for each sandbox.
//! The public keys reach the configuration through `BATON_NKEY_<USER>`; the seeds are written
//! to `<credentials dir>/<user>.nk` (every user's, for the sandbox's operator) and, for each
//! user alone, to `<user credentials dir>/<user>/<user>.nk` — the folder an agent is given,
//! which holds nothing but its own seed.
//!
//! The users' permissions are generated from the bus definitions for the clusters the sandbox
//! serves (`auth.conf`, as `baton bus auth` writes it), beside a copy of `nats-server.conf`.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::info;

use crate::bins;
use crate::error::{Result, SandboxError};
use crate::process::{self, ManagedProcess, ProcessSpec, DEFAULT_GRACE};

/// The users of Baton's bus.
pub use baton_core::bus::NATS_USERS;
pub use baton_core::busauth::nkey_env_var;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The clusters whose agents a sandbox's bus serves unless told otherwise: the demo's and the
/// tests'.
pub const DEFAULT_CLUSTERS: [&str; 2] = ["sandbox", "test"];

/// What the servers of one bus share: the configuration and the users.
#[derive(Debug)]
struct Shared {
    program: PathBuf,
    config: PathBuf,
    credentials_dir: PathBuf,
    user_credentials_dir: PathBuf,
    /// user → seed
    seeds: BTreeMap<&'static str, String>,
    /// `BATON_NKEY_<USER>` → public key
    env: Vec<(String, String)>,
}

impl Shared {
    fn prepare(dir: &Path, bus_config_dir: &Path, clusters: &[String]) -> Result<Self> {
        let program = bins::nats_server()?;
        let template = bus_config_dir.join("nats-server.conf");
        let not_found = |what, path: PathBuf| SandboxError::Io {
            what,
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        if !template.is_file() {
            return Err(not_found(
                "find the NATS configuration (set BATON_BUS_CONFIG to the bus-config dir)",
                template,
            ));
        }
        let conf_dir = dir.join("nats-conf");
        let credentials_dir = dir.join("credentials");
        let user_credentials_dir = dir.join("user-credentials");
        for (what, path) in [
            ("create the NATS configuration dir", &conf_dir),
            ("create the credentials dir", &credentials_dir),
            ("create the per-user credentials dir", &user_credentials_dir),
            ("create the logs dir", &dir.join("logs")),
        ] {
            make_private_dir(what, path)?;
        }
        let defs = baton_core::busconfig::Definitions::load(bus_config_dir).map_err(|e| {
            SandboxError::InvalidOptions {
                reason: format!("the bus definitions in {}: {e}", bus_config_dir.display()),
            }
        })?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Io { what, path, source }
        };
        let config = conf_dir.join("nats-server.conf");
        std::fs::copy(&template, &config).map_err(io("copy the NATS configuration", &config))?;
        let auth = conf_dir.join("auth.conf");
        std::fs::write(&auth, baton_core::busauth::render(&defs, clusters))
            .map_err(io("write the NATS users", &auth))?;

        let mut seeds = BTreeMap::new();
        let mut env = Vec::new();
        for user in NATS_USERS {
            let key = nkeys::KeyPair::new_user();
            let seed = key.seed().map_err(|source| SandboxError::Nkey {
                user: user.to_string(),
                source,
            })?;
            write_secret(&credentials_dir.join(format!("{user}.nk")), &seed)?;
            let own = user_credentials_dir.join(user);
            make_private_dir("create a user's credentials dir", &own)?;
            write_secret(&own.join(format!("{user}.nk")), &seed)?;
            env.push((nkey_env_var(user), key.public_key()));
            seeds.insert(user, seed);
        }
        Ok(Self {
            program,
            config,
            credentials_dir,
            user_credentials_dir,
            seeds,
            env,
        })
    }
}

/// How a server takes part in a cluster.
#[derive(Debug, Clone)]
struct Membership {
    route_port: u16,
    routes: Vec<u16>,
}

/// A running (or deliberately stopped) nats-server on a loopback port.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    url: String,
    name: String,
    store_dir: PathBuf,
    log_path: PathBuf,
    membership: Option<Membership>,
    shared: Arc<Shared>,
    process: Mutex<Option<ManagedProcess>>,
}

impl NatsServer {
    /// Starts one nats-server with `<bus_config_dir>/nats-server.conf` and users for
    /// [`DEFAULT_CLUSTERS`], keeping its JetStream store, credentials and log under `dir`.
    pub async fn start(dir: &Path, bus_config_dir: &Path) -> Result<Self> {
        let clusters: Vec<String> = DEFAULT_CLUSTERS.iter().map(|c| c.to_string()).collect();
        let mut servers = NatsCluster::start(dir, bus_config_dir, 1, &clusters).await?;
        servers.servers.pop().ok_or(SandboxError::InvalidOptions {
            reason: "no nats-server started".into(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's name (unique in its cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory holding `<user>.nk`, the nkey seed of every user: the sandbox operator's.
    pub fn credentials_dir(&self) -> &Path {
        &self.shared.credentials_dir
    }

    /// A directory holding only `<user>.nk`: what a process running as `user` is given.
    pub fn credentials_dir_of(&self, user: &str) -> PathBuf {
        self.shared.user_credentials_dir.join(user)
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
        self.shared
            .seeds
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
            info!(pid = process.pid(), server = %self.name, %status, "nats-server killed");
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
        self.spawn()?;
        self.wait_ready().await
    }

    /// Starts the process without waiting for JetStream (a cluster's servers must all be
    /// started before any of them has a JetStream to answer with).
    fn spawn(&self) -> Result<()> {
        if let Some(pid) = self.pid() {
            return Err(SandboxError::AlreadyRunning {
                name: self.name.clone(),
                pid,
            });
        }
        let mut spec = ProcessSpec::new(&self.name, &self.shared.program, self.log_path.clone())
            .arg("-c")
            .arg(&self.shared.config)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-n")
            .arg(&self.name)
            .arg("-sd")
            .arg(&self.store_dir);
        if let Some(m) = &self.membership {
            let routes: Vec<String> = m
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            spec = spec
                .args(["--cluster_name", "baton", "--cluster"])
                .arg(format!("nats://127.0.0.1:{}", m.route_port))
                .arg("--routes")
                .arg(routes.join(","));
        }
        let spec = self
            .shared
            .env
            .iter()
            .fold(spec, |spec, (k, v)| spec.env(k.clone(), v.clone()));
        let process = ManagedProcess::spawn(spec)?;
        *self.lock() = Some(process);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<()> {
        let taken = self.lock().take();
        let Some(mut process) = taken else {
            return Err(SandboxError::InvalidOptions {
                reason: format!("{} is not running", self.name),
            });
        };
        let port = self.port;
        let url = self.url.clone();
        let seed = self.seed("admin")?.to_string();
        let ready = process::wait_ready(&mut process, "JetStream", STARTUP_TIMEOUT, || {
            let (url, seed) = (url.clone(), seed.clone());
            async move {
                process::probe_tcp(port).await?;
                let client = async_nats::ConnectOptions::with_nkey(seed)
                    .connection_timeout(Duration::from_secs(2))
                    .connect(&url)
                    .await
                    .map_err(|e| format!("connect to {url}: {e}"))?;
                // A raw request: async-nats 0.51's `query_account` can't parse the account
                // info of nats-server 2.9. In a cluster it fails until a meta leader is chosen.
                let reply = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request("$JS.API.INFO", bytes::Bytes::new()),
                )
                .await
                .map_err(|_| "JetStream account info: no answer yet".to_string())?
                .map_err(|e| format!("JetStream account info: {e}"))?;
                let info: serde_json::Value = serde_json::from_slice(&reply.payload)
                    .map_err(|e| format!("JetStream account info: {e}"))?;
                match info.get("error") {
                    None => Ok(()),
                    Some(error) => Err(format!("JetStream account info: {error}")),
                }
            }
        })
        .await;
        *self.lock() = Some(process);
        ready
    }

    /// Stops nats-server gracefully and starts it again with the same port and store.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// A client connected as `user` (one of [`NATS_USERS`]) to this server alone. It pings
    /// every second so that a killed server is noticed quickly, and reconnects forever.
    pub async fn connect(&self, user: &str) -> Result<async_nats::Client> {
        connect_to(&self.url, self.seed(user)?, user).await
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

async fn connect_to(urls: &str, seed: &str, user: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::with_nkey(seed.to_string())
        .name(format!("baton-sandbox-{user}"))
        .custom_inbox_prefix(baton_core::busauth::inbox_prefix(user))
        .ping_interval(Duration::from_secs(1))
        .connection_timeout(Duration::from_secs(5))
        .connect(
            baton_core::bus::server_addrs(urls)
                .map_err(|e| SandboxError::InvalidOptions {
                    reason: e.to_string(),
                })?
                .as_slice(),
        )
        .await
        .map_err(|source| SandboxError::NatsConnect {
            url: urls.to_string(),
            user: user.to_string(),
            source,
        })
}

/// One bus: a single nats-server, or a JetStream cluster of several routed to each other on
/// loopback, sharing one configuration and one set of users.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers (1 for a plain server, 3 for a JetStream cluster with quorum)
    /// whose users' permissions cover the agents of `clusters`, and waits until JetStream
    /// answers on each.
    pub async fn start(
        dir: &Path,
        bus_config_dir: &Path,
        size: usize,
        clusters: &[String],
    ) -> Result<Self> {
        if !(1..=5).contains(&size) {
            return Err(SandboxError::InvalidOptions {
                reason: format!("a NATS cluster of {size} servers: use 1 to 5"),
            });
        }
        for c in clusters {
            baton_core::names::validate_dns_label("cluster name", c).map_err(|e| {
                SandboxError::InvalidOptions {
                    reason: e.to_string(),
                }
            })?;
        }
        let shared = Arc::new(Shared::prepare(dir, bus_config_dir, clusters)?);
        let ports: Vec<u16> = (0..size)
            .map(|_| process::free_port())
            .collect::<Result<_>>()?;
        let route_ports: Vec<u16> = match size {
            1 => Vec::new(),
            _ => (0..size)
                .map(|_| process::free_port())
                .collect::<Result<_>>()?,
        };
        let mut servers = Vec::with_capacity(size);
        for (i, port) in ports.iter().enumerate() {
            let name = match size {
                1 => "nats-server".to_string(),
                _ => format!("nats-{}", i + 1),
            };
            let store_dir = dir.join(format!("nats-store-{}", i + 1));
            make_private_dir("create the JetStream store dir", &store_dir)?;
            let membership = (size > 1).then(|| Membership {
                route_port: route_ports[i],
                routes: route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect(),
            });
            servers.push(NatsServer {
                port: *port,
                url: format!("nats://127.0.0.1:{port}"),
                log_path: dir.join("logs").join(format!("{name}.log")),
                name,
                store_dir,
                membership,
                shared: shared.clone(),
                process: Mutex::new(None),
            });
        }
        for server in &servers {
            server.spawn()?;
        }
        let ready = futures::future::join_all(servers.iter().map(NatsServer::wait_ready)).await;
        ready.into_iter().collect::<Result<Vec<()>>>()?;
        if size > 1 {
            info!(size, "NATS cluster ready");
        }
        Ok(Self { servers })
    }

    /// Every server, in order.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// The first server.
    pub fn first(&self) -> &NatsServer {
        // `start` refuses a cluster of no servers.
        &self.servers[0]
    }

    /// Every server's URL, comma-separated: what clients are given, so that they reach the
    /// bus while any one server is up.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client connected as `user` to whichever server answers.
    pub async fn connect(&self, user: &str) -> Result<async_nats::Client> {
        connect_to(&self.urls(), self.first().seed(user)?, user).await
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&NatsServer> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// SIGKILLs every server at once.
    pub async fn kill9_all(&self) -> Result<()> {
        let killed = futures::future::join_all(self.servers.iter().map(NatsServer::kill9)).await;
        killed.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    }

    /// Starts every stopped server again (all before waiting: a cluster answers only once a
    /// quorum is back), and waits until JetStream answers on each.
    pub async fn start_again_all(&self) -> Result<()> {
        for server in self.servers.iter().filter(|s| s.pid().is_none()) {
            server.spawn()?;
        }
        let ready =
            futures::future::join_all(self.servers.iter().map(NatsServer::wait_ready)).await;
        ready.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    }

    /// Stops every server gracefully, all at once.
    pub async fn stop(&self) -> Result<()> {
        let stopped = futures::future::join_all(self.servers.iter().map(NatsServer::stop)).await;
        stopped.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    }

    pub(crate) fn begin_stop(&self) {
        for server in &self.servers {
            server.begin_stop();
        }
    }
}

fn make_private_dir(what: &'static str, path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| SandboxError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })
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
