//! Baton's model: what a release is, with no I/O.
//!
//! The event contract (types, owners, subjects, validation, deterministic ids), the release fold,
//! the step plan of each strategy, deadlines, the limits every agent enforces, the fence's rule,
//! and the configuration's parsing and resolution into release specs. This crate depends on
//! neither tokio, async-nats nor kube, so the compiler refuses an I/O call here; the runtime
//! (`baton-core`) and the Kubernetes glue (`baton-kube`) build on it.

pub mod config;
pub mod control;
pub mod deadline;
pub mod event;
pub mod fence;
pub mod fold;
#[cfg(test)]
mod fold_tests;
pub mod ids;
pub mod limits;
pub mod metric;
pub mod names;
pub mod notify;
pub mod subject;
pub mod testing;
pub mod time;
pub mod validate;

pub use event::{Event, EventType, Role};
pub use fold::{fold, ReleaseState, Status};
pub use ids::EventKey;
pub use names::{AppName, EnvName, ReleaseId};
