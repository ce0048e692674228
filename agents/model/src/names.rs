//! Names that go into subjects: environment and app names (DNS labels) and release ids (UUID v7).
//!
//! Anything else is refused before it is published, so a subject can always be parsed back.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than 63 characters")]
    TooLong { what: &'static str, value: String },
    #[error(
        "{what} {value:?} is not a DNS label: use lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
    )]
    NotDnsLabel { what: &'static str, value: String },
    #[error("release id {value:?} is not a UUID")]
    NotUuid { value: String },
    #[error("release id {value:?} is not a version 7 UUID in lowercase hyphenated form")]
    NotUuidV7 { value: String },
}

/// Checks a DNS label as Kubernetes does for namespaces (RFC 1123), but starting with a letter.
pub fn validate_dns_label(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > 63 {
        return Err(NameError::TooLong {
            what,
            value: value.to_owned(),
        });
    }
    let bytes = value.as_bytes();
    let ok_inner = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ok_first = bytes[0].is_ascii_lowercase();
    let ok_last =
        bytes[bytes.len() - 1].is_ascii_lowercase() || bytes[bytes.len() - 1].is_ascii_digit();
    if ok_inner && ok_first && ok_last {
        Ok(())
    } else {
        Err(NameError::NotDnsLabel {
            what,
            value: value.to_owned(),
        })
    }
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_dns_label($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

label_type!(
    /// An environment name such as `production`: a DNS label.
    EnvName,
    "environment name"
);
label_type!(
    /// An application name such as `checkout`: a DNS label (it names the Deployment).
    AppName,
    "app name"
);

/// A release id: a UUID v7, written lowercase and hyphenated (as it appears in subjects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReleaseId(Uuid);

impl ReleaseId {
    /// A new id; v7 ids sort by creation time.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(value: &str) -> Result<Self, NameError> {
        let uuid = Uuid::parse_str(value).map_err(|_| NameError::NotUuid {
            value: value.to_owned(),
        })?;
        // Only the canonical form: subjects are compared byte for byte.
        if uuid.get_version_num() != 7 || uuid.hyphenated().to_string() != value {
            return Err(NameError::NotUuidV7 {
                value: value.to_owned(),
            });
        }
        Ok(Self(uuid))
    }

    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl FromStr for ReleaseId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_checked_like_kubernetes_names() {
        let long = "a".repeat(64);
        let cases: &[(&str, bool)] = &[
            ("web", true),
            ("checkout-api", true),
            ("a1", true),
            ("a", true),
            (&long[..63], true),
            (&long, false),
            ("", false),
            ("Web", false),
            ("1web", false),
            ("-web", false),
            ("web-", false),
            ("web.api", false),
            ("web_api", false),
            ("web*", false),
            ("we b", false),
            ("wéb", false),
            (">", false),
        ];
        for (value, ok) in cases {
            assert_eq!(AppName::new(*value).is_ok(), *ok, "{value:?}");
            assert_eq!(EnvName::new(*value).is_ok(), *ok, "{value:?}");
        }
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let err = EnvName::new("Prod").unwrap_err().to_string();
        assert!(
            err.contains("environment name") && err.contains("\"Prod\""),
            "{err}"
        );
    }

    #[test]
    fn release_ids_must_be_canonical_uuid_v7() {
        let id = ReleaseId::generate();
        assert_eq!(ReleaseId::parse(&id.to_string()), Ok(id));
        assert!(ReleaseId::parse("not-a-uuid").is_err());
        // v4
        assert!(ReleaseId::parse("6f9619ff-8b86-4d11-b42d-00c04fc964ff").is_err());
        // v7 but uppercase
        assert!(ReleaseId::parse(&id.to_string().to_uppercase()).is_err());
        // v7 but simple form
        assert!(ReleaseId::parse(&id.uuid().simple().to_string()).is_err());
    }
}

/// A URL (or a comma-separated list of them) fit for logs and errors: any `user:password@`
/// part is replaced by `***@`.
pub fn redact_url(text: &str) -> String {
    text.split(',')
        .map(|url| match url.split_once("://") {
            Some((scheme, rest)) => {
                let authority_end = rest.find('/').unwrap_or(rest.len());
                match rest[..authority_end].rfind('@') {
                    Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                    None => url.to_string(),
                }
            }
            None => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn credentials_in_urls_are_hidden() {
        assert_eq!(
            redact_url("nats://baton:s3cret@nats-0:4222,nats://nats-1:4222"),
            "nats://***@nats-0:4222,nats://nats-1:4222"
        );
        assert_eq!(
            redact_url("https://u:p@host/path@x?q=1"),
            "https://***@host/path@x?q=1"
        );
        assert_eq!(
            redact_url("http://10.0.0.1:8080/health"),
            "http://10.0.0.1:8080/health"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
