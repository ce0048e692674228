//! `baton config`: the app and environment configuration, versioned in a KV bucket.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use baton_core::bus::NatsArgs;
use baton_core::config::{self, store, ConfigErrors};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file; every wrong field is named
    Validate { file: PathBuf },
    /// Validate, then store a file as the new revision
    Apply { file: PathBuf },
    /// Print the current configuration (or a past revision)
    Show {
        #[arg(long)]
        revision: Option<u64>,
    },
    /// List the stored revisions
    History,
    /// Make a past revision current again (as a new revision)
    Rollback {
        #[arg(long)]
        revision: u64,
    },
}

pub async fn run(nats: &NatsArgs, cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Validate { file } => {
            let text = read(&file)?;
            let config = validate(&file, &text)?;
            let n = config.notifications();
            let notifications = if n.channels.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} notification channels, {} routes",
                    n.channels.len(),
                    n.routes.len()
                )
            };
            println!(
                "valid: {} apps, {} environments{notifications}",
                config.apps().len(),
                config.environments().len()
            );
            Ok(())
        }
        ConfigCommand::Apply { file } => {
            let text = read(&file)?;
            // Refused before connecting: a bad file never reaches the bus.
            validate(&file, &text)?;
            let bus = crate::connect_as(nats, "config").await?;
            let applied = store::apply(&bus, &text, &actor())
                .await
                .with_context(|| format!("applying {}", file.display()))?;
            if applied.changed {
                println!("applied: revision {}", applied.revision);
            } else {
                println!(
                    "unchanged: revision {} already holds this configuration",
                    applied.revision
                );
            }
            Ok(())
        }
        ConfigCommand::Show { revision } => {
            let bus = crate::connect(nats).await?;
            let text = match revision {
                Some(n) => store::at_revision(&bus, n).await?.1,
                None => match store::current(&bus).await? {
                    Some((_, _, text)) => text,
                    None => bail!(
                        "no configuration has been applied yet (use `baton config apply FILE`)"
                    ),
                },
            };
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        ConfigCommand::History => {
            let bus = crate::connect(nats).await?;
            let revisions = store::history(&bus).await?;
            if revisions.is_empty() {
                println!("no configuration has been applied yet");
                return Ok(());
            }
            println!(
                "{:<10} {:<22} {:<32} SHA256",
                "REVISION", "APPLIED AT", "BY"
            );
            let newest = revisions.last().map(|r| r.revision);
            for r in revisions.iter().rev() {
                let current = if Some(r.revision) == newest {
                    "  (current)"
                } else {
                    ""
                };
                println!(
                    "{:<10} {:<22} {:<32} {}{current}",
                    r.revision,
                    r.applied_at,
                    r.applied_by,
                    r.sha256.get(..12).unwrap_or(&r.sha256)
                );
            }
            Ok(())
        }
        ConfigCommand::Rollback { revision } => {
            let bus = crate::connect_as(nats, "config").await?;
            let applied = store::rollback(&bus, revision, &actor())
                .await
                .with_context(|| {
                    format!("rolling the configuration back to revision {revision}")
                })?;
            if applied.changed {
                println!(
                    "rolled back: revision {} holds the configuration of revision {revision}",
                    applied.revision
                );
            } else {
                println!(
                    "unchanged: the current revision {} already holds the configuration of revision {revision}",
                    applied.revision
                );
            }
            Ok(())
        }
    }
}

fn read(file: &Path) -> anyhow::Result<String> {
    let f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    let mut text = String::new();
    // One byte over the limit is enough to know the file is too large.
    f.take(config::MAX_FILE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (is it UTF-8 text?)", file.display()))?;
    Ok(text)
}

fn validate(file: &Path, text: &str) -> anyhow::Result<config::Config> {
    config::parse(text).map_err(|e| anyhow::anyhow!(report(file, &e)))
}

fn report(file: &Path, errors: &ConfigErrors) -> String {
    let n = errors.len();
    let mut out = format!(
        "{} is not valid ({n} problem{}):",
        file.display(),
        if n == 1 { "" } else { "s" }
    );
    for p in &errors.problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string().replace('\n', "\n    "));
    }
    out
}

/// Who is acting, for the history: `BATON_ACTOR` (CI sets it), else `user@host`.
fn actor() -> String {
    if let Some(a) = std::env::var("BATON_ACTOR")
        .ok()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
    {
        return a.chars().take(128).collect();
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}
