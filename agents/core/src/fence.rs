//! Fenced writes: before each cluster write, an agent confirms from the release's history and the
//! workload's lock that the release still owns the workload and may still change it. A writer that
//! wakes up late (a paused process, a slow API call, a lost lock) writes nothing.
//!
//! What each writer may still do is decided by [`refusal`], purely, from the fold.

use crate::lock::{self, Workload};
use crate::names::ReleaseId;
use crate::runtime::AgentContext;

pub use baton_model::fence::{refusal, Writer};

/// The outcome of a fence check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// The release owns the workload: write.
    Clear,
    /// Write nothing, for this reason.
    Closed(String),
}

/// Confirms, just before a write, that `release` may still change `workload`: its history allows
/// it and it holds the workload's lock.
pub async fn confirm(
    ctx: &AgentContext,
    release: ReleaseId,
    workload: &Workload,
    writer: Writer,
) -> Result<Fence, crate::error::Error> {
    // The rollback agent ends even a release flooded past its bound of events; the deployer
    // drives only releases whose whole history can be read.
    let (_, state) = match writer {
        Writer::Rollback => ctx.release_state_bounded(release).await?,
        Writer::Deployer => ctx.release_state(release).await?,
    };
    if let Some(reason) = refusal(&state, writer) {
        return Ok(Fence::Closed(reason));
    }
    let store = ctx.bus.kv(crate::bus::LOCKS_BUCKET).await?;
    let key = workload.lock_key();
    let holder = lock::holder(&store, &key)
        .await
        .map_err(|e| crate::error::Error::Stream {
            stream: format!("KV_{}", crate::bus::LOCKS_BUCKET),
            message: e.to_string(),
        })?;
    let me = release.to_string();
    Ok(match holder {
        Some(h) if h == me => Fence::Clear,
        Some(h) => Fence::Closed(format!("the lock of {workload} is held by release {h}")),
        None => Fence::Closed(format!(
            "release {me} no longer holds the lock of {workload}"
        )),
    })
}

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The release no longer owns the workload: nothing was written.
    #[error("not {what}: {reason}")]
    Closed { what: String, reason: String },
    /// The history or the lock could not be read: nothing was written.
    #[error(transparent)]
    Bus(#[from] crate::error::Error),
}

/// The fence of one writer (the deployer or the rollback agent) at one workload for one
/// release: [`check`](Fencer::check) before every cluster write.
pub struct Fencer<'a> {
    pub agent: &'a AgentContext,
    pub release_id: ReleaseId,
    pub workload: Workload,
    pub writer: Writer,
    /// Fault injection (`BATON_FAULT_WRITE_DELAY`): a pause before each check, as a slow or
    /// stalled process would take, for tests of the fence.
    pub delay: Option<std::time::Duration>,
}

impl Fencer<'_> {
    /// Ok when `what` may be written now; [`FenceError::Closed`] (logged) when not.
    pub async fn check(&self, what: &str) -> Result<(), FenceError> {
        if let Some(delay) = self.delay {
            tracing::warn!(
                what,
                delay_ms = delay.as_millis() as u64,
                "fault injection: waiting before the write"
            );
            tokio::time::sleep(delay).await;
        }
        match confirm(self.agent, self.release_id, &self.workload, self.writer).await? {
            Fence::Clear => Ok(()),
            Fence::Closed(reason) => {
                tracing::warn!(what, %reason, "fenced: writing nothing");
                Err(FenceError::Closed {
                    what: what.to_owned(),
                    reason,
                })
            }
        }
    }
}
