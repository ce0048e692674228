//! Blue-green: `<app>-blue` and `<app>-green` behind the Service `<app>`, the new colour previewed
//! behind `<app>-preview`, then switched to.

use std::collections::HashMap;

use baton_core::rollout::Problem;
use baton_proto::v1::{FailureKind, ReleaseSpec};

use crate::error::Result;
use crate::steps::{StepCtx, StepOutcome, StepPlan};

pub fn describe(spec: &ReleaseSpec, step: u32, _last: bool) -> StepPlan {
    StepPlan {
        action: format!("blue-green step {step} of {}", spec.app),
        selector: HashMap::new(),
    }
}

pub async fn step(_ctx: &StepCtx<'_>, _step: u32, _last: bool) -> Result<StepOutcome> {
    Ok(StepOutcome::Failed(Problem {
        kind: FailureKind::Precheck,
        reason: "blue-green is not available in this version".into(),
    }))
}
