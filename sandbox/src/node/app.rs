//! The simulated app: HTTP on each declared port of a running container, answering as its
//! [`Behaviour`] says. One [`Servers`] per container run; a restart gets fresh counters, as a
//! restarted process would.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::behaviour::{Behaviour, Reply};

/// How long in-flight requests get to finish when a container stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

struct AppState {
    behaviour: Behaviour,
    started: Instant,
    image: String,
    /// Requests served, by status code.
    counts: Mutex<BTreeMap<u16, u64>>,
    stop: CancellationToken,
}

/// The HTTP servers of one container run.
pub(crate) struct Servers {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Servers {
    /// Binds every port on `ip` and serves until [`Servers::stop`] (or until `parent` is
    /// cancelled). `started` is the container's start, from which the behaviour's delays count.
    pub(crate) async fn start(
        ip: Ipv4Addr,
        ports: &[u16],
        behaviour: Behaviour,
        image: String,
        started: Instant,
        parent: &CancellationToken,
    ) -> io::Result<Self> {
        let stop = parent.child_token();
        let state = Arc::new(AppState {
            behaviour,
            started,
            image,
            counts: Mutex::new(BTreeMap::new()),
            stop: stop.clone(),
        });
        let mut listeners = Vec::with_capacity(ports.len());
        for &port in ports {
            listeners.push(tokio::net::TcpListener::bind(SocketAddr::from((ip, port))).await?);
        }
        let mut tasks = JoinSet::new();
        for listener in listeners {
            let router = Router::new()
                .fallback(handle)
                .with_state(Arc::clone(&state));
            let shutdown = stop.clone().cancelled_owned();
            tasks.spawn(async move {
                let addr = listener.local_addr().ok();
                if let Err(error) = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::warn!(?addr, %error, "simulated app server failed");
                }
            });
        }
        Ok(Self { stop, tasks })
    }

    /// Stops accepting, lets in-flight requests end (they are cut short), and closes the ports.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::debug!("simulated app servers did not drain in time; aborting them");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Dropping the JoinSet aborts the accept loops; the token ends open connections.
        self.stop.cancel();
    }
}

async fn handle(State(app): State<Arc<AppState>>, uri: Uri) -> Response {
    if !app.behaviour.latency.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(app.behaviour.latency) => {}
            () = app.stop.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    let elapsed = app.started.elapsed();
    let reply = app
        .behaviour
        .route(uri.path(), elapsed, rand::random::<f64>());
    let status = reply.status();
    let body = match reply {
        Reply::Starting => "starting\n".to_string(),
        Reply::Health { ok: true } => "ok".to_string(),
        Reply::Health { ok: false } => "failing\n".to_string(),
        Reply::Version => app.image.clone(),
        Reply::Metrics => render_metrics(&counts(&app)),
        Reply::NotFound => "not found\n".to_string(),
    };
    *counts(&app).entry(status).or_default() += 1;
    let content_type = match reply {
        Reply::Metrics => "text/plain; version=0.0.4; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn counts(app: &AppState) -> std::sync::MutexGuard<'_, BTreeMap<u16, u64>> {
    app.counts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prometheus text exposition of the request counters: one series per status code served so far,
/// and none of a code not served yet — as real client libraries expose only the label values
/// they have seen, so a query over 5xx responses finds no series on a healthy app.
pub(crate) fn render_metrics(counts: &BTreeMap<u16, u64>) -> String {
    let mut out = String::from(
        "# HELP http_requests_total HTTP requests served by the simulated app, by status code.\n\
         # TYPE http_requests_total counter\n",
    );
    for (code, n) in counts {
        out.push_str(&format!("http_requests_total{{code=\"{code}\"}} {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::behaviour::Health;

    #[test]
    fn metrics_show_only_the_codes_served() {
        let text = render_metrics(&BTreeMap::from([(200, 3), (404, 2)]));
        assert_eq!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            [
                "http_requests_total{code=\"200\"} 3",
                "http_requests_total{code=\"404\"} 2",
            ]
        );
    }

    async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
        let response = client.get(url).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    #[tokio::test]
    async fn the_app_answers_on_every_port_and_counts_every_request() {
        crate::registry::ensure_crypto_provider();
        let lease = super::super::ip::IpLease::acquire(&[18080, 18081]).expect("lease");
        let ip = lease.ip();
        let root = CancellationToken::new();
        let behaviour = Behaviour {
            health: Health::Fail,
            ..Default::default()
        };
        let servers = Servers::start(
            ip,
            &[18080, 18081],
            behaviour,
            "r:1/web:v1".into(),
            Instant::now(),
            &root,
        )
        .await
        .expect("servers");
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        assert_eq!(
            get(&client, &format!("http://{ip}:18080/health")).await,
            (500, "failing\n".into())
        );
        assert_eq!(
            get(&client, &format!("http://{ip}:18081/version")).await,
            (200, "r:1/web:v1".into())
        );
        assert_eq!(
            get(&client, &format!("http://{ip}:18080/nope")).await.0,
            404
        );
        let (status, metrics) = get(&client, &format!("http://{ip}:18081/metrics")).await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("http_requests_total{code=\"200\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("http_requests_total{code=\"500\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("http_requests_total{code=\"404\"} 1\n"),
            "{metrics}"
        );

        servers.stop().await;
        assert!(client
            .get(format!("http://{ip}:18080/health"))
            .send()
            .await
            .is_err());
        // The ports are free again for the next run.
        let again = Servers::start(
            ip,
            &[18080],
            Behaviour::default(),
            String::new(),
            Instant::now(),
            &root,
        )
        .await
        .expect("restart");
        assert_eq!(
            get(&client, &format!("http://{ip}:18080/health")).await,
            (200, "ok".into())
        );
        root.cancel();
        again.stop().await;
    }

    #[tokio::test]
    async fn a_starting_app_answers_503() {
        crate::registry::ensure_crypto_provider();
        let lease = super::super::ip::IpLease::acquire(&[18080]).expect("lease");
        let root = CancellationToken::new();
        let behaviour = Behaviour {
            startup: Duration::from_secs(60),
            ..Default::default()
        };
        let servers = Servers::start(
            lease.ip(),
            &[18080],
            behaviour,
            String::new(),
            Instant::now(),
            &root,
        )
        .await
        .expect("servers");
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        assert_eq!(
            get(&client, &format!("http://{}:18080/health", lease.ip()))
                .await
                .0,
            503
        );
        servers.stop().await;
    }
}
