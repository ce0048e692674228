//! The observations of an analysis: HTTP requests straight to the new pods' IPs (and to a check's
//! URL), a smoke test's argv run without a shell, and a read of the pods from the cluster. Each
//! has a timeout; what the observations mean is decided in [`crate::analysis`].

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::analysis::{
    HttpAttempt, HttpPlan, LatencyPlan, PodObservation, Sample, Series, SmokePlan, SmokeRun,
};
use crate::error::{Error, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const LIST_PODS_TIMEOUT: Duration = Duration::from_secs(10);
/// Up to this many pods are read one by one (by name); more are listed at once.
const PODS_READ_BY_NAME: usize = 16;
/// How much of a response body is read to look for the expected text.
const MAX_BODY: usize = 64 * 1024;
/// How much of a smoke test's output is kept for the measurement.
const OUTPUT_TAIL: usize = 512;
/// Requests of a latency check in flight at once, per pod.
const LATENCY_CONCURRENCY: usize = 4;
/// How long a finished smoke test's output may stay open (held by what it left running).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// What the analysis talks to: the pods over HTTP, and the cluster.
#[derive(Clone)]
pub struct Checker {
    http: reqwest::Client,
    kube: kube::Client,
}

impl Checker {
    pub fn new(kube: kube::Client) -> Result<Checker> {
        baton_core::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(crate::analysis::MAX_REQUEST_TIMEOUT)
            // A health endpoint that redirects is not answering for itself.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("baton-health-checker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::HttpClient)?;
        Ok(Checker { http, kube })
    }

    /// An HTTP check on one URL: up to `attempts` tries, `retry_interval` apart, until one gets
    /// the expected answer.
    pub async fn http(&self, plan: &HttpPlan, url: &str) -> Vec<HttpAttempt> {
        let mut attempts = Vec::with_capacity(plan.attempts as usize);
        for i in 0..plan.attempts.max(1) {
            if i > 0 {
                tokio::time::sleep(plan.retry_interval).await;
            }
            let attempt = self
                .get(url, plan.timeout, plan.body_contains.as_deref())
                .await;
            let passed = attempt.error.is_none()
                && attempt.status == Some(plan.expect_status)
                && attempt.body_matched;
            attempts.push(attempt);
            if passed {
                break;
            }
        }
        attempts
    }

    /// A latency check on one URL: `requests` requests, a few at a time, each timed.
    pub async fn latency(&self, plan: &LatencyPlan, url: &str) -> Vec<Sample> {
        use futures::StreamExt;
        futures::stream::iter(0..plan.requests)
            .map(|_| async move {
                let a = self.get(url, plan.timeout, None).await;
                Sample {
                    elapsed_ms: a.elapsed_ms,
                    ok: a.error.is_none() && a.status.is_some_and(|s| (200..300).contains(&s)),
                }
            })
            .buffer_unordered(LATENCY_CONCURRENCY)
            .collect()
            .await
    }

    async fn get(&self, url: &str, timeout: Duration, body_contains: Option<&str>) -> HttpAttempt {
        let started = Instant::now();
        let elapsed = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;
        let request = self.http.get(url).timeout(timeout).send();
        // The client's timeout covers the body too; this one is the backstop for all of it.
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), async {
            let response = request.await?;
            let status = response.status().as_u16();
            let body_matched = match body_contains {
                None => true,
                Some(text) => read_body(response).await?.contains(text),
            };
            Ok::<_, reqwest::Error>((status, body_matched))
        })
        .await;
        match result {
            Ok(Ok((status, body_matched))) => HttpAttempt {
                status: Some(status),
                body_matched,
                elapsed_ms: elapsed(started),
                error: None,
            },
            Ok(Err(e)) => HttpAttempt {
                status: None,
                body_matched: false,
                elapsed_ms: elapsed(started),
                error: Some(describe(&e, timeout)),
            },
            Err(_) => HttpAttempt {
                status: None,
                body_matched: false,
                elapsed_ms: elapsed(started),
                error: Some(format!("no answer within {} ms", timeout.as_millis())),
            },
        }
    }

    /// Runs a smoke test: the argv as is (no shell), stdin closed, in a process group of its own
    /// that is killed when the timeout passes, with an environment of only `PATH` and `env`.
    pub async fn smoke(&self, plan: &SmokePlan, env: &[(String, String)]) -> SmokeRun {
        let Some((program, args)) = plan.argv.split_first() else {
            return SmokeRun::NotStarted("empty argv".into());
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => return SmokeRun::NotStarted(format!("{program}: {e}")),
        };
        let pid = child.id();
        let stdout = tokio::spawn(tail(child.stdout.take()));
        let stderr = tokio::spawn(tail(child.stderr.take()));
        let status = match tokio::time::timeout(plan.timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                kill_group(pid);
                return SmokeRun::NotStarted(format!("waiting for {program}: {e}"));
            }
            Err(_) => {
                kill_group(pid);
                let _ = child.kill().await;
                return SmokeRun::TimedOut {
                    after_ms: u64::try_from(plan.timeout.as_millis()).unwrap_or(u64::MAX),
                };
            }
        };
        // What it left running in the background may hold its output open: give the output a
        // moment, then end the leftovers.
        let outputs = async { (stdout.await, stderr.await) };
        tokio::pin!(outputs);
        let (out, err) = match tokio::time::timeout(OUTPUT_GRACE, &mut outputs).await {
            Ok(o) => o,
            Err(_) => {
                kill_group(pid);
                match tokio::time::timeout(OUTPUT_GRACE, &mut outputs).await {
                    Ok(o) => o,
                    Err(_) => (Ok(Vec::new()), Ok(Vec::new())),
                }
            }
        };
        let (out, err) = (out.unwrap_or_default(), err.unwrap_or_default());
        let mut output = String::from_utf8_lossy(&err).into_owned();
        if output.trim().is_empty() {
            output = String::from_utf8_lossy(&out).into_owned();
        }
        let keep = output.len().saturating_sub(OUTPUT_TAIL);
        let start = (keep..=output.len())
            .find(|i| output.is_char_boundary(*i))
            .unwrap_or(0);
        SmokeRun::Exited {
            code: status.code(),
            output: output[start..].to_owned(),
        }
    }

    /// An instant query to a Prometheus server's HTTP API (`GET /api/v1/query`): the series of
    /// its result (a vector, or a scalar as one series), or why there are none.
    pub async fn prometheus(
        &self,
        address: &str,
        query: &str,
        timeout: Duration,
    ) -> std::result::Result<Vec<Series>, String> {
        let mut url = reqwest::Url::parse(&format!("{address}/api/v1/query"))
            .map_err(|e| format!("{address:?}: {e}"))?;
        url.query_pairs_mut().append_pair("query", query);
        let request = self.http.get(url).timeout(timeout);
        let body = self.answer(request, timeout).await?;
        prometheus_series(&body)
    }

    /// A POST of `context` as JSON to a webhook; the number at `field` in its JSON answer.
    pub async fn webhook(
        &self,
        url: &str,
        field: &[String],
        context: &serde_json::Value,
        timeout: Duration,
    ) -> std::result::Result<Vec<Series>, String> {
        let request = self.http.post(url).json(context).timeout(timeout);
        let body = self.answer(request, timeout).await?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("the answer is not JSON: {e}"))?;
        let value = json_number(&answer, field)?;
        Ok(vec![(String::new(), value)])
    }

    /// The body of a 2xx answer, or why there is none.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> std::result::Result<String, String> {
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), async {
            let response = request.send().await?;
            let status = response.status();
            let body = read_body(response).await?;
            Ok::<_, reqwest::Error>((status, body))
        })
        .await;
        match result {
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            Ok(Err(e)) => Err(describe(&e, timeout)),
            Ok(Ok((status, body))) if !status.is_success() => {
                let body = body.trim();
                let excerpt: String = body.chars().take(200).collect();
                Err(format!("status {}: {excerpt}", status.as_u16()))
            }
            Ok(Ok((_, body))) => Ok(body),
        }
    }

    /// The named pods of `namespace` as the cluster has them (absent when gone).
    pub async fn pods(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<HashMap<String, PodObservation>> {
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), namespace);
        let err = |message: String| Error::ListPods {
            namespace: namespace.to_owned(),
            message,
        };
        let timeout = || err(format!("no answer within {}s", LIST_PODS_TIMEOUT.as_secs()));
        // A few pods are read by name: the cost of a round follows the step's pods, not the
        // namespace's (a thousand apps in one namespace, each analysed every second, would
        // otherwise list every pod of the namespace a thousand times a second). Many pods are
        // listed once, from the API server's cache.
        if names.len() <= PODS_READ_BY_NAME {
            let reads = futures::future::join_all(names.iter().map(|name| api.get_opt(name)));
            let pods = tokio::time::timeout(LIST_PODS_TIMEOUT, reads)
                .await
                .map_err(|_| timeout())?;
            let mut observed = HashMap::new();
            for (name, pod) in names.iter().zip(pods) {
                if let Some(pod) = pod.map_err(|e| err(e.to_string()))? {
                    observed.insert(name.clone(), observe(&pod));
                }
            }
            return Ok(observed);
        }
        let list = tokio::time::timeout(
            LIST_PODS_TIMEOUT,
            api.list(&ListParams::default().match_any()),
        )
        .await
        .map_err(|_| timeout())?
        .map_err(|e| err(e.to_string()))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|pod| {
                let name = pod.metadata.name.clone()?;
                names.contains(&name).then(|| (name, observe(&pod)))
            })
            .collect())
    }
}

/// Kills a timed-out smoke test with everything it started (its process group).
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if let Err(e) = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        tracing::debug!(pid, error = %e, "killing the smoke test's process group");
    }
}

/// Reads a stream to its end, keeping only its last bytes.
async fn tail<R: AsyncRead + Unpin>(reader: Option<R>) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > OUTPUT_TAIL * 2 {
                    kept.drain(..kept.len() - OUTPUT_TAIL);
                }
            }
        }
    }
    kept
}

async fn read_body(mut response: reqwest::Response) -> std::result::Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_BODY {
            body.truncate(MAX_BODY);
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {} ms", timeout.as_millis());
    }
    if e.is_connect() {
        return format!("cannot connect: {}", root_cause(e));
    }
    root_cause(e)
}

/// The innermost error: reqwest's own message says little ("error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// What the analysis needs of a pod.
fn observe(pod: &Pod) -> PodObservation {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .collect::<Vec<_>>();
    let restarts = containers
        .iter()
        .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
        .fold(0u32, u32::saturating_add);
    let last_termination_ms = containers
        .iter()
        .filter_map(|c| {
            c.last_state
                .as_ref()?
                .terminated
                .as_ref()?
                .finished_at
                .as_ref()
        })
        .map(|t| t.0.as_millisecond())
        .max();
    let waiting = containers
        .iter()
        .filter_map(|c| {
            let reason = c.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
            Some((c.name.clone(), reason))
        })
        .collect();
    PodObservation {
        ip: status.and_then(|s| s.pod_ip.clone()),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        restarts,
        created_ms: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond()),
        last_termination_ms,
        waiting,
    }
}

/// The series of a Prometheus query's answer (its HTTP API's JSON).
pub fn prometheus_series(body: &str) -> std::result::Result<Vec<Series>, String> {
    use serde_json::Value;
    let answer: Value =
        serde_json::from_str(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if answer["status"] != "success" {
        return Err(format!(
            "the query failed: {} {}",
            answer["errorType"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or("(no message)")
        ));
    }
    let sample = |v: &Value| -> std::result::Result<f64, String> {
        // [ <unix time>, "<value>" ]; Prometheus writes NaN and ±Inf as text too.
        let text = v
            .get(1)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a sample is not [time, \"value\"]: {v}"))?;
        match text {
            "NaN" => Ok(f64::NAN),
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            t => t.parse().map_err(|_| format!("{t:?} is not a number")),
        }
    };
    let data = &answer["data"];
    match data["resultType"].as_str() {
        Some("scalar") => Ok(vec![(String::new(), sample(&data["result"])?)]),
        Some("vector") => data["result"]
            .as_array()
            .ok_or_else(|| "the vector has no result list".to_owned())?
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .map(|m| {
                        let inner: Vec<String> =
                            m.iter().map(|(k, v)| format!("{k}={}", v)).collect();
                        format!("{{{}}}", inner.join(","))
                    })
                    .unwrap_or_default();
                Ok((labels, sample(&series["value"])?))
            })
            .collect(),
        Some(other) => Err(format!(
            "the result is a {other}: write an instant query whose result is a vector or a scalar"
        )),
        None => Err("the answer has no resultType".into()),
    }
}

/// The number at `path` in `answer` (objects by key, arrays by index); `true` and `false` count
/// as 1 and 0, and a string holding a number as that number.
pub fn json_number(
    answer: &serde_json::Value,
    path: &[String],
) -> std::result::Result<f64, String> {
    use serde_json::Value;
    let mut at = answer;
    for (i, part) in path.iter().enumerate() {
        let next = match at {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|n| items.get(n)),
            _ => None,
        };
        at = next.ok_or_else(|| format!("the answer has no field {}", path[..=i].join(".")))?;
    }
    let name = path.join(".");
    match at {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("field {name} is not a number")),
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("field {name} is {s:?}, not a number")),
        other => Err(format!("field {name} is {other}, not a number")),
    }
}

/// Checks that a check's URL parses as the HTTP client will use it.
pub fn parse_url(url: &str) -> std::result::Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} is not an http(s) URL with a host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_answers_become_series() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"pod":"web-1"},"value":[1700000000.1,"0.25"]},
            {"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        let series = prometheus_series(vector).unwrap();
        assert_eq!(series[0], ("{pod=\"web-1\"}".to_owned(), 0.25));
        assert_eq!(series[1].0, "{}");
        assert!(series[1].1.is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
        assert_eq!(
            prometheus_series(scalar).unwrap(),
            vec![(String::new(), 3.0)]
        );
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        assert_eq!(
            prometheus_series(bad).unwrap_err(),
            "the query failed: bad_data parse error at char 3"
        );
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(prometheus_series(matrix)
            .unwrap_err()
            .contains("instant query"));
        assert!(prometheus_series("<html>")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn a_webhook_answer_s_field_is_a_number() {
        let answer =
            serde_json::json!({"result": {"score": 0.97, "ok": true, "n": "12", "list": [5]}});
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(json_number(&answer, &path("result.score")).unwrap(), 0.97);
        assert_eq!(json_number(&answer, &path("result.ok")).unwrap(), 1.0);
        assert_eq!(json_number(&answer, &path("result.n")).unwrap(), 12.0);
        assert_eq!(json_number(&answer, &path("result.list.0")).unwrap(), 5.0);
        assert_eq!(
            json_number(&answer, &path("result.missing")).unwrap_err(),
            "the answer has no field result.missing"
        );
        assert!(json_number(&answer, &path("result"))
            .unwrap_err()
            .contains("not a number"));
    }
}
