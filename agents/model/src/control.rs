//! Manual control of a release (`baton pause`, `resume`, `promote`, `abort`) and its visible
//! progress, decided from the release's events alone (no I/O).
//!
//! [`Progress`] is the fold plus what a person needs to see or decide: the strategy's steps, what
//! holds a paused release (a gate of the strategy or a person), the last analysis verdict with its
//! measurements, and when the current step and analysis began. [`check`] says whether a command
//! makes sense for the release's state; the CLI refuses (and publishes nothing) when it does not.

use std::collections::BTreeMap;

use baton_proto::v1::{envelope::Payload, Measurement, ReleaseSpec, Strategy};

use crate::config::DEFAULT_CANARY_WEIGHTS;
use crate::event::Event;
use crate::fold::{fold, ReleaseState, Status};
use crate::names::ReleaseId;

/// The longest reason a person may give to a command.
pub const MAX_REASON: usize = 500;

/// One step of a strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDef {
    pub weight: u32,
    /// A timed pause after the step's analysis.
    pub pause_seconds: u32,
    /// Hold after the step's analysis until a person promotes.
    pub until_promoted: bool,
}

impl StepDef {
    pub const fn at(weight: u32) -> Self {
        StepDef {
            weight,
            pause_seconds: 0,
            until_promoted: false,
        }
    }

    /// Whether the strategy holds the release after this step.
    pub fn gated(&self) -> bool {
        self.until_promoted || self.pause_seconds > 0
    }
}

/// The strategy of a spec (unspecified means rolling).
pub fn strategy(spec: &ReleaseSpec) -> Strategy {
    match Strategy::try_from(spec.strategy).unwrap_or(Strategy::Unspecified) {
        Strategy::Unspecified => Strategy::Rolling,
        s => s,
    }
}

/// Whether a step is analysed: every step, but blue-green's switch when the release turned its
/// post-promotion analysis off.
pub fn analysed(spec: &ReleaseSpec, step: u32) -> bool {
    let switch_unchecked = strategy(spec) == Strategy::BlueGreen
        && step == 1
        && spec
            .blue_green
            .as_ref()
            .is_some_and(|b| !b.post_promotion_analysis);
    !switch_unchecked
}

/// The steps of a release, as the deployer runs them: a rolling update is one step at 100%; a
/// canary is its weights (the defaults when none are given), always ending with the promotion at
/// 100%; blue-green is the new colour behind the preview Service (0%), held there until a person
/// promotes when its promotion is manual, then the switch (100%).
pub fn plan(spec: &ReleaseSpec) -> Vec<StepDef> {
    match strategy(spec) {
        Strategy::Canary => {
            let mut steps: Vec<StepDef> = match spec.canary.as_ref().filter(|c| !c.steps.is_empty())
            {
                Some(c) => c
                    .steps
                    .iter()
                    .map(|s| StepDef {
                        weight: s.weight,
                        pause_seconds: s.pause_seconds,
                        until_promoted: s.pause_until_promoted,
                    })
                    .collect(),
                None => DEFAULT_CANARY_WEIGHTS
                    .iter()
                    .map(|w| StepDef::at(*w))
                    .collect(),
            };
            if steps.last().is_none_or(|s| s.weight != 100) {
                steps.push(StepDef::at(100));
            }
            steps
        }
        Strategy::BlueGreen => vec![
            StepDef {
                until_promoted: spec.blue_green.as_ref().is_some_and(|b| b.manual_promotion),
                ..StepDef::at(0)
            },
            StepDef::at(100),
        ],
        _ => vec![StepDef::at(100)],
    }
}

/// A person's command to a running release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    /// The next step, or (`full`) all the way to 100% after each remaining step's analysis.
    Promote {
        full: bool,
    },
    Abort,
}

impl Command {
    pub fn verb(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote { .. } => "promote",
            Command::Abort => "abort",
        }
    }
}

/// What holds a paused release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// A pause-until-promoted step of the strategy: a person must promote.
    Promotion { step: u32 },
    /// The step's analysis gave no verdict: a person promotes (the step counts as passed) or
    /// aborts.
    Inconclusive { step: u32, reason: String },
    /// A timed pause of the strategy after a step; it ends by itself at `until_ms`.
    Timed {
        step: u32,
        seconds: u32,
        until_ms: i64,
    },
    /// A person paused the release (`reason` is the deployer's, "paused by …").
    Person {
        step: u32,
        by: String,
        reason: String,
        since_ms: i64,
    },
}

impl Hold {
    pub fn step(&self) -> u32 {
        match self {
            Hold::Promotion { step }
            | Hold::Inconclusive { step, .. }
            | Hold::Timed { step, .. }
            | Hold::Person { step, .. } => *step,
        }
    }

    /// A gate of the strategy (promote passes it), rather than a person's pause (resume ends it).
    pub fn is_gate(&self) -> bool {
        !matches!(self, Hold::Person { .. })
    }

    /// A stable word for machine output.
    pub fn kind(&self) -> &'static str {
        match self {
            Hold::Promotion { .. } => "until_promoted",
            Hold::Inconclusive { .. } => "inconclusive",
            Hold::Timed { .. } => "timed",
            Hold::Person { .. } => "person",
        }
    }
}

/// The last analysis verdict of a release.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub step: u32,
    pub passed: bool,
    pub reason: String,
    pub measurements: Vec<Measurement>,
    pub time_ms: i64,
}

/// Where a release is, what it waits for, and what its analysis measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub release_id: ReleaseId,
    pub state: ReleaseState,
    /// The strategy's steps (empty for a manual rollback, or without a request).
    pub plan: Vec<StepDef>,
    pub hold: Option<Hold>,
    pub verdict: Option<Verdict>,
    /// When each step and each step's analysis began (first event).
    pub step_started_ms: BTreeMap<u32, i64>,
    pub analysis_started_ms: BTreeMap<u32, i64>,
    /// Who asked to abort, and who promoted all the way (first request of each).
    pub abort_by: Option<String>,
    pub promoted_full_by: Option<String>,
}

/// The deployer words a person's pause as "paused by <actor>[: <reason>]"; its gates otherwise.
const PERSON_PAUSE: &str = "paused by ";

impl Progress {
    /// Reads a release's history (stream order).
    pub fn of(release_id: ReleaseId, events: &[Event]) -> Progress {
        let state = fold(events);
        let plan = state.spec.as_ref().map(plan).unwrap_or_default();
        let mut step_started_ms = BTreeMap::new();
        let mut analysis_started_ms = BTreeMap::new();
        let mut verdict = None;
        let mut abort_by = None;
        let mut promoted_full_by = None;
        // The latest pause of each step: (reason, actor, time).
        let mut pauses: BTreeMap<u32, (String, String, i64)> = BTreeMap::new();
        for e in events.iter().filter(|e| e.release_id == release_id) {
            let t = e.time_ms();
            let Some(payload) = e.payload() else { continue };
            match payload {
                Payload::DeployStepStarted(s) => {
                    step_started_ms.entry(s.step).or_insert(t);
                }
                Payload::AnalysisStarted(a) => {
                    analysis_started_ms.entry(a.step).or_insert(t);
                }
                Payload::AnalysisPassed(a) => {
                    verdict = Some(Verdict {
                        step: a.step,
                        passed: true,
                        reason: String::new(),
                        measurements: a.measurements.clone(),
                        time_ms: t,
                    })
                }
                Payload::AnalysisFailed(a) => {
                    verdict = Some(Verdict {
                        step: a.step,
                        passed: false,
                        reason: a.reason.clone(),
                        measurements: a.measurements.clone(),
                        time_ms: t,
                    })
                }
                Payload::ReleaseAbortRequested(_) => {
                    abort_by.get_or_insert_with(|| e.envelope.actor.clone());
                }
                Payload::ReleasePromoteRequested(p) if p.full => {
                    promoted_full_by.get_or_insert_with(|| e.envelope.actor.clone());
                }
                Payload::ReleasePaused(p) => {
                    let reason = if p.gate {
                        p.reason.clone()
                    } else {
                        format!(
                            "{PERSON_PAUSE}{}",
                            p.reason.trim_start_matches(PERSON_PAUSE)
                        )
                    };
                    pauses.insert(p.step, (reason, e.envelope.actor.clone(), t));
                }
                _ => {}
            }
        }
        let hold = hold(&state, &plan, &pauses);
        Progress {
            release_id,
            state,
            plan,
            hold,
            verdict,
            step_started_ms,
            analysis_started_ms,
            abort_by,
            promoted_full_by,
        }
    }

    pub fn status(&self) -> Status {
        self.state.status()
    }

    /// The index of the strategy's last step.
    fn last_step(&self) -> Option<u32> {
        (self.plan.len() as u32).checked_sub(1)
    }

    /// The release is at (or past) its last step: nothing is left to hold or promote.
    pub fn at_last_step(&self) -> bool {
        self.state.deploy_completed
            || matches!((self.state.current_step(), self.last_step()), (Some(c), Some(l)) if c >= l)
    }
}

/// What holds a paused release: the step with a pause not yet resumed, and its latest pause.
fn hold(
    state: &ReleaseState,
    plan: &[StepDef],
    pauses: &BTreeMap<u32, (String, String, i64)>,
) -> Option<Hold> {
    if !state.is_paused() || state.terminal.is_some() {
        return None;
    }
    let step = state
        .step_pauses
        .keys()
        .rev()
        .find(|s| state.is_paused_at(**s))
        .copied()
        .or_else(|| state.current_step())
        .unwrap_or(0);
    let def = plan.get(step as usize).copied().unwrap_or(StepDef::at(0));
    let (reason, by, since_ms) = pauses.get(&step).cloned().unwrap_or_default();
    if state.awaits_judgement(step) {
        return Some(Hold::Inconclusive {
            step,
            reason: state
                .inconclusive_reasons
                .get(&step)
                .cloned()
                .unwrap_or_default(),
        });
    }
    if !reason.starts_with(PERSON_PAUSE) {
        if def.until_promoted {
            return Some(Hold::Promotion { step });
        }
        if def.pause_seconds > 0 {
            let since = state.first_pause_ms.get(&step).copied().unwrap_or(since_ms);
            return Some(Hold::Timed {
                step,
                seconds: def.pause_seconds,
                until_ms: since + i64::from(def.pause_seconds) * 1000,
            });
        }
    }
    Some(Hold::Person {
        step,
        by,
        reason: if reason.is_empty() {
            "paused".into()
        } else {
            reason
        },
        since_ms,
    })
}

/// "45s", "5m", "1m30s", "2h".
pub fn seconds_text(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let mut text = String::new();
    if h > 0 {
        text.push_str(&format!("{h}h"));
    }
    if m > 0 {
        text.push_str(&format!("{m}m"));
    }
    if s > 0 || text.is_empty() {
        text.push_str(&format!("{s}s"));
    }
    text
}

/// Checks a reason a person gives to a command.
pub fn validate_reason(reason: &str) -> Result<(), String> {
    if reason.chars().count() > MAX_REASON {
        return Err(format!("the reason is longer than {MAX_REASON} characters"));
    }
    if reason.chars().any(char::is_control) {
        return Err("the reason contains control characters (one line of text, please)".into());
    }
    Ok(())
}

/// Whether `command` makes sense for the release now; the error says why not, and what to do.
pub fn check(command: Command, p: &Progress) -> Result<(), String> {
    let rid = p.release_id;
    let s = &p.state;
    let verb = command.verb();
    let status = s.status();
    if s.spec.is_none() && s.rollback_request.is_none() {
        return Err(format!(
            "release {rid} is unknown: the event stream has no request for it"
        ));
    }
    if let Some(r) = &s.rollback_request {
        return Err(format!(
            "release {rid} is a manual rollback of {} in {}: it cannot be {}",
            r.app,
            r.env,
            past(command)
        ));
    }
    if status.is_terminal() {
        return Err(format!("release {rid} already {status}: nothing to {verb}"));
    }
    if let Some(by) = &p.abort_by {
        return Err(format!("release {rid} is being aborted (by {by})"));
    }
    if let Some(f) = &s.failure {
        let at = f.step.map(|n| format!(" at step {n}")).unwrap_or_default();
        let then = if s.spec.as_ref().is_none_or(|s| s.rollback_on_failure) {
            "is being rolled back"
        } else {
            "is ending as failed (rollback_on_failure is off)"
        };
        return Err(format!(
            "release {rid} already failed{at} ({}) and {then}",
            f.reason
        ));
    }
    if s.rollback_started {
        return Err(format!("release {rid} is already rolling back"));
    }
    if command == Command::Abort {
        return Ok(());
    }
    // A verdict-less analysis holds any step, the last one of a rolling update included.
    if let (Command::Promote { .. }, Some(Hold::Inconclusive { .. })) = (command, &p.hold) {
        return Ok(());
    }
    let strategy = s.spec.as_ref().map(strategy).unwrap_or(Strategy::Rolling);
    if strategy == Strategy::Rolling && command != Command::Resume {
        return Err(match command {
            Command::Pause => format!(
                "release {rid} is a rolling update: it has no steps to hold (baton abort {rid} stops it)"
            ),
            _ => format!(
                "release {rid} is a rolling update: only canary and blue-green releases have steps to promote"
            ),
        });
    }
    match command {
        Command::Pause => {
            if !s.deploy_started {
                return Err(format!(
                    "release {rid} is not deploying yet (it is {status}): nothing to pause"
                ));
            }
            if let Some(hold) = &p.hold {
                let why = match hold {
                    Hold::Person { reason, .. } => reason.clone(),
                    Hold::Promotion { .. } => "waiting for a person to promote".into(),
                    Hold::Inconclusive { reason, .. } => {
                        format!("its analysis gave no verdict: {reason}")
                    }
                    Hold::Timed { seconds, .. } => {
                        format!("a pause of {}", seconds_text(i64::from(*seconds)))
                    }
                };
                return Err(format!(
                    "release {rid} is already paused at step {} ({why})",
                    hold.step()
                ));
            }
            if p.at_last_step() {
                return Err(format!(
                    "release {rid} is at its last step (100%): nothing is left to hold"
                ));
            }
            Ok(())
        }
        Command::Resume => match &p.hold {
            None => Err(format!("release {rid} is not paused (it is {status})")),
            Some(Hold::Promotion { step }) => Err(format!(
                "release {rid} waits at step {step} for a person to promote: use baton promote {rid}"
            )),
            Some(Hold::Timed { step, seconds, .. }) => Err(format!(
                "release {rid} is in the pause of {} after step {step}, which ends by itself: baton promote {rid} ends it now",
                seconds_text(i64::from(*seconds))
            )),
            Some(Hold::Person { .. }) => Ok(()),
            Some(Hold::Inconclusive { step, .. }) => Err(format!(
                "release {rid} waits at step {step} for a person to judge its inconclusive analysis: baton promote {rid} takes it as passed, baton abort {rid} rolls it back"
            )),
        },
        Command::Promote { full } => {
            if !s.deploy_started {
                return Err(format!(
                    "release {rid} has not started deploying yet (it is {status}): nothing to promote"
                ));
            }
            if p.at_last_step() {
                return Err(format!(
                    "release {rid} is already at its last step (100%): nothing to promote"
                ));
            }
            if p.hold.as_ref().is_some_and(Hold::is_gate) {
                return Ok(());
            }
            if full {
                return match &p.promoted_full_by {
                    Some(by) => Err(format!(
                        "release {rid} is already promoted all the way (by {by})"
                    )),
                    None => Ok(()),
                };
            }
            Err(match &p.hold {
                Some(Hold::Person { by, .. }) => format!(
                    "release {rid} is paused by {by}, not waiting at a gate: use baton resume {rid} (or promote --full to go all the way)"
                ),
                _ => format!(
                    "release {rid} is not waiting at a gate (it is {status}): nothing to promote; promote --full goes all the way after each step's analysis"
                ),
            })
        }
        Command::Abort => Ok(()),
    }
}

fn past(command: Command) -> &'static str {
    match command {
        Command::Pause => "paused",
        Command::Resume => "resumed",
        Command::Promote { .. } => "promoted",
        Command::Abort => "aborted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::v1::*;

    use crate::testing::History;

    const PAUSE: Command = Command::Pause;
    const RESUME: Command = Command::Resume;
    const PROMOTE: Command = Command::Promote { full: false };
    const FULL: Command = Command::Promote { full: true };
    const ABORT: Command = Command::Abort;
    const ALL: [Command; 5] = [PAUSE, RESUME, PROMOTE, FULL, ABORT];

    /// Asserts the verdict of every command: `Ok` where `allowed`, else an error containing `says`.
    fn expect(name: &str, h: &History, allowed: &[Command], says: &[(Command, &str)]) {
        let p = h.progress();
        for c in ALL {
            let got = check(c, &p);
            if allowed.contains(&c) {
                assert_eq!(got, Ok(()), "{name}: {c:?}");
            } else {
                let err = got.expect_err(&format!("{name}: {c:?} should be refused"));
                assert!(
                    err.contains(&h.rid.to_string()),
                    "{name}: {c:?}: {err} does not name the release"
                );
                if let Some((_, text)) = says.iter().find(|(sc, _)| *sc == c) {
                    assert!(err.contains(text), "{name}: {c:?}: {err:?} lacks {text:?}");
                }
            }
        }
    }

    #[test]
    fn commands_are_checked_against_every_status() {
        // Unknown: no request in the stream.
        let mut h = History::canary();
        h.events.clear();
        h.add(
            "deployer",
            Payload::ReleaseQueued(ReleaseQueued {
                blocking_release_id: ReleaseId::generate().to_string(),
            }),
        );
        for c in ALL {
            assert!(
                check(c, &h.progress()).is_err_and(|e| e.contains("unknown")),
                "{c:?}"
            );
        }
        assert!(check(PAUSE, &Progress::of(h.rid, &[])).is_err_and(|e| e.contains("unknown")));

        // Pending, queued, building: only abort.
        let h = History::canary();
        assert_eq!(h.progress().status(), Status::Pending);
        let early = [
            (PAUSE, "not deploying yet (it is pending)"),
            (PROMOTE, "has not started deploying yet"),
            (RESUME, "is not paused"),
        ];
        expect("pending", &h, &[ABORT], &early);
        let mut h = History::canary();
        h.add(
            "deployer",
            Payload::ReleaseQueued(ReleaseQueued {
                blocking_release_id: ReleaseId::generate().to_string(),
            }),
        );
        assert_eq!(h.progress().status(), Status::Queued);
        expect("queued", &h, &[ABORT], &[(PAUSE, "(it is queued)")]);
        let mut h = History::canary();
        h.add(
            "builder",
            Payload::BuildStarted(BuildStarted {
                image: "web:v2".into(),
                backend: "resolve".into(),
            }),
        );
        assert_eq!(h.progress().status(), Status::Building);
        expect("building", &h, &[ABORT], &[(PAUSE, "(it is building)")]);

        // Deploying the first step: pause, promote --full, abort.
        let mut h = History::canary();
        h.started().step(0, 10);
        assert_eq!(h.progress().status(), Status::Deploying { step: 0 });
        let running = [
            (RESUME, "is not paused (it is "),
            (PROMOTE, "not waiting at a gate"),
        ];
        expect("deploying", &h, &[PAUSE, FULL, ABORT], &running);
        // Analysing it: the same.
        h.ready(0, 10).analysing(0);
        assert_eq!(h.progress().status(), Status::Analysing { step: 0 });
        expect("analysing", &h, &[PAUSE, FULL, ABORT], &running);

        // Paused by a person: resume, promote --full, abort.
        h.paused(0, "paused by bob: looks odd");
        assert_eq!(h.progress().status(), Status::Paused { step: 0 });
        expect(
            "paused by a person",
            &h,
            &[RESUME, FULL, ABORT],
            &[
                (PAUSE, "already paused at step 0 (paused by bob: looks odd)"),
                (
                    PROMOTE,
                    "paused by bob, not waiting at a gate: use baton resume",
                ),
            ],
        );
        h.resumed(0);
        expect("resumed", &h, &[PAUSE, FULL, ABORT], &running);

        // At a pause-until-promoted gate: promote (either), abort.
        h.passed(0)
            .done(1, 50)
            .paused(1, "waiting for a person to promote (baton promote)");
        assert_eq!(h.progress().hold, Some(Hold::Promotion { step: 1 }));
        expect(
            "until promoted",
            &h,
            &[PROMOTE, FULL, ABORT],
            &[
                (
                    RESUME,
                    "waits at step 1 for a person to promote: use baton promote",
                ),
                (
                    PAUSE,
                    "already paused at step 1 (waiting for a person to promote)",
                ),
            ],
        );
        // At a timed gate: promote ends it now.
        h.resumed(1)
            .done(2, 75)
            .paused(2, "pause of 60s after step 2");
        assert!(matches!(
            h.progress().hold,
            Some(Hold::Timed {
                step: 2,
                seconds: 60,
                ..
            })
        ));
        expect(
            "timed pause",
            &h,
            &[PROMOTE, FULL, ABORT],
            &[(RESUME, "ends by itself: baton promote")],
        );
        // The last step (the promotion at 100%): only abort.
        h.resumed(2).step(3, 100);
        expect(
            "last step",
            &h,
            &[ABORT],
            &[
                (PAUSE, "at its last step (100%): nothing is left to hold"),
                (PROMOTE, "already at its last step"),
                (FULL, "already at its last step"),
            ],
        );

        // Ended: nothing, and it says how.
        for (end, word) in [
            (
                Payload::ReleaseSucceeded(ReleaseSucceeded::default()),
                "already succeeded",
            ),
            (
                Payload::ReleaseRolledBack(ReleaseRolledBack::default()),
                "already rolled back",
            ),
            (
                Payload::ReleaseFailed(ReleaseFailed::default()),
                "already failed",
            ),
        ] {
            let mut h = History::canary();
            h.started().done(0, 10).add("x", end);
            expect(
                word,
                &h,
                &[],
                &ALL.iter().map(|c| (*c, word)).collect::<Vec<_>>(),
            );
        }

        // Failed, not yet rolled back: nothing, abort included ("already rolling back").
        let mut h = History::canary();
        h.started().step(0, 10).ready(0, 10).analysing(0).add(
            "health-checker",
            Payload::AnalysisFailed(AnalysisFailed {
                step: 0,
                reason: "health: 500".into(),
                ..Default::default()
            }),
        );
        expect(
            "failed",
            &h,
            &[],
            &[(
                ABORT,
                "already failed at step 0 (health: 500) and is being rolled back",
            )],
        );
        h.add(
            "rollback",
            Payload::RollbackStarted(RollbackStarted::default()),
        );
        assert_eq!(h.progress().status(), Status::RollingBack);
        expect("rolling back", &h, &[], &[(ABORT, "is being rolled back")]);

        // Aborted: nothing more.
        let mut h = History::canary();
        h.started().step(0, 10);
        h.add(
            "carol",
            Payload::ReleaseAbortRequested(ReleaseAbortRequested {
                reason: "wrong image".into(),
            }),
        );
        expect(
            "aborted",
            &h,
            &[],
            &[(ABORT, "is being aborted (by carol)")],
        );

        // Promoted all the way already.
        let mut h = History::canary();
        h.started().step(0, 10);
        h.add(
            "dave",
            Payload::ReleasePromoteRequested(ReleasePromoteRequested { full: true }),
        );
        expect(
            "promoted all the way",
            &h,
            &[PAUSE, ABORT],
            &[(FULL, "already promoted all the way (by dave)")],
        );
    }

    #[test]
    fn rolling_releases_and_manual_rollbacks_have_nothing_to_hold_or_promote() {
        let mut h = History::new(Strategy::Rolling, &[]);
        h.started().step(0, 100);
        expect(
            "rolling",
            &h,
            &[ABORT],
            &[
                (PAUSE, "is a rolling update: it has no steps to hold"),
                (PROMOTE, "only canary and blue-green"),
                (FULL, "only canary and blue-green"),
                (RESUME, "is not paused"),
            ],
        );
        let mut h = History::canary();
        h.events.clear();
        h.add(
            "alice",
            Payload::RollbackRequested(RollbackRequested {
                app: "web".into(),
                env: "test".into(),
                ..Default::default()
            }),
        );
        expect(
            "manual rollback",
            &h,
            &[],
            &[
                (
                    ABORT,
                    "is a manual rollback of web in test: it cannot be aborted",
                ),
                (PAUSE, "cannot be paused"),
            ],
        );
        // Blue-green: pause before the switch, promote --full; no gates to promote.
        let mut h = History::new(Strategy::BlueGreen, &[]);
        h.started().done(0, 0);
        expect(
            "blue-green",
            &h,
            &[PAUSE, FULL, ABORT],
            &[(PROMOTE, "not waiting at a gate")],
        );
    }

    #[test]
    fn plans_follow_the_strategy() {
        let weights = |strategy: Strategy, steps: &[(u32, u32, bool)]| {
            let h = History::new(strategy, steps);
            h.progress()
                .plan
                .iter()
                .map(|s| s.weight)
                .collect::<Vec<_>>()
        };
        assert_eq!(weights(Strategy::Rolling, &[]), [100]);
        assert_eq!(weights(Strategy::Unspecified, &[]), [100]);
        assert_eq!(weights(Strategy::BlueGreen, &[]), [0, 100]);
        let mut spec = ReleaseSpec {
            strategy: Strategy::BlueGreen as i32,
            ..Default::default()
        };
        assert!(!plan(&spec)[0].gated(), "automatic promotion holds nothing");
        spec.blue_green = Some(BlueGreenParams {
            manual_promotion: true,
            ..Default::default()
        });
        assert_eq!(
            plan(&spec),
            [
                StepDef {
                    until_promoted: true,
                    ..StepDef::at(0)
                },
                StepDef::at(100)
            ],
            "manual promotion holds before the switch"
        );
        assert_eq!(weights(Strategy::Canary, &[]), DEFAULT_CANARY_WEIGHTS);
        assert_eq!(weights(Strategy::Canary, &[(20, 0, false)]), [20, 100]);
    }

    #[test]
    fn durations_and_reasons() {
        assert_eq!(seconds_text(0), "0s");
        assert_eq!(seconds_text(45), "45s");
        assert_eq!(seconds_text(300), "5m");
        assert_eq!(seconds_text(90), "1m30s");
        assert_eq!(seconds_text(7200), "2h");
        assert!(validate_reason("errors up after the deploy").is_ok());
        assert!(validate_reason("two\nlines").is_err());
        assert!(validate_reason(&"x".repeat(MAX_REASON + 1)).is_err());
    }
}
