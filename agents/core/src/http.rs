//! Each agent's HTTP endpoint: `/healthz` (the process lives), `/readyz` (connected to the bus,
//! consumers running, and the cluster reachable when the agent needs one), `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, CONTENT_TYPE};

/// An extra readiness check (e.g. "the Kubernetes API answers"); `Err` says what is wrong.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
pub struct Health {
    pub bus: Bus,
    pub metrics: Metrics,
    pub consumers_ready: Arc<AtomicBool>,
    pub extra: Option<ReadinessCheck>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if !h.bus.is_connected() {
        problems.push("not connected to nats".to_owned());
    }
    if !h.consumers_ready.load(Ordering::Relaxed) {
        problems.push("consumers not running yet".to_owned());
    }
    if let Some(check) = &h.extra {
        if let Err(e) = check().await {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], h.metrics.render())
}

/// Binds the endpoint (so a bad address fails at start) and serves it until shutdown.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Http {
        addr: addr.to_string(),
        source,
    })?;
    tracing::info!(addr = %local, "http endpoint listening (/healthz, /readyz, /metrics)");
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http endpoint failed");
        }
    }))
}
