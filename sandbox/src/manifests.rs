//! `baton-sandbox apply -f FILE`: server-side apply of Kubernetes manifests, for setting up the
//! workloads Baton then releases (there is no kubectl on these machines).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use serde::Deserialize;

/// The field manager of manifests applied by the sandbox.
const FIELD_MANAGER: &str = "baton-sandbox";

pub async fn apply_file(file: &Path, kubeconfig: &Path, wait: bool) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    let client = kube::Client::try_from(config)?;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .context("discovering the API")?;
    let mut deployments = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("document {} is not YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml_ng::from_value(value)
            .with_context(|| format!("document {} is not a Kubernetes object", i + 1))?;
        let types = obj
            .types
            .clone()
            .ok_or_else(|| anyhow!("document {} has no apiVersion/kind", i + 1))?;
        let gvk =
            GroupVersionKind::try_from(&types).map_err(|e| anyhow!("document {}: {e}", i + 1))?;
        let (resource, caps) = discovery.resolve_gvk(&gvk).ok_or_else(|| {
            anyhow!(
                "document {}: the cluster has no {} {}",
                i + 1,
                types.api_version,
                types.kind
            )
        })?;
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("document {}: no metadata.name", i + 1))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let ns = obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                if gvk.kind == "Deployment" {
                    deployments.push((ns.clone(), name.clone()));
                }
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {} {name}", gvk.kind))?;
        println!("applied {} {name}", kind_text(&resource));
    }
    if wait {
        for (ns, name) in deployments {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let available =
                kube::runtime::wait::await_condition(api, &name, |d: Option<&Deployment>| {
                    d.is_some_and(|d| {
                        let want = d.spec.replicas.unwrap_or(1);
                        d.status.as_ref().is_some_and(|s| {
                            s.available_replicas.unwrap_or(0) == want
                                && s.updated_replicas.unwrap_or(0) == want
                        })
                    })
                });
            match tokio::time::timeout(Duration::from_secs(180), available).await {
                Ok(Ok(_)) => println!("deployment {ns}/{name} is available"),
                Ok(Err(e)) => bail!("waiting for deployment {ns}/{name}: {e}"),
                Err(_) => bail!("deployment {ns}/{name} not available after 180s"),
            }
        }
    }
    Ok(())
}

fn kind_text(r: &ApiResource) -> String {
    r.kind.to_lowercase()
}
