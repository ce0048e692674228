//! Baton's shared agent runtime.
//!
//! The event contract (types, owners, subjects, validation, deterministic ids), the pure release
//! fold, and the I/O every agent shares: the NATS bus with JetStream publishing and durable
//! consumers, dead letters, the retry policy, the bus definitions, telemetry, the HTTP health and
//! metrics endpoint, and graceful shutdown.

pub mod event;
pub mod fold;
#[cfg(test)]
mod fold_tests;
pub mod ids;
pub mod limits;
pub mod names;
pub mod subject;
pub mod validate;
pub mod workload;

pub use event::{Event, EventType, Role};
pub use fold::{fold, ReleaseState, Status};
pub use ids::EventKey;
pub use names::{AppName, EnvName, ReleaseId};
pub mod agent;
pub mod bluegreen;
pub mod bus;
pub mod busconfig;
pub mod cluster;
pub mod config;
pub mod control;
pub mod deadline;
pub mod error;
pub mod fence;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod retry;
pub mod rollout;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
