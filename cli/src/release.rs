//! `baton release`, `status`, `logs`, `rollback`: requesting releases and following them live.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

use baton_core::bus::{Bus, NatsArgs};
use baton_core::config::{self, store, Overrides};
use baton_core::control::{Hold, Progress};

use crate::progress::Wording;
use baton_core::event::{Event, EventType};
use baton_core::fold::{fold, ReleaseState, Status};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::{self, EventSubject};
use baton_proto::v1::{envelope::Payload, *};

use crate::Output;

#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// The app to release (a DNS label, as in the configuration)
    pub app: String,
    /// The environment to release to
    #[arg(long)]
    pub env: String,
    /// The image to release (a tag or a digest)
    #[arg(long)]
    pub image: String,
    /// The strategy, instead of the configured one: rolling, canary or blue-green
    #[arg(long)]
    pub strategy: Option<String>,
    /// The canary's steps for this release, instead of the configured ones: weights in percent,
    /// each optionally followed by `pause` (until a person promotes) or `pause:<duration>`,
    /// e.g. `10,pause:5m,50,pause,100`
    #[arg(long)]
    pub steps: Option<String>,
    /// The source revision being released (for the history)
    #[arg(long)]
    pub commit: Option<String>,
    /// When that revision was committed, RFC 3339 (for lead time): 2026-11-26T09:30:00Z
    #[arg(long = "commit-time")]
    pub commit_time: Option<String>,
    /// Follow the release to its end; exit 0 when it succeeded, 2 when rolled back, 1 when failed
    #[arg(long)]
    pub wait: bool,
    /// Give up following after this long (e.g. 30m); the release itself goes on
    #[arg(long, default_value = "60m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The release id
    pub id: String,
    /// Then follow the release live until it ends (exit 0 succeeded, 2 rolled back, 1 failed)
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Give up watching after this long (e.g. 30m); the release itself goes on
    #[arg(long, default_value = "60m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The release id
    pub id: String,
    /// Keep printing its events as they come until the release ends (JSON: one event a line)
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Give up following after this long (e.g. 30m); the release itself goes on
    #[arg(long, default_value = "60m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The app to roll back
    pub app: String,
    /// The environment
    #[arg(long)]
    pub env: String,
    /// Why (kept in the history)
    #[arg(long, default_value = "requested by a person")]
    pub reason: String,
    /// Follow the rollback to its end; exit 0 when rolled back, 1 when it failed
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value = "60m")]
    pub timeout: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Who is asking: `BATON_ACTOR` (CI sets it), else the user and host.
pub fn actor() -> String {
    std::env::var("BATON_ACTOR")
        .ok()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| {
            let user = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .ok()
                .filter(|u| !u.is_empty())
                .or_else(|| {
                    // No login name in the environment (a service, a container): the numeric user.
                    let status = std::fs::read_to_string("/proc/self/status").ok()?;
                    let uid = status
                        .lines()
                        .find_map(|l| l.strip_prefix("Uid:"))?
                        .split_whitespace()
                        .next()?
                        .to_owned();
                    Some(format!("uid-{uid}"))
                })
                .unwrap_or_else(|| "unknown".into());
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            format!("{user}@{host}")
        })
}

fn parse_names(app: &str, env: &str) -> anyhow::Result<(AppName, EnvName)> {
    Ok((AppName::new(app)?, EnvName::new(env)?))
}

pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    config::parse_duration_ms(text)
        .map(Duration::from_millis)
        .map_err(|e| anyhow!("{text:?}: {e}"))
}

/// `--steps`: weights in percent, each optionally followed by `pause` (until a person
/// promotes) or `pause:<duration>` (a timed pause), e.g. `10,pause:5m,50,pause,100`. The
/// weights must rise to 100 (the spec's validation says so otherwise).
pub fn parse_steps(text: &str) -> anyhow::Result<Vec<CanaryStep>> {
    let mut steps: Vec<CanaryStep> = Vec::new();
    for item in text.split(',').map(str::trim) {
        let pause = item.strip_prefix("pause");
        match (pause, steps.last_mut()) {
            (Some(_), None) => bail!("{text:?}: a pause follows a weight, e.g. 10,pause,100"),
            (Some(rest), Some(last)) => {
                if last.pause_until_promoted || last.pause_seconds > 0 {
                    bail!("{text:?}: one pause per step");
                }
                match rest.strip_prefix(':') {
                    None if rest.is_empty() => last.pause_until_promoted = true,
                    Some(d) => {
                        let ms =
                            config::parse_duration_ms(d).map_err(|e| anyhow!("{item:?}: {e}"))?;
                        last.pause_seconds = u32::try_from(ms.div_ceil(1000))
                            .ok()
                            .filter(|s| *s > 0)
                            .ok_or_else(|| anyhow!("{item:?}: a pause is at least 1s"))?;
                    }
                    None => bail!("{item:?} is not a pause: use pause or pause:<duration>"),
                }
            }
            (None, _) => {
                let weight: u32 = item
                    .parse()
                    .ok()
                    .filter(|w| (1..=100).contains(w))
                    .ok_or_else(|| {
                        anyhow!("{item:?} is not a weight from 1 to 100 (or a pause)")
                    })?;
                if steps.last().is_some_and(|s| s.weight >= weight) {
                    bail!(
                        "{text:?}: the weights must rise ({weight} after {})",
                        steps.last().map_or(0, |s| s.weight)
                    );
                }
                steps.push(CanaryStep {
                    weight,
                    ..Default::default()
                });
            }
        }
    }
    match steps.last() {
        None => bail!("no steps given"),
        Some(last) if last.weight != 100 => bail!("{text:?}: the last step must be 100"),
        Some(_) => Ok(steps),
    }
}

/// Parses RFC 3339 (`2026-11-26T09:30:00Z`, `…+02:00`, fractions allowed).
pub fn parse_rfc3339(text: &str) -> anyhow::Result<SystemTime> {
    baton_core::time::parse_rfc3339(text).map_err(|e| anyhow!(e))
}

pub async fn release(nats: &NatsArgs, args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let (app, env) = parse_names(&args.app, &args.env)?;
    let strategy = match &args.strategy {
        Some(s) => Some(
            config::parse_strategy(s)
                .ok_or_else(|| anyhow!("--strategy {s:?}: use rolling, canary or blue-green"))?,
        ),
        None => None,
    };
    let commit_time = args
        .commit_time
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .context("--commit-time")?;
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    let canary_steps = args
        .steps
        .as_deref()
        .map(parse_steps)
        .transpose()
        .context("--steps")?;
    let bus = crate::connect(nats).await?;
    let (revision, cfg, _) = store::current(&bus).await?.ok_or_else(|| {
        anyhow!("no configuration has been applied yet: run `baton config apply FILE` first")
    })?;
    let cfg = cfg.with_revision(revision);
    let overrides = Overrides {
        image: args.image.clone(),
        strategy,
        commit: args.commit.clone(),
        commit_time,
        canary_steps,
    };
    let spec = cfg
        .resolve(app.as_str(), env.as_str(), &overrides)
        .map_err(|e| anyhow!("cannot release {app} to {env}:\n{e}"))?;
    let rid = ReleaseId::generate();
    let event = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested {
            spec: Some(spec.clone()),
        }),
        bus.source(),
        actor(),
        "",
    );
    let said = format!(
        "release {rid} requested: {app} {} to {env} ({})",
        spec.image,
        describe_strategy(spec.strategy)
    );
    let subject = EventSubject::new(env, app, rid, EventType::ReleaseRequested);
    request(
        &bus,
        &subject,
        &event,
        &said,
        args.wait,
        args.output,
        timeout,
    )
    .await
}

fn describe_strategy(strategy: i32) -> &'static str {
    Strategy::try_from(strategy)
        .map(config::strategy_name)
        .unwrap_or("rolling")
}

pub async fn rollback(nats: &NatsArgs, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let (app, env) = parse_names(&args.app, &args.env)?;
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    let bus = crate::connect(nats).await?;
    let (_, cfg, _) = store::current(&bus).await?.ok_or_else(|| {
        anyhow!("no configuration has been applied yet: run `baton config apply FILE` first")
    })?;
    let environment = cfg.environments().get(env.as_str()).ok_or_else(|| {
        anyhow!(
            "unknown environment {env}; configured: {}",
            cfg.environments()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if !cfg.apps().contains_key(app.as_str()) {
        bail!(
            "unknown app {app}; configured: {}",
            cfg.apps().keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let rid = ReleaseId::generate();
    let rollback_request = RollbackRequested {
        app: app.to_string(),
        env: env.to_string(),
        namespace: environment.namespace.clone(),
        cluster: environment.cluster.clone(),
        reason: args.reason.clone(),
        target_release_id: String::new(),
    };
    let event = Event::new(
        rid,
        EventKey::Once,
        Payload::RollbackRequested(rollback_request),
        bus.source(),
        actor(),
        "",
    );
    let said = format!("rollback {rid} requested: {app} in {env}");
    let subject = EventSubject::new(env, app, rid, EventType::RollbackRequested);
    request(
        &bus,
        &subject,
        &event,
        &said,
        args.wait,
        args.output,
        timeout,
    )
    .await
}

/// Publishes a request, says so (the id alone in JSON), and follows it when asked to.
async fn request(
    bus: &Bus,
    subject: &EventSubject,
    event: &Event,
    said: &str,
    wait: bool,
    output: Output,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    bus.publish(subject, event)
        .await
        .with_context(|| format!("publishing {}", subject.event_type))?;
    match output {
        Output::Json if !wait => println!(
            "{}",
            serde_json::json!({"release_id": subject.release_id.to_string()})
        ),
        Output::Json => {}
        Output::Text => println!("{said}"),
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow(bus, subject.release_id, output, timeout, FollowFrom::Start).await
}

/// The exit code of an ended release: 0 succeeded, 2 rolled back, 1 failed. A manual rollback
/// that rolled back succeeded at what it was asked.
fn exit_code(state: &ReleaseState) -> ExitCode {
    match state.status() {
        Status::Succeeded => ExitCode::SUCCESS,
        Status::RolledBack if state.rollback_request.is_some() => ExitCode::SUCCESS,
        Status::RolledBack => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Which of a release's events [`follow`] prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowFrom {
    /// Every one.
    Start,
    /// Those from this stream sequence on.
    Sequence(u64),
    /// All but the first this many (already shown).
    After(usize),
}

/// Prints each event of the release as it happens (see [`FollowFrom`]), with a progress line
/// during long waits, until the release ends.
pub(crate) async fn follow(
    bus: &Bus,
    rid: ReleaseId,
    output: Output,
    timeout: Duration,
    from: FollowFrom,
) -> anyhow::Result<ExitCode> {
    // Whichever replica answers first: a person's view, which goes on while a stream elects a
    // leader (a replica a moment behind shows an event a moment later).
    let mut reader = bus
        .clone()
        .reading_from_any_replica()
        .follow_events(&subject::release_events(rid), 1)
        .await
        .map_err(|e| anyhow!("following the release: {e}"))?;
    let mut events: Vec<Event> = Vec::new();
    let mut said = Said::default();
    let start = Instant::now();
    // A progress line once nothing has been printed for 10 s, then every 10 s.
    let mut last_printed = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        tokio::select! {
            m = reader.next() => {
                let m = m.map_err(|e| anyhow!("reading the event stream: {e}"))?;
                let Ok(s) = EventSubject::parse(m.subject.as_str()) else { continue };
                let Ok(event) = Event::decode(&m.payload, Some(s.event_type), Some(&rid.to_string())) else { continue };
                let seq = m.sequence;
                last_printed = Instant::now();
                let t0 = events.first().map(|e| e.time_ms()).unwrap_or(event.time_ms());
                let shown = match from {
                    FollowFrom::Start => true,
                    FollowFrom::Sequence(first) => seq >= first,
                    FollowFrom::After(n) => events.len() >= n,
                };
                match output {
                    _ if !shown => {}
                    Output::Text => println!("{:>8}  {:<26} {}", offset(event.time_ms() - t0), event.event_type.as_str(), said.describe(&event)),
                    Output::Json => println!("{}", event_json(&event)),
                }
                events.push(event);
                let state = fold(&events);
                if state.status().is_terminal() {
                    if output == Output::Text {
                        let reason = state.terminal_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                        println!("release {rid} {}{}", state.status(), said.once(reason, None, "release"));
                    }
                    return Ok(exit_code(&state));
                }
            }
            _ = ticker.tick() => {
                if start.elapsed() > timeout {
                    bail!("gave up following release {rid} after {}s; it goes on: `baton status {rid}`", timeout.as_secs());
                }
                if last_printed.elapsed() >= Duration::from_secs(10) && output == Output::Text {
                    last_printed = Instant::now();
                    let progress = Progress::of(rid, &events);
                    println!("{:>8}  … {}", offset(start.elapsed().as_millis() as i64), progress_line(&progress, now_ms()));
                }
            }
        }
    }
}

/// Where a release is and what it waits for, in one line: "step 2 (3 of 5) at 50%: analysing
/// step 2 (started 12s ago)", "building: waiting for the image to resolve".
pub(crate) fn progress_line(p: &Progress, now_ms: i64) -> String {
    let what = p.status().to_string();
    format!(
        "{}: {}",
        p.step_text().unwrap_or(what),
        p.waiting_for(now_ms)
    )
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn offset(ms: i64) -> String {
    format!("+{:.1}s", ms as f64 / 1000.0)
}

fn time_text(ms: i64) -> String {
    store::rfc3339(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// One line about an event, for people.
pub fn describe(event: &Event) -> String {
    let Some(payload) = event.payload() else {
        return String::new();
    };
    match payload {
        Payload::ReleaseRequested(r) => r.spec.as_ref().map_or(String::new(), |s| {
            format!(
                "{} {} to {} ({}, namespace {}) by {}",
                s.app,
                s.image,
                s.env,
                describe_strategy(s.strategy),
                s.namespace,
                event.envelope.actor
            )
        }),
        Payload::ReleaseAbortRequested(r) => by_because(&event.envelope.actor, &r.reason),
        Payload::ReleasePauseRequested(r) => by_because(&event.envelope.actor, &r.reason),
        Payload::ReleaseResumeRequested(_) => format!("by {}", event.envelope.actor),
        Payload::ReleasePromoteRequested(p) => format!(
            "by {}{}",
            event.envelope.actor,
            if p.full { ", all the way" } else { "" }
        ),
        Payload::RollbackRequested(r) => format!(
            "{} in {} by {}: {}",
            r.app, r.env, event.envelope.actor, r.reason
        ),
        Payload::BuildStarted(b) => format!("{} ({})", b.image, b.backend),
        Payload::BuildSucceeded(b) => b.image_ref.clone(),
        Payload::BuildFailed(b) => b.reason.clone(),
        Payload::DeployStarted(d) => format!(
            "{} replicas of {}; previous revision {} ({})",
            d.replicas,
            d.workload,
            if d.previous_revision.is_empty() {
                "none"
            } else {
                &d.previous_revision
            },
            d.previous_image
        ),
        Payload::DeployStepStarted(s) if s.action.is_empty() => {
            format!("step {} at {}%", s.step, s.weight)
        }
        Payload::DeployStepStarted(s) if s.selector.is_empty() => {
            format!("step {}: {}", s.step, s.action)
        }
        Payload::DeployStepStarted(s) => format!(
            "step {}: {} (the Service will select {})",
            s.step,
            s.action,
            selector_text(&s.selector)
        ),
        Payload::DeployStepReady(s) => format!(
            "step {} at {}%: {} new pod(s) ready ({})",
            s.step,
            s.weight,
            s.pods.len(),
            s.pods
                .iter()
                .map(|p| format!("{}@{}", p.name, p.ip))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Payload::DeployCompleted(d) => format!("revision {} runs {}", d.revision, d.image_ref),
        Payload::DeployFailed(d) => format!(
            "step {}: {} ({})",
            d.step,
            d.reason,
            FailureKind::try_from(d.kind)
                .map(|k| k
                    .as_str_name()
                    .trim_start_matches("FAILURE_KIND_")
                    .to_lowercase())
                .unwrap_or_default()
        ),
        Payload::ReleaseSucceeded(r) => r.image_ref.clone(),
        Payload::ReleaseQueued(q) => format!("behind release {}", q.blocking_release_id),
        Payload::ReleasePaused(p) => format!("at step {}: {}", p.step, p.reason),
        Payload::ReleaseResumed(r) => format!("at step {}", r.step),
        Payload::AnalysisStarted(a) => format!("step {}: {}", a.step, a.checks.join(", ")),
        Payload::AnalysisPassed(a) => format!("step {}: {}", a.step, passed(&a.measurements)),
        Payload::AnalysisFailed(a) => {
            // The failed measurements the reason does not already name (it names the checks and
            // pods that failed, and the rounds): each thing said once.
            let unsaid: Vec<Measurement> = a
                .measurements
                .iter()
                .filter(|m| !m.ok && m.check != "analysis" && !a.reason.contains(&m.target))
                .cloned()
                .collect();
            if unsaid.is_empty() {
                format!("step {}: {}", a.step, a.reason)
            } else {
                format!("step {}: {} — {}", a.step, a.reason, failed(&unsaid))
            }
        }
        Payload::AnalysisInconclusive(a) => format!(
            "step {}: no verdict, held for a person (baton promote / baton abort): {}",
            a.step, a.reason
        ),
        Payload::RollbackStarted(r) if r.to_image.is_empty() => r.reason.clone(),
        Payload::RollbackStarted(r) => format!(
            "to revision {} ({}): {}",
            if r.to_revision.is_empty() {
                "?"
            } else {
                &r.to_revision
            },
            r.to_image,
            r.reason
        ),
        Payload::RollbackCompleted(r) => {
            let restored = if r.restored_image.is_empty() {
                "nothing new ran; nothing to restore".to_owned()
            } else {
                format!("revision {} runs {}", r.restored_revision, r.restored_image)
            };
            if r.selector.is_empty() {
                restored
            } else {
                format!(
                    "{restored}; the Service selects {}",
                    selector_text(&r.selector)
                )
            }
        }
        Payload::RollbackFailed(r) => r.reason.clone(),
        Payload::ReleaseRolledBack(r) => r.reason.clone(),
        Payload::ReleaseFailed(r) => r.reason.clone(),
    }
}

/// A label selector as `kubectl` writes one: `app=web,baton.dev/colour=green`, sorted.
fn selector_text(selector: &std::collections::HashMap<String, String>) -> String {
    let sorted: std::collections::BTreeMap<_, _> = selector.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The reason an event gives, if it gives one.
fn reason_of(event: &Event) -> Option<&str> {
    let reason = match event.payload()? {
        Payload::BuildFailed(b) => &b.reason,
        Payload::DeployFailed(d) => &d.reason,
        Payload::AnalysisFailed(a) => &a.reason,
        Payload::AnalysisInconclusive(a) => &a.reason,
        Payload::RollbackStarted(r) => &r.reason,
        Payload::RollbackFailed(r) => &r.reason,
        Payload::ReleaseRolledBack(r) => &r.reason,
        Payload::ReleaseFailed(r) => &r.reason,
        Payload::ReleaseAbortRequested(r) => &r.reason,
        Payload::RollbackRequested(r) => &r.reason,
        _ => return None,
    };
    Some(reason.as_str()).filter(|r| !r.is_empty())
}

/// The reasons a listing of one release has printed, so that each is said once: where a later
/// event repeats an earlier reason (a rollback, and the release's end, carry the failure that
/// caused them), it refers to the event that said it instead.
#[derive(Debug, Default)]
pub(crate) struct Said {
    /// Each reason printed, with the event type that printed it.
    reasons: Vec<(String, &'static str)>,
}

impl Said {
    /// Reasons shorter than this are printed again: a reference would be longer.
    const SHORT: usize = 24;

    /// `text`, with every earlier reason in it replaced by a reference; `reason` (the event's
    /// own) is remembered as said by `by`.
    pub(crate) fn once(&mut self, text: String, reason: Option<&str>, by: &'static str) -> String {
        let mut text = text;
        let mut said_before = false;
        // Longest first, so that a reason that contains another is referred to whole.
        let mut earlier: Vec<&(String, &'static str)> = self.reasons.iter().collect();
        earlier.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
        for (r, at) in earlier {
            if text.contains(r.as_str()) {
                text = text.replace(r.as_str(), &format!("(see {at} above)"));
                said_before |= reason == Some(r.as_str());
            }
        }
        if let Some(reason) = reason {
            if !said_before && reason.len() >= Self::SHORT {
                self.reasons.push((reason.to_owned(), by));
            }
        }
        text
    }

    /// One event's line text (see [`describe`]), each reason once.
    pub(crate) fn describe(&mut self, event: &Event) -> String {
        self.once(describe(event), reason_of(event), event.event_type.as_str())
    }
}

/// "by alice", or "by alice: the reason".
fn by_because(actor: &str, reason: &str) -> String {
    if reason.is_empty() {
        format!("by {actor}")
    } else {
        format!("by {actor}: {reason}")
    }
}

/// A passing verdict in short: how many measurements, and the health-checker's summary of its
/// rounds (every measurement is in `baton status`).
fn passed(ms: &[Measurement]) -> String {
    let summary = ms
        .iter()
        .find(|m| m.check == "analysis" && !m.detail.is_empty())
        .map(|m| format!("; {}", m.detail))
        .unwrap_or_default();
    format!("{} measurement(s) ok{summary}", ms.len())
}

/// A failing verdict in short: the failed measurements (the first three).
fn failed(ms: &[Measurement]) -> String {
    const SHOWN: usize = 3;
    let bad: Vec<&Measurement> = ms.iter().filter(|m| !m.ok).collect();
    let mut text: Vec<String> = bad.iter().take(SHOWN).map(|m| measurement(m)).collect();
    if bad.len() > SHOWN {
        text.push(format!("{} more failed", bad.len() - SHOWN));
    }
    if text.is_empty() {
        return format!("{} measurement(s)", ms.len());
    }
    text.join("; ")
}

/// `check target ok (detail)`; the value and unit when there is no detail.
fn measurement(m: &Measurement) -> String {
    let verdict = if m.ok { "ok" } else { "FAILED" };
    let what = if !m.detail.is_empty() {
        format!(" ({})", m.detail)
    } else if !m.unit.is_empty() {
        let value = if m.value.fract() == 0.0 {
            format!("{}", m.value)
        } else {
            format!("{:.2}", m.value)
        };
        format!(" {value} {}", m.unit)
    } else {
        String::new()
    };
    format!("{} {} {verdict}{what}", m.check, m.target)
}

pub(crate) fn event_json(e: &Event) -> serde_json::Value {
    let source = e.envelope.source.clone().unwrap_or_default();
    serde_json::json!({
        "id": e.envelope.id,
        "release_id": e.envelope.release_id,
        "type": e.event_type.as_str(),
        "time": time_text(e.time_ms()),
        "time_ms": e.time_ms(),
        "source": {"agent": source.agent, "cluster": source.cluster, "instance": source.instance},
        "actor": e.envelope.actor,
        "causation_id": e.envelope.causation_id,
        "detail": describe(e),
    })
}

async fn history_of(nats: &NatsArgs, id: &str) -> anyhow::Result<(ReleaseId, Vec<Event>)> {
    let rid = ReleaseId::parse(id).map_err(|e| anyhow!("{e}"))?;
    let bus = crate::connect_reader(nats).await?;
    let events = bus.release_history(rid).await?;
    if events.is_empty() {
        bail!("no release {rid}: the event stream has no events of it");
    }
    Ok((rid, events))
}

pub async fn status(nats: &NatsArgs, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    let (rid, events) = history_of(nats, &args.id).await?;
    print_status(rid, &events, args.output);
    let state = fold(&events);
    if !args.watch || state.status().is_terminal() {
        return Ok(if args.watch {
            exit_code(&state)
        } else {
            ExitCode::SUCCESS
        });
    }
    // Re-attached: what happens from here on, as `baton release --wait` prints it.
    if args.output == Output::Text {
        println!("\nwatching release {rid} (Ctrl-C stops watching; the release goes on)");
    }
    let bus = crate::connect_reader(nats).await?;
    follow(
        &bus,
        rid,
        args.output,
        timeout,
        FollowFrom::After(events.len()),
    )
    .await
}

fn print_status(rid: ReleaseId, events: &[Event], output: Output) {
    let progress = Progress::of(rid, events);
    let state = &progress.state;
    let now = now_ms();
    let spec = state.spec.clone().unwrap_or_default();
    let (app, env) = match (&state.spec, &state.rollback_request) {
        (Some(s), _) => (s.app.clone(), s.env.clone()),
        (None, Some(r)) => (r.app.clone(), r.env.clone()),
        _ => (String::new(), String::new()),
    };
    let last = events
        .last()
        .map(|e| e.event_type.as_str())
        .unwrap_or_default();
    let waiting = (!state.status().is_terminal()).then(|| progress.waiting_for(now));
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "release_id": rid.to_string(),
                "app": app, "env": env,
                "status": state.status().name(),
                "step": state.current_step(), "weight": state.current_weight(),
                "steps": progress.plan.iter().map(|s| serde_json::json!({
                    "weight": s.weight,
                    "pause_seconds": s.pause_seconds,
                    "until_promoted": s.until_promoted,
                })).collect::<Vec<_>>(),
                "waiting_for": waiting,
                "hold": progress.hold.as_ref().map(|h| hold_json(h, now)),
                "analysis": progress.verdict.as_ref().map(|v| serde_json::json!({
                    "step": v.step,
                    "verdict": if v.passed { "passed" } else { "failed" },
                    "reason": v.reason,
                    "time": time_text(v.time_ms),
                    "measurements": v.measurements.iter().map(measurement_json).collect::<Vec<_>>(),
                })),
                "image": spec.image, "image_ref": state.image_ref,
                "strategy": describe_strategy(spec.strategy),
                "actor": state.actor,
                "requested_at": state.requested_at_ms.map(time_text),
                "started_at": state.started_at_ms.map(time_text),
                "ended_at": state.ended_at_ms.map(time_text),
                "duration_ms": state.duration_ms(now),
                "previous_revision": state.previous_revision,
                "failure": state.failure.as_ref().map(|f| serde_json::json!({"stage": f.stage.as_str(), "step": f.step, "reason": f.reason})),
                "reason": state.terminal_reason,
                "events": state.events,
                "last_event": last,
            })
        ),
        Output::Text => {
            println!("release   {rid}");
            println!("app       {app} in {env}");
            println!("status    {}", state.status());
            if !spec.image.is_empty() {
                println!(
                    "image     {}{}",
                    spec.image,
                    state
                        .image_ref
                        .as_deref()
                        .map(|r| format!(" → {r}"))
                        .unwrap_or_default()
                );
                println!("strategy  {}", describe_strategy(spec.strategy));
            }
            if let Some(plan) = progress.plan_text() {
                println!("steps     {plan}");
            }
            if let Some(step) = progress.step_text() {
                println!("step      {}", step.trim_start_matches("step "));
            }
            if let Some(w) = &waiting {
                println!("now       {w}");
            }
            if let Some(v) = &progress.verdict {
                println!(
                    "analysis  step {} {}{}",
                    v.step,
                    if v.passed { "passed" } else { "failed" },
                    if v.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", v.reason)
                    }
                );
                const SHOWN: usize = 20;
                for m in v.measurements.iter().take(SHOWN) {
                    println!("          {}", measurement(m));
                }
                if v.measurements.len() > SHOWN {
                    println!(
                        "          … {} more: baton logs {rid} --output json",
                        v.measurements.len() - SHOWN
                    );
                }
            }
            println!("by        {}", state.actor);
            if let Some(t) = state.requested_at_ms {
                println!("requested {}", time_text(t));
            }
            if let Some(t) = state.ended_at_ms {
                println!("ended     {}", time_text(t));
            }
            if let Some(d) = state.duration_ms(now) {
                println!("duration  {:.1}s", d as f64 / 1000.0);
            }
            if let Some(prev) = &state.previous_revision {
                println!(
                    "previous  revision {prev}{}",
                    state
                        .previous_image
                        .as_deref()
                        .map(|i| format!(" ({i})"))
                        .unwrap_or_default()
                );
            }
            if let Some(f) = &state.failure {
                println!("failure   {}: {}", f.stage, f.reason);
            }
            if let Some(r) = &state.terminal_reason {
                println!("reason    {r}");
            }
            println!(
                "events    {} (last: {last}); all of them: baton logs {rid}",
                state.events
            );
        }
    }
}

fn hold_json(hold: &Hold, now_ms: i64) -> serde_json::Value {
    let mut v = serde_json::json!({"kind": hold.kind(), "step": hold.step()});
    match hold {
        Hold::Timed {
            seconds, until_ms, ..
        } => {
            v["seconds"] = (*seconds).into();
            v["until"] = time_text(*until_ms).into();
            v["left_ms"] = (until_ms - now_ms).max(0).into();
        }
        Hold::Person {
            by,
            reason,
            since_ms,
            ..
        } => {
            v["by"] = by.clone().into();
            v["reason"] = reason.clone().into();
            v["since"] = time_text(*since_ms).into();
        }
        Hold::Inconclusive { reason, .. } => {
            v["reason"] = reason.clone().into();
        }
        Hold::Promotion { .. } => {}
    }
    v
}

fn measurement_json(m: &Measurement) -> serde_json::Value {
    serde_json::json!({
        "check": m.check, "target": m.target, "ok": m.ok,
        "value": m.value, "unit": m.unit, "detail": m.detail,
    })
}

pub async fn logs(nats: &NatsArgs, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    if args.follow {
        let (rid, _) = history_of(nats, &args.id).await?;
        let bus = crate::connect_reader(nats).await?;
        return follow(&bus, rid, args.output, timeout, FollowFrom::Start).await;
    }
    let (_, events) = history_of(nats, &args.id).await?;
    let t0 = events.first().map(|e| e.time_ms()).unwrap_or(0);
    match args.output {
        Output::Json => {
            let all: Vec<serde_json::Value> = events.iter().map(event_json).collect();
            println!("{}", serde_json::Value::Array(all));
        }
        Output::Text => {
            let mut said = Said::default();
            for e in &events {
                let source = e.envelope.source.clone().unwrap_or_default();
                println!(
                    "{}  {:>8}  {:<26} {:<15} {}",
                    time_text(e.time_ms()),
                    offset(e.time_ms() - t0),
                    e.event_type.as_str(),
                    source.agent,
                    said.describe(e)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(check: &str, target: &str, ok: bool, detail: &str) -> Measurement {
        Measurement {
            check: check.into(),
            target: target.into(),
            ok,
            detail: detail.into(),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts_are_one_short_line() {
        let ok = [
            m("analysis", "rounds", true, "3 of 3 rounds run"),
            m("health", "web-1@10.0.0.1", true, "200"),
        ];
        assert_eq!(passed(&ok), "2 measurement(s) ok; 3 of 3 rounds run");
        let bad: Vec<Measurement> = (0..5)
            .map(|i| m("health", &format!("web-{i}@10.0.0.{i}"), i == 0, "500"))
            .collect();
        assert_eq!(
            failed(&bad),
            "health web-1@10.0.0.1 FAILED (500); health web-2@10.0.0.2 FAILED (500); \
             health web-3@10.0.0.3 FAILED (500); 1 more failed"
        );
        assert_eq!(by_because("bob", ""), "by bob");
        assert_eq!(by_because("bob", "lunch"), "by bob: lunch");
    }

    #[test]
    fn the_progress_line_says_the_step_and_what_is_waited_for() {
        let rid = ReleaseId::generate();
        let source = Source::default();
        let spec = ReleaseSpec {
            app: "web".into(),
            env: "test".into(),
            strategy: Strategy::Canary as i32,
            ..Default::default()
        };
        let mut events = vec![Event::new(
            rid,
            EventKey::Once,
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
            source.clone(),
            "alice",
            "",
        )];
        let p = Progress::of(rid, &events);
        assert_eq!(
            progress_line(&p, now_ms()),
            "pending: waiting for the agents to pick it up"
        );
        for payload in [
            Payload::DeployStarted(DeployStarted::default()),
            Payload::DeployStepStarted(DeployStepStarted {
                step: 2,
                weight: 50,
                ..Default::default()
            }),
            Payload::ReleasePaused(ReleasePaused {
                step: 2,
                reason: "paused by bob: lunch".into(),
                ..Default::default()
            }),
        ] {
            events.push(Event::new(
                rid,
                EventKey::Unique,
                payload,
                source.clone(),
                "bob",
                "",
            ));
        }
        let p = Progress::of(rid, &events);
        assert_eq!(
            progress_line(&p, now_ms()),
            format!("step 2 (3 of 5) at 50%: paused by bob: lunch (baton resume {rid})")
        );
    }

    #[test]
    fn a_failure_is_told_once_and_referred_to_after() {
        let rid = ReleaseId::generate();
        let event =
            |payload| Event::new(rid, EventKey::Unique, payload, Source::default(), "a", "");
        let cause = "error-rate: 0.31 is not < 0.01 in 2 of 2 rounds (http_requests_total)";
        let events = [
            event(Payload::AnalysisFailed(AnalysisFailed {
                step: 1,
                measurements: Vec::new(),
                reason: cause.into(),
            })),
            event(Payload::RollbackStarted(RollbackStarted {
                reason: format!("analysis of step 1 failed: {cause}"),
                ..Default::default()
            })),
            event(Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: format!("analysis of step 1 failed: {cause}"),
            })),
        ];
        let mut said = Said::default();
        let lines: Vec<String> = events.iter().map(|e| said.describe(e)).collect();
        let end = said.once(
            format!(": analysis of step 1 failed: {cause}"),
            None,
            "release",
        );
        assert!(lines[0].contains(cause), "{lines:?}");
        let all = format!("{}\n{end}", lines.join("\n"));
        assert_eq!(all.matches(cause).count(), 1, "{all}");
        assert_eq!(
            lines[1],
            "analysis of step 1 failed: (see analysis.failed above)"
        );
        assert_eq!(lines[2], "(see rollback.started above)");
        assert_eq!(end, ": (see rollback.started above)");
        // Short reasons are said again: a reference would be longer.
        let mut said = Said::default();
        let short = event(Payload::ReleaseFailed(ReleaseFailed {
            reason: "aborted".into(),
        }));
        assert_eq!(said.describe(&short), "aborted");
        assert_eq!(said.describe(&short), "aborted");
    }

    #[test]
    fn selector_changes_are_shown_as_kubectl_writes_them() {
        let rid = ReleaseId::generate();
        let selector: std::collections::HashMap<String, String> = [
            ("baton.dev/colour".to_string(), "blue".to_string()),
            ("app".to_string(), "web".to_string()),
        ]
        .into();
        let event =
            |payload| Event::new(rid, EventKey::Unique, payload, Source::default(), "a", "");
        assert_eq!(
            describe(&event(Payload::DeployStepStarted(DeployStepStarted {
                step: 1,
                weight: 100,
                action: "switch Service web to blue".into(),
                selector: selector.clone(),
            }))),
            "step 1: switch Service web to blue (the Service will select \
             app=web,baton.dev/colour=blue)"
        );
        assert_eq!(
            describe(&event(Payload::RollbackCompleted(RollbackCompleted {
                restored_revision: "3 of web-blue".into(),
                restored_image: "web:v1".into(),
                selector,
            }))),
            "revision 3 of web-blue runs web:v1; the Service selects app=web,baton.dev/colour=blue"
        );
    }

    #[test]
    fn rfc3339_times_parse() {
        let t = |s: &str| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
        assert_eq!(t("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(t("2026-11-26T09:30:00Z").unwrap(), 1_795_685_400);
        assert_eq!(t("2026-11-26T11:30:00+02:00").unwrap(), 1_795_685_400);
        assert_eq!(t("2026-11-26T09:30:00.250Z").unwrap(), 1_795_685_400);
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-26 09:30",
            "2026-11-26T09:30:00",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
        assert_eq!(
            store::rfc3339(parse_rfc3339("2026-11-26T09:30:00Z").unwrap()),
            "2026-11-26T09:30:00Z"
        );
    }
}
