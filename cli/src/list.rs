//! `baton list`: the releases in flight, from the workloads' locks and queues (what is open,
//! never a scan of the history), each with where it is and what it waits for.

use anyhow::Context;
use baton_core::bus::NatsArgs;
use baton_core::control::Progress;
use baton_core::lock;

use crate::progress::Wording;
use crate::release::{now_ms, progress_line};
use crate::Output;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this environment
    #[arg(long)]
    pub env: Option<String>,
    /// Only this app
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn list(nats: &NatsArgs, args: ListArgs) -> anyhow::Result<()> {
    let bus = crate::connect_reader(nats).await?;
    let open = lock::open_releases(&bus)
        .await
        .context("reading the open releases")?;
    let now = now_ms();
    let mut rows = Vec::new();
    for rid in open {
        let (events, _) = bus
            .release_history_head(rid, baton_core::bus::MAX_EVENTS_PER_RELEASE)
            .await?;
        let progress = Progress::of(rid, &events);
        let state = &progress.state;
        if state.status().is_terminal() {
            continue;
        }
        let Some(spec) = state.spec.as_ref() else {
            continue;
        };
        if args.env.as_ref().is_some_and(|e| *e != spec.env)
            || args.app.as_ref().is_some_and(|a| *a != spec.app)
        {
            continue;
        }
        let since = state.requested_at_ms.unwrap_or(now);
        rows.push((since, rid, spec.clone(), progress));
    }
    rows.sort_by_key(|(since, ..)| *since);
    match args.output {
        Output::Json => {
            let all: Vec<serde_json::Value> = rows
                .iter()
                .map(|(since, rid, spec, p)| {
                    serde_json::json!({
                        "release_id": rid.to_string(),
                        "app": spec.app, "env": spec.env, "image": spec.image,
                        "status": p.status().name(),
                        "step": p.state.current_step(), "weight": p.state.current_weight(),
                        "waiting_for": p.waiting_for(now),
                        "age_seconds": (now - since) / 1000,
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(all));
        }
        Output::Text if rows.is_empty() => println!("no release in flight"),
        Output::Text => {
            println!(
                "{:<36}  {:<16} {:<12} {:>7}  WHERE",
                "RELEASE", "APP", "ENV", "AGE"
            );
            for (since, rid, spec, p) in &rows {
                println!(
                    "{:<36}  {:<16} {:<12} {:>6}s  {}",
                    rid.to_string(),
                    spec.app,
                    spec.env,
                    (now - since) / 1000,
                    progress_line(p, now)
                );
            }
        }
    }
    Ok(())
}
