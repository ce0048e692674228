//! Resolving an image reference to its immutable digest through the OCI distribution API of its
//! registry: `HEAD /v2/<name>/manifests/<reference>` (a `GET` when the answer lacks a usable
//! `Docker-Content-Digest`, whose body is then hashed), with anonymous, basic or bearer-token
//! authentication as the registry's `WWW-Authenticate` challenge asks.
//!
//! HEAD first because Docker Hub does not count HEAD requests against its pull rate limit.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::{parse_challenge, AuthConfig, Challenge, Credentials};
use crate::decide::{is_sha256_digest, ImageRef};
use crate::error::{Error, ResolveError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// distribution refuses manifests over 4 MiB; so does this client.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
const MAX_SMALL_BODY: usize = 64 * 1024;
const MAX_TOKEN_BYTES: usize = 1024 * 1024;

/// Every manifest kind an image can be pushed as: OCI and Docker v2, single and multi-platform.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// An image pinned to its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `registry/repository@sha256:…`
    pub image_ref: String,
    pub digest: String,
}

/// A client of the registries images come from.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    auth: AuthConfig,
    plain_http: BTreeSet<String>,
    retry_budget: Duration,
}

// No Debug: it holds secrets.
#[derive(Clone)]
enum Auth {
    Basic(Credentials),
    Bearer(String),
}

impl RegistryClient {
    /// `plain_http`: registries (`host[:port]`, as in image references) reached over HTTP; every
    /// other one over HTTPS. `retry_budget`: how long an unreachable or failing registry is
    /// asked again before the build fails.
    pub fn new(
        auth: AuthConfig,
        plain_http: BTreeSet<String>,
        retry_budget: Duration,
    ) -> Result<Self, Error> {
        baton_core::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("baton-builder/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::HttpClient)?;
        Ok(Self {
            http,
            auth,
            plain_http,
            retry_budget,
        })
    }

    /// Resolves `image` to its digest, asking again with back-off while the registry is
    /// unreachable or failing, for at most the retry budget.
    pub async fn resolve(&self, image: &ImageRef) -> Result<Resolved, ResolveError> {
        baton_core::retry::retry(self.retry_budget, ResolveError::is_transient, || async {
            let result = self.resolve_once(image).await;
            if let Err(e) = &result {
                if e.is_transient() {
                    tracing::warn!(%image, error = %e, "registry trouble; will ask again");
                }
            }
            result
        })
        .await
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.plain_http.contains(&host.to_ascii_lowercase()) {
            "http"
        } else {
            "https"
        }
    }

    async fn resolve_once(&self, image: &ImageRef) -> Result<Resolved, ResolveError> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme(&image.registry),
            image.api_host(),
            image.repository,
            image.reference()
        );
        let mut auth: Option<Auth> = None;
        let mut method = Method::HEAD;
        // Each round either returns or moves on for good (HEAD → GET, anonymous → authorised),
        // so four rounds are enough.
        for _ in 0..4 {
            let request = self
                .http
                .request(method.clone(), &url)
                .header(ACCEPT, MANIFEST_ACCEPT);
            let response = self.send(request, auth.as_ref(), image).await?;
            let status = response.status();
            if status.is_success() {
                let header = digest_header(&response);
                if method == Method::HEAD {
                    match header {
                        Some(digest) => return finish(image, digest),
                        // No usable digest header: fetch the manifest and hash it.
                        None => {
                            method = Method::GET;
                            continue;
                        }
                    }
                }
                let body = read_capped(response, MAX_MANIFEST_BYTES, image, "manifest").await?;
                let computed = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
                if let Some(header) = header {
                    if header != computed {
                        return Err(invalid(
                            image,
                            format!(
                                "Docker-Content-Digest {header} does not match the manifest's \
                                 sha256 {computed}"
                            ),
                        ));
                    }
                }
                return finish(image, computed);
            }
            match status {
                StatusCode::UNAUTHORIZED if auth.is_none() => {
                    auth = Some(self.authorize(image, &response).await?);
                }
                // A HEAD answer has no body; a GET tells which error code the registry means.
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                    if method == Method::HEAD =>
                {
                    method = Method::GET;
                }
                StatusCode::NOT_FOUND => {
                    return Err(ResolveError::NotFound {
                        image: image.to_string(),
                        registry: image.registry.clone(),
                        code: error_codes(response).await,
                    })
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let code = if method == Method::GET {
                        error_codes(response).await
                    } else {
                        None
                    };
                    let hint = if auth.is_some() {
                        "; the repository may not exist, or the credentials cannot pull it"
                    } else {
                        ""
                    };
                    return Err(ResolveError::Denied {
                        image: image.to_string(),
                        registry: image.registry.clone(),
                        message: format!(
                            "HTTP {}{}{hint}",
                            status.as_u16(),
                            code.map(|c| format!(" ({c})")).unwrap_or_default()
                        ),
                    });
                }
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    let code = if method == Method::GET {
                        error_codes(response).await
                    } else {
                        None
                    };
                    return Err(ResolveError::Server {
                        image: image.to_string(),
                        registry: image.registry.clone(),
                        status: s.as_u16(),
                        code,
                    });
                }
                s => {
                    let code = if method == Method::GET {
                        error_codes(response).await
                    } else {
                        None
                    };
                    return Err(invalid(
                        image,
                        format!(
                            "unexpected HTTP {}{}",
                            s.as_u16(),
                            code.map(|c| format!(" ({c})")).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Err(invalid(image, "no answer after four requests".into()))
    }

    async fn send(
        &self,
        request: RequestBuilder,
        auth: Option<&Auth>,
        image: &ImageRef,
    ) -> Result<Response, ResolveError> {
        let request = match auth {
            Some(Auth::Basic(c)) => request.basic_auth(&c.username, Some(&c.password)),
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };
        request.send().await.map_err(|e| unreachable(image, "", &e))
    }

    /// Answers a 401: basic credentials, or a token from the challenge's realm.
    async fn authorize(&self, image: &ImageRef, response: &Response) -> Result<Auth, ResolveError> {
        let challenges: Vec<Challenge> = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .collect();
        let credentials = self.auth.for_registry(&image.registry);
        let denied = |message: String| ResolveError::Denied {
            image: image.to_string(),
            registry: image.registry.clone(),
            message,
        };
        for challenge in &challenges {
            if let Challenge::Bearer {
                realm,
                service,
                scope,
            } = challenge
            {
                let token = self
                    .token(
                        image,
                        realm,
                        service.as_deref(),
                        scope.as_deref(),
                        credentials,
                    )
                    .await?;
                return Ok(Auth::Bearer(token));
            }
        }
        if challenges.contains(&Challenge::Basic) {
            return credentials.cloned().map(Auth::Basic).ok_or_else(|| {
                denied(format!(
                    "HTTP 401: the registry asks for credentials, and --registry-auth has none \
                     for {}",
                    image.registry
                ))
            });
        }
        Err(denied(
            "HTTP 401 without an authentication challenge this client understands".into(),
        ))
    }

    /// Docker's token authentication: `GET <realm>?service=…&scope=…`, with basic credentials
    /// when there are some; answers `{"token": …}` or `{"access_token": …}`.
    async fn token(
        &self,
        image: &ImageRef,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        credentials: Option<&Credentials>,
    ) -> Result<String, ResolveError> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| invalid(image, format!("token realm {realm:?} is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let host = url_host(&url);
                if credentials.is_some() && !self.plain_http.contains(&host) {
                    return Err(ResolveError::Denied {
                        image: image.to_string(),
                        registry: image.registry.clone(),
                        message: format!(
                            "will not send credentials over plain HTTP to the token service \
                             {realm} (list {host} with --plain-http-registry to allow it)"
                        ),
                    });
                }
            }
            other => {
                return Err(invalid(
                    image,
                    format!("token realm {realm:?} has scheme {other:?}, not https"),
                ))
            }
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            let default_scope = format!("repository:{}:pull", image.repository);
            for scope in scope.unwrap_or(&default_scope).split(' ') {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url).header(ACCEPT, "application/json");
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, Some(&c.password));
        }
        let context = format!("token service {realm}: ");
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(image, &context, &e))?;
        let status = response.status();
        if !status.is_success() {
            let code = error_codes(response).await;
            let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ResolveError::Denied {
                    image: image.to_string(),
                    registry: image.registry.clone(),
                    message: format!(
                        "token service {realm} answered HTTP {}{code}{}",
                        status.as_u16(),
                        if credentials.is_some() {
                            " to the configured credentials"
                        } else {
                            " without credentials"
                        }
                    ),
                },
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    ResolveError::Server {
                        image: image.to_string(),
                        registry: image.registry.clone(),
                        status: s.as_u16(),
                        code: Some(format!("token service {realm}")),
                    }
                }
                s => invalid(
                    image,
                    format!("token service {realm} answered HTTP {}{code}", s.as_u16()),
                ),
            });
        }
        let body = read_capped(response, MAX_TOKEN_BYTES, image, "token").await?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            invalid(
                image,
                format!("token service {realm} answered no JSON: {e}"),
            )
        })?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(image, format!("token service {realm} gave no token")))
    }
}

/// Checks `--plain-http-registry` values (`host[:port]`) and normalises them to lowercase.
pub fn plain_http_registries(values: &[String]) -> Result<BTreeSet<String>, Error> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| {
            let bad = || Error::PlainHttpRegistry {
                value: v.to_owned(),
            };
            let (host, port) = match v.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, Some(p)),
                _ => (v, None),
            };
            // An IPv6 address is bracketed; any other host has no ':'.
            let bracketed = host.starts_with('[') && host.ends_with(']');
            let host_ok = !host.is_empty()
                && (bracketed || !host.contains(':'))
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
            let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
            if host_ok && port_ok {
                Ok(v.to_ascii_lowercase())
            } else {
                Err(bad())
            }
        })
        .collect()
}

fn finish(image: &ImageRef, digest: String) -> Result<Resolved, ResolveError> {
    if let Some(expected) = &image.digest {
        if *expected != digest {
            return Err(ResolveError::DigestMismatch {
                image: image.to_string(),
                registry: image.registry.clone(),
                expected: expected.clone(),
                actual: digest,
            });
        }
    }
    Ok(Resolved {
        image_ref: image.pinned(&digest),
        digest,
    })
}

fn invalid(image: &ImageRef, message: String) -> ResolveError {
    ResolveError::Invalid {
        image: image.to_string(),
        registry: image.registry.clone(),
        message,
    }
}

/// `Docker-Content-Digest`, when it is a sha256 digest (others are hashed by this client).
fn digest_header(response: &Response) -> Option<String> {
    response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|d| is_sha256_digest(d))
        .map(str::to_owned)
}

/// `host[:port]` of a URL, as in `--plain-http-registry`.
fn url_host(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

/// A request that got no answer. A host name that does not exist, a certificate that is not
/// trusted, or TLS spoken to a plain-HTTP server will not mend by waiting; the rest may.
fn unreachable(image: &ImageRef, context: &str, e: &reqwest::Error) -> ResolveError {
    let chain = error_chain(e);
    let permanent = [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
        "certificate",
        "InvalidContentType",
        "corrupt message",
    ];
    let transient = !permanent.iter().any(|p| chain.contains(p));
    let hint = if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
        format!(
            " (if {} serves plain HTTP, list it with --plain-http-registry)",
            image.registry
        )
    } else {
        String::new()
    };
    ResolveError::Unreachable {
        registry: image.registry.clone(),
        message: format!("{context}{chain}{hint}"),
        transient,
    }
}

/// The error and its sources, without the URL (the reason names the registry already).
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let top = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        e.to_string()
            .split(" for url (")
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    parts.push(top);
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // hyper's wrapper adds nothing a reader needs.
        let noise = text.starts_with("client error (");
        if !text.is_empty() && !noise && parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

async fn read_capped(
    mut response: Response,
    limit: usize,
    image: &ImageRef,
    what: &str,
) -> Result<Vec<u8>, ResolveError> {
    let too_large = |size: u64| {
        invalid(
            image,
            format!("{what} of {size} bytes is larger than {limit}"),
        )
    };
    if let Some(len) = response.content_length() {
        if len > limit as u64 {
            return Err(too_large(len));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| unreachable(image, "reading the answer: ", &e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The registry's error codes from a body `{"errors": [{"code": …, "message": …}]}`, e.g.
/// `MANIFEST_UNKNOWN: manifest unknown`.
async fn error_codes(response: Response) -> Option<String> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let mut response = response;
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_SMALL_BODY {
            return None;
        }
    }
    let errors: Errors = serde_json::from_slice(&body).ok()?;
    let text: Vec<String> = errors
        .errors
        .into_iter()
        .filter_map(|e| match (e.code, e.message) {
            (Some(c), Some(m)) if !m.is_empty() => Some(format!("{c}: {m}")),
            (Some(c), _) => Some(c),
            (None, Some(m)) => Some(m),
            (None, None) => None,
        })
        .map(|t| t.chars().filter(|c| !c.is_control()).take(200).collect())
        .take(5)
        .collect();
    (!text.is_empty()).then(|| text.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_registries_are_host_and_port() {
        let ok = plain_http_registries(&[
            "127.0.0.1:5000".into(),
            "Registry.Local".into(),
            " ".into(),
            "[::1]:5000".into(),
        ])
        .unwrap();
        assert_eq!(
            ok.into_iter().collect::<Vec<_>>(),
            ["127.0.0.1:5000", "[::1]:5000", "registry.local"]
        );
        for bad in ["http://x:5000", "x:port", "x:0", "a/b", ":5000"] {
            assert!(
                plain_http_registries(&[bad.into()]).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
