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
