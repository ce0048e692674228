//! Registry credentials from a docker `config.json`-style file, and the `WWW-Authenticate`
//! challenges registries answer with. Pure: parsing only, no I/O.
//!
//! The file is the one `docker login` writes (and Kubernetes' `kubernetes.io/dockerconfigjson`
//! secrets hold): `{"auths": {"<host[:port]>": {"auth": base64("user:pass")}}}`, or with
//! `username` and `password` instead of `auth`. Credential helpers (`credsStore`, `credHelpers`)
//! would mean running programs named by the file; they are not supported and refused.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Credentials by registry host (normalised: no scheme, no path, lowercase; Docker Hub's several
/// names are one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    by_host: BTreeMap<String, Credentials>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl AuthConfig {
    /// Parses the file's text; the error names the entry at fault (never a secret).
    pub fn parse(text: &str) -> Result<AuthConfig, String> {
        let file: ConfigFile =
            serde_json::from_str(text).map_err(|e| format!("not a docker config.json: {e}"))?;
        if file.creds_store.is_some() || !file.cred_helpers.is_empty() {
            return Err(
                "credential helpers (credsStore, credHelpers) are not supported; put the \
                 credentials in \"auths\""
                    .into(),
            );
        }
        let mut by_host = BTreeMap::new();
        for (key, entry) in file.auths {
            let host = normalize_host(&key);
            if host.is_empty() {
                return Err(format!("auths: {key:?} names no registry host"));
            }
            let credentials = match (&entry.auth, &entry.username, &entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64_decode(auth.trim())
                        .map_err(|e| format!("auths.{key:?}.auth is not base64: {e}"))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| format!("auths.{key:?}.auth is not UTF-8 text"))?;
                    let (username, password) = decoded.split_once(':').ok_or_else(|| {
                        format!("auths.{key:?}.auth is not base64 of \"user:password\"")
                    })?;
                    Credentials {
                        username: username.to_owned(),
                        password: password.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) if !username.is_empty() => Credentials {
                    username: username.clone(),
                    password: password.clone(),
                },
                _ if entry.identitytoken.is_some() => {
                    return Err(format!(
                        "auths.{key:?}: identity tokens are not supported; give auth or \
                         username and password"
                    ))
                }
                _ => {
                    return Err(format!(
                        "auths.{key:?} has neither auth nor username and password"
                    ))
                }
            };
            if by_host.insert(host.clone(), credentials).is_some() {
                return Err(format!("auths: more than one entry for registry {host}"));
            }
        }
        Ok(AuthConfig { by_host })
    }

    /// The credentials for a registry host as written in image references (`host[:port]`).
    pub fn for_registry(&self, registry: &str) -> Option<&Credentials> {
        self.by_host.get(&normalize_host(registry))
    }

    /// The registries that have credentials, for logs.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.by_host.keys().map(String::as_str)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `Registry.Example.com:5000/x` →
/// `registry.example.com:5000`.
pub fn normalize_host(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

/// Standard base64 (RFC 4648 §4), padding optional, as `docker login` writes it.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for (i, c) in text.bytes().enumerate() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("character {i} is not in the base64 alphabet")),
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("truncated".into());
    }
    Ok(out)
}

/// One challenge of a `WWW-Authenticate` header (RFC 7235), as registries send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    /// Docker's token authentication: get a token from `realm` for `service` and `scope`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value: `Bearer realm="…",service="…",scope="…"` or
/// `Basic realm="…"`. Unknown schemes and a Bearer challenge without a realm give `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm").filter(|r| !r.is_empty())?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `key="value", key=value, …` with quoted values that may hold commas and escaped quotes.
fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
        }
        let key = key.trim().to_ascii_lowercase();
        if !key.is_empty() {
            params.insert(key, value);
        }
        if chars.peek().is_none() {
            break;
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_as_docker_login_writes_it() {
        let table: &[(&str, &[u8])] = &[
            ("dXNlcjpwYXNz", b"user:pass"),
            ("dTpw", b"u:p"),
            ("YTpiYw==", b"a:bc"),
            ("YTpiYw", b"a:bc"),
            ("YTpiY2Q=", b"a:bcd"),
            ("", b""),
            ("Pz8+Pw==", b"??>?"),
            ("Pz8/Pw==", b"???\x3f"),
        ];
        for (text, expected) in table {
            assert_eq!(base64_decode(text).as_deref(), Ok(*expected), "{text}");
        }
        for bad in ["dXNlc*pw", "a", "dXNlcjpwYXNz!"] {
            assert!(base64_decode(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn credentials_are_found_by_host_however_the_file_names_it() {
        let config = AuthConfig::parse(
            r#"{
              "auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOmh1YnBhc3M="},
                "127.0.0.1:5000": {"auth": "dXNlcjpwYTpzcw=="},
                "http://Registry.Example.com:8443/v2/": {"username": "ci", "password": "s3cret"}
              },
              "HttpHeaders": {"User-Agent": "x"}
            }"#,
        )
        .unwrap();
        let table = [
            ("docker.io", Some(("hub", "hubpass"))),
            ("registry-1.docker.io", Some(("hub", "hubpass"))),
            ("127.0.0.1:5000", Some(("user", "pa:ss"))),
            ("127.0.0.1:5001", None),
            ("registry.example.com:8443", Some(("ci", "s3cret"))),
            ("registry.example.com", None),
        ];
        for (host, expected) in table {
            let found = config
                .for_registry(host)
                .map(|c| (c.username.as_str(), c.password.as_str()));
            assert_eq!(found, expected, "{host}");
        }
        assert!(
            !format!("{config:?}").contains("hubpass"),
            "Debug shows a password"
        );
    }

    #[test]
    fn unusable_credential_files_are_refused_with_the_entry_at_fault() {
        let table = [
            ("not json", "not a docker config.json"),
            (
                r#"{"auths": {"h": {"auth": "***"}}}"#,
                "\"h\".auth is not base64",
            ),
            (
                r#"{"auths": {"h": {"auth": "dXNlcg=="}}}"#,
                "not base64 of \"user:password\"",
            ),
            (r#"{"auths": {"h": {}}}"#, "neither auth nor username"),
            (
                r#"{"auths": {"h": {"identitytoken": "t"}}}"#,
                "identity tokens",
            ),
            (r#"{"credsStore": "desktop"}"#, "credential helpers"),
            (
                r#"{"auths": {"docker.io": {"auth": "dTpw"}, "index.docker.io": {"auth": "dTpw"}}}"#,
                "more than one entry for registry docker.io",
            ),
        ];
        for (text, expected) in table {
            let e = AuthConfig::parse(text).unwrap_err();
            assert!(e.contains(expected), "{text}: {e}");
        }
        assert_eq!(AuthConfig::parse("{}"), Ok(AuthConfig::default()));
    }

    #[test]
    fn challenges_are_parsed_as_registries_send_them() {
        let table = [
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                Some(Challenge::Bearer {
                    realm: "https://auth.docker.io/token".into(),
                    service: Some("registry.docker.io".into()),
                    scope: Some("repository:library/nginx:pull".into()),
                }),
            ),
            (
                // Scopes with commas inside quotes, spaces after commas, unquoted values.
                r#"bearer realm="http://127.0.0.1:9/t", scope="repository:a/b:pull,push", service=reg"#,
                Some(Challenge::Bearer {
                    realm: "http://127.0.0.1:9/t".into(),
                    service: Some("reg".into()),
                    scope: Some("repository:a/b:pull,push".into()),
                }),
            ),
            (
                r#"Bearer realm="https://ghcr.io/token",service="ghcr.io""#,
                Some(Challenge::Bearer {
                    realm: "https://ghcr.io/token".into(),
                    service: Some("ghcr.io".into()),
                    scope: None,
                }),
            ),
            (r#"Basic realm="Registry Realm""#, Some(Challenge::Basic)),
            ("Basic", Some(Challenge::Basic)),
            (r#"Bearer service="x""#, None),
            (r#"Negotiate abc"#, None),
            ("", None),
        ];
        for (header, expected) in table {
            assert_eq!(parse_challenge(header), expected, "{header}");
        }
    }
}
