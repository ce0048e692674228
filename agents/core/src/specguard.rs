//! A release's spec checked against the configuration revision it names, before an agent acts
//! on it (DESIGN.md §7): what an agent runs (build and smoke commands), contacts (check URLs)
//! and touches (cluster, namespace) comes from the stored configuration, never from the request
//! alone. Anyone who may publish a `release.requested` could otherwise make the builder run a
//! command of their choosing.
//!
//! A revision's configuration never changes once stored, so the last few are kept parsed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use baton_proto::v1::ReleaseSpec;

use crate::bus::Bus;
use crate::config::store::{self, StoreError};
use crate::config::Config;
use crate::runtime::HandlerError;

/// Parsed revisions kept: releases in flight name the last few.
const CACHED_REVISIONS: usize = 8;

/// The metric label of a refused spec.
pub const CATEGORY: &str = "spec_not_in_config";

#[derive(Default)]
pub struct SpecGuard {
    cache: Mutex<VecDeque<(u64, Arc<Config>)>>,
}

impl SpecGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ok when `spec` is what its configuration revision resolves; a permanent error naming
    /// the difference when not (a forged or stale request), a retryable one when the
    /// configuration can't be read now.
    pub async fn check(&self, bus: &Bus, spec: &ReleaseSpec) -> Result<(), HandlerError> {
        let config = self.config(bus, spec.config_revision).await?;
        config.verify(spec).map_err(|mismatch| {
            HandlerError::permanent(
                CATEGORY,
                format!(
                    "refused: the release of {} in {} is not what configuration revision {} says: {mismatch}",
                    spec.app, spec.env, spec.config_revision
                ),
            )
        })
    }

    async fn config(&self, bus: &Bus, revision: u64) -> Result<Arc<Config>, HandlerError> {
        if let Some(hit) = self.cached(revision) {
            return Ok(hit);
        }
        let config = match store::config_at(bus, revision).await {
            Ok(config) => Arc::new(config),
            Err(e @ StoreError::UnknownRevision { .. }) | Err(e @ StoreError::Corrupt { .. }) => {
                return Err(HandlerError::permanent(
                    CATEGORY,
                    format!("refused: the spec names configuration revision {revision}, which can't be used: {e}"),
                ))
            }
            Err(e) => return Err(HandlerError::retry("config_unavailable", e.to_string())),
        };
        let mut cache = self.lock();
        cache.push_front((revision, config.clone()));
        cache.truncate(CACHED_REVISIONS);
        Ok(config)
    }

    fn cached(&self, revision: u64) -> Option<Arc<Config>> {
        let mut cache = self.lock();
        let at = cache.iter().position(|(r, _)| *r == revision)?;
        let entry = cache.remove(at)?;
        let config = entry.1.clone();
        cache.push_front(entry);
        Some(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<Config>)>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
