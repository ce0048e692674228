//! Many releases at once, with the agents as real processes: releases of different apps run side
//! by side and one slow release holds no other, every release ends (an API refusal at once, a
//! lost health-checker at its deadline), writes are fenced, and agents stop within their grace.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_core::event::{Event, EventType, EventType::*};
use baton_core::fold::{fold, Status};
use baton_core::names::ReleaseId;
use baton_tests::harness::trial;
use baton_tests::release::{fleet_config, repeated, Baton};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::PostParams;
use kube::Api;
use libtest_mimic::Trial;
use nix::sys::signal::Signal;

use baton_tests::first;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_release_is_not_held_by_another_apps_timed_pause_or_long_analysis,
        twenty_releases_of_twenty_apps_run_side_by_side_and_one_apps_never_overlap,
        a_deployer_killed_with_ten_releases_in_flight_ends_them_all_after_a_restart,
        an_apply_the_api_server_refuses_fails_the_release_at_once_and_the_next_one_proceeds,
        a_release_whose_health_checker_is_gone_ends_at_its_deadline_and_frees_the_lock,
        a_stalled_deployer_writes_nothing_after_an_abort,
        every_agent_stops_in_order_after_sigterm_with_the_broker_gone,
        a_release_flooded_with_commands_is_refused_and_ended_and_restored,
    ]
}

const LONG: Duration = Duration::from_secs(240);

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn status(events: &[Event]) -> Status {
    fold(events).status()
}

fn time_of(events: &[Event], t: EventType) -> Option<i64> {
    events
        .iter()
        .find(|e| e.event_type == t)
        .map(Event::time_ms)
}

async fn a_release_is_not_held_by_another_apps_timed_pause_or_long_analysis() -> Result<()> {
    let baton = Baton::start_with("side", &["paused", "quick", "analysed"], 1, &[]).await?;
    let apps = ["paused", "quick", "analysed"].map(String::from);
    baton
        .apply_config(&fleet_config(&baton.ns.name, &apps, |app| match app {
            "paused" => "strategy: canary\nanalysis: {duration: 1s, interval: 1s}\ncanary:\n  steps:\n    - {weight: 50, pause: 5m}\n    - {weight: 100}".into(),
            "analysed" => "strategy: rolling\nanalysis: {duration: 60s, interval: 2s}".into(),
            _ => "strategy: rolling\nanalysis: {duration: 2s, interval: 1s}".into(),
        }))
        .await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let (v3, _) = baton.push("v3", &[]).await?;

    // A canary sits in its five-minute pause…
    let paused = baton.release_of("paused", &v2, &[]).await?;
    baton.wait_for_event(paused, ReleasePaused, LONG).await?;
    // …while another app's release goes through.
    let quick = baton.release_of("quick", &v2, &[]).await?;
    let events = baton.wait_for_end(quick, LONG).await?;
    ensure!(
        status(&events) == Status::Succeeded,
        "{:?}",
        fold(&events).terminal_reason
    );
    ensure!(
        repeated(&events).is_empty(),
        "repeated: {:?}",
        repeated(&events)
    );
    ensure!(
        status(&baton.events(paused).await?) == (Status::Paused { step: 0 }),
        "the canary did not stay in its pause"
    );

    // An analysis of a minute runs while another release goes through.
    let analysed = baton.release_of("analysed", &v2, &[]).await?;
    baton
        .wait_for_event(analysed, AnalysisStarted, LONG)
        .await?;
    let again = baton.release_of("quick", &v3, &[]).await?;
    let events = baton.wait_for_end(again, LONG).await?;
    ensure!(
        status(&events) == Status::Succeeded,
        "{:?}",
        fold(&events).terminal_reason
    );
    ensure!(
        repeated(&events).is_empty(),
        "repeated: {:?}",
        repeated(&events)
    );
    ensure!(
        fold(&baton.events(analysed).await?).terminal.is_none(),
        "the minute-long analysis ended before the other release"
    );
    // Nothing was retried to get there: every message was handled on its first delivery or
    // deferred on purpose.
    for agent in &baton.agents {
        let text = agent.metrics().await?;
        ensure!(
            !text
                .lines()
                .any(|l| l.starts_with("baton_events_handled_total")
                    && l.contains("outcome=\"retry\"")),
            "{} retried messages:\n{text}",
            agent.name
        );
    }
    let out = baton
        .baton(&["abort", &paused.to_string(), "--reason", "test over"])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    baton.wait_for_end(paused, LONG).await?;
    Ok(())
}

async fn twenty_releases_of_twenty_apps_run_side_by_side_and_one_apps_never_overlap() -> Result<()>
{
    let apps = names("app", 20);
    let refs: Vec<&str> = apps.iter().map(String::as_str).collect();
    let baton = Baton::start_with("many", &refs, 1, &[]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &apps, |_| {
            "strategy: rolling\nanalysis: {duration: 1s, interval: 1s}".into()
        }))
        .await?;
    let (v2, _) = baton
        .push("v2", &[("BATON_SIM_STARTUP_MS", "1500")])
        .await?;
    let (v3, _) = baton.push("v3", &[]).await?;
    let requests = apps.iter().map(|app| baton.release_of(app, &v2, &[]));
    let mut ids: Vec<ReleaseId> = futures::future::try_join_all(requests).await?;
    // A second release of the first app, requested while its first is in flight.
    let second = baton.release_of("app0", &v3, &[]).await?;
    ids.push(second);
    let mut histories = Vec::new();
    for id in &ids {
        let events = baton.wait_for_end(*id, LONG).await?;
        ensure!(
            status(&events) == Status::Succeeded,
            "release {id} ended {:?}: {:?}",
            status(&events),
            fold(&events).terminal_reason
        );
        ensure!(
            repeated(&events).is_empty(),
            "repeated: {:?}",
            repeated(&events)
        );
        histories.push(events);
    }
    // The deploy steps of the twenty overlap in time…
    let spans: Vec<(i64, i64)> = histories[..20]
        .iter()
        .map(|e| {
            (
                time_of(e, DeployStepStarted).unwrap_or_default(),
                time_of(e, DeployStepReady).unwrap_or_default(),
            )
        })
        .collect();
    let most_at_once = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        most_at_once >= 5,
        "at most {most_at_once} deploy steps ran at once: {spans:?}"
    );
    // …and the two of one app did not: the second waited for the first to end.
    let (first_app0, second_app0) = (&histories[0], &histories[20]);
    ensure!(
        second_app0.iter().any(|e| e.event_type == ReleaseQueued),
        "the second release of app0 was not queued"
    );
    let first_end = first_app0
        .iter()
        .find(|e| e.event_type.is_terminal())
        .map(Event::time_ms)
        .context("no end")?;
    let second_start = time_of(second_app0, DeployStarted).context("no deploy.started")?;
    ensure!(
        second_start >= first_end,
        "the second release of app0 started at {second_start}, before the first ended at {first_end}"
    );
    ensure!(
        baton.image_of("app0").await?.contains('@'),
        "app0 not deployed"
    );
    Ok(())
}

async fn a_deployer_killed_with_ten_releases_in_flight_ends_them_all_after_a_restart() -> Result<()>
{
    let apps = names("k", 10);
    let refs: Vec<&str> = apps.iter().map(String::as_str).collect();
    let mut baton = Baton::start_with("kill-many", &refs, 1, &[]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &apps, |_| {
            "strategy: rolling\nanalysis: {duration: 1s, interval: 1s}".into()
        }))
        .await?;
    let (v2, _) = baton
        .push("v2", &[("BATON_SIM_STARTUP_MS", "5000")])
        .await?;
    let requests = apps.iter().map(|app| baton.release_of(app, &v2, &[]));
    let ids: Vec<ReleaseId> = futures::future::try_join_all(requests).await?;
    for id in &ids {
        baton.wait_for_event(*id, DeployStepStarted, LONG).await?;
    }
    baton.restart_agent("deployer").await?;
    for id in &ids {
        let events = baton.wait_for_end(*id, LONG).await?;
        ensure!(
            status(&events) == Status::Succeeded,
            "release {id} ended {:?}: {:?}",
            status(&events),
            fold(&events).terminal_reason
        );
        ensure!(
            repeated(&events).is_empty(),
            "release {id} has events twice: {:?}",
            repeated(&events)
        );
    }
    Ok(())
}

async fn an_apply_the_api_server_refuses_fails_the_release_at_once_and_the_next_one_proceeds(
) -> Result<()> {
    let baton = Baton::start_with("refused", &["web"], 1, &[]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &["web".into()], |_| {
            "strategy: canary\nanalysis: {duration: 1s, interval: 1s}".into()
        }))
        .await?;
    // One Deployment in the namespace at most: the canary's is refused by the quota admission.
    let client = baton.cluster.client().await?;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &baton.ns.name);
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "one-deployment"},
        "spec": {"hard": {"count/deployments.apps": "1"}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    baton_tests::eventually("the quota to count the Deployment", LONG, || {
        let quotas = quotas.clone();
        async move {
            let q = quotas.get("one-deployment").await?;
            Ok(q.status
                .and_then(|s| s.used)
                .and_then(|u| u.get("count/deployments.apps").cloned())
                .filter(|v| v.0 == "1")
                .map(|_| ()))
        }
    })
    .await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let refused = baton.release_of("web", &v2, &[]).await?;
    let events = baton.wait_for_end(refused, LONG).await?;
    let failed = first!(events, DeployFailed)?;
    ensure!(
        failed.reason.contains("exceeded quota") && failed.reason.contains("403"),
        "deploy.failed does not carry the API's message: {}",
        failed.reason
    );
    ensure!(
        status(&events) != Status::Succeeded,
        "the refused release succeeded"
    );
    // Refused once, not retried: a single deploy.failed, and the release ended.
    ensure!(
        repeated(&events).is_empty(),
        "repeated: {:?}",
        repeated(&events)
    );
    // The next release of the app proceeds (rolling: no second Deployment needed).
    let next = baton
        .release_of("web", &v2, &["--strategy", "rolling"])
        .await?;
    let events = baton.wait_for_end(next, LONG).await?;
    ensure!(
        status(&events) == Status::Succeeded,
        "{:?}",
        fold(&events).terminal_reason
    );
    Ok(())
}

async fn a_release_whose_health_checker_is_gone_ends_at_its_deadline_and_frees_the_lock(
) -> Result<()> {
    let mut baton = Baton::start_with("deadline", &["web"], 1, &[]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &["web".into()], |_| {
            "strategy: rolling\nanalysis: {duration: 2s, interval: 1s}\ndeadline_margin: 3s".into()
        }))
        .await?;
    let before = baton.image_of("web").await?;
    baton.agent("health-checker")?.process.kill9().await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let orphan = baton.release_of("web", &v2, &[]).await?;
    let events = baton.wait_for_end(orphan, LONG).await?;
    let state = fold(&events);
    ensure!(
        state.terminal == Some(ReleaseFailed),
        "ended {:?}: {:?}",
        state.terminal,
        state.terminal_reason
    );
    let reason = state.terminal_reason.clone().unwrap_or_default();
    ensure!(
        reason.contains("deadline") && reason.contains("analysis of step 0"),
        "the reason does not say what it waited for: {reason}"
    );
    ensure!(
        events.iter().any(|e| e.event_type == RollbackCompleted),
        "the changed cluster was not rolled back first"
    );
    ensure!(baton.image_of("web").await? == before, "not restored");
    // The lock is free: with a health-checker again, the next release goes through.
    baton.restart_agent("health-checker").await?;
    let (v3, _) = baton.push("v3", &[]).await?;
    let next = baton.release_of("web", &v3, &[]).await?;
    let events = baton.wait_for_end(next, LONG).await?;
    ensure!(
        status(&events) == Status::Succeeded,
        "{:?}",
        fold(&events).terminal_reason
    );
    ensure!(
        !events.iter().any(|e| e.event_type == ReleaseQueued),
        "the next release waited for a lock"
    );
    Ok(())
}

async fn a_stalled_deployer_writes_nothing_after_an_abort() -> Result<()> {
    // The deployer stalls for 4 s before each write, as a stopped process would.
    let mut baton =
        Baton::start_with("fence", &["web"], 1, &[("BATON_FAULT_WRITE_DELAY", "4s")]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &["web".into()], |_| {
            "strategy: rolling\nanalysis: {duration: 1s, interval: 1s}".into()
        }))
        .await?;
    let client = baton.cluster.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client, &baton.ns.name);
    let before = deployments.get("web").await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let rid = baton.release_of("web", &v2, &[]).await?;
    baton.wait_for_event(rid, DeployStepStarted, LONG).await?;
    baton.agent("deployer")?.process.signal(Signal::SIGSTOP)?;
    let out = baton
        .baton(&["abort", &rid.to_string(), "--reason", "wrong build"])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = baton.wait_for_end(rid, LONG).await?;
    ensure!(
        fold(&events).terminal.is_some(),
        "the aborted release did not end"
    );
    baton.agent("deployer")?.process.signal(Signal::SIGCONT)?;
    // The deployer wakes, reaches its write, and finds the fence closed.
    let deployer = baton.agent("deployer")?;
    baton_tests::eventually("the deployer to meet the fence", LONG, || {
        let tail = deployer.process.log_tail(200);
        async move { Ok(tail.contains("fenced: writing nothing").then_some(())) }
    })
    .await?;
    let after = deployments.get("web").await?;
    ensure!(
        after.spec.template == before.spec.template,
        "the Deployment's template changed: {:?}",
        after.spec.template
    );
    ensure!(
        after.metadata.generation == before.metadata.generation,
        "the Deployment was written ({:?} → {:?})",
        before.metadata.generation,
        after.metadata.generation
    );
    Ok(())
}

async fn every_agent_stops_in_order_after_sigterm_with_the_broker_gone() -> Result<()> {
    let mut baton =
        Baton::start_with("grace", &["web"], 1, &[("BATON_SHUTDOWN_GRACE", "5s")]).await?;
    baton.bus.sandbox.nats().kill9().await?;
    let signalled = std::time::Instant::now();
    for agent in &mut baton.agents {
        agent.process.signal(Signal::SIGTERM)?;
    }
    for agent in &mut baton.agents {
        // LONG only tells a hung agent from one that stops: how soon it stops is a figure for
        // the benchmarks, printed here, not asserted.
        let status = agent.process.wait_exit(LONG).await;
        println!(
            "{} had stopped {:.1}s after SIGTERM (grace 5s)",
            agent.name,
            signalled.elapsed().as_secs_f64()
        );
        let log = std::fs::read_to_string(agent.process.log_path()).unwrap_or_default();
        ensure!(
            status.is_some_and(|s| s.success()) && log.contains("stopped"),
            "{} did not stop in order after SIGTERM with the broker gone ({status:?}):\n{}",
            agent.name,
            agent.process.log_tail(30)
        );
    }
    Ok(())
}

async fn a_release_flooded_with_commands_is_refused_and_ended_and_restored() -> Result<()> {
    use baton_core::event::Event as E;
    use baton_core::ids::EventKey;
    use baton_core::subject::EventSubject;
    use baton_proto::v1::{envelope::Payload, ReleasePauseRequested};
    let baton = Baton::start_with("flood", &["web"], 1, &[]).await?;
    baton
        .apply_config(&fleet_config(&baton.ns.name, &["web".into()], |_| {
            "strategy: canary\nanalysis: {duration: 1s, interval: 1s}\ncanary:\n  steps:\n    - {weight: 50, pause: until-promoted}\n    - {weight: 100}".into()
        }))
        .await?;
    let before = baton.image_of("web").await?;
    let (v2, _) = baton.push("v2", &[]).await?;
    let rid = baton.release_of("web", &v2, &[]).await?;
    baton.wait_for_event(rid, ReleasePaused, LONG).await?;
    // More commands than a release may have events, as a runaway script would send them.
    let cli = baton.bus.bus("cli").await?;
    let subject = EventSubject::new(
        "test".parse()?,
        "web".parse()?,
        rid,
        EventType::ReleasePauseRequested,
    );
    for i in 0..baton_core::bus::MAX_EVENTS_PER_RELEASE {
        let event = E::new(
            rid,
            EventKey::Named(&format!("flood-{i}")),
            Payload::ReleasePauseRequested(ReleasePauseRequested::default()),
            cli.source(),
            "runaway",
            "",
        );
        cli.publish(&subject, &event).await?;
    }
    // The trigger past the bound is refused, the release fails with the reason and is rolled
    // back (the agents read only its first events for that): the canary is gone.
    let state = baton_tests::eventually("the flooded release to end", LONG, || {
        let cli = cli.clone();
        async move {
            let (events, _) = cli.release_history_head(rid, 5000).await?;
            let state = fold(&events);
            let told: Vec<String> = events
                .iter()
                .filter(|e| e.event_type != ReleasePauseRequested)
                .map(|e| format!("{} {:?}", e.event_type, e.payload()))
                .collect();
            Ok(state.terminal.is_some().then_some((state, told)))
        }
    })
    .await?;
    let (state, told) = state;
    let reason = state.terminal_reason.clone().unwrap_or_default();
    ensure!(
        state.terminal == Some(ReleaseRolledBack) && reason.contains("more than the 1000"),
        "ended {:?}: {reason}\n{}",
        state.terminal,
        told.join("\n")
    );
    ensure!(
        baton.image_of("web").await? == before,
        "the stable Deployment changed"
    );
    let client = baton.cluster.client().await?;
    let canary = Api::<Deployment>::namespaced(client, &baton.ns.name)
        .get_opt("web-canary")
        .await?;
    ensure!(canary.is_none(), "the canary was left behind");
    Ok(())
}
