//! A small client for the sandbox's OCI registry (`docker-registry`, distribution v2.8, plain
//! HTTP on loopback): it pushes tiny images whose config carries the env that chooses a simulated
//! app's behaviour, and looks references up the way a node's image puller would.
//!
//! Only what the sandbox needs: monolithic blob uploads, one OCI manifest per image, and reads of
//! OCI or Docker v2 manifests (indexes and manifest lists are followed to their first entry).

use std::time::Duration;

use reqwest::{header, Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Media types this client writes and reads.
pub mod media_type {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
}

/// Every request to the registry is bounded by this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// distribution's limit on the length of a repository name.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Manifests and configs in the sandbox are a few hundred bytes; refuse anything absurd.
const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid registry address {address:?}: {reason}")]
    InvalidAddress {
        address: String,
        reason: &'static str,
    },

    #[error("invalid repository name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: &'static str },

    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },

    #[error("invalid environment variable name {key:?} for image {image}: {reason}")]
    InvalidEnv {
        image: String,
        key: String,
        reason: &'static str,
    },

    #[error("building the http client for registry {host}")]
    Client {
        host: String,
        source: reqwest::Error,
    },

    #[error("registry request {method} {url} failed")]
    Request {
        method: Method,
        url: String,
        source: reqwest::Error,
    },

    #[error("registry answered {status} to {method} {url}: {body}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
    },

    #[error("registry answered {method} {url} without a usable location header")]
    MissingLocation { method: Method, url: String },

    #[error("{what} from {url} is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { what: &'static str, url: String },

    #[error("malformed {what} from {url}")]
    Malformed {
        what: &'static str,
        url: String,
        source: serde_json::Error,
    },

    #[error("digest mismatch for {what}: expected {expected}, registry has {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("unsupported manifest media type {media_type:?} for {reference}")]
    UnsupportedManifest {
        reference: String,
        media_type: String,
    },
}

impl RegistryError {
    /// Whether trying again later may succeed: network trouble and server errors, not bad input
    /// or malformed content.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Request { .. } | Self::MissingLocation { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::InvalidAddress { .. }
            | Self::InvalidName { .. }
            | Self::InvalidTag { .. }
            | Self::InvalidReference { .. }
            | Self::InvalidEnv { .. }
            | Self::Client { .. }
            | Self::TooLarge { .. }
            | Self::Malformed { .. }
            | Self::DigestMismatch { .. }
            | Self::UnsupportedManifest { .. } => false,
        }
    }
}

/// What a node learns about an image when it pulls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The digest of the manifest the reference resolved to, `sha256:…`.
    pub digest: String,
    /// `config.Env` of the image, split at the first `=`.
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Registry {
    host: String,
    http: reqwest::Client,
}

/// reqwest is built with `rustls-no-provider` and panics when building a client without a
/// process-wide crypto provider; installing ring's is harmless when one is already there.
pub(crate) fn ensure_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

impl Registry {
    /// A client for the registry at `host_port`, e.g. `127.0.0.1:5000`. No request is made.
    pub fn new(host_port: impl Into<String>) -> Result<Self> {
        let host = host_port.into();
        validate_host(&host)?;
        ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|source| RegistryError::Client {
                host: host.clone(),
                source,
            })?;
        Ok(Self { host, http })
    }

    /// `HOST:PORT` as it appears at the front of image references.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The full reference for `name:tag` in this registry.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host)
    }

    /// Creates a tiny image `name:tag` whose config has `config.Env` = `env`, pushes its layer,
    /// config and OCI manifest, and returns the manifest digest. The content is deterministic:
    /// the same name, tag and env always give the same digest.
    pub async fn push_image(
        &self,
        name: &str,
        tag: &str,
        env: &[(String, String)],
    ) -> Result<String> {
        validate_name(name)?;
        validate_tag(tag)?;
        for (key, _) in env {
            validate_env_key(key).map_err(|reason| RegistryError::InvalidEnv {
                image: format!("{name}:{tag}"),
                key: key.clone(),
                reason,
            })?;
        }

        let tar = layer_tar(name, tag);
        let diff_id = sha256_digest(&tar);
        let layer = gzip_stored(&tar);
        let layer_digest = sha256_digest(&layer);
        self.upload_blob(name, &layer_digest, layer.clone()).await?;

        let config = image_config(name, tag, env, &diff_id);
        let config_digest = sha256_digest(&config);
        self.upload_blob(name, &config_digest, config.clone())
            .await?;

        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "config": {
                "mediaType": media_type::OCI_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": media_type::OCI_LAYER_GZIP,
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))
        .map_err(|source| RegistryError::Malformed {
            what: "manifest we built",
            url: String::new(),
            source,
        })?;
        let digest = sha256_digest(&manifest);
        let url = self.url(&format!("{name}/manifests/{tag}"));
        let response = self
            .send(
                Method::PUT,
                &url,
                self.http
                    .put(&url)
                    .header(header::CONTENT_TYPE, media_type::OCI_MANIFEST)
                    .body(manifest),
            )
            .await?;
        expect_status(Method::PUT, &url, response, &[StatusCode::CREATED])
            .await
            .and_then(
                |response| match header_str(&response, "docker-content-digest") {
                    Some(actual) if actual != digest => Err(RegistryError::DigestMismatch {
                        what: format!("manifest {name}:{tag}"),
                        expected: digest.clone(),
                        actual: actual.to_string(),
                    }),
                    _ => Ok(()),
                },
            )?;
        tracing::debug!(image = %self.reference(name, tag), %digest, "pushed image");
        Ok(digest)
    }

    /// Looks up `reference` (`HOST:PORT/name:tag`, `HOST:PORT/name@sha256:…`, or either without
    /// a host, meaning this registry). `Ok(None)` when the image is not in this registry, which
    /// includes references naming another registry; `Err` when the registry can't be asked or
    /// answers nonsense.
    pub async fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let parsed = ImageReference::parse(reference)?;
        if let Some(host) = &parsed.host {
            if !same_host(host, &self.host) {
                tracing::debug!(%reference, registry = %self.host, "reference names another registry");
                return Ok(None);
            }
        }
        let Some((digest, manifest)) = self.fetch_manifest(&parsed.name, &parsed.target).await?
        else {
            return Ok(None);
        };
        if let Target::Digest(expected) = &parsed.target {
            if *expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        let manifest = match manifest {
            Manifest::Image(image) => image,
            Manifest::Index(child) => {
                // Followed by digest: the child's digest is checked against the index's entry.
                match self
                    .fetch_manifest(&parsed.name, &Target::Digest(child.clone()))
                    .await?
                {
                    Some((_, Manifest::Image(image))) => image,
                    Some((_, Manifest::Index(_))) => {
                        return Err(RegistryError::UnsupportedManifest {
                            reference: reference.to_string(),
                            media_type: "nested index".to_string(),
                        })
                    }
                    None => return Ok(None),
                }
            }
        };
        let Some(config) = self
            .fetch_blob(&parsed.name, &manifest.config.digest)
            .await?
        else {
            return Ok(None);
        };
        let url = self.url(&format!("{}/blobs/{}", parsed.name, manifest.config.digest));
        let config: ImageConfig =
            serde_json::from_slice(&config).map_err(|source| RegistryError::Malformed {
                what: "image config",
                url,
                source,
            })?;
        let env = config
            .config
            .and_then(|c| c.env)
            .unwrap_or_default()
            .into_iter()
            .map(|entry| match entry.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (entry, String::new()),
            })
            .collect();
        Ok(Some(ImageInfo { digest, env }))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/v2/{path}", self.host)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        request
            .send()
            .await
            .map_err(|source| RegistryError::Request {
                method,
                url: url.to_string(),
                source,
            })
    }

    /// Uploads a blob unless the registry already has it: a monolithic POST then PUT.
    async fn upload_blob(&self, name: &str, digest: &str, body: Vec<u8>) -> Result<()> {
        let url = self.url(&format!("{name}/blobs/{digest}"));
        let response = self.send(Method::HEAD, &url, self.http.head(&url)).await?;
        if response.status() == StatusCode::OK {
            return Ok(());
        }

        let url = self.url(&format!("{name}/blobs/uploads/"));
        let response = self.send(Method::POST, &url, self.http.post(&url)).await?;
        let response = expect_status(Method::POST, &url, response, &[StatusCode::ACCEPTED]).await?;
        let location =
            header_str(&response, "location").ok_or_else(|| RegistryError::MissingLocation {
                method: Method::POST,
                url: url.clone(),
            })?;
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.host)
        } else if location.starts_with("http://") {
            location.to_string()
        } else {
            return Err(RegistryError::MissingLocation {
                method: Method::POST,
                url,
            });
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let response = self
            .send(
                Method::PUT,
                &url,
                self.http
                    .put(&url)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body),
            )
            .await?;
        expect_status(Method::PUT, &url, response, &[StatusCode::CREATED]).await?;
        Ok(())
    }

    /// The manifest and its digest (computed from the bytes), or None when the registry says the
    /// repository or manifest is unknown.
    async fn fetch_manifest(
        &self,
        name: &str,
        target: &Target,
    ) -> Result<Option<(String, Manifest)>> {
        let url = self.url(&format!("{name}/manifests/{}", target.as_str()));
        let accept = [
            media_type::OCI_MANIFEST,
            media_type::DOCKER_MANIFEST,
            media_type::OCI_INDEX,
            media_type::DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let response = self
            .send(
                Method::GET,
                &url,
                self.http.get(&url).header(header::ACCEPT, accept),
            )
            .await?;
        if is_absent(response.status()) {
            return Ok(None);
        }
        let response = expect_status(Method::GET, &url, response, &[StatusCode::OK]).await?;
        let content_type = header_str(&response, "content-type").map(str::to_string);
        let bytes = read_limited(response, "manifest", &url).await?;
        let digest = sha256_digest(&bytes);
        let raw: RawManifest =
            serde_json::from_slice(&bytes).map_err(|source| RegistryError::Malformed {
                what: "manifest",
                url: url.clone(),
                source,
            })?;
        let media_type = raw
            .media_type
            .clone()
            .or(content_type)
            .unwrap_or_else(|| media_type::OCI_MANIFEST.to_string());
        let media_type = media_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let manifest = match media_type.as_str() {
            media_type::OCI_MANIFEST | media_type::DOCKER_MANIFEST => match raw.config {
                Some(config) => Manifest::Image(ImageManifest { config }),
                None => {
                    return Err(RegistryError::UnsupportedManifest {
                        reference: url,
                        media_type: format!("{media_type} without config"),
                    })
                }
            },
            media_type::OCI_INDEX | media_type::DOCKER_MANIFEST_LIST => {
                let manifests = raw.manifests.unwrap_or_default();
                let chosen = manifests
                    .iter()
                    .find(|m| {
                        m.platform.as_ref().is_some_and(|p| {
                            p.os.as_deref() == Some("linux")
                                && p.architecture.as_deref() == Some("amd64")
                        })
                    })
                    .or_else(|| manifests.first());
                match chosen {
                    Some(entry) => Manifest::Index(entry.digest.clone()),
                    None => return Ok(None),
                }
            }
            other => {
                return Err(RegistryError::UnsupportedManifest {
                    reference: url,
                    media_type: other.to_string(),
                })
            }
        };
        Ok(Some((digest, manifest)))
    }

    async fn fetch_blob(&self, name: &str, digest: &str) -> Result<Option<Vec<u8>>> {
        validate_digest(digest).map_err(|reason| RegistryError::InvalidReference {
            reference: digest.to_string(),
            reason,
        })?;
        let url = self.url(&format!("{name}/blobs/{digest}"));
        let response = self.send(Method::GET, &url, self.http.get(&url)).await?;
        if is_absent(response.status()) {
            return Ok(None);
        }
        let response = expect_status(Method::GET, &url, response, &[StatusCode::OK]).await?;
        let bytes = read_limited(response, "blob", &url).await?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob {url}"),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(Some(bytes))
    }
}

fn is_absent(status: StatusCode) -> bool {
    // distribution answers 404 with MANIFEST_UNKNOWN, NAME_UNKNOWN or BLOB_UNKNOWN.
    status == StatusCode::NOT_FOUND
}

async fn expect_status(
    method: Method,
    url: &str,
    response: reqwest::Response,
    expected: &[StatusCode],
) -> Result<reqwest::Response> {
    let status = response.status();
    if expected.contains(&status) {
        return Ok(response);
    }
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(500);
    Err(RegistryError::Status {
        method,
        url: url.to_string(),
        status,
        body: body.trim().to_string(),
    })
}

async fn read_limited(
    response: reqwest::Response,
    what: &'static str,
    url: &str,
) -> Result<Vec<u8>> {
    if response
        .content_length()
        .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(RegistryError::TooLarge {
            what,
            url: url.to_string(),
        });
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|source| RegistryError::Request {
            method: Method::GET,
            url: url.to_string(),
            source,
        })?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(RegistryError::TooLarge {
            what,
            url: url.to_string(),
        });
    }
    Ok(bytes.to_vec())
}

fn header_str<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    media_type: Option<String>,
    config: Option<Descriptor>,
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: Option<String>,
    architecture: Option<String>,
}

enum Manifest {
    Image(ImageManifest),
    /// The digest of the entry to follow.
    Index(String),
}

struct ImageManifest {
    config: Descriptor,
}

#[derive(Deserialize)]
struct ImageConfig {
    config: Option<ImageConfigConfig>,
}

#[derive(Deserialize)]
struct ImageConfigConfig {
    #[serde(rename = "Env")]
    env: Option<Vec<String>>,
}

/// An image reference split the way the distribution reference grammar does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageReference {
    pub host: Option<String>,
    pub name: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Tag(String),
    Digest(String),
}

impl Target {
    fn as_str(&self) -> &str {
        match self {
            Self::Tag(t) | Self::Digest(t) => t,
        }
    }
}

impl ImageReference {
    pub(crate) fn parse(reference: &str) -> Result<Self> {
        let invalid = |reason| RegistryError::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        if reference.is_empty() {
            return Err(invalid("empty"));
        }
        let (host, rest) = match reference.split_once('/') {
            // As in docker's reference grammar: the first component is a registry host when it
            // looks like one (has a dot or port, or is localhost).
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                validate_host(first).map_err(|_| invalid("bad registry host"))?;
                (Some(first.to_string()), rest)
            }
            _ => (None, reference),
        };
        let (name_and_tag, digest) = match rest.split_once('@') {
            Some((left, digest)) => {
                validate_digest(digest).map_err(invalid)?;
                (left, Some(digest.to_string()))
            }
            None => (rest, None),
        };
        let (name, tag) = match name_and_tag.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
            _ => (name_and_tag, None),
        };
        validate_name(name).map_err(|_| invalid("bad repository name"))?;
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|_| invalid("bad tag"))?;
        }
        let target = match (digest, tag) {
            (Some(digest), _) => Target::Digest(digest),
            (None, Some(tag)) => Target::Tag(tag.to_string()),
            (None, None) => Target::Tag("latest".to_string()),
        };
        Ok(Self {
            host,
            name: name.to_string(),
            target,
        })
    }
}

fn same_host(a: &str, b: &str) -> bool {
    let normalise = |h: &str| {
        let (host, port) = h.rsplit_once(':').unwrap_or((h, ""));
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        (host.to_ascii_lowercase(), port.to_string())
    };
    normalise(a) == normalise(b)
}

fn validate_host(host: &str) -> Result<()> {
    let invalid = |reason| RegistryError::InvalidAddress {
        address: host.to_string(),
        reason,
    };
    if host.is_empty() {
        return Err(invalid("empty"));
    }
    if host.contains(['/', '@', ' ']) || host.starts_with("http") && host.contains("://") {
        return Err(invalid("expected host:port without scheme or path"));
    }
    if let Some((h, port)) = host.rsplit_once(':') {
        if h.is_empty() {
            return Err(invalid("empty host"));
        }
        port.parse::<u16>()
            .map_err(|_| invalid("port is not a number in 1..=65535"))?;
    }
    Ok(())
}

/// A repository name per the distribution spec: `/`-separated components of lowercase
/// alphanumerics joined by `.`, `_`, `__` or runs of `-`.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| RegistryError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(invalid("longer than 255 characters"));
    }
    for component in name.split('/') {
        validate_component(component).map_err(invalid)?;
    }
    Ok(())
}

fn validate_component(component: &str) -> Result<(), &'static str> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => return Err("empty path component"),
        (Some(&first), Some(&last)) if !alnum(first) || !alnum(last) => {
            return Err("path components must start and end with a lowercase letter or digit")
        }
        _ => {}
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return Err(
                "only lowercase letters, digits and single '.', '_', '__' or '-' runs are allowed",
            );
        }
    }
    Ok(())
}

pub(crate) fn validate_tag(tag: &str) -> Result<()> {
    let invalid = |reason| RegistryError::InvalidTag {
        tag: tag.to_string(),
        reason,
    };
    let bytes = tag.as_bytes();
    match bytes.first() {
        None => return Err(invalid("empty")),
        Some(b) if !(b.is_ascii_alphanumeric() || *b == b'_') => {
            return Err(invalid("must start with a letter, digit or '_'"))
        }
        _ => {}
    }
    if bytes.len() > 128 {
        return Err(invalid("longer than 128 characters"));
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '_', '.' and '-' are allowed",
        ));
    }
    Ok(())
}

fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err("digest must be sha256:<64 hex digits>");
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("digest must be sha256:<64 hex digits>");
    }
    Ok(())
}

fn validate_env_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty");
    }
    if key.contains(['=', '\0']) {
        return Err("must not contain '=' or NUL");
    }
    Ok(())
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The image config: only what a runtime reads, and no timestamps so digests are reproducible.
fn image_config(name: &str, tag: &str, env: &[(String, String)], diff_id: &str) -> Vec<u8> {
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env,
            "Labels": {
                "org.opencontainers.image.title": name,
                "org.opencontainers.image.version": tag,
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    // Serialising a json! value can't fail; an empty config would still be a valid blob.
    serde_json::to_vec(&config).unwrap_or_default()
}

/// One small file, `/etc/baton-image`, naming the image: a ustar archive.
fn layer_tar(name: &str, tag: &str) -> Vec<u8> {
    let content = format!("{name}:{tag}\n");
    let mut header = [0u8; 512];
    let put = |header: &mut [u8; 512], at: usize, value: &[u8]| {
        header[at..at + value.len()].copy_from_slice(value);
    };
    put(&mut header, 0, b"etc/baton-image");
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", content.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    put(&mut header, 265, b"root");
    put(&mut header, 297, b"root");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());

    let mut tar = header.to_vec();
    let mut data = content.into_bytes();
    data.resize(data.len().div_ceil(512) * 512, 0);
    tar.extend_from_slice(&data);
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

/// gzip with deflate "stored" blocks: valid for any reader, and no compression library needed
/// for a layer of a few kilobytes.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(u16::MAX as usize).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Child, Command, Stdio};

    /// A real `docker-registry` on a random loopback port, killed on drop.
    pub(crate) struct TestRegistry {
        child: Child,
        _dir: tempfile::TempDir,
        pub host: String,
    }

    impl TestRegistry {
        pub(crate) async fn start() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::File::create(&config_path)
                .and_then(|mut f| f.write_all(config.as_bytes()))
                .expect("write registry config");
            let child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn docker-registry");
            let host = format!("127.0.0.1:{port}");
            let registry = Self {
                child,
                _dir: dir,
                host,
            };
            let http = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            for _ in 0..100 {
                let ready = http
                    .get(format!("http://{}/v2/", registry.host))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK);
                if ready {
                    return registry;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("docker-registry did not answer on {}", registry.host);
        }
    }

    impl Drop for TestRegistry {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        let cases = [
            ("web", true),
            ("shop/web", true),
            ("a.b_c__d---e/f", true),
            ("a0/1b", true),
            ("", false),
            ("Web", false),
            ("web/", false),
            ("/web", false),
            ("we..b", false),
            ("we___b", false),
            ("-web", false),
            ("web-", false),
            ("we b", false),
            ("web:1", false),
        ];
        for (name, ok) in cases {
            assert_eq!(validate_name(name).is_ok(), ok, "{name:?}");
        }
        assert!(validate_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        let cases = [
            ("v1", true),
            ("1.2.3-rc.1_b", true),
            ("_x", true),
            ("latest", true),
            ("", false),
            (".v1", false),
            ("-v1", false),
            ("v1/2", false),
            ("v1+b", false),
        ];
        for (tag, ok) in cases {
            assert_eq!(validate_tag(tag).is_ok(), ok, "{tag:?}");
        }
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
    }

    #[test]
    fn references_are_split_into_host_name_and_target() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let tag = |t: &str| Target::Tag(t.to_string());
        let cases: Vec<(String, Option<&str>, &str, Target)> = vec![
            (
                "127.0.0.1:5000/web:v1".into(),
                Some("127.0.0.1:5000"),
                "web",
                tag("v1"),
            ),
            (
                "127.0.0.1:5000/shop/web".into(),
                Some("127.0.0.1:5000"),
                "shop/web",
                tag("latest"),
            ),
            (
                "localhost:5000/web:v1".into(),
                Some("localhost:5000"),
                "web",
                tag("v1"),
            ),
            ("web:v1".into(), None, "web", tag("v1")),
            ("shop/web:v1".into(), None, "shop/web", tag("v1")),
            (
                "docker.io/library/nginx:1.19".into(),
                Some("docker.io"),
                "library/nginx",
                tag("1.19"),
            ),
            (
                format!("h:1/web@{digest}"),
                Some("h:1"),
                "web",
                Target::Digest(digest.clone()),
            ),
            (
                format!("h:1/web:v1@{digest}"),
                Some("h:1"),
                "web",
                Target::Digest(digest.clone()),
            ),
        ];
        for (reference, host, name, target) in cases {
            let parsed = ImageReference::parse(&reference).expect(&reference);
            assert_eq!(parsed.host.as_deref(), host, "{reference}");
            assert_eq!(parsed.name, name, "{reference}");
            assert_eq!(parsed.target, target, "{reference}");
        }
        for bad in [
            "",
            "Web:v1",
            "h:1/web:",
            "h:1/web@sha256:zz",
            "h:x/web:v1",
            "web:v1:v2",
        ] {
            assert!(
                ImageReference::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn localhost_and_the_loopback_address_are_the_same_registry() {
        assert!(same_host("localhost:5000", "127.0.0.1:5000"));
        assert!(same_host("127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(!same_host("127.0.0.1:5001", "127.0.0.1:5000"));
        assert!(!same_host("registry.example:5000", "127.0.0.1:5000"));
    }

    #[test]
    fn the_layer_is_a_gzipped_tar_that_tar_can_read() {
        let layer = gzip_stored(&layer_tar("shop/web", "v1"));
        let mut child = Command::new("tar")
            .args(["-xzOf", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&layer)
            .expect("write");
        let output = child.wait_with_output().expect("tar output");
        assert!(output.status.success());
        assert_eq!(String::from_utf8_lossy(&output.stdout), "shop/web:v1\n");
    }

    #[test]
    fn crc32_matches_the_reference_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn bad_input_is_rejected_before_any_request() {
        assert!(matches!(
            Registry::new("http://127.0.0.1:5000"),
            Err(RegistryError::InvalidAddress { .. })
        ));
        assert!(matches!(
            Registry::new("127.0.0.1:99999"),
            Err(RegistryError::InvalidAddress { .. })
        ));
        let registry = Registry::new("127.0.0.1:9").expect("registry");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let err = registry.push_image("Bad", "v1", &[]).await.expect_err("bad name");
            assert_eq!(
                err.to_string(),
                "invalid repository name \"Bad\": path components must start and end with a lowercase letter or digit"
            );
            let err = registry.push_image("web", "v1+b", &[]).await.expect_err("bad tag");
            assert_eq!(
                err.to_string(),
                "invalid tag \"v1+b\": only letters, digits, '_', '.' and '-' are allowed"
            );
            let err = registry.push_image("web", "v1", &env(&[("A=B", "c")])).await.expect_err("bad env");
            assert!(matches!(err, RegistryError::InvalidEnv { .. }));
        });
    }

    #[tokio::test]
    async fn pushed_images_are_found_with_their_env_and_digest() {
        let server = TestRegistry::start().await;
        let registry = Registry::new(server.host.clone()).expect("registry");
        let vars = env(&[("BATON_SIM_HEALTH", "ok"), ("GREETING", "a=b")]);
        let digest = registry
            .push_image("shop/web", "v1", &vars)
            .await
            .expect("push");
        assert!(digest.starts_with("sha256:") && digest.len() == 71);

        let by_tag = registry
            .inspect(&format!("{}/shop/web:v1", server.host))
            .await
            .expect("inspect");
        let info = by_tag.expect("image is present");
        assert_eq!(info.digest, digest);
        assert_eq!(info.env, vars);

        let by_digest = registry
            .inspect(&format!("{}/shop/web@{digest}", server.host))
            .await
            .expect("inspect");
        assert_eq!(by_digest.map(|i| i.digest), Some(digest.clone()));
        let without_host = registry.inspect("shop/web:v1").await.expect("inspect");
        assert_eq!(without_host.map(|i| i.digest), Some(digest.clone()));

        // Pushing the same content again is idempotent; different env gives a new digest.
        assert_eq!(
            registry
                .push_image("shop/web", "v1", &vars)
                .await
                .expect("push"),
            digest
        );
        let other = registry
            .push_image("shop/web", "v2", &env(&[("BATON_SIM_HEALTH", "fail")]))
            .await
            .expect("push");
        assert_ne!(other, digest);
        let v2 = registry
            .inspect(&format!("{}/shop/web:v2", server.host))
            .await
            .expect("inspect");
        assert_eq!(v2.expect("v2").env, env(&[("BATON_SIM_HEALTH", "fail")]));
    }

    #[tokio::test]
    async fn absent_images_and_other_registries_are_reported_absent() {
        let server = TestRegistry::start().await;
        let registry = Registry::new(server.host.clone()).expect("registry");
        registry.push_image("web", "v1", &[]).await.expect("push");
        let missing = [
            format!("{}/web:v9", server.host),
            format!("{}/nothing:v1", server.host),
            format!("{}/web@sha256:{}", server.host, "0".repeat(64)),
            "registry.example:5000/web:v1".to_string(),
            "docker.io/library/web:v1".to_string(),
        ];
        for reference in missing {
            assert_eq!(
                registry.inspect(&reference).await.expect(&reference),
                None,
                "{reference}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_an_error_not_an_absence() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let registry = Registry::new(format!("127.0.0.1:{port}")).expect("registry");
        let err = registry
            .inspect("web:v1")
            .await
            .expect_err("nobody listens");
        assert!(err.is_retryable(), "{err}");
        assert!(
            err.to_string()
                .starts_with("registry request GET http://127.0.0.1:"),
            "{err}"
        );
    }
}
