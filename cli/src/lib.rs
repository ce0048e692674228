//! Baton's command-line interface, `baton`: what a person or a CI job uses to request releases,
//! follow them, query history and metrics, and set up the bus.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use baton_core::bus::{Bus, InitialConnect, NatsArgs};
use baton_core::busconfig::{self, Definitions};

mod busstatus;
mod config;
mod control;
mod credentials;
mod history;
mod list;
mod progress;
mod release;

/// Baton: event-driven release agents for Kubernetes over NATS.
#[derive(Debug, clap::Parser)]
#[command(name = "baton", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Request a release of APP in an environment; with --wait, follow it to its end
    Release(release::ReleaseArgs),
    /// Where a release is: status, step, timings, failure (--watch: then follow it to its end)
    Status(release::StatusArgs),
    /// The releases in flight: where each is and what it waits for
    List(list::ListArgs),
    /// Every event of a release with its details and timings (--follow: until it ends)
    Logs(release::LogsArgs),
    /// Roll APP back to its previous revision in an environment
    Rollback(release::RollbackArgs),
    /// Hold a canary or blue-green release after its current step
    Pause(control::PauseArgs),
    /// Continue a release a person paused
    Resume(control::ResumeArgs),
    /// Let a release waiting at a gate go on (--full: all the way to 100%)
    Promote(control::PromoteArgs),
    /// Stop a release now and roll it back
    Abort(control::AbortArgs),
    /// Past releases, newest first
    History(history::HistoryArgs),
    /// Delivery metrics (DORA and more) over a window
    Metrics(history::MetricsArgs),
    /// App and environment configuration: validate, apply (versioned), show, history, rollback
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Set up the bus: streams, consumers, KV buckets and object stores
    #[command(subcommand)]
    Bus(BusCommand),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum BusCommand {
    /// Create or update every stream, consumer, bucket and store defined in bus-config/.
    /// Running it again changes nothing.
    Apply {
        /// A bus-config folder to apply instead of the definitions built into baton
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The NATS user to act as (its `<user>.nk` is taken from --credentials)
        #[arg(long = "as", default_value = "admin")]
        user: String,
        /// Also create the per-cluster consumers of the deployer, health-checker and rollback
        /// agents for this cluster (repeatable; each agent creates its own at start as well)
        #[arg(long = "cluster")]
        clusters: Vec<String>,
    },
    /// Print the users and permissions block of nats-server's configuration (`accounts`), for
    /// the agents of the given clusters: include it from nats-server.conf
    Auth {
        /// A cluster whose agents use this bus (repeatable, or comma-separated)
        #[arg(
            long = "clusters",
            alias = "cluster",
            required = true,
            value_delimiter = ','
        )]
        clusters: Vec<String>,
        /// A bus-config folder to derive it from instead of the definitions built into baton
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Write to this file instead of standard output
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make a NATS credential (nkey) for every Baton user: `<user>.nk` seeds for the CLI and the
    /// agents, and `nkeys.env` with the public keys nats-server.conf reads (BATON_NKEY_<USER>)
    Credentials {
        /// Folder to write into (created if missing)
        #[arg(long)]
        out: PathBuf,
        /// Replace credentials that are already there
        #[arg(long)]
        force: bool,
    },
    /// Where every stream and bucket has its replicas: the server that leads it, those that
    /// follow and whether they are current. Exits 1 when a stream has no leader or no quorum
    Status {
        /// The NATS user to ask as (any Baton user may read the streams' state)
        #[arg(long = "as", default_value = "cli")]
        user: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

impl Cli {
    /// Runs the command and says how the process should exit; the error says what went wrong
    /// in words a person can act on.
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
        match self.command {
            Command::Release(args) => release::release(&self.nats, args).await,
            Command::Status(args) => release::status(&self.nats, args).await,
            Command::List(args) => done(list::list(&self.nats, args).await),
            Command::Logs(args) => release::logs(&self.nats, args).await,
            Command::Rollback(args) => release::rollback(&self.nats, args).await,
            Command::Pause(args) => control::pause(&self.nats, args).await,
            Command::Resume(args) => control::resume(&self.nats, args).await,
            Command::Promote(args) => control::promote(&self.nats, args).await,
            Command::Abort(args) => control::abort(&self.nats, args).await,
            Command::History(args) => done(history::history(&self.nats, args).await),
            Command::Metrics(args) => done(history::metrics(&self.nats, args).await),
            Command::Config(cmd) => done(config::run(&self.nats, cmd).await),
            Command::Bus(BusCommand::Apply {
                dir,
                user,
                clusters,
            }) => done(bus_apply(&self.nats, dir, &user, &clusters).await),
            Command::Bus(BusCommand::Auth { clusters, dir, out }) => {
                done(bus_auth(&clusters, dir, out))
            }
            Command::Bus(BusCommand::Credentials { out, force }) => {
                done(credentials::write(&out, force))
            }
            Command::Bus(BusCommand::Status { user, output }) => {
                let bus = connect_as(&self.nats, &user).await?;
                Ok(match busstatus::run(bus.jetstream(), output).await? {
                    true => ExitCode::SUCCESS,
                    false => ExitCode::FAILURE,
                })
            }
        }
    }
}

/// Connects as the CLI's own NATS user, failing at once with a clear error.
pub async fn connect(nats: &NatsArgs) -> anyhow::Result<Bus> {
    connect_as(nats, "cli").await
}

/// Connects as `user`: `cli` to release and query, `config` to change the configuration
/// (two roles, so that CI may release without being able to change what a release runs).
pub async fn connect_as(nats: &NatsArgs, user: &str) -> anyhow::Result<Bus> {
    Bus::connect(nats, user, source(), InitialConnect::FailFast)
        .await
        .with_context(|| format!("connecting to NATS at {}", nats.url))
}

/// Connects as the CLI's user for reading only (`status`, `logs`, `list`, a release followed
/// live): any replica of a stream answers (see [`Bus::reading_from_any_replica`]), so these
/// answer at once while a stream elects a leader. Commands decide from their leader's reads.
pub async fn connect_reader(nats: &NatsArgs) -> anyhow::Result<Bus> {
    Ok(connect(nats).await?.reading_from_any_replica())
}

fn source() -> baton_core::bus::Source {
    baton_core::bus::Source {
        agent: "cli".into(),
        cluster: String::new(),
        instance: format!("baton/{}", std::process::id()),
    }
}

async fn bus_apply(
    nats: &NatsArgs,
    dir: Option<PathBuf>,
    user: &str,
    clusters: &[String],
) -> anyhow::Result<()> {
    for c in clusters {
        baton_core::names::validate_dns_label("cluster name", c)
            .map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    }
    let defs = match &dir {
        Some(d) => Definitions::load(d)?,
        None => Definitions::embedded()?,
    };
    let bus = Bus::connect(nats, user, source(), InitialConnect::FailFast)
        .await
        .with_context(|| format!("connecting to NATS as {user}"))?;
    let report = busconfig::apply(bus.jetstream(), &defs, clusters).await?;
    for change in &report.changes {
        println!("{change}");
    }
    match report.changed() {
        0 => println!("bus is up to date: nothing changed"),
        n => println!("bus applied: {n} change(s)"),
    }
    Ok(())
}

fn bus_auth(clusters: &[String], dir: Option<PathBuf>, out: Option<PathBuf>) -> anyhow::Result<()> {
    for c in clusters {
        baton_core::names::validate_dns_label("cluster name", c)
            .map_err(|e| anyhow::anyhow!("--clusters: {e}"))?;
    }
    let defs = match &dir {
        Some(d) => Definitions::load(d)?,
        None => Definitions::embedded()?,
    };
    let text = baton_core::busauth::render(&defs, clusters);
    match out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote the users and permissions of {} for cluster(s) {} to {}",
                baton_core::busauth::USERS.join(", "),
                clusters.join(", "),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}
