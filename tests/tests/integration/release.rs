//! Releases end to end: the five agents as real processes, a real control plane, the real CLI.

use anyhow::{ensure, Context, Result};
use baton_core::event::EventType::{self, *};
use baton_core::fold::{fold, Status};
use baton_proto::v1::FailureKind;
use baton_tests::harness::trial;
use baton_tests::release::{in_order, Baton};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_rolling_release_of_a_healthy_image_succeeds_and_runs_it_by_digest,
        an_image_that_fails_its_health_check_is_rolled_back,
        a_crash_looping_image_is_rolled_back_on_the_first_check_that_sees_the_crash_loop,
        a_missing_image_fails_the_release_and_leaves_the_cluster_untouched,
        a_missing_namespace_fails_the_release_before_anything_changes,
        two_releases_requested_back_to_back_run_one_after_the_other,
        a_manual_rollback_restores_the_previous_revision,
    ]
}

const FLOW: [EventType; 10] = [
    ReleaseRequested,
    BuildStarted,
    BuildSucceeded,
    DeployStarted,
    DeployStepStarted,
    DeployStepReady,
    AnalysisStarted,
    AnalysisPassed,
    DeployCompleted,
    ReleaseSucceeded,
];

async fn a_rolling_release_of_a_healthy_image_succeeds_and_runs_it_by_digest() -> Result<()> {
    let baton = Baton::start("e2e-ok").await?;
    let (image, digest) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (code, rid, out) = baton.release(&image, true).await?;
    ensure!(code == 0, "baton release --wait exited {code}:\n{out}");
    let expected = format!("{}/{}@{digest}", baton.cluster.registry, baton.repo);
    let deployed = baton.deployed_image().await?;
    ensure!(
        deployed == expected,
        "the Deployment runs {deployed}, not {expected}"
    );
    let types = baton.types(rid).await?;
    ensure!(types == FLOW, "events out of the causal order: {types:?}");
    // Each event names its cause.
    let events = baton.events(rid).await?;
    for pair in events.windows(2).skip(1) {
        ensure!(
            !pair[1].envelope.causation_id.is_empty(),
            "{} has no cause",
            pair[1].event_type
        );
    }
    ensure!(
        out.contains("deploy.step_ready") && out.contains(&format!("release {rid} succeeded")),
        "the CLI did not follow the release:\n{out}"
    );
    // Status and logs tell the same story.
    let status = baton.baton(&["status", &rid.to_string()]).await?;
    ensure!(
        String::from_utf8_lossy(&status.stdout).contains("status    succeeded"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let logs = baton.baton(&["logs", &rid.to_string()]).await?;
    let logs = String::from_utf8_lossy(&logs.stdout);
    ensure!(
        logs.lines().count() == FLOW.len(),
        "baton logs printed:\n{logs}"
    );
    Ok(())
}

async fn an_image_that_fails_its_health_check_is_rolled_back() -> Result<()> {
    let mut baton = Baton::start("e2e-health").await?;
    let (good, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (code, _, out) = baton.release(&good, true).await?;
    ensure!(code == 0, "the good release failed:\n{out}");
    let before = baton.deployment().await?.spec.template;
    let (bad, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let (code, rid, out) = baton.release(&bad, true).await?;
    ensure!(
        code == 2,
        "baton release --wait of a failing image exited {code}:\n{out}"
    );
    let types = baton.types(rid).await?;
    ensure!(
        types.last() == Some(&ReleaseRolledBack),
        "the release did not end rolled back: {types:?}"
    );
    ensure!(
        in_order(
            &types,
            &[
                DeployStepReady,
                AnalysisStarted,
                AnalysisFailed,
                RollbackStarted,
                RollbackCompleted,
                ReleaseRolledBack
            ]
        ),
        "{types:?}"
    );
    let after = baton.deployment().await?;
    let images = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        t.spec.as_ref().map(|s| {
            s.containers
                .iter()
                .map(|c| c.image.clone())
                .collect::<Vec<_>>()
        })
    };
    ensure!(
        images(&after.spec.template) == images(&before),
        "the pod template is not the previous one"
    );
    let status = after.status.unwrap_or_default();
    ensure!(
        status.available_replicas == Some(2) && status.updated_replicas == Some(2),
        "the restored revision is not available: {status:?}"
    );

    // The metrics agent timed both from their events: one release each way, each one's step
    // ready, one analysis passed and one failed, one rollback after the failure.
    let metrics = baton.agent("metrics")?;
    let of = |h: &str, outcome: &str| {
        format!(r#"{h}{{env="test",app="web",strategy="rolling",outcome="{outcome}"}}"#)
    };
    for (series, n) in [
        (of("baton_release_duration_seconds_count", "succeeded"), 1.0),
        (
            of("baton_release_duration_seconds_count", "rolled_back"),
            1.0,
        ),
        (of("baton_step_duration_seconds_count", "ready"), 2.0),
        (of("baton_analysis_duration_seconds_count", "passed"), 1.0),
        (of("baton_analysis_duration_seconds_count", "failed"), 1.0),
        (
            of("baton_failure_to_rollback_seconds_count", "rolled_back"),
            1.0,
        ),
    ] {
        metrics
            .wait_metric(&series, n, std::time::Duration::from_secs(30))
            .await?;
        let got = metrics.metric(&series).await?;
        ensure!(got == n, "{series} is {got}, expected {n}");
    }
    let restore = metrics
        .metric(&of("baton_failure_to_rollback_seconds_sum", "rolled_back"))
        .await?;
    let whole = metrics
        .metric(&of("baton_release_duration_seconds_sum", "rolled_back"))
        .await?;
    ensure!(
        restore > 0.0 && restore < whole,
        "failure to rollback {restore} s in a release of {whole} s"
    );
    // Its gauges go at the agent's next export (within a second or so).
    let id = rid.to_string();
    baton_tests::eventually(
        "the ended release's gauges to go",
        std::time::Duration::from_secs(10),
        || {
            let text = metrics.metrics();
            let id = &id;
            async move { Ok((!text.await?.contains(id.as_str())).then_some(())) }
        },
    )
    .await?;
    Ok(())
}

async fn a_crash_looping_image_is_rolled_back_on_the_first_check_that_sees_the_crash_loop(
) -> Result<()> {
    let baton = Baton::start("e2e-crash").await?;
    let (crash, _) = baton.push("v2", &[("BATON_SIM_CRASH", "1")]).await?;
    let (code, rid, out) = baton.release(&crash, true).await?;
    ensure!(code == 2, "exit {code}:\n{out}");
    let events = baton.events(rid).await?;
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    ensure!(
        in_order(
            &types,
            &[
                DeployStepStarted,
                DeployFailed,
                RollbackStarted,
                ReleaseRolledBack
            ]
        ),
        "{types:?}"
    );
    ensure!(
        !types.contains(&AnalysisStarted) && !types.contains(&DeployStepReady),
        "the crash loop got as far as analysis: {types:?}"
    );
    let failed = baton_tests::first!(events, DeployFailed)?;
    ensure!(
        failed.kind == FailureKind::CrashLoop as i32,
        "deploy.failed says {failed:?}"
    );
    // The first restart was enough: the reason counts the restarts seen.
    ensure!(
        failed.reason.contains("(1 restarts)") || failed.reason.contains("crash-looping"),
        "{}",
        failed.reason
    );
    Ok(())
}

async fn a_missing_image_fails_the_release_and_leaves_the_cluster_untouched() -> Result<()> {
    let baton = Baton::start("e2e-noimg").await?;
    let before = baton.deployment().await?;
    let missing = baton.image("does-not-exist");
    let (code, rid, out) = baton.release(&missing, true).await?;
    ensure!(code == 1, "exit {code}:\n{out}");
    let state = fold(&baton.events(rid).await?);
    ensure!(state.status() == Status::Failed, "{:?}", state.status());
    let reason = state.terminal_reason.clone().unwrap_or_default();
    ensure!(
        reason.contains("does-not-exist"),
        "the reason does not name the image: {reason}"
    );
    ensure!(!state.deploy_started, "the deployer started");
    let after = baton.deployment().await?;
    ensure!(
        after.metadata.generation == before.metadata.generation,
        "the Deployment was changed"
    );
    Ok(())
}

async fn a_missing_namespace_fails_the_release_before_anything_changes() -> Result<()> {
    let baton = Baton::start("e2e-nons").await?;
    let (image, _) = baton.push("v2", &[]).await?;
    let out = baton
        .baton(&[
            "release", "web", "--env", "ghost", "--image", &image, "--wait",
        ])
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}:\n{text}",
        out.status.code()
    );
    ensure!(
        text.contains("-missing does not exist"),
        "the reason does not name the namespace:\n{text}"
    );
    Ok(())
}

async fn two_releases_requested_back_to_back_run_one_after_the_other() -> Result<()> {
    let baton = Baton::start("e2e-queue").await?;
    let (a, _) = baton.push("v2", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (b, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "ok")]).await?;
    let (_, first, _) = baton.release(&a, false).await?;
    let (code, second, out) = baton.release(&b, true).await?;
    ensure!(code == 0, "the second release exited {code}:\n{out}");
    let one = baton.events(first).await?;
    let two = baton.events(second).await?;
    let time = |events: &[baton_core::event::Event], t: EventType| {
        events
            .iter()
            .find(|e| e.event_type == t)
            .map(|e| e.time_ms())
    };
    let first_end = time(&one, ReleaseSucceeded).context("the first release did not succeed")?;
    let second_start =
        time(&two, DeployStepStarted).context("the second release never rolled out")?;
    ensure!(
        second_start >= first_end,
        "the second rollout began before the first ended"
    );
    ensure!(
        two.iter().any(|e| e.event_type == ReleaseQueued),
        "the second release was not queued"
    );
    ensure!(
        baton.deployed_image().await?.contains('@'),
        "not deployed by digest"
    );
    Ok(())
}

async fn a_manual_rollback_restores_the_previous_revision() -> Result<()> {
    let baton = Baton::start("e2e-manual").await?;
    let v1 = baton.deployed_image().await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let (code, _, out) = baton.release(&v2, true).await?;
    ensure!(code == 0, "{out}");
    let out = baton
        .baton(&[
            "rollback",
            "web",
            "--env",
            "test",
            "--wait",
            "--reason",
            "errors up",
        ])
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "baton rollback --wait failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        baton.deployed_image().await? == v1,
        "the Deployment does not run the previous image again"
    );
    Ok(())
}
