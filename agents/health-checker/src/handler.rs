//! The reaction to `deploy.step_ready`: decide from the release's history whether the step is
//! still to be judged, announce `analysis.started`, run the rounds of checks on the new pods, and
//! publish `analysis.passed` or `analysis.failed` with the measurements. Every event is keyed by
//! the step, so a re-run after a crash publishes nothing twice.

use std::collections::HashMap;

use baton_core::ids::EventKey;
use baton_core::runtime::{AgentContext, Delivery, Handled, Handler, HandlerError};
use baton_proto::v1::{
    envelope::Payload, AnalysisFailed, AnalysisInconclusive, AnalysisPassed, AnalysisStarted,
    Measurement,
};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use crate::analysis::{
    self, latency_measurements, CheckKind, Decision, MetricSource, Plan, PodTarget, ReleaseContext,
    Series, Tally, Verdict,
};
use crate::checks::{self, Checker};

/// Checks of one round in flight at once (each a pod and a check, or a smoke test).
const ROUND_CONCURRENCY: usize = 16;

/// The health-checker's handler.
pub struct HealthChecker {
    checker: Checker,
}

impl HealthChecker {
    pub fn new(checker: Checker) -> HealthChecker {
        HealthChecker { checker }
    }
}

impl Handler for HealthChecker {
    fn handle<'a>(
        &'a self,
        ctx: &'a AgentContext,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<Handled, HandlerError>> {
        Box::pin(async move {
            self.on_step_ready(ctx, delivery).await?;
            Ok(Handled::Done)
        })
    }

    /// A step to judge was dead-lettered (e.g. its analysis can't run as specified): the step
    /// fails its analysis with the reason, so the release is rolled back instead of waiting.
    fn on_dead_letter<'a>(
        &'a self,
        ctx: &'a AgentContext,
        d: &'a Delivery,
        _category: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(Payload::DeployStepReady(ready)) = d.event.payload() else {
                return;
            };
            let step = ready.step;
            match ctx.release_state_bounded(d.subject.release_id).await {
                Ok((_, state))
                    if matches!(
                        analysis::decide(&state, step, &ctx.cluster),
                        Decision::Analyse
                    ) =>
                {
                    let failed = AnalysisFailed {
                        step,
                        measurements: Vec::new(),
                        reason: format!(
                            "the health-checker could not analyse step {step} ({reason})"
                        ),
                    };
                    if let Err(e) = ctx
                        .emit(d, EventKey::Step(step), Payload::AnalysisFailed(failed))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot fail the analysis of a dead-lettered step");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the release to fail its analysis")
                }
            }
        })
    }
}

/// A metric check's reading of one round: its name, its plan, and the series or why none.
type MetricReading<'r> = (
    &'r str,
    &'r analysis::MetricPlan,
    Result<Vec<Series>, String>,
);

/// One analysis: what to check, on which pods.
struct Run<'a> {
    step: u32,
    plan: &'a Plan,
    pods: &'a [PodTarget],
    namespace: &'a str,
    step_began_ms: Option<i64>,
    smoke_env: Vec<(String, String)>,
    /// The variables of metric queries and the body of webhooks.
    context: ReleaseContext,
}

impl HealthChecker {
    async fn on_step_ready(
        &self,
        ctx: &AgentContext,
        delivery: Delivery,
    ) -> Result<(), HandlerError> {
        let ready = match delivery.event.payload() {
            Some(Payload::DeployStepReady(r)) => r.clone(),
            _ => {
                return Err(HandlerError::permanent(
                    "invalid",
                    format!(
                        "the health-checker reacts to deploy.step_ready, not {}",
                        delivery.event.event_type
                    ),
                ))
            }
        };
        let step = ready.step;
        let release_id = delivery.event.release_id;
        let (_, state) = ctx.release_state(release_id).await?;
        if let Decision::Skip(why) = analysis::decide(&state, step, &ctx.cluster) {
            tracing::info!(step, %why, "no analysis");
            return Ok(());
        }
        let Some(spec) = state.spec.as_ref() else {
            return Ok(());
        };
        // The checks' URLs and smoke commands come from the configuration the release names.
        ctx.check_spec(spec).await?;
        let plan = analysis::plan(&analysis::for_step(spec, step))
            .map_err(|e| HandlerError::permanent("invalid", e))?;
        for check in &plan.checks {
            let url = match &check.kind {
                CheckKind::Http(h) => h.url.as_deref(),
                CheckKind::Metric(m) => Some(m.target()),
                _ => None,
            };
            if let Some(url) = url {
                checks::parse_url(url).map_err(|e| {
                    HandlerError::permanent("invalid", format!("check {}: url {e}", check.name))
                })?;
            }
        }
        let pods =
            analysis::pod_targets(&ready).map_err(|e| HandlerError::permanent("invalid", e))?;
        let smoke_env = vec![
            ("BATON_RELEASE_ID".to_owned(), release_id.to_string()),
            ("BATON_APP".to_owned(), spec.app.clone()),
            ("BATON_ENV".to_owned(), spec.env.clone()),
            ("BATON_NAMESPACE".to_owned(), spec.namespace.clone()),
            ("BATON_STEP".to_owned(), step.to_string()),
            (
                "BATON_POD_IPS".to_owned(),
                pods.iter()
                    .map(|p| p.ip.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "BATON_POD_NAMES".to_owned(),
                pods.iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        let context = ReleaseContext::new(
            spec,
            &release_id.to_string(),
            step,
            &pods,
            plan.settings.interval,
        );
        let run = Run {
            step,
            plan: &plan,
            pods: &pods,
            namespace: &spec.namespace,
            step_began_ms: analysis::step_began_ms(&state, step),
            smoke_env,
            context,
        };

        ctx.emit(
            &delivery,
            EventKey::Step(step),
            Payload::AnalysisStarted(AnalysisStarted {
                step,
                checks: plan.check_names(),
            }),
        )
        .await?;
        tracing::info!(
            step,
            pods = pods.len(),
            checks = plan.checks.len() + 1,
            rounds = plan.settings.rounds(),
            "analysis started"
        );
        let verdict = self.analyse(ctx, &run).await?;

        // Another instance may have judged the step meanwhile (a redelivery racing this run):
        // one verdict per step.
        let (_, state) = ctx.release_state(release_id).await?;
        if state.analyses_passed.contains(&step)
            || state.analyses_failed.contains(&step)
            || state.analyses_inconclusive.contains(&step)
        {
            tracing::info!(
                step,
                "the step was judged meanwhile; publishing no second verdict"
            );
            return Ok(());
        }
        match verdict {
            Verdict::Passed { measurements } => {
                tracing::info!(step, measurements = measurements.len(), "analysis passed");
                ctx.emit(
                    &delivery,
                    EventKey::Step(step),
                    Payload::AnalysisPassed(AnalysisPassed { step, measurements }),
                )
                .await?;
            }
            Verdict::Failed {
                measurements,
                reason,
            } => {
                tracing::warn!(step, %reason, "analysis failed");
                ctx.emit(
                    &delivery,
                    EventKey::Step(step),
                    Payload::AnalysisFailed(AnalysisFailed {
                        step,
                        measurements,
                        reason,
                    }),
                )
                .await?;
            }
            Verdict::Inconclusive { reason } => {
                return Err(HandlerError::retry(
                    "inconclusive",
                    format!("analysis of step {step} is inconclusive: {reason}"),
                ));
            }
            Verdict::Undecided {
                measurements,
                reason,
            } => {
                tracing::warn!(step, %reason, "analysis inconclusive; the release holds for a person");
                ctx.emit(
                    &delivery,
                    EventKey::Step(step),
                    Payload::AnalysisInconclusive(AnalysisInconclusive {
                        step,
                        measurements,
                        reason,
                    }),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Runs the rounds, every interval from the start, until the duration is over or more rounds
    /// failed than the limit allows. Shutdown stops it at once; the step is analysed again
    /// after redelivery.
    async fn analyse(&self, ctx: &AgentContext, run: &Run<'_>) -> Result<Verdict, HandlerError> {
        let settings = run.plan.settings;
        let mut tally = Tally::new(settings);
        let mut baselines = HashMap::new();
        // Consecutive errors of each metric check, across rounds.
        let mut metric_errors: HashMap<String, u32> = HashMap::new();
        let start = tokio::time::Instant::now();
        let stopped = || {
            HandlerError::retry(
                "shutdown",
                format!(
                    "shutting down during the analysis of step {}; it will run again",
                    run.step
                ),
            )
        };
        for round in 0..tally.total_rounds() {
            let due = start + settings.interval.saturating_mul(round);
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Err(stopped()),
                _ = tokio::time::sleep_until(due) => {}
            }
            let (mut measurements, cluster_error, readings) = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Err(stopped()),
                r = self.round(run, &mut baselines) => r,
            };
            let mut inconclusive = None;
            for (check, plan, reading) in readings {
                let errors = metric_errors.entry(check.to_owned()).or_default();
                let (ms, stop) = analysis::metric_measurements(check, plan, &reading, errors);
                measurements.extend(ms);
                inconclusive = inconclusive.or(stop);
            }
            if let Some(reason) = inconclusive {
                tracing::warn!(step = run.step, %reason, "a metric check is inconclusive; no verdict");
                tally.record(measurements, cluster_error);
                return Ok(tally.undecided(run.step, reason));
            }
            let outcome = tally.record(measurements, cluster_error);
            tracing::debug!(step = run.step, round = round + 1, ?outcome, "round done");
            if tally.exceeded() {
                break;
            }
        }
        Ok(tally.verdict(run.step))
    }

    /// One round: every check on every pod (and URL), and the pods as the cluster has them.
    /// Metric checks come back as readings, judged by the caller (who counts their errors).
    async fn round<'r>(
        &self,
        run: &'r Run<'_>,
        baselines: &mut HashMap<String, u32>,
    ) -> (Vec<Measurement>, Option<String>, Vec<MetricReading<'r>>) {
        let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
        let mut tasks: Vec<BoxFuture<'_, Vec<Measurement>>> = Vec::new();
        let mut metrics: Vec<BoxFuture<'_, MetricReading<'r>>> = Vec::new();
        for check in &run.plan.checks {
            let name = check.name.as_str();
            match &check.kind {
                CheckKind::Http(h) => {
                    let mut targets: Vec<(String, String)> = run
                        .pods
                        .iter()
                        .map(|p| (p.label(), p.url(h.port, &h.path)))
                        .collect();
                    if let Some(url) = &h.url {
                        targets.push((url.clone(), url.clone()));
                    }
                    for (target, url) in targets {
                        tasks.push(
                            async move {
                                let attempts = self.checker.http(h, &url).await;
                                vec![analysis::http_measurement(name, target, h, &attempts)]
                            }
                            .boxed(),
                        );
                    }
                }
                CheckKind::Latency(l) => {
                    for pod in run.pods {
                        tasks.push(
                            async move {
                                let samples =
                                    self.checker.latency(l, &pod.url(l.port, &l.path)).await;
                                latency_measurements(name, &pod.label(), l, &samples).to_vec()
                            }
                            .boxed(),
                        );
                    }
                }
                CheckKind::Metric(m) => {
                    let context = &run.context;
                    metrics.push(
                        async move {
                            let reading = match &m.source {
                                MetricSource::Prometheus { address, query } => {
                                    let query = context.query(query);
                                    self.checker.prometheus(address, &query, m.timeout).await
                                }
                                MetricSource::Webhook { url, field } => {
                                    let body = context.webhook_body(name);
                                    self.checker.webhook(url, field, &body, m.timeout).await
                                }
                            };
                            (name, m, reading)
                        }
                        .boxed(),
                    );
                }
                CheckKind::Smoke(s) => {
                    let env = &run.smoke_env;
                    tasks.push(
                        async move {
                            let outcome = self.checker.smoke(s, env).await;
                            vec![analysis::smoke_measurement(name, s, &outcome)]
                        }
                        .boxed(),
                    );
                }
            }
        }
        let checks = futures::stream::iter(tasks)
            .buffered(ROUND_CONCURRENCY)
            .collect::<Vec<_>>();
        let readings = futures::future::join_all(metrics);
        let (observed, results, readings) =
            tokio::join!(self.checker.pods(run.namespace, &names), checks, readings);
        let mut measurements = Vec::new();
        let cluster_error = match observed {
            Ok(observed) => {
                for pod in run.pods {
                    let seen = observed.get(&pod.name);
                    measurements.push(analysis::pod_measurement(
                        pod,
                        seen,
                        run.step_began_ms,
                        baselines.get(&pod.name).copied(),
                    ));
                    if let Some(seen) = seen {
                        baselines.entry(pod.name.clone()).or_insert(seen.restarts);
                    }
                }
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pods this round");
                Some(e.to_string())
            }
        };
        measurements.extend(results.into_iter().flatten());
        (measurements, cluster_error, readings)
    }
}
