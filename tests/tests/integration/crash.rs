//! Crashes in the middle of a release: an agent killed with SIGKILL and started again carries the
//! release on from its history, and no step's event is published twice.

use std::time::Duration;

use anyhow::{ensure, Result};
use baton_core::event::EventType::*;
use baton_core::fold::{fold, Status};
use baton_tests::harness::trial;
use baton_tests::release::{config_yaml, repeated, Baton};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_deployer_killed_during_a_rollout_finishes_it_after_a_restart_without_repeating_a_step,
        a_health_checker_killed_during_an_analysis_gives_one_verdict_after_a_restart,
        a_rollback_agent_killed_during_a_rollback_finishes_it_after_a_restart,
    ]
}

const LONG: Duration = Duration::from_secs(180);

async fn a_deployer_killed_during_a_rollout_finishes_it_after_a_restart_without_repeating_a_step(
) -> Result<()> {
    let mut baton = Baton::start("crash-dep").await?;
    // Slow to start, so the rollout is still going when the deployer dies.
    let (image, _) = baton
        .push("v2", &[("BATON_SIM_STARTUP_MS", "6000")])
        .await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    baton.wait_for_event(rid, DeployStepStarted, LONG).await?;
    baton.restart_agent("deployer").await?;
    let events = baton.wait_for_end(rid, LONG).await?;
    let state = fold(&events);
    ensure!(
        state.status() == Status::Succeeded,
        "the release ended {:?}: {:?}",
        state.status(),
        state.terminal_reason
    );
    ensure!(
        repeated(&events).is_empty(),
        "events published twice: {:?}",
        repeated(&events)
    );
    ensure!(
        baton.deployed_image().await?.contains('@'),
        "not deployed by digest"
    );
    Ok(())
}

async fn a_health_checker_killed_during_an_analysis_gives_one_verdict_after_a_restart() -> Result<()>
{
    let mut baton = Baton::start("crash-hc").await?;
    baton
        .apply_config(&config_yaml(
            &baton.ns.name,
            "{duration: 8s, interval: 1s, failure_limit: 0}",
        ))
        .await?;
    let (image, _) = baton.push("v2", &[]).await?;
    let (_, rid, _) = baton.release(&image, false).await?;
    baton.wait_for_event(rid, AnalysisStarted, LONG).await?;
    baton.restart_agent("health-checker").await?;
    let events = baton.wait_for_end(rid, LONG).await?;
    ensure!(
        fold(&events).status() == Status::Succeeded,
        "{:?}",
        events.iter().map(|e| e.event_type).collect::<Vec<_>>()
    );
    ensure!(
        repeated(&events).is_empty(),
        "events published twice: {:?}",
        repeated(&events)
    );
    Ok(())
}

async fn a_rollback_agent_killed_during_a_rollback_finishes_it_after_a_restart() -> Result<()> {
    let mut baton = Baton::start("crash-rb").await?;
    // The revision to restore is slow to start, so the rollback is still waiting when it dies.
    let (slow, _) = baton
        .push("v2", &[("BATON_SIM_STARTUP_MS", "6000")])
        .await?;
    let (code, _, out) = baton.release(&slow, true).await?;
    ensure!(code == 0, "{out}");
    let before = baton.deployed_image().await?;
    let (bad, _) = baton.push("v3", &[("BATON_SIM_HEALTH", "fail")]).await?;
    let (_, rid, _) = baton.release(&bad, false).await?;
    baton.wait_for_event(rid, RollbackStarted, LONG).await?;
    baton.restart_agent("rollback").await?;
    let events = baton.wait_for_end(rid, LONG).await?;
    let state = fold(&events);
    ensure!(
        state.status() == Status::RolledBack,
        "the release ended {:?}: {:?}",
        state.status(),
        state.terminal_reason
    );
    ensure!(
        repeated(&events).is_empty(),
        "events published twice: {:?}",
        repeated(&events)
    );
    ensure!(
        baton.deployed_image().await? == before,
        "the previous image was not restored"
    );
    Ok(())
}
