//! Manual control of releases (`baton pause`, `resume`, `promote`, `abort`) and their visible
//! progress (`baton status`, `baton release --wait`): first against a bus alone, with histories
//! published by their owners, then end to end with the five agents and a canary on the cluster.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use tokio::io::{AsyncBufReadExt, BufReader};

use baton_core::bus::EVENTS_STREAM;
use baton_core::busconfig::Definitions;
use baton_core::event::{Event, EventType as T, Role};
use baton_core::fold::{fold, Status};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};
use baton_tests::harness::trial;
use baton_tests::release::{app_config, Baton};
use baton_tests::{sample_spec, target_bin, BusEnv};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        commands_that_make_no_sense_for_the_release_are_refused_and_nothing_is_published,
        accepted_commands_are_events_in_the_stream_with_their_actor,
        status_shows_the_step_the_weight_the_measurements_and_what_is_waited_for,
        a_pause_until_promoted_step_holds_the_release_until_baton_promote,
        baton_abort_during_a_canary_rolls_it_back_at_once,
        promote_full_skips_the_remaining_steps_and_gates,
        pause_and_resume_hold_and_continue_a_running_canary,
    ]
}

const ACTOR: &str = "e2e-test";

// ---- histories published by their owners, on a bus alone ----

/// A release whose events the test publishes as their owners would.
struct Story<'a> {
    env: &'a BusEnv,
    rid: ReleaseId,
    spec: ReleaseSpec,
    n: u32,
}

impl<'a> Story<'a> {
    /// A release requested by alice: a canary of 10/50%(until promoted)/100% unless `strategy`
    /// says otherwise.
    async fn requested(env: &'a BusEnv, strategy: Strategy) -> Result<Story<'a>> {
        let mut spec = sample_spec("test", "web", "127.0.0.1:5000/web:v2");
        spec.strategy = strategy as i32;
        spec.canary = Some(CanaryParams {
            steps: vec![
                CanaryStep {
                    weight: 10,
                    ..Default::default()
                },
                CanaryStep {
                    weight: 50,
                    pause_until_promoted: true,
                    ..Default::default()
                },
                CanaryStep {
                    weight: 100,
                    ..Default::default()
                },
            ],
        });
        let mut story = Story {
            env,
            rid: ReleaseId::generate(),
            spec: spec.clone(),
            n: 0,
        };
        story
            .publish(
                "cli",
                Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
            )
            .await?;
        Ok(story)
    }

    async fn publish(&mut self, user: &str, payload: Payload) -> Result<&mut Self> {
        let bus = self.env.bus(user).await?;
        self.n += 1;
        let event = Event::new(
            self.rid,
            EventKey::Named(&self.n.to_string()),
            payload,
            bus.source(),
            "alice",
            "",
        );
        let subject = EventSubject::new(
            EnvName::new(&self.spec.env)?,
            AppName::new(&self.spec.app)?,
            self.rid,
            event.event_type,
        );
        bus.publish(&subject, &event)
            .await
            .with_context(|| format!("publishing {} as {user}", event.event_type))?;
        Ok(self)
    }

    async fn building(&mut self) -> Result<&mut Self> {
        self.publish(
            "builder",
            Payload::BuildStarted(BuildStarted {
                image: self.spec.image.clone(),
                backend: "resolve".into(),
            }),
        )
        .await
    }

    async fn deploying(&mut self) -> Result<&mut Self> {
        self.building().await?;
        self.publish(
            "builder",
            Payload::BuildSucceeded(BuildSucceeded {
                image_ref: "127.0.0.1:5000/web@sha256:00".into(),
                digest: "sha256:00".into(),
                log_object: String::new(),
            }),
        )
        .await?;
        let strategy = self.spec.strategy;
        self.publish(
            "deployer",
            Payload::DeployStarted(DeployStarted {
                strategy,
                workload: "web".into(),
                replicas: 2,
                ..Default::default()
            }),
        )
        .await?;
        self.publish(
            "deployer",
            Payload::DeployStepStarted(DeployStepStarted {
                step: 0,
                weight: 10,
                action: "canary at 10%: 1 canary pod(s) beside 2 stable".into(),
                ..Default::default()
            }),
        )
        .await
    }

    /// Step `step` at `weight` ready, analysed, passed (with one measurement).
    async fn step_passed(&mut self, step: u32, weight: u32) -> Result<&mut Self> {
        if step > 0 {
            self.publish(
                "deployer",
                Payload::DeployStepStarted(DeployStepStarted {
                    step,
                    weight,
                    ..Default::default()
                }),
            )
            .await?;
        }
        self.publish(
            "deployer",
            Payload::DeployStepReady(DeployStepReady {
                step,
                weight,
                pods: vec![PodRef {
                    name: "web-canary-1".into(),
                    ip: "127.0.1.9".into(),
                    image: "web@sha256:00".into(),
                }],
            }),
        )
        .await?;
        self.publish(
            "health-checker",
            Payload::AnalysisStarted(AnalysisStarted {
                step,
                checks: vec!["health".into()],
            }),
        )
        .await?;
        self.publish(
            "health-checker",
            Payload::AnalysisPassed(AnalysisPassed {
                step,
                measurements: vec![
                    Measurement {
                        check: "health".into(),
                        target: "web-canary-1@127.0.1.9".into(),
                        ok: true,
                        value: 3.0,
                        unit: "ms".into(),
                        detail: "200 in 3ms".into(),
                    },
                    Measurement {
                        check: "rounds".into(),
                        target: "analysis".into(),
                        ok: true,
                        value: 4.0,
                        unit: "rounds".into(),
                        detail: String::new(),
                    },
                ],
            }),
        )
        .await
    }

    async fn paused(&mut self, step: u32, reason: &str) -> Result<&mut Self> {
        self.publish(
            "deployer",
            Payload::ReleasePaused(ReleasePaused {
                step,
                reason: reason.into(),
                // The deployer's gates are not worded "paused by …".
                gate: !reason.starts_with("paused by "),
            }),
        )
        .await
    }

    async fn events(&self) -> Result<Vec<Event>> {
        Ok(self.env.bus("cli").await?.release_history(self.rid).await?)
    }
}

/// Runs the real `baton` against a bus; returns the exit code and stdout + stderr.
async fn baton(env: &BusEnv, args: &[&str]) -> Result<(Option<i32>, String)> {
    let (code, stdout, stderr) = baton_out(env, args).await?;
    Ok((code, format!("{stdout}{stderr}")))
}

/// Runs the real `baton` against a bus; returns the exit code, stdout and stderr.
async fn baton_out(env: &BusEnv, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = tokio::process::Command::new(target_bin("baton")?)
        .args(args)
        .envs(env.process_env())
        .env("BATON_ACTOR", ACTOR)
        .kill_on_drop(true)
        .output()
        .await?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `baton <command…> ID` is refused: exit 1, a message saying `says`, nothing published.
async fn refused(story: &Story<'_>, command: &[&str], says: &str) -> Result<()> {
    let before = story.events().await?.len();
    let id = story.rid.to_string();
    let mut args = command.to_vec();
    args.push(&id);
    let (code, text) = baton(story.env, &args).await?;
    let line = args.join(" ");
    ensure!(code == Some(1), "baton {line} exited {code:?}:\n{text}");
    ensure!(
        text.contains(says) && text.contains(&id),
        "baton {line} does not say {says:?} about the release:\n{text}"
    );
    let after = story.events().await?.len();
    ensure!(
        after == before,
        "baton {line} was refused but published {} event(s)",
        after - before
    );
    Ok(())
}

async fn commands_that_make_no_sense_for_the_release_are_refused_and_nothing_is_published(
) -> Result<()> {
    let env = BusEnv::start().await?;

    // A rolling update has no steps to hold or promote.
    let mut rolling = Story::requested(&env, Strategy::Rolling).await?;
    rolling.deploying().await?;
    refused(&rolling, &["pause"], "is a rolling update").await?;
    refused(&rolling, &["promote"], "only canary and blue-green").await?;
    refused(
        &rolling,
        &["promote", "--full"],
        "only canary and blue-green",
    )
    .await?;
    refused(&rolling, &["resume"], "is not paused").await?;

    // A canary still building: nothing to pause or promote yet.
    let mut building = Story::requested(&env, Strategy::Canary).await?;
    building.building().await?;
    refused(&building, &["pause"], "not deploying yet (it is building)").await?;
    refused(&building, &["promote"], "has not started deploying yet").await?;

    // A running canary, not at a gate: promote needs --full; resume needs a pause.
    let mut running = Story::requested(&env, Strategy::Canary).await?;
    running.deploying().await?;
    refused(&running, &["promote"], "not waiting at a gate").await?;
    refused(
        &running,
        &["resume"],
        "is not paused (it is deploying step 0)",
    )
    .await?;

    // Paused by a person: resume it, don't promote it; don't pause it twice.
    running
        .paused(0, "paused by bob: checking the dashboards")
        .await?;
    refused(
        &running,
        &["promote"],
        "paused by alice, not waiting at a gate: use baton resume",
    )
    .await?;
    refused(
        &running,
        &["pause"],
        "already paused at step 0 (paused by bob",
    )
    .await?;

    // At a pause-until-promoted gate: promote, not resume.
    let mut gate = Story::requested(&env, Strategy::Canary).await?;
    gate.deploying()
        .await?
        .step_passed(0, 10)
        .await?
        .step_passed(1, 50)
        .await?;
    gate.paused(1, "waiting for a person to promote (baton promote)")
        .await?;
    refused(
        &gate,
        &["resume"],
        "waits at step 1 for a person to promote: use baton promote",
    )
    .await?;
    refused(&gate, &["pause"], "already paused at step 1").await?;

    // Failed, and being rolled back: not even abort.
    let mut failed = Story::requested(&env, Strategy::Canary).await?;
    failed.deploying().await?;
    failed
        .publish(
            "health-checker",
            Payload::AnalysisFailed(AnalysisFailed {
                step: 0,
                reason: "health: 500 from web-canary-1".into(),
                ..Default::default()
            }),
        )
        .await?;
    refused(
        &failed,
        &["abort"],
        "already failed at step 0 (health: 500 from web-canary-1) and is being rolled back",
    )
    .await?;
    refused(&failed, &["pause"], "already failed").await?;

    // Ended: each command says how.
    let mut done = Story::requested(&env, Strategy::Canary).await?;
    done.deploying().await?;
    done.publish(
        "deployer",
        Payload::ReleaseSucceeded(ReleaseSucceeded {
            image_ref: "127.0.0.1:5000/web@sha256:00".into(),
        }),
    )
    .await?;
    for command in [
        &["pause"][..],
        &["resume"],
        &["promote"],
        &["promote", "--full"],
        &["abort"],
    ] {
        refused(&done, command, "already succeeded").await?;
    }
    let mut rolled_back = Story::requested(&env, Strategy::Canary).await?;
    rolled_back.deploying().await?;
    rolled_back
        .publish(
            "rollback",
            Payload::ReleaseRolledBack(ReleaseRolledBack {
                reason: "aborted".into(),
            }),
        )
        .await?;
    refused(&rolled_back, &["abort"], "already rolled back").await?;

    // A release the stream has never seen.
    let (code, text) = baton(&env, &["abort", &ReleaseId::generate().to_string()]).await?;
    ensure!(
        code == Some(1) && text.contains("no release"),
        "exit {code:?}:\n{text}"
    );
    // A reason on several lines is refused before anything is sent.
    let id = running.rid.to_string();
    let (code, text) = baton(&env, &["abort", &id, "--reason", "one\ntwo"]).await?;
    ensure!(
        code == Some(1) && text.contains("--reason"),
        "exit {code:?}:\n{text}"
    );
    Ok(())
}

async fn accepted_commands_are_events_in_the_stream_with_their_actor() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut story = Story::requested(&env, Strategy::Canary).await?;
    story.deploying().await?;
    let id = story.rid.to_string();

    let (code, text) = baton(&env, &["pause", &id, "--reason", "checking dashboards"]).await?;
    ensure!(code == Some(0), "baton pause exited {code:?}:\n{text}");
    ensure!(
        text.contains(&format!("pause of release {id} requested by {ACTOR}")),
        "{text}"
    );
    let (code, text, _) = baton_out(&env, &["promote", &id, "--full", "--output", "json"]).await?;
    ensure!(
        code == Some(0),
        "baton promote --full exited {code:?}:\n{text}"
    );
    let json: serde_json::Value = serde_json::from_str(text.trim()).context(text.clone())?;
    ensure!(
        json["command"] == "promote" && json["release_id"] == id.as_str(),
        "{json}"
    );
    let (code, text) = baton(&env, &["abort", &id, "--reason", "wrong image"]).await?;
    ensure!(code == Some(0), "baton abort exited {code:?}:\n{text}");

    let events = story.events().await?;
    let asked: Vec<&Event> = events
        .iter()
        .filter(|e| {
            matches!(
                e.event_type,
                T::ReleasePauseRequested | T::ReleasePromoteRequested | T::ReleaseAbortRequested
            )
        })
        .collect();
    let types: Vec<_> = asked.iter().map(|e| e.event_type).collect();
    ensure!(
        types
            == [
                T::ReleasePauseRequested,
                T::ReleasePromoteRequested,
                T::ReleaseAbortRequested
            ],
        "the stream holds {types:?}"
    );
    for e in &asked {
        ensure!(
            e.envelope.actor == ACTOR,
            "{} names {:?} as its actor",
            e.event_type,
            e.envelope.actor
        );
        ensure!(
            e.envelope.source.as_ref().map(|s| s.agent.as_str()) == Some("cli"),
            "{} was not published by the CLI",
            e.event_type
        );
    }
    ensure!(
        matches!(asked[0].payload(), Some(Payload::ReleasePauseRequested(p)) if p.reason == "checking dashboards"),
        "{:?}",
        asked[0].payload()
    );
    ensure!(
        matches!(
            asked[1].payload(),
            Some(Payload::ReleasePromoteRequested(p)) if p.full
        ),
        "{:?}",
        asked[1].payload()
    );
    ensure!(
        matches!(asked[2].payload(), Some(Payload::ReleaseAbortRequested(a)) if a.reason == "wrong image"),
        "{:?}",
        asked[2].payload()
    );
    // Once aborted, the release takes no more commands.
    refused(&story, &["pause"], "is being aborted (by e2e-test)").await?;

    // --wait with no deployer to answer: a clear time-out, exit 1; the request stands.
    let mut other = Story::requested(&env, Strategy::Canary).await?;
    other.deploying().await?;
    let (code, text) = baton(
        &env,
        &["pause", &other.rid.to_string(), "--wait", "--timeout", "2s"],
    )
    .await?;
    ensure!(
        code == Some(1) && text.contains("no answer from the deployer within 2s"),
        "exit {code:?}:\n{text}"
    );
    ensure!(
        other
            .events()
            .await?
            .iter()
            .any(|e| e.event_type == T::ReleasePauseRequested),
        "the pause request was not kept"
    );
    Ok(())
}

async fn status_shows_the_step_the_weight_the_measurements_and_what_is_waited_for() -> Result<()> {
    let env = BusEnv::start().await?;
    let mut story = Story::requested(&env, Strategy::Canary).await?;
    story
        .deploying()
        .await?
        .step_passed(0, 10)
        .await?
        .step_passed(1, 50)
        .await?;
    story
        .paused(1, "waiting for a person to promote (baton promote)")
        .await?;
    let id = story.rid.to_string();
    let (code, text) = baton(&env, &["status", &id]).await?;
    ensure!(code == Some(0), "baton status exited {code:?}:\n{text}");
    for says in [
        "status    paused at step 1",
        "steps     10% → [50%] (until promoted) → 100%",
        "step      1 (2 of 3) at 50%",
        &format!("now       waiting for a person to promote (baton promote {id})"),
        "analysis  step 1 passed",
        "          health web-canary-1@127.0.1.9 ok (200 in 3ms)",
        "          rounds analysis ok 4 rounds",
    ] {
        ensure!(
            text.contains(says),
            "baton status does not say {says:?}:\n{text}"
        );
    }
    let (code, text, _) = baton_out(&env, &["status", &id, "--output", "json"]).await?;
    ensure!(code == Some(0), "{text}");
    let json: serde_json::Value = serde_json::from_str(text.trim()).context(text.clone())?;
    ensure!(json["step"] == 1 && json["weight"] == 50, "{json}");
    ensure!(json["steps"].as_array().map(Vec::len) == Some(3), "{json}");
    ensure!(
        json["hold"]["kind"] == "until_promoted" && json["hold"]["step"] == 1,
        "{json}"
    );
    ensure!(
        json["waiting_for"]
            .as_str()
            .is_some_and(|w| w.starts_with("waiting for a person to promote")),
        "{json}"
    );
    ensure!(
        json["analysis"]["verdict"] == "passed"
            && json["analysis"]["measurements"][0]["target"] == "web-canary-1@127.0.1.9",
        "{json}"
    );

    // A person's pause, while the next step is analysed: who paused, and why.
    let mut other = Story::requested(&env, Strategy::Canary).await?;
    other.deploying().await?.step_passed(0, 10).await?;
    other
        .publish(
            "deployer",
            Payload::DeployStepStarted(DeployStepStarted {
                step: 1,
                weight: 50,
                ..Default::default()
            }),
        )
        .await?;
    other
        .publish(
            "health-checker",
            Payload::AnalysisStarted(AnalysisStarted {
                step: 1,
                checks: vec!["health".into()],
            }),
        )
        .await?;
    let (_, text) = baton(&env, &["status", &other.rid.to_string()]).await?;
    ensure!(
        text.contains("now       analysing step 1 (started "),
        "baton status does not say what is analysed:\n{text}"
    );
    other.paused(1, "paused by bob: lunch").await?;
    let (_, text) = baton(&env, &["status", &other.rid.to_string()]).await?;
    ensure!(
        text.contains(&format!(
            "now       paused by bob: lunch (baton resume {})",
            other.rid
        )),
        "{text}"
    );
    Ok(())
}

// ---- end to end: the five agents, a canary on the cluster ----

/// Baton with `web` released as a canary with these steps (YAML list items) and an analysis of
/// `analysis`.
async fn canary(prefix: &str, steps: &[&str], analysis: &str) -> Result<Baton> {
    let baton = Baton::start(prefix).await?;
    let steps: String = steps.iter().map(|s| format!("\n    - {s}")).collect();
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            &format!("strategy: canary\nanalysis: {analysis}\ncanary:\n  steps:{steps}"),
        ))
        .await?;
    Ok(baton)
}

const ANALYSIS: &str = "{duration: 2s, interval: 1s, failure_limit: 0}";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Step numbers of `deploy.step_started`, in stream order.
fn steps_started(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e.payload() {
            Some(Payload::DeployStepStarted(s)) => Some(s.step),
            _ => None,
        })
        .collect()
}

async fn canary_exists(baton: &Baton) -> Result<bool> {
    let client = baton.cluster.client().await?;
    Ok(Api::<Deployment>::namespaced(client, &baton.ns.name)
        .get_opt("web-canary")
        .await?
        .is_some())
}

/// Waits for a `release.paused` at `step`.
async fn wait_paused(baton: &Baton, rid: ReleaseId, step: u32) -> Result<Vec<Event>> {
    baton_tests::eventually(
        &format!("release.paused at step {step}"),
        Duration::from_secs(120),
        || async move {
            let events = baton.events(rid).await?;
            if let Some(end) = events.iter().find(|e| e.event_type.is_terminal()) {
                bail!("the release ended ({}) before it paused", end.event_type);
            }
            Ok(events
                .iter()
                .any(|e| matches!(e.payload(), Some(Payload::ReleasePaused(p)) if p.step == step))
                .then_some(events))
        },
    )
    .await
}

/// Waits until the deployer has acked every event it reacts to that is in the stream: whatever
/// it would do about them, it has done.
async fn deployer_has_handled_everything(baton: &Baton) -> Result<()> {
    let admin = baton.bus.bus("admin").await?;
    let stream = admin.jetstream().get_stream(EVENTS_STREAM).await?;
    let durables: Vec<String> = Definitions::embedded()?
        .consumers_for(Role::Deployer, baton_tests::CLUSTER)
        .into_iter()
        .map(|c| c.durable)
        .collect();
    ensure!(!durables.is_empty(), "the deployer has no consumers");
    baton_tests::eventually(
        "the deployer has handled every event",
        Duration::from_secs(60),
        || {
            let (stream, durables) = (&stream, &durables);
            async move {
                for durable in durables {
                    let info = stream.consumer_info(durable).await?;
                    if info.num_pending > 0 || info.num_ack_pending > 0 {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await
}

/// `baton release web --wait` running in the background, as it follows its release.
struct Following {
    /// Each line of its output as it is printed.
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Its exit code and its whole output, once it ends.
    end: tokio::task::JoinHandle<Result<(Option<i32>, String)>>,
}

impl Following {
    /// Waits until it prints a line containing `text`.
    async fn prints(&mut self, text: &str, timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(text) {
                    return Ok(());
                }
            }
            bail!("baton release --wait ended without printing {text:?}")
        })
        .await
        .with_context(|| format!("baton release --wait did not print {text:?}"))?
    }
}

/// `baton release web --wait` running in the background: its release id (read from its first
/// line), and its output as it follows the release.
async fn release_in_background(baton: &Baton, image: &str) -> Result<(ReleaseId, Following)> {
    let mut child = tokio::process::Command::new(target_bin("baton")?)
        .args([
            "release",
            "web",
            "--env",
            "test",
            "--image",
            image,
            "--wait",
            "--timeout",
            "5m",
        ])
        .envs(baton.bus.process_env())
        .env("BATON_ACTOR", ACTOR)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("baton release printed nothing in 30s")??
        .context("baton release printed nothing")?;
    let rid = first
        .split_whitespace()
        .find_map(|w| ReleaseId::parse(w.trim_end_matches(':')).ok())
        .with_context(|| format!("no release id in {first:?}"))?;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let end = tokio::spawn(async move {
        let mut out = format!("{first}\n");
        while let Some(line) = lines.next_line().await? {
            out.push_str(&line);
            out.push('\n');
            // Nobody may be listening any more: the whole output is in `out` too.
            let _ = sender.send(line);
        }
        let status = child.wait_with_output().await?;
        out.push_str(&String::from_utf8_lossy(&status.stderr));
        Ok((status.status.code(), out))
    });
    Ok((
        rid,
        Following {
            lines: receiver,
            end,
        },
    ))
}

async fn a_pause_until_promoted_step_holds_the_release_until_baton_promote() -> Result<()> {
    let baton = canary(
        "ctl-gate",
        &["{weight: 50, pause: until-promoted}", "{weight: 100}"],
        ANALYSIS,
    )
    .await?;
    let (image, digest) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (rid, mut following) = release_in_background(&baton, &image).await?;
    let id = rid.to_string();
    wait_paused(&baton, rid, 0).await?;
    // Held: `baton release --wait` says what it waits for once it has printed nothing for a
    // while, and nothing went past the gate. (That nothing goes past it until the promotion is
    // shown by the order of the events below.)
    let waiting =
        format!("step 0 (1 of 2) at 50%: waiting for a person to promote (baton promote {id})");
    following.prints(&waiting, Duration::from_secs(60)).await?;
    let events = baton.events(rid).await?;
    ensure!(
        steps_started(&events) == [0],
        "the release went past its gate: steps {:?}",
        steps_started(&events)
    );
    ensure!(
        canary_exists(&baton).await?,
        "the canary is gone while held"
    );

    let out = baton.baton(&["status", &id]).await?;
    let status = text(&out);
    for says in [
        "status    paused at step 0",
        "step      0 (1 of 2) at 50%",
        &format!("now       waiting for a person to promote (baton promote {id})"),
        "analysis  step 0 passed",
        "          health web-canary-",
    ] {
        ensure!(
            status.contains(says),
            "baton status does not say {says:?}:\n{status}"
        );
    }
    // A resume is not a promotion.
    let out = baton.baton(&["resume", &id]).await?;
    ensure!(
        out.status.code() == Some(1) && text(&out).contains("use baton promote"),
        "{}",
        text(&out)
    );

    let out = baton.baton(&["promote", &id, "--wait"]).await?;
    ensure!(
        out.status.success() && text(&out).contains(&format!("release {id} resumed after step 0")),
        "baton promote --wait:\n{}",
        text(&out)
    );
    let (code, followed) = following.end.await??;
    ensure!(
        code == Some(0),
        "baton release --wait exited {code:?}:\n{followed}"
    );
    let events = baton.events(rid).await?;
    let state = fold(&events);
    ensure!(state.status() == Status::Succeeded, "{:?}", state.status());
    ensure!(
        steps_started(&events) == [0, 1],
        "{:?}",
        steps_started(&events)
    );
    // The promotion came after the request, and it was e2e-test's.
    let promoted = events
        .iter()
        .position(|e| e.event_type == T::ReleasePromoteRequested)
        .context("no release.promote_requested")?;
    ensure!(events[promoted].envelope.actor == ACTOR, "wrong actor");
    let step1 = events
        .iter()
        .position(|e| matches!(e.payload(), Some(Payload::DeployStepStarted(s)) if s.step == 1))
        .context("no step 1")?;
    ensure!(step1 > promoted, "step 1 started before the promotion");
    let deployed = baton.deployed_image().await?;
    ensure!(
        deployed.ends_with(&digest),
        "the stable Deployment runs {deployed}"
    );
    ensure!(!canary_exists(&baton).await?, "the canary is left behind");
    Ok(())
}

async fn baton_abort_during_a_canary_rolls_it_back_at_once() -> Result<()> {
    // A long analysis: the abort must not wait for it.
    let baton = canary(
        "ctl-abort",
        &["{weight: 50}", "{weight: 100}"],
        "{duration: 60s, interval: 1s, failure_limit: 0}",
    )
    .await?;
    let before = baton.deployed_image().await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    baton
        .wait_for_event(rid, T::AnalysisStarted, Duration::from_secs(120))
        .await?;
    ensure!(canary_exists(&baton).await?, "no canary while analysing");
    let id = rid.to_string();
    let out = baton
        .baton(&[
            "abort",
            &id,
            "--reason",
            "wrong build",
            "--wait",
            "--timeout",
            "3m",
        ])
        .await?;
    let said = text(&out);
    ensure!(
        out.status.code() == Some(2),
        "baton abort --wait exited {:?}:\n{said}",
        out.status.code()
    );
    ensure!(
        said.contains("release.rolled_back") && said.contains(&format!("release {id} rolled back")),
        "baton abort --wait did not follow the rollback:\n{said}"
    );
    let events = baton.events(rid).await?;
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    let at = |t| types.iter().position(|x| *x == t);
    let (Some(abort), Some(started), Some(end)) = (
        at(T::ReleaseAbortRequested),
        at(T::RollbackStarted),
        at(T::ReleaseRolledBack),
    ) else {
        bail!("no abort, rollback and end in {types:?}");
    };
    ensure!(abort < started && started < end, "{types:?}");
    // At once: the rollback did not wait for the analysis' verdict.
    if let Some(verdict) = types
        .iter()
        .position(|t| *t == T::AnalysisPassed || *t == T::AnalysisFailed)
    {
        ensure!(
            started < verdict,
            "the rollback waited for the analysis: {types:?}"
        );
    }
    ensure!(
        events[abort].envelope.actor == ACTOR,
        "the abort names {:?}",
        events[abort].envelope.actor
    );
    ensure!(!canary_exists(&baton).await?, "the canary is still there");
    ensure!(
        baton.deployed_image().await? == before,
        "the stable Deployment changed"
    );
    Ok(())
}

async fn promote_full_skips_the_remaining_steps_and_gates() -> Result<()> {
    let baton = canary(
        "ctl-full",
        &[
            "{weight: 25, pause: until-promoted}",
            "{weight: 50}",
            "{weight: 75, pause: until-promoted}",
            "{weight: 100}",
        ],
        ANALYSIS,
    )
    .await?;
    let (image, digest) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    wait_paused(&baton, rid, 0).await?;
    let id = rid.to_string();
    let out = baton.baton(&["promote", &id, "--full", "--wait"]).await?;
    ensure!(
        out.status.success(),
        "baton promote --full --wait:\n{}",
        text(&out)
    );
    let events = baton.wait_for_end(rid, Duration::from_secs(180)).await?;
    let state = fold(&events);
    ensure!(
        state.status() == Status::Succeeded,
        "{:?}: {:?}",
        state.status(),
        state.terminal_reason
    );
    ensure!(
        steps_started(&events) == [0, 3],
        "steps run: {:?} (expected the first and the promotion)",
        steps_started(&events)
    );
    // Each step run was analysed before the next; no gate held it after the promotion.
    ensure!(
        state.analyses_passed.iter().copied().collect::<Vec<_>>() == [0, 3],
        "analyses passed: {:?}",
        state.analyses_passed
    );
    ensure!(
        state.step_pauses.keys().copied().collect::<Vec<_>>() == [0],
        "{:?}",
        state.step_pauses
    );
    ensure!(
        baton.deployed_image().await?.ends_with(&digest),
        "not promoted"
    );
    ensure!(!canary_exists(&baton).await?, "the canary is left behind");
    Ok(())
}

async fn pause_and_resume_hold_and_continue_a_running_canary() -> Result<()> {
    let baton = canary(
        "ctl-pause",
        &["{weight: 50}", "{weight: 100}"],
        "{duration: 6s, interval: 1s, failure_limit: 0}",
    )
    .await?;
    let (image, digest) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    baton
        .wait_for_event(rid, T::DeployStepStarted, Duration::from_secs(120))
        .await?;
    let id = rid.to_string();
    let out = baton
        .baton(&["pause", &id, "--reason", "checking dashboards", "--wait"])
        .await?;
    ensure!(
        out.status.success()
            && text(&out).contains(&format!(
                "release {id} paused at step 0: paused by {ACTOR}: checking dashboards"
            )),
        "baton pause --wait:\n{}",
        text(&out)
    );
    // The step's analysis still ends; then nothing moves: once the deployer has handled the
    // verdict (acked it, and every other event it reacts to), no step has started.
    baton
        .wait_for_event(rid, T::AnalysisPassed, Duration::from_secs(120))
        .await?;
    deployer_has_handled_everything(&baton).await?;
    let events = baton.events(rid).await?;
    ensure!(
        steps_started(&events) == [0],
        "the paused release went on: steps {:?}",
        steps_started(&events)
    );
    let status = text(&baton.baton(&["status", &id]).await?);
    ensure!(
        status.contains(&format!(
            "now       paused by {ACTOR}: checking dashboards (baton resume {id})"
        )),
        "{status}"
    );
    let out = baton.baton(&["resume", &id, "--wait"]).await?;
    ensure!(
        out.status.success() && text(&out).contains(&format!("release {id} resumed")),
        "baton resume --wait:\n{}",
        text(&out)
    );
    let events = baton.wait_for_end(rid, Duration::from_secs(180)).await?;
    let state = fold(&events);
    ensure!(
        state.status() == Status::Succeeded,
        "{:?}: {:?}",
        state.status(),
        state.terminal_reason
    );
    let resumed = events
        .iter()
        .position(|e| e.event_type == T::ReleaseResumed)
        .context("no release.resumed")?;
    let step1 = events
        .iter()
        .position(|e| matches!(e.payload(), Some(Payload::DeployStepStarted(s)) if s.step == 1))
        .context("step 1 never started")?;
    ensure!(resumed < step1, "step 1 started before the resume");
    ensure!(
        baton.deployed_image().await?.ends_with(&digest),
        "not promoted"
    );
    Ok(())
}
