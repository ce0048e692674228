//! Baton's shared agent runtime: the I/O every agent shares — the NATS bus with JetStream
//! publishing and durable consumers, the keyed concurrent consumer runtime with dead letters, the
//! supervisor (signal, connection, background tasks, shutdown within a grace), the retry policy,
//! the bus definitions, the workload locks and fence, configuration storage, telemetry, and the
//! HTTP health and metrics endpoint.
//!
//! The model it acts on is `baton-model` (pure) and the Kubernetes glue `baton-kube`; both are
//! re-exported here under their old paths.

pub use baton_kube::{bluegreen, rollout, workload};
pub use baton_model::{
    control, deadline, event, fold, ids, limits, metric, names, notify, subject, testing, time,
    validate,
};
pub use baton_model::{
    AppName, EnvName, Event, EventKey, EventType, ReleaseId, ReleaseState, Role, Status,
};

/// Configuration: parsing and resolution (`baton-model`), and its versioned storage on the bus.
pub mod config {
    pub use baton_model::config::*;
    pub mod store;
}

pub mod agent;
pub mod bus;
pub mod busauth;
pub mod busconfig;
pub mod cluster;
pub mod error;
pub mod fence;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod retry;
pub mod runtime;
pub mod shutdown;
pub mod specguard;
pub mod telemetry;
