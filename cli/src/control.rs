//! `baton pause`, `resume`, `promote`, `abort`: a person's commands to a running release. Each is
//! an event in the stream with its actor; each is refused, with nothing published, when it makes
//! no sense for the release's state (the rules are `baton_core::control::check`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use baton_core::bus::{Bus, NatsArgs};
use baton_core::control::{self, Command, Progress};

use crate::progress::Wording;
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::{self, EventSubject};
use baton_proto::v1::{envelope::Payload, *};

use crate::release::{self, actor, describe, event_json, parse_duration};
use crate::Output;

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// The release id
    pub id: String,
    /// Why (kept in the history)
    #[arg(long)]
    pub reason: Option<String>,
    /// Wait until the deployer holds the release, and say where
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits for the deployer's answer
    #[arg(long, default_value = "2m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The release id
    pub id: String,
    /// Wait until the deployer resumes the release
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits for the deployer's answer
    #[arg(long, default_value = "2m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The release id
    pub id: String,
    /// All the way to 100% after the current step's analysis, skipping the steps and gates between
    #[arg(long)]
    pub full: bool,
    /// Wait until the deployer moves on (past the gate, or to the next step with --full)
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits for the deployer's answer
    #[arg(long, default_value = "2m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct AbortArgs {
    /// The release id
    pub id: String,
    /// Why (kept in the history)
    #[arg(long)]
    pub reason: Option<String>,
    /// Follow the release to its end; exit 2 when rolled back, 1 when it ended failed
    #[arg(long)]
    pub wait: bool,
    /// Give up following after this long; the rollback goes on
    #[arg(long, default_value = "60m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn pause(nats: &NatsArgs, a: PauseArgs) -> anyhow::Result<ExitCode> {
    let req = Request {
        id: a.id,
        command: Command::Pause,
        reason: a.reason,
        wait: a.wait,
        timeout: a.timeout,
        output: a.output,
    };
    req.run(nats).await
}

pub async fn resume(nats: &NatsArgs, a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let req = Request {
        id: a.id,
        command: Command::Resume,
        reason: None,
        wait: a.wait,
        timeout: a.timeout,
        output: a.output,
    };
    req.run(nats).await
}

pub async fn promote(nats: &NatsArgs, a: PromoteArgs) -> anyhow::Result<ExitCode> {
    let req = Request {
        id: a.id,
        command: Command::Promote { full: a.full },
        reason: None,
        wait: a.wait,
        timeout: a.timeout,
        output: a.output,
    };
    req.run(nats).await
}

pub async fn abort(nats: &NatsArgs, a: AbortArgs) -> anyhow::Result<ExitCode> {
    let req = Request {
        id: a.id,
        command: Command::Abort,
        reason: a.reason,
        wait: a.wait,
        timeout: a.timeout,
        output: a.output,
    };
    req.run(nats).await
}

struct Request {
    id: String,
    command: Command,
    reason: Option<String>,
    wait: bool,
    timeout: String,
    output: Output,
}

impl Request {
    async fn run(self, nats: &NatsArgs) -> anyhow::Result<ExitCode> {
        let rid = ReleaseId::parse(&self.id).map_err(|e| anyhow!("{e}"))?;
        let reason = self.reason.clone().unwrap_or_default();
        control::validate_reason(&reason).map_err(|e| anyhow!("--reason: {e}"))?;
        let timeout = parse_duration(&self.timeout).context("--timeout")?;
        let verb = self.command.verb();
        let bus = crate::connect(nats).await?;
        let events = bus.release_history(rid).await?;
        if events.is_empty() {
            bail!("cannot {verb}: no release {rid}: the event stream has no events of it");
        }
        let progress = Progress::of(rid, &events);
        control::check(self.command, &progress).map_err(|e| anyhow!("cannot {verb}: {e}"))?;
        let spec = progress
            .state
            .spec
            .clone()
            .ok_or_else(|| anyhow!("cannot {verb}: release {rid} has no request"))?;
        let env = EnvName::new(&spec.env).context("the release's environment")?;
        let app = AppName::new(&spec.app).context("the release's app")?;

        let payload = match self.command {
            Command::Pause => Payload::ReleasePauseRequested(ReleasePauseRequested { reason }),
            Command::Resume => Payload::ReleaseResumeRequested(ReleaseResumeRequested {}),
            Command::Promote { full } => {
                Payload::ReleasePromoteRequested(ReleasePromoteRequested { full })
            }
            Command::Abort => Payload::ReleaseAbortRequested(ReleaseAbortRequested { reason }),
        };
        let who = actor();
        // Each command is a request of its own: a fresh id, never deduplicated with another.
        let event = Event::new(
            rid,
            EventKey::Unique,
            payload,
            bus.source(),
            who.clone(),
            "",
        );
        let subject = EventSubject::new(env, app, rid, event.event_type);
        let (seq, _) = bus
            .publish(&subject, &event)
            .await
            .with_context(|| format!("publishing {}", event.event_type))?;
        match self.output {
            Output::Json if !self.wait => println!(
                "{}",
                serde_json::json!({
                    "release_id": rid.to_string(),
                    "command": verb,
                    "event_id": event.id(),
                    "actor": who,
                })
            ),
            Output::Json => {}
            Output::Text => println!("{}", said(self.command, &progress, &who)),
        }
        if !self.wait {
            return Ok(ExitCode::SUCCESS);
        }
        match self.command {
            Command::Abort => {
                release::follow(
                    &bus,
                    rid,
                    self.output,
                    timeout,
                    release::FollowFrom::Sequence(seq),
                )
                .await
            }
            command => answer(&bus, rid, seq, command, &progress, self.output, timeout).await,
        }
    }
}

/// What was asked, for people.
fn said(command: Command, p: &Progress, who: &str) -> String {
    let rid = p.release_id;
    let at = p
        .step_text()
        .map(|s| format!("; it is at {s}"))
        .unwrap_or_default();
    match command {
        Command::Pause => format!(
            "pause of release {rid} requested by {who}: it holds after the current step{at}"
        ),
        Command::Resume => format!("resume of release {rid} requested by {who}{at}"),
        Command::Promote { full: false } => {
            format!("promotion of release {rid} past its gate requested by {who}{at}")
        }
        Command::Promote { full: true } => format!(
            "promotion of release {rid} all the way requested by {who}: after the current step's analysis it goes to 100%{at}"
        ),
        Command::Abort if p.state.cluster_changed => format!(
            "abort of release {rid} requested by {who}: the rollback agent rolls it back now{at}"
        ),
        Command::Abort => format!(
            "abort of release {rid} requested by {who}: it ends failed (the cluster was not changed yet)"
        ),
    }
}

/// Waits for the deployer's answer to a pause, resume or promotion: the first `release.paused` /
/// `release.resumed` after the request (with `promote --full` on a release not held, the next
/// step or the end).
async fn answer(
    bus: &Bus,
    rid: ReleaseId,
    after: u64,
    command: Command,
    before: &Progress,
    output: Output,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let held = before.hold.is_some();
    let wanted = |t: EventType| match command {
        Command::Pause => t == EventType::ReleasePaused,
        Command::Promote { full: true } if !held => {
            t == EventType::ReleaseResumed || t == EventType::DeployStepStarted
        }
        _ => t == EventType::ReleaseResumed,
    };
    let mut reader = bus
        .clone()
        .reading_from_any_replica()
        .follow_events(&subject::release_events(rid), after + 1)
        .await
        .map_err(|e| anyhow!("following the release: {e}"))?;
    let wait = async {
        loop {
            let m = reader
                .next()
                .await
                .map_err(|e| anyhow!("reading the event stream: {e}"))?;
            let Ok(s) = EventSubject::parse(m.subject.as_str()) else {
                continue;
            };
            let Ok(event) = Event::decode(&m.payload, Some(s.event_type), Some(&rid.to_string()))
            else {
                continue;
            };
            if wanted(event.event_type) {
                return Ok::<_, anyhow::Error>(Ok(event));
            }
            if event.event_type.is_terminal() {
                return Ok(Err(event));
            }
        }
    };
    let ended = match tokio::time::timeout(timeout, wait).await {
        Err(_) => bail!(
            "no answer from the deployer within {}s; the request stands: baton status {rid}",
            timeout.as_secs()
        ),
        Ok(r) => r?,
    };
    match ended {
        Ok(event) => {
            match output {
                Output::Json => println!("{}", event_json(&event)),
                Output::Text => println!(
                    "release {rid} {}",
                    match event.payload() {
                        Some(Payload::ReleasePaused(p)) =>
                            format!("paused at step {}: {}", p.step, p.reason),
                        Some(Payload::ReleaseResumed(r)) =>
                            format!("resumed after step {}", r.step),
                        _ => format!("{}: {}", event.event_type, describe(&event)),
                    }
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        // A promotion all the way that ends in success got what it asked for.
        Err(end) if end.event_type == EventType::ReleaseSucceeded && command != Command::Pause => {
            match output {
                Output::Json => println!("{}", event_json(&end)),
                Output::Text => println!("release {rid} succeeded"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(end) => bail!(
            "release {rid} ended ({}: {}) before the deployer answered the {}",
            end.event_type,
            describe(&end),
            command.verb()
        ),
    }
}
