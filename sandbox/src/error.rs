//! Errors of the sandbox. Startup errors carry the tail of the failing server's log, since that
//! is where the reason is.

use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{name} not found (looked for {looked_in}); run scripts/setup.sh to install it, or set {env}")]
    BinaryNotFound {
        name: &'static str,
        looked_in: String,
        env: &'static str,
    },

    #[error("failed to start {name} ({program})")]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("supervisor of {name} ({program}) reported no pid (exit {status}); log:\n{log_tail}")]
    NoPid {
        name: String,
        program: PathBuf,
        status: String,
        log_tail: String,
    },

    #[error("{name} exited during startup ({status}); {log}")]
    Exited {
        name: String,
        status: String,
        log: Box<ServerLog>,
    },

    #[error("{name}: {what} not ready after {waited:?}: {last_error}; {log}")]
    NotReady {
        name: String,
        what: &'static str,
        waited: Duration,
        last_error: String,
        log: Box<ServerLog>,
    },

    #[error("failed to send {signal} to {name} (pid {pid})")]
    Signal {
        name: String,
        pid: u32,
        signal: &'static str,
        #[source]
        source: nix::errno::Errno,
    },

    #[error("{name} (pid {pid}) did not exit after SIGKILL")]
    Stop { name: String, pid: u32 },

    #[error("{name} is already running (pid {pid})")]
    AlreadyRunning { name: String, pid: u32 },

    #[error("failed to {what} ({path})")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("failed to generate the nkey seed of NATS user {user}")]
    Nkey {
        user: String,
        #[source]
        source: nkeys::error::Error,
    },

    #[error("unknown NATS user {user:?} (known: {known})")]
    UnknownUser { user: String, known: String },

    #[error("failed to connect to NATS at {url} as {user}")]
    NatsConnect {
        url: String,
        user: String,
        #[source]
        source: async_nats::ConnectError,
    },

    #[error("failed to build the HTTP client for readiness checks")]
    HttpClient(#[source] reqwest::Error),

    #[error("failed to load the kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },

    #[error("failed to build a Kubernetes client from {path}")]
    KubeClient {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },

    #[error("Kubernetes API call failed: {what}")]
    KubeApi {
        what: String,
        #[source]
        source: kube::Error,
    },

    #[error("{what} did not happen within {waited:?}: {last_error}")]
    Timeout {
        what: String,
        waited: Duration,
        last_error: String,
    },

    #[error("the sandbox was started without {component}")]
    Disabled { component: &'static str },

    #[error("the shared sandbox's startup task panicked")]
    SharedStartupPanicked,

    #[error("invalid sandbox options: {reason}")]
    InvalidOptions { reason: String },

    #[error("failed to create the registry client for {host_port}")]
    Registry {
        host_port: String,
        #[source]
        source: crate::registry::RegistryError,
    },

    #[error("failed to start the simulated nodes")]
    Nodes(#[source] crate::node::NodeError),
}

/// Where a server logs, and the end of that log.
#[derive(Debug)]
pub struct ServerLog {
    pub path: PathBuf,
    pub tail: String,
}

impl std::fmt::Display for ServerLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "log {}:\n{}", self.path.display(), self.tail)
    }
}

impl SandboxError {
    /// Whether trying again may help. Startup failures of the sandbox are mostly about the
    /// machine (missing binaries, a port taken meanwhile); only lost races on ports and
    /// timeouts are worth a retry.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotReady { .. } | Self::Timeout { .. } | Self::NatsConnect { .. }
        )
    }
}
