//! A container of a rendered pod template run as a process, the way a kubelet would run it: its
//! command and args (with Kubernetes' `$(VAR)` expansion), its environment (`envFrom`, `env`,
//! `valueFrom`), its user and group, and the files of its volumes (Secrets, ConfigMaps,
//! projected volumes, `emptyDir`, with `items`, `defaultMode`, `subPath` and `readOnly`) at the
//! literal paths its volume mounts name. A Secret, key, path or flag the manifests get wrong
//! makes the start fail here as it would make the pod fail on a node.
//!
//! The files are placed in a private mount namespace (util-linux's `unshare`, `nsenter`,
//! `mount`; the test runs as root): a tmpfs per volume, bind-mounted at each mount path, so
//! nothing is written to the host's paths, and everything is gone when the process ends.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvFromSource, KeyToPath, PodTemplateSpec, Secret, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The objects of a rendered install (`kubectl kustomize`).
pub struct Manifests {
    objects: Vec<serde_json::Value>,
}

impl Manifests {
    pub fn parse(yaml: &str) -> Result<Self> {
        let mut objects = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let mut object = serde_json::Value::deserialize(doc).context("a rendered document")?;
            // kustomize wraps a long base64 value over lines; the API server's decoder (Go's
            // encoding/base64) skips the line breaks, and so does this.
            if object["kind"] == "Secret" {
                if let Some(data) = object["data"].as_object_mut() {
                    for value in data.values_mut() {
                        if let Some(text) = value.as_str() {
                            *value = text.replace(['\n', '\r'], "").into();
                        }
                    }
                }
            }
            if !object.is_null() {
                objects.push(object);
            }
        }
        Ok(Self { objects })
    }

    /// The object of `kind` named `name` in `namespace`, if the manifests hold it.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<T>> {
        self.objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str().unwrap_or("default") == namespace
            })
            .map(|o| serde_json::from_value(o.clone()).with_context(|| format!("{kind} {name}")))
            .transpose()
    }

    /// Every object of `kind`, in the order rendered.
    pub fn all<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(|o| serde_json::from_value(o.clone()).with_context(|| format!("a {kind}")))
            .collect()
    }

    fn secret(&self, namespace: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
        Ok(self.get::<Secret>("Secret", namespace, name)?.map(|s| {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            data
        }))
    }

    fn config_map(&self, namespace: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
        Ok(self
            .get::<ConfigMap>("ConfigMap", namespace, name)?
            .map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                data
            }))
    }

    /// The keys of the Secret or ConfigMap `name` (`kind`), or why the kubelet would refuse it.
    fn source(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        optional: Option<bool>,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let data = match kind {
            "Secret" => self.secret(namespace, name)?,
            _ => self.config_map(namespace, name)?,
        };
        match data {
            Some(data) => Ok(data),
            None if optional == Some(true) => Ok(BTreeMap::new()),
            None => bail!(
                "the {kind} {name} is not in the rendered manifests (namespace {namespace}): the kubelet would not start the pod"
            ),
        }
    }
}

/// One file of a volume: its path inside the volume, content and mode.
#[derive(Debug, Clone)]
pub struct VolumeFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// What a volume holds: files (Secret, ConfigMap, projected) or an empty folder (`emptyDir`).
#[derive(Debug, Clone)]
pub enum VolumeContent {
    Files(Vec<VolumeFile>),
    Empty,
}

/// The kubelet's mode for the files of a Secret or ConfigMap volume without `defaultMode`.
const DEFAULT_MODE: i32 = 0o644;

/// One Secret or ConfigMap projected into a volume.
struct Projection<'a> {
    kind: &'a str,
    name: &'a str,
    items: Option<&'a [KeyToPath]>,
    optional: Option<bool>,
}

fn project(
    manifests: &Manifests,
    namespace: &str,
    source: Projection<'_>,
    default_mode: i32,
    files: &mut Vec<VolumeFile>,
) -> Result<()> {
    let Projection {
        kind,
        name,
        items,
        optional,
    } = source;
    let data = manifests.source(kind, namespace, name, optional)?;
    match items {
        None => {
            for (key, bytes) in data {
                files.push(VolumeFile {
                    path: PathBuf::from(key),
                    bytes,
                    mode: mode_bits(default_mode)?,
                });
            }
        }
        Some(items) => {
            for item in items {
                let Some(bytes) = data.get(&item.key) else {
                    if optional == Some(true) {
                        continue;
                    }
                    bail!(
                        "the {kind} {name} has no key {:?} (its keys: {}): the kubelet would not mount it",
                        item.key,
                        data.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                };
                files.push(VolumeFile {
                    path: relative(&item.path)?,
                    bytes: bytes.clone(),
                    mode: mode_bits(item.mode.unwrap_or(default_mode))?,
                });
            }
        }
    }
    Ok(())
}

fn mode_bits(mode: i32) -> Result<u32> {
    let bits = u32::try_from(mode).context("a negative file mode")?;
    ensure!(bits <= 0o777, "file mode {bits:o} is out of range");
    Ok(bits)
}

/// A path inside a volume: relative, without `..`.
fn relative(path: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    ensure!(
        p.components().all(|c| matches!(c, Component::Normal(_))),
        "{path:?} is not a relative path inside the volume"
    );
    Ok(p)
}

/// The content of `volume` as the kubelet would make it from the rendered objects.
pub fn volume_content(
    manifests: &Manifests,
    namespace: &str,
    volume: &Volume,
) -> Result<VolumeContent> {
    let mut files = Vec::new();
    let what = || format!("volume {}", volume.name);
    if let Some(s) = &volume.secret {
        let name = s
            .secret_name
            .as_deref()
            .with_context(|| format!("{}: a secret volume without secretName", what()))?;
        project(
            manifests,
            namespace,
            Projection {
                kind: "Secret",
                name,
                items: s.items.as_deref(),
                optional: s.optional,
            },
            s.default_mode.unwrap_or(DEFAULT_MODE),
            &mut files,
        )
        .with_context(what)?;
    } else if let Some(c) = &volume.config_map {
        project(
            manifests,
            namespace,
            Projection {
                kind: "ConfigMap",
                name: &c.name,
                items: c.items.as_deref(),
                optional: c.optional,
            },
            c.default_mode.unwrap_or(DEFAULT_MODE),
            &mut files,
        )
        .with_context(what)?;
    } else if let Some(p) = &volume.projected {
        let default_mode = p.default_mode.unwrap_or(DEFAULT_MODE);
        for source in p.sources.as_deref().unwrap_or_default() {
            if let Some(s) = &source.secret {
                project(
                    manifests,
                    namespace,
                    Projection {
                        kind: "Secret",
                        name: &s.name,
                        items: s.items.as_deref(),
                        optional: s.optional,
                    },
                    default_mode,
                    &mut files,
                )
                .with_context(what)?;
            } else if let Some(c) = &source.config_map {
                project(
                    manifests,
                    namespace,
                    Projection {
                        kind: "ConfigMap",
                        name: &c.name,
                        items: c.items.as_deref(),
                        optional: c.optional,
                    },
                    default_mode,
                    &mut files,
                )
                .with_context(what)?;
            } else {
                bail!(
                    "{}: a projected source this test does not make (only secret and configMap)",
                    what()
                );
            }
        }
    } else if volume.empty_dir.is_some() {
        return Ok(VolumeContent::Empty);
    } else {
        bail!(
            "{}: a kind of volume this test does not make (secret, configMap, projected, emptyDir)",
            what()
        );
    }
    Ok(VolumeContent::Files(files))
}

/// Kubernetes' expansion of `$(VAR)` in command, args and env values: a defined variable is
/// replaced, `$$` is a literal `$`, anything else is kept as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[at..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key.to_owned(), value)),
    }
}

/// The variables of `env_from`, in order (a later source wins), as the kubelet makes them.
pub fn env_from(
    manifests: &Manifests,
    namespace: &str,
    sources: &[EnvFromSource],
) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for source in sources {
        let (kind, name, optional) = match (&source.config_map_ref, &source.secret_ref) {
            (Some(c), _) => ("ConfigMap", c.name.as_str(), c.optional),
            (_, Some(s)) => ("Secret", s.name.as_str(), s.optional),
            _ => bail!("an envFrom entry with neither configMapRef nor secretRef"),
        };
        let data = manifests
            .source(kind, namespace, name, optional)
            .context("envFrom")?;
        let prefix = source.prefix.as_deref().unwrap_or_default();
        for (key, value) in data {
            let key = format!("{prefix}{key}");
            // The kubelet skips keys that are not valid variable names.
            if key.is_empty()
                || key.starts_with(|c: char| c.is_ascii_digit())
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                continue;
            }
            let value = String::from_utf8(value)
                .with_context(|| format!("{kind} {name}: {key} is not text"))?;
            set(&mut env, &key, value);
        }
    }
    Ok(env)
}

/// What the pod is, beyond its template: the names the API server gives it.
pub struct PodIdentity<'a> {
    pub namespace: &'a str,
    pub pod_name: &'a str,
}

/// The container's environment as the kubelet makes it from the manifests (`envFrom`, then
/// `env`, each value expanded with the variables defined before it), on top of `base`.
pub fn container_env(
    manifests: &Manifests,
    pod: &PodIdentity<'_>,
    service_account: &str,
    container: &Container,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let mut env = base;
    for (k, v) in env_from(
        manifests,
        pod.namespace,
        container.env_from.as_deref().unwrap_or_default(),
    )? {
        set(&mut env, &k, v);
    }
    for var in container.env.as_deref().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &env),
            (None, None) => String::new(),
            (None, Some(from)) => {
                // A key of a ConfigMap or Secret: its value, or none (an optional one absent).
                let key_ref = |kind: &str, name: &str, key: &str, optional: Option<bool>| {
                    let data = manifests.source(kind, pod.namespace, name, optional)?;
                    match data.get(key) {
                        Some(v) => Ok(Some(String::from_utf8(v.clone())?)),
                        None if optional == Some(true) => Ok(None),
                        None => Err(anyhow::anyhow!(
                            "env {}: the {kind} {name} has no key {key:?}",
                            var.name
                        )),
                    }
                };
                let found = if let Some(r) = &from.config_map_key_ref {
                    Some(key_ref("ConfigMap", &r.name, &r.key, r.optional)?)
                } else if let Some(r) = &from.secret_key_ref {
                    Some(key_ref("Secret", &r.name, &r.key, r.optional)?)
                } else {
                    None
                };
                if let Some(found) = found {
                    match found {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => pod.pod_name.to_owned(),
                        "metadata.namespace" => pod.namespace.to_owned(),
                        "spec.serviceAccountName" => service_account.to_owned(),
                        other => bail!(
                            "env {}: fieldRef {other} is not made by this test",
                            var.name
                        ),
                    }
                } else {
                    bail!("env {}: a valueFrom this test does not make", var.name);
                }
            }
        };
        set(&mut env, &var.name, value);
    }
    Ok(env)
}

/// The API server as the kubelet and the ServiceAccount admission present it to a pod:
/// `KUBERNETES_SERVICE_HOST`/`PORT`, and the CA of the token mount.
#[derive(Debug, Clone)]
pub struct ApiServer {
    pub host: String,
    pub port: u16,
    pub ca_pem: Vec<u8>,
}

impl ApiServer {
    /// From an admin kubeconfig whose cluster names its CA by file (the sandbox's).
    pub fn from_kubeconfig(path: &Path) -> Result<Self> {
        let config: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path)?)?;
        let cluster = &config["clusters"][0]["cluster"];
        let server = cluster["server"]
            .as_str()
            .context("the kubeconfig has no server")?;
        let authority = server
            .strip_prefix("https://")
            .context("the API server is not https")?
            .trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .context("the API server has no port")?;
        let ca = cluster["certificate-authority"]
            .as_str()
            .context("the kubeconfig names no CA file")?;
        Ok(Self {
            host: host.to_owned(),
            port: port.parse()?,
            ca_pem: std::fs::read(ca)?,
        })
    }
}

/// Where the ServiceAccount admission mounts the token volume.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What to start: the first (and only) container of a pod template.
pub struct PodStart<'a> {
    pub manifests: &'a Manifests,
    pub template: &'a PodTemplateSpec,
    pub pod: PodIdentity<'a>,
    /// Variables whose rendered values name addresses of the cluster's DNS, with the value that
    /// reaches the same server from here. Each must exist in the rendered environment.
    pub substitute: &'a [(&'a str, String)],
    pub api: &'a ApiServer,
    /// The ServiceAccount's token (a TokenRequest's): mounted only if the pod mounts one.
    pub token: Option<&'a str>,
    pub log: PathBuf,
}

/// A running container of a rendered pod template.
pub struct PodProcess {
    pub name: String,
    /// The container of the template, as rendered.
    pub container: Container,
    /// The argv it was started with (after `$(VAR)` expansion; the program as in the manifest).
    pub argv: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Whether the ServiceAccount token volume was mounted.
    pub token_mounted: bool,
    holder: tokio::process::Child,
    child: tokio::process::Child,
    scratch: PathBuf,
    log: PathBuf,
    http: reqwest::Client,
}

/// The image's environment (Dockerfile: debian's PATH; no user in /etc/passwd, so HOME=/).
fn image_env() -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/".into()),
    ]
}

async fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn link_of(path: &str) -> Option<PathBuf> {
    std::fs::read_link(path).ok()
}

impl PodProcess {
    /// Starts the template's container as the kubelet would, in a mount namespace of its own.
    pub async fn start(start: PodStart<'_>) -> Result<PodProcess> {
        let PodStart {
            manifests,
            template,
            pod,
            substitute,
            api,
            token,
            log,
        } = start;
        // /proc/self belongs to the effective user.
        ensure!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0,
            "starting a pod as the kubelet would needs root (a private mount namespace, and \
             setpriv to the pod's user): run the tests as root"
        );
        let spec = template
            .spec
            .as_ref()
            .context("a pod template without spec")?;
        ensure!(
            spec.init_containers
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "{}: init containers are not run by this test",
            pod.pod_name
        );
        let [container] = spec.containers.as_slice() else {
            bail!("{}: one container expected", pod.pod_name);
        };
        let name = format!("{}/{}", pod.pod_name, container.name);

        // The ServiceAccount, and whether its token is mounted (the pod's field wins).
        let sa_name = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let sa: Option<ServiceAccount> =
            manifests.get("ServiceAccount", pod.namespace, &sa_name)?;
        ensure!(
            sa.is_some() || sa_name == "default",
            "{name}: the ServiceAccount {sa_name} is not in the rendered manifests"
        );
        let token_mounted = spec
            .automount_service_account_token
            .or(sa.and_then(|s| s.automount_service_account_token))
            .unwrap_or(true);

        // The environment: the image's, the kubelet's service variables for the API server,
        // then the manifest's.
        let mut base = image_env();
        base.push(("HOSTNAME".into(), pod.pod_name.to_owned()));
        base.push(("KUBERNETES_SERVICE_HOST".into(), api.host.clone()));
        base.push(("KUBERNETES_SERVICE_PORT".into(), api.port.to_string()));
        let mut env = container_env(manifests, &pod, &sa_name, container, base)?;
        for (key, value) in substitute {
            let entry = env
                .iter_mut()
                .find(|(k, _)| k == key)
                .with_context(|| format!("{name}: no variable {key} to point at the sandbox"))?;
            entry.1 = value.clone();
        }

        let argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|a| expand(a, &env))
            .collect();
        let program = argv
            .first()
            .with_context(|| format!("{name}: no command (the image has no entrypoint)"))?;
        ensure!(
            !program.contains('/'),
            "{name}: the command {program} is not one of the image's binaries on its PATH"
        );
        // The image holds the workspace's binaries in /usr/local/bin (Dockerfile).
        let binary = crate::target_bin(program)?;

        // User and groups: the container's securityContext, then the pod's, then the image's
        // USER 65532:65532.
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let sc = container.security_context.clone().unwrap_or_default();
        let uid = sc.run_as_user.or(pod_sc.run_as_user).unwrap_or(65532);
        let gid = sc.run_as_group.or(pod_sc.run_as_group).unwrap_or(65532);
        let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true);
        ensure!(!non_root || uid != 0, "{name}: runAsNonRoot with user 0");
        let fs_group = pod_sc.fs_group;
        let mut groups = vec![gid];
        groups.extend(fs_group);
        groups.extend(pod_sc.supplemental_groups.iter().flatten());
        groups.dedup();

        // The volumes, then the mounts in order of depth (a parent before what is inside it),
        // as container runtimes do.
        let volumes = spec.volumes.clone().unwrap_or_default();
        let mut mounts = container.volume_mounts.clone().unwrap_or_default();
        if token_mounted {
            mounts.push(k8s_openapi::api::core::v1::VolumeMount {
                name: "kube-api-access".into(),
                mount_path: SERVICE_ACCOUNT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        mounts.sort_by_key(|m| Path::new(&m.mount_path).components().count());
        let mut contents = BTreeMap::new();
        for mount in &mounts {
            if contents.contains_key(&mount.name) {
                continue;
            }
            let content = if mount.name == "kube-api-access" && token_mounted {
                let token = token.with_context(|| {
                    format!("{name}: the pod mounts its ServiceAccount's token: give one")
                })?;
                VolumeContent::Files(vec![
                    VolumeFile {
                        path: "token".into(),
                        bytes: token.as_bytes().to_vec(),
                        mode: 0o644,
                    },
                    VolumeFile {
                        path: "ca.crt".into(),
                        bytes: api.ca_pem.clone(),
                        mode: 0o644,
                    },
                    VolumeFile {
                        path: "namespace".into(),
                        bytes: pod.namespace.as_bytes().to_vec(),
                        mode: 0o644,
                    },
                ])
            } else {
                let volume = volumes
                    .iter()
                    .find(|v| v.name == mount.name)
                    .with_context(|| {
                        format!(
                            "{name}: mounts {}, which is no volume of the pod",
                            mount.name
                        )
                    })?;
                volume_content(manifests, pod.namespace, volume).with_context(|| name.clone())?
            };
            contents.insert(mount.name.clone(), content);
        }

        // A process that holds the private mount (and host name) namespace while the mounts are
        // made; it dies with this process (parent-death signal) and is killed on drop.
        let scratch =
            PathBuf::from("/dev/shm").join(format!("baton-pod-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&scratch)?;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700))?;
        let holder = tokio::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
            ])
            .args(["sleep", "infinity"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("unshare (util-linux) for a private mount namespace")?;
        let mut started = Started {
            holder: Some(holder),
            scratch: Some(scratch.clone()),
        };
        let pid = started
            .holder
            .as_ref()
            .and_then(|h| h.id())
            .context("the namespace holder has no pid")?;
        // Mounts are made only once the holder runs `sleep` in a namespace that is not ours:
        // `unshare` has then made it private, so nothing propagates to the host.
        let own = link_of("/proc/self/ns/mnt");
        crate::eventually("a private mount namespace", Duration::from_secs(10), || {
            let exe = link_of(&format!("/proc/{pid}/exe"));
            let ns = link_of(&format!("/proc/{pid}/ns/mnt"));
            let ready = exe.is_some_and(|e| e.ends_with("sleep")) && ns.is_some() && ns != own;
            async move { Ok(ready.then_some(())) }
        })
        .await?;
        let pid_s = pid.to_string();
        let in_ns = |args: &[&str]| {
            let mut all = vec!["-t", pid_s.as_str(), "-m", "--", "mount", "-n"];
            all.extend_from_slice(args);
            let all: Vec<String> = all.into_iter().map(String::from).collect();
            async move {
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                run_tool("nsenter", &all).await
            }
        };
        // The namespace's view of a path, from here.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let view = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));

        // The pod's host name is its name.
        run_tool(
            "nsenter",
            &["-t", &pid_s, "-u", "--", "hostname", pod.pod_name],
        )
        .await?;
        let scratch_s = scratch.display().to_string();
        // 0711: the container's user reaches the program below, and lists nothing.
        in_ns(&["-t", "tmpfs", "-o", "mode=0711", "tmpfs", &scratch_s]).await?;
        // The program, bound into the scratch folder before anything is mounted: a pod that
        // mounts over the folder it was built in (an emptyDir at /tmp, with the repository
        // cloned under /tmp) still runs it.
        let bin_dir = scratch.join("bin");
        std::fs::create_dir(view(&bin_dir))?;
        std::fs::set_permissions(view(&bin_dir), std::fs::Permissions::from_mode(0o755))?;
        let program = bin_dir.join(binary.file_name().context("the program has no name")?);
        std::fs::write(view(&program), b"")?;
        in_ns(&[
            "--bind",
            &binary.display().to_string(),
            &program.display().to_string(),
        ])
        .await?;
        let chown_group = |path: &Path, group: Option<i64>| -> Result<()> {
            if let Some(g) = group {
                std::os::unix::fs::chown(path, Some(0), Some(u32::try_from(g)?))?;
            }
            Ok(())
        };
        for (volume, content) in &contents {
            let dir = view(&scratch.join(volume));
            std::fs::create_dir(&dir)?;
            match content {
                VolumeContent::Empty => {
                    // emptyDir: writable by the pod's users, owned by its fsGroup.
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                    chown_group(&dir, fs_group)?;
                }
                VolumeContent::Files(files) => {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
                    chown_group(&dir, fs_group)?;
                    for file in files {
                        let path = dir.join(&file.path);
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent)?;
                        }
                        std::fs::write(&path, &file.bytes)?;
                        // With an fsGroup the kubelet gives the group read access (SetVolumeOwnership).
                        let mode = if fs_group.is_some() && volume != "kube-api-access" {
                            file.mode | 0o040
                        } else {
                            file.mode
                        };
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                        chown_group(&path, fs_group)?;
                    }
                }
            }
        }

        let mut covered: Vec<PathBuf> = Vec::new();
        for mount in &mounts {
            ensure!(
                mount.mount_path.starts_with('/'),
                "{name}: mountPath {} is not absolute",
                mount.mount_path
            );
            // The path as the namespace resolves it: a symlink on the way (/var/run -> /run)
            // must be followed there, not through /proc/<pid>/root from here (an absolute link
            // would lead back to the host's root).
            let out = tokio::process::Command::new("nsenter")
                .args(["-t", &pid_s, "-m", "--", "realpath", "-m", "--"])
                .arg(&mount.mount_path)
                .output()
                .await?;
            ensure!(
                out.status.success(),
                "realpath {}: {}",
                mount.mount_path,
                String::from_utf8_lossy(&out.stderr)
            );
            let target = PathBuf::from(String::from_utf8(out.stdout)?.trim_end_matches('\n'));
            let mut source = scratch.join(&mount.name);
            if let Some(sub) = mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                source = source.join(relative(sub)?);
            }
            let source_view = view(&source);
            if mount.sub_path.is_some() && !source_view.exists() {
                // The kubelet makes a missing subPath as an empty folder.
                std::fs::create_dir_all(&source_view)?;
            }
            let is_file = source_view.is_file();
            // The mount point must exist in the namespace. Where the path does not exist, a
            // tmpfs is laid over its nearest existing ancestor (as a container's own root
            // would hold only the image's files there), so nothing is created on the host.
            if !view(&target).exists() {
                let mut ancestor = target.clone();
                while !view(&ancestor).exists() {
                    ancestor = ancestor
                        .parent()
                        .map(Path::to_path_buf)
                        .context("no existing ancestor")?;
                }
                let ours = covered.iter().any(|c| ancestor.starts_with(c));
                if !ours {
                    ensure!(
                        ancestor != Path::new("/") && !scratch.starts_with(&ancestor),
                        "{name}: cannot make {} without hiding {} (which this test needs)",
                        target.display(),
                        ancestor.display()
                    );
                    in_ns(&[
                        "-t",
                        "tmpfs",
                        "-o",
                        "mode=0755",
                        "tmpfs",
                        &ancestor.display().to_string(),
                    ])
                    .await?;
                    covered.push(ancestor);
                }
                ensure!(
                    covered.iter().any(|c| target.starts_with(c)),
                    "{name}: {} would be made on the host",
                    target.display()
                );
                if is_file {
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(view(parent))?;
                    }
                    std::fs::write(view(&target), b"")?;
                } else {
                    std::fs::create_dir_all(view(&target))?;
                }
            }
            ensure!(
                !scratch.starts_with(&target),
                "{name}: mountPath {} would hide what this test needs",
                target.display()
            );
            let target_s = target.display().to_string();
            in_ns(&["--bind", &source.display().to_string(), &target_s]).await?;
            if mount.read_only == Some(true) {
                in_ns(&["-o", "remount,bind,ro", &target_s]).await?;
            }
            covered.push(target);
        }
        if sc.read_only_root_filesystem == Some(true) {
            in_ns(&["-o", "remount,bind,ro", "/"]).await?;
        }

        // The container: its user and groups, no new privileges when it may not escalate, and
        // the parent-death signal so that it dies with the test.
        let log_file = std::fs::File::create(&log)?;
        let groups: Vec<String> = groups.iter().map(i64::to_string).collect();
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args(["-t", &pid_s, "-m", "-u", "--", "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg(format!("--groups={}", groups.join(",")))
            .args(["--pdeathsig", "KILL"]);
        if sc.allow_privilege_escalation == Some(false) {
            cmd.arg("--no-new-privs");
        }
        cmd.arg("--")
            .arg(&program)
            .args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(container.working_dir.as_deref().unwrap_or("/"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("{name}: starting {}", program.display()))?;
        let holder = started.holder.take().context("no holder")?;
        started.scratch = None;
        Ok(PodProcess {
            name,
            container: container.clone(),
            argv,
            env,
            token_mounted,
            holder,
            child,
            scratch,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(4))
                .build()?,
        })
    }

    pub fn log_tail(&self, lines: usize) -> String {
        baton_sandbox::process::log_tail(&self.log, lines)
    }

    /// The URL of an HTTP probe of the container (its port by name or number, on loopback).
    pub fn probe_url(&self, probe: &k8s_openapi::api::core::v1::Probe) -> Result<String> {
        let get = probe
            .http_get
            .as_ref()
            .with_context(|| format!("{}: the probe is not an HTTP GET", self.name))?;
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(named) => self
                .container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(named))
                .map(|p| p.container_port)
                .with_context(|| format!("{}: the probe's port {named} is not named", self.name))?,
        };
        Ok(format!(
            "http://127.0.0.1:{port}{}",
            get.path.as_deref().unwrap_or("/")
        ))
    }

    /// Waits until the container's readiness probe answers 2xx, as the kubelet would probe it;
    /// fails with its log if it exits first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<String> {
        let probe = self
            .container
            .readiness_probe
            .clone()
            .with_context(|| format!("{} has no readiness probe", self.name))?;
        let url = self.probe_url(&probe)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready; its log ends:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let last = match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(url),
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready at {url} after {timeout:?} (last answer: {last}); its log ends:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the container to exit (a Job's).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {timeout:?}", self.name))?
            .map_err(Into::into)
    }

    /// GET on the probe's URL: the status.
    pub async fn probe(&self, probe: &k8s_openapi::api::core::v1::Probe) -> Result<u16> {
        let url = self.probe_url(probe)?;
        Ok(self.http.get(&url).send().await?.status().as_u16())
    }

    /// SIGTERM, then the exit status (within `grace`, else SIGKILL).
    pub async fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => {
                self.child.start_kill()?;
                self.child.wait().await?;
                Ok(None)
            }
        }
    }
}

/// Until a start completes: the holder is killed and the scratch folder removed.
struct Started {
    holder: Option<tokio::process::Child>,
    scratch: Option<PathBuf>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut h) = self.holder.take() {
            let _ = h.start_kill();
        }
        if let Some(scratch) = self.scratch.take() {
            let _ = std::fs::remove_dir(scratch);
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.holder.start_kill();
        // The tmpfs was mounted in the private namespace only: the host sees an empty folder.
        let _ = std::fs::remove_dir(&self.scratch);
    }
}
