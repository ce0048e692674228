//! The CLI on releases in flight: `baton release --steps` overrides a canary's steps for one
//! release, `baton list` shows what is in flight, and `baton status --watch` and
//! `baton logs --follow` re-attach to a release and follow it to its end.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType;
use baton_proto::v1::envelope::Payload;
use baton_tests::harness::trial;
use baton_tests::release::{app_config, Baton};
use baton_tests::target_bin;
use libtest_mimic::Trial;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_release_with_its_own_steps_is_listed_watched_and_followed_to_its_end,
        steps_are_refused_for_a_release_that_is_not_a_canary,
    ]
}

const END: Duration = Duration::from_secs(120);

/// A `baton` process following a release: `attached` fires at its first line of output, and
/// `output` yields its exit status, stdout and stderr once it ends.
struct Attached {
    attached: tokio::sync::oneshot::Receiver<()>,
    output: tokio::task::JoinHandle<Result<(std::process::ExitStatus, String, String)>>,
}

async fn a_release_with_its_own_steps_is_listed_watched_and_followed_to_its_end() -> Result<()> {
    let baton = Baton::start("cli-watch").await?;
    baton
        .apply_config(&app_config(
            &baton.ns.name,
            "strategy: canary\ncanary: {steps: [{weight: 10}, {weight: 25}, {weight: 50}, {weight: 100}]}\n\
             analysis: {duration: 1s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    let (image, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    // Two steps instead of the configured four, held at the first until promoted.
    let rid = baton
        .release_of("web", &image, &["--steps", "30,pause,100"])
        .await?;
    baton
        .wait_for_event(rid, EventType::ReleasePaused, END)
        .await?;

    let list = baton.baton(&["list"]).await?;
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    ensure!(
        list.status.success() && listed.contains(&rid.to_string()) && listed.contains("30%"),
        "baton list: {listed}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let json = baton.baton(&["list", "--output", "json"]).await?;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    ensure!(
        rows.as_array().map(Vec::len) == Some(1) && rows[0]["weight"] == 30,
        "baton list --output json: {rows}"
    );

    // Re-attach twice, as two people would, then let the release go on once both have read the
    // release (their first line of output), so that the promotion is news to each.
    let attach = |args: &[&str]| -> Result<Attached> {
        let mut child = tokio::process::Command::new(target_bin("baton")?)
            .args(args)
            .envs(baton.bus.process_env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            stderr.read_to_string(&mut text).await.map(|_| text)
        });
        let (first, attached) = tokio::sync::oneshot::channel();
        let output = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut text = String::new();
            let mut first = Some(first);
            while let Some(line) = lines.next_line().await? {
                text.push_str(&line);
                text.push('\n');
                if let Some(first) = first.take() {
                    let _ = first.send(());
                }
            }
            let status = child.wait().await?;
            Ok((status, text, errors.await??))
        });
        Ok(Attached { attached, output })
    };
    let id = rid.to_string();
    let watch = attach(&["status", &id, "--watch"])?;
    let follow = attach(&["logs", &id, "--follow"])?;
    for (what, attached) in [
        ("status --watch", watch.attached),
        ("logs --follow", follow.attached),
    ] {
        tokio::time::timeout(END, attached)
            .await
            .with_context(|| format!("baton {what} printed nothing"))?
            .with_context(|| format!("baton {what} ended before it printed anything"))?;
    }
    let promote = baton.baton(&["promote", &id]).await?;
    ensure!(
        promote.status.success(),
        "baton promote: {}",
        String::from_utf8_lossy(&promote.stderr)
    );
    for (what, task) in [
        ("status --watch", watch.output),
        ("logs --follow", follow.output),
    ] {
        let (status, text, stderr) = tokio::time::timeout(END, task)
            .await
            .with_context(|| format!("baton {what} did not end with the release"))???;
        ensure!(
            status.success() && text.contains(&format!("release {rid} succeeded")),
            "baton {what} exited {:?}:\n{text}{stderr}",
            status.code(),
        );
        ensure!(
            text.contains("release.promote_requested") && text.contains("release.succeeded"),
            "baton {what} did not print what happened after it attached:\n{text}"
        );
    }

    // The steps were the request's: 30% then 100%.
    let events = baton.wait_for_end(rid, END).await?;
    let weights: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.payload() {
            Some(Payload::DeployStepReady(r)) => Some(r.weight),
            _ => None,
        })
        .collect();
    ensure!(weights == [30, 100], "the steps ran at {weights:?}");
    let after = baton.baton(&["list"]).await?;
    ensure!(
        String::from_utf8_lossy(&after.stdout).contains("no release in flight"),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
    Ok(())
}

async fn steps_are_refused_for_a_release_that_is_not_a_canary() -> Result<()> {
    let baton = Baton::start("cli-steps").await?;
    for (steps, says) in [
        ("10,50,100", "only a canary release has steps"),
        ("50,10,100", "the weights must rise"),
        ("10,50", "the last step must be 100"),
        ("pause,100", "a pause follows a weight"),
        ("10,pause:soon,100", "pause:soon"),
    ] {
        let out = baton
            .baton(&[
                "release", "web", "--env", "test", "--image", "web:v9", "--steps", steps,
            ])
            .await?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            out.status.code() == Some(1) && text.contains(says) && !text.contains("panicked"),
            "--steps {steps}: exit {:?}, {text}",
            out.status.code()
        );
    }
    Ok(())
}
