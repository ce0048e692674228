//! Baton's notifier agent: tells teams of their releases where they work.
//!
//! It turns release events into messages for the channels the configuration routes them to
//! (`notifications:` — which apps, environments and triggers go to which channel): Slack-compatible
//! incoming webhooks, and JSON webhooks in CloudEvents' HTTP binary mode. The channels' URLs are
//! secrets: they come from the file given with `--secrets`, never from the configuration.
//!
//! It works in two halves joined by a stream, so that every event is told exactly once to each
//! channel, and a receiver that keeps failing holds up only its own channel:
//! - [`route`]: the durable consumer `notifier-all` (through the shared runtime) routes each
//!   trigger event and stores one message per channel in the outbox `BATON_NOTIFY`, deduplicated
//!   by event id and channel;
//! - [`deliver`]: the outbox's consumer sends each channel's messages in order, retrying with
//!   back-off, each attempt with the event id as its idempotency key; what a receiver refuses or
//!   never takes within `--give-up-after` is dead-lettered with the reason.
//!
//! It publishes no event and needs no access to any cluster.

pub mod deliver;
pub mod message;
pub mod route;
pub mod secrets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_core::agent::{AgentArgs, Supervisor};
use baton_core::config::parse_duration_ms;
use baton_core::Role;

/// The notifier's metric names and help texts, defined once.
pub mod names {
    pub const QUEUED: (&str, &str) = (
        "baton_notifications_queued_total",
        "Notifications stored in the outbox, by channel and trigger",
    );
    pub const SENT: (&str, &str) = (
        "baton_notifications_sent_total",
        "Notifications a receiver took (2xx), by channel and trigger",
    );
    pub const FAILED_ATTEMPTS: (&str, &str) = (
        "baton_notification_attempts_failed_total",
        "Attempts a receiver did not take (to be tried again), by channel",
    );
    pub const GIVEN_UP: (&str, &str) = (
        "baton_notifications_dead_lettered_total",
        "Notifications dead-lettered, by channel and kind (refused, gave_up, invalid)",
    );
    pub const PENDING: (&str, &str) = (
        "baton_notifications_pending",
        "Notifications the notifier holds, waiting for their channel",
    );
    pub const SEND_SECONDS: (&str, &str) = (
        "baton_notification_send_duration_seconds",
        "Time a receiver took to answer one notification",
    );
}

/// Command-line flags of `baton-notifier`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "baton-notifier",
    version,
    about = "Baton's notifier agent: tells teams of their releases in Slack and over CloudEvents webhooks"
)]
pub struct Args {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// The channels' webhook URLs: a YAML file of `channel: url` (a mounted Secret); read again
    /// when it changes
    #[arg(long, env = "BATON_NOTIFIER_SECRETS")]
    pub secrets: PathBuf,
    /// How long a notification a receiver keeps failing is tried before it is dead-lettered
    /// (1s to 7d)
    #[arg(long = "give-up-after", env = "BATON_NOTIFIER_GIVE_UP_AFTER", default_value = "1h",
          value_parser = parse_give_up)]
    pub give_up_after: Duration,
    /// How long one request to a receiver may take (1s to 20s)
    #[arg(long = "request-timeout", env = "BATON_NOTIFIER_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = parse_request_timeout)]
    pub request_timeout: Duration,
}

fn parse_between(text: &str, min_ms: u64, max_ms: u64, range: &str) -> Result<Duration, String> {
    let ms = parse_duration_ms(text)?;
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(format!("{text} is not between {range}"));
    }
    Ok(Duration::from_millis(ms))
}

fn parse_give_up(text: &str) -> Result<Duration, String> {
    parse_between(text, 1_000, 7 * 86_400_000, "1s and 7d")
}

fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    parse_between(text, 1_000, 20_000, "1s and 20s")
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let secrets = Arc::new(secrets::Secrets::load(&self.secrets)?);
        let settings = deliver::Settings {
            give_up_after: self.give_up_after,
            request_timeout: self.request_timeout,
        };
        let supervisor = Supervisor::start(self.agent, Role::Notifier)
            .await
            .context("starting the notifier")?;
        let deliverer = deliver::Deliverer::new(
            supervisor.bus().clone(),
            supervisor.metrics().clone(),
            secrets.clone(),
            settings,
            supervisor.shutdown(),
        )?;
        supervisor.spawn("outbox", deliverer.run());
        {
            let bus = supervisor.bus().clone();
            supervisor.spawn("channel check", async move {
                warn_of_channels_without_url(&bus, &secrets).await;
            });
        }
        supervisor
            .run(Arc::new(route::Router::default()), None)
            .await?;
        Ok(())
    }
}

/// Says at start which configured channels have no URL in the secrets file (their messages wait,
/// then are dead-lettered).
async fn warn_of_channels_without_url(bus: &baton_core::bus::Bus, secrets: &secrets::Secrets) {
    match baton_core::config::store::current(bus).await {
        Ok(Some((revision, config, _))) => {
            let have = secrets.channels();
            for name in config.notifications().channels.keys() {
                if !have.contains(name) {
                    tracing::warn!(channel = %name, revision, secrets = %secrets.path().display(), "channel has no URL in the secrets file: its notifications wait for one");
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read the configuration to check channels"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_out_of_range_are_refused() {
        assert_eq!(parse_give_up("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_give_up("0s")
            .unwrap_err()
            .contains("between 1s and 7d"));
        assert!(parse_give_up("8d").is_err());
        assert!(parse_request_timeout("30s")
            .unwrap_err()
            .contains("1s and 20s"));
        assert!(parse_request_timeout("soon").is_err());
    }
}
