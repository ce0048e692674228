//! The Kubernetes connection of an agent (from `baton-kube`), with a readiness check that the API
//! answers.

use std::sync::Arc;
use std::time::Duration;

use crate::http::ReadinessCheck;

pub use baton_kube::client::{client, refusal, ClusterError};

/// Ready while the API server answers `/version` within a few seconds.
pub fn readiness(client: kube::Client) -> ReadinessCheck {
    Arc::new(move || {
        let client = client.clone();
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_secs(3), client.apiserver_version()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("kubernetes api: {e}")),
                Err(_) => Err("kubernetes api: no answer within 3s".into()),
            }
        })
    })
}
