//! The Kubernetes connection of an agent: from a kubeconfig, or in-cluster from the pod's
//! service account, with a readiness check that the API answers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::http::ReadinessCheck;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster configuration: {0}")]
    InCluster(String),
    #[error("kubernetes client: {0}")]
    Client(String),
}

/// A client for the agent's cluster: `--in-cluster`, else `--kubeconfig`, else the usual
/// inference ($KUBECONFIG, ~/.kube/config, in-cluster).
pub async fn client(
    kubeconfig: Option<&Path>,
    in_cluster: bool,
) -> Result<kube::Client, ClusterError> {
    crate::telemetry::install_crypto_provider();
    let config = if in_cluster {
        kube::Config::incluster().map_err(|e| ClusterError::InCluster(e.to_string()))?
    } else if let Some(path) = kubeconfig {
        let err = |message: String| ClusterError::Kubeconfig {
            path: path.display().to_string(),
            message,
        };
        let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?
    } else {
        kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Client(e.to_string()))?
    };
    kube::Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

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
