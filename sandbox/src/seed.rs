//! `baton-sandbox seed-history`: writes the history of many ended releases of one app into the
//! event stream, quickly, for benchmarks that measure how the agents' cost grows with history.
//! Each release is the whole story of a healthy rolling release, its end first, so that an agent
//! that sees any of its events already finds it ended and leaves it alone.

use anyhow::Context;
use baton_core::bus::{Bus, InitialConnect, NatsArgs, Source};
use baton_core::event::Event;
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::{envelope::Payload, *};

/// Publishes `count` ended releases of `app` in `env` (namespace `namespace`).
pub async fn seed(
    nats: &NatsArgs,
    env: &str,
    app: &str,
    namespace: &str,
    count: usize,
) -> anyhow::Result<()> {
    let env_name: EnvName = env.parse().context("--env")?;
    let app_name: AppName = app.parse().context("--app")?;
    let source = Source {
        agent: "seed".into(),
        cluster: "sandbox".into(),
        instance: "seed".into(),
    };
    let bus = Bus::connect(nats, "admin", source.clone(), InitialConnect::FailFast).await?;
    let image = format!("seed/{app}@sha256:{}", "0".repeat(64));
    for i in 0..count {
        let rid = ReleaseId::generate();
        let spec = ReleaseSpec {
            app: app.into(),
            env: env.into(),
            cluster: "sandbox".into(),
            namespace: namespace.into(),
            image: image.clone(),
            container: "app".into(),
            strategy: Strategy::Rolling as i32,
            rollback_on_failure: true,
            ..Default::default()
        };
        let story: Vec<(EventKey<'_>, Payload)> = vec![
            (
                EventKey::Once,
                Payload::ReleaseSucceeded(ReleaseSucceeded {
                    image_ref: image.clone(),
                }),
            ),
            (
                EventKey::Once,
                Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
            ),
            (
                EventKey::Once,
                Payload::BuildStarted(BuildStarted::default()),
            ),
            (
                EventKey::Once,
                Payload::BuildSucceeded(BuildSucceeded {
                    image_ref: image.clone(),
                    ..Default::default()
                }),
            ),
            (
                EventKey::Once,
                Payload::DeployStarted(DeployStarted {
                    strategy: Strategy::Rolling as i32,
                    previous_revision: (i + 1).to_string(),
                    workload: app.into(),
                    replicas: 1,
                    ..Default::default()
                }),
            ),
            (
                EventKey::Step(0),
                Payload::DeployStepStarted(DeployStepStarted {
                    step: 0,
                    weight: 100,
                    ..Default::default()
                }),
            ),
            (
                EventKey::Step(0),
                Payload::DeployStepReady(DeployStepReady {
                    step: 0,
                    weight: 100,
                    pods: Vec::new(),
                }),
            ),
            (
                EventKey::Step(0),
                Payload::AnalysisPassed(AnalysisPassed {
                    step: 0,
                    measurements: Vec::new(),
                }),
            ),
            (
                EventKey::Once,
                Payload::DeployCompleted(DeployCompleted {
                    revision: (i + 2).to_string(),
                    image_ref: image.clone(),
                }),
            ),
        ];
        for (key, payload) in story {
            let event = Event::new(rid, key, payload, source.clone(), "seed", "");
            let subject =
                EventSubject::new(env_name.clone(), app_name.clone(), rid, event.event_type);
            bus.publish(&subject, &event).await?;
        }
    }
    Ok(())
}
