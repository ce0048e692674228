//! Baton's Kubernetes glue: the client, rollouts followed like `kubectl rollout status` but failing
//! fast, the canary and blue-green objects, server-side apply with Baton's one field manager, and
//! which of the API server's answers are refusals (never retried) rather than transient errors.

pub mod bluegreen;
pub mod client;
pub mod rollout;
pub mod workload;
