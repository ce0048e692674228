//! Baton's command-line interface, `baton`: what a person or a CI job uses to request releases,
//! follow them, query history and metrics, and set up the bus.

use std::path::PathBuf;

use anyhow::Context;
use baton_core::bus::{Bus, InitialConnect, NatsArgs};
use baton_core::busconfig::{self, Definitions};

mod credentials;

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
    /// Set up the bus: streams, consumers, KV buckets and object stores
    #[command(subcommand)]
    Bus(BusCommand),
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
}

impl Cli {
    /// Runs the command; the error says what went wrong in words a person can act on.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Bus(BusCommand::Apply { dir, user }) => {
                bus_apply(&self.nats, dir, &user).await
            }
            Command::Bus(BusCommand::Credentials { out, force }) => credentials::write(&out, force),
        }
    }
}

fn source() -> baton_core::bus::Source {
    baton_core::bus::Source {
        agent: "cli".into(),
        cluster: String::new(),
        instance: format!("baton/{}", std::process::id()),
    }
}

async fn bus_apply(nats: &NatsArgs, dir: Option<PathBuf>, user: &str) -> anyhow::Result<()> {
    let defs = match &dir {
        Some(d) => Definitions::load(d)?,
        None => Definitions::embedded()?,
    };
    let bus = Bus::connect(nats, user, source(), InitialConnect::FailFast)
        .await
        .with_context(|| format!("connecting to NATS as {user}"))?;
    let report = busconfig::apply(bus.jetstream(), &defs).await?;
    for change in &report.changes {
        println!("{change}");
    }
    match report.changed() {
        0 => println!("bus is up to date: nothing changed"),
        n => println!("bus applied: {n} change(s)"),
    }
    Ok(())
}
