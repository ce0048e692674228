//! The Kubernetes client of an agent — from a kubeconfig, or in-cluster from the pod's service
//! account — and the classification of the API server's answers: a refusal for good, or a
//! transient error.

use std::path::Path;

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
    // kube-rs uses rustls: one process-wide provider, whoever asks first.
    let _ = rustls::crypto::ring::default_provider().install_default();
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

/// HTTP codes with which the API server refuses a request for good: it is malformed (400),
/// forbidden by RBAC or an admission plugin such as a quota (403), names what does not exist
/// (404, 410), or is invalid (422). Retrying cannot help; a conflict (409), throttling (429) and
/// server errors (5xx) are transient.
const REFUSALS: [u16; 8] = [400, 403, 404, 405, 406, 410, 415, 422];

/// The API server's own words when it refused a request for good (see [`REFUSALS`]), else
/// `None` (the error is transient, or not the API server's answer).
pub fn refusal(error: &kube::Error) -> Option<String> {
    match error {
        kube::Error::Api(status) if REFUSALS.contains(&status.code) => {
            Some(if status.message.is_empty() {
                format!("refused with HTTP {}", status.code)
            } else {
                format!("{} (HTTP {})", status.message, status.code)
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn only_the_api_servers_final_answers_are_refusals() {
        let quota = "deployments.apps \"web-canary\" is forbidden: exceeded quota";
        assert_eq!(
            refusal(&api(403, quota)).as_deref(),
            Some(format!("{quota} (HTTP 403)").as_str())
        );
        assert!(refusal(&api(422, "spec.replicas: Invalid value")).is_some());
        assert!(refusal(&api(404, "")).is_some_and(|m| m == "refused with HTTP 404"));
        for transient in [409, 429, 500, 503] {
            assert_eq!(refusal(&api(transient, "x")), None, "{transient}");
        }
    }
}
