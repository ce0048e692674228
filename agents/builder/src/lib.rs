//! Baton's builder agent: turns a release request into an immutable image reference.
//!
//! On `release.requested` it resolves the spec's image (a tag) to `registry/repo@sha256:…` through
//! the OCI distribution API of its registry — after running the spec's build command, when it has
//! one — and publishes `build.started`, then `build.succeeded` or `build.failed` with a reason.
//! It has no access to the cluster. `decide` holds the decisions (pure), `registry` and `command`
//! the I/O, `handler` the wiring onto the bus (see `bus-config/consumers/builder.json`).

pub mod auth;
pub mod command;
pub mod decide;
pub mod error;
pub mod handler;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_core::agent::{self, Agent, AgentArgs};
use baton_core::Role;

use crate::auth::AuthConfig;
use crate::error::Error;
use crate::registry::RegistryClient;

/// Command-line flags of `baton-builder`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-builder",
    version,
    about = "Baton's builder agent: turns a release request into an immutable image reference"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How the builder reaches registries.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Registry credentials: a docker config.json ({"auths": {"HOST[:PORT]": {"auth": base64 of
    /// "user:password"}}}, or "username" and "password")
    #[arg(
        long = "registry-auth",
        env = "BATON_REGISTRY_AUTH",
        value_name = "FILE"
    )]
    pub auth_file: Option<PathBuf>,
    /// A registry reached over plain HTTP instead of HTTPS (repeatable; comma-separated in the
    /// environment). Credentials are sent over plain HTTP only to hosts listed here, token
    /// services included
    #[arg(
        long = "plain-http-registry",
        env = "BATON_PLAIN_HTTP_REGISTRIES",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub plain_http: Vec<String>,
    /// How long an unreachable or failing registry is asked again before the build fails
    #[arg(
        long = "registry-retry-seconds",
        env = "BATON_REGISTRY_RETRY_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=600)
    )]
    pub retry_seconds: u64,
}

impl RegistryArgs {
    /// The registry client these flags describe; reads and checks the credentials file.
    pub fn client(&self) -> Result<RegistryClient, Error> {
        let auth = match &self.auth_file {
            None => AuthConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::ReadAuth {
                    path: path.clone(),
                    source,
                })?;
                let auth = AuthConfig::parse(&text).map_err(|message| Error::AuthFile {
                    path: path.clone(),
                    message,
                })?;
                let hosts: Vec<&str> = auth.hosts().collect();
                tracing::info!(path = %path.display(), registries = ?hosts, "registry credentials loaded");
                auth
            }
        };
        let plain_http = registry::plain_http_registries(&self.plain_http)?;
        if !plain_http.is_empty() {
            tracing::info!(registries = ?plain_http, "registries reached over plain HTTP");
        }
        RegistryClient::new(auth, plain_http, Duration::from_secs(self.retry_seconds))
    }
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let registry = self.registry.client()?;
        let agent = Agent {
            role: Role::Builder,
            handler: Arc::new(handler::Builder::new(registry)),
            readiness: None,
        };
        agent::run(self.agent, agent).await?;
        Ok(())
    }
}
