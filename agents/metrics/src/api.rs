//! The queries the metrics agent answers over NATS request/reply, and their validation. Pure.
//!
//! | subject | request | reply |
//! |---|---|---|
//! | `baton.v1.api.metrics.report` | `{"window_seconds": 2592000, "env"?: "prod", "app"?: "web"}` | a [`Report`](crate::dora::Report) |
//! | `baton.v1.api.releases.list` | `{"env"?: "prod", "app"?: "web", "limit"?: 20}` | an array of [`ReleaseView`](crate::history::ReleaseView), newest first |
//!
//! A request that is not valid gets `{"error": "<what is wrong>"}`.

use baton_core::names::{AppName, EnvName};
use serde::{Deserialize, Serialize};

use crate::history::{Filter, History};

/// Queue group of the responders: of several replicas, one answers each request.
pub const QUEUE_GROUP: &str = "baton-metrics";
/// `baton.v1.api.` + this: the delivery report.
pub const REPORT: &str = "metrics.report";
/// `baton.v1.api.` + this: the release history.
pub const RELEASES: &str = "releases.list";
/// Larger requests are refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The longest window: a year and a day (the event stream keeps at least 90 days).
pub const MAX_WINDOW_SECONDS: u64 = 366 * 86_400;
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 1000;

/// A validated query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Report { window_seconds: u64, filter: Filter },
    Releases { filter: Filter, limit: usize },
}

/// Why a request was refused; the text goes back to the asker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown query subject {0:?}")]
    UnknownSubject(String),
    #[error("request of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("request is not valid JSON for {query}: {message}")]
    BadJson {
        query: &'static str,
        message: String,
    },
    #[error("{field}: {message}")]
    BadField {
        field: &'static str,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportWire {
    window_seconds: u64,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    app: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleasesWire {
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

/// The error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

fn filter(env: Option<String>, app: Option<String>) -> Result<Filter, RequestError> {
    Ok(Filter {
        env: env
            .map(EnvName::new)
            .transpose()
            .map_err(|e| RequestError::BadField {
                field: "env",
                message: e.to_string(),
            })?,
        app: app
            .map(AppName::new)
            .transpose()
            .map_err(|e| RequestError::BadField {
                field: "app",
                message: e.to_string(),
            })?,
    })
}

/// Parses and validates a request that came on `name` (the subject after `baton.v1.api.`).
pub fn parse(name: &str, payload: &[u8]) -> Result<Query, RequestError> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge {
            size: payload.len(),
            limit: MAX_REQUEST_BYTES,
        });
    }
    let bad_json = |query: &'static str| {
        move |e: serde_json::Error| RequestError::BadJson {
            query,
            message: e.to_string(),
        }
    };
    match name {
        REPORT => {
            let wire: ReportWire = serde_json::from_slice(payload).map_err(bad_json(REPORT))?;
            if wire.window_seconds == 0 || wire.window_seconds > MAX_WINDOW_SECONDS {
                return Err(RequestError::BadField {
                    field: "window_seconds",
                    message: format!(
                        "{} is outside 1..={MAX_WINDOW_SECONDS} (at most 366 days)",
                        wire.window_seconds
                    ),
                });
            }
            Ok(Query::Report {
                window_seconds: wire.window_seconds,
                filter: filter(wire.env, wire.app)?,
            })
        }
        RELEASES => {
            // An empty request asks for the defaults.
            let wire: ReleasesWire = if payload.iter().all(u8::is_ascii_whitespace) {
                ReleasesWire {
                    env: None,
                    app: None,
                    limit: None,
                }
            } else {
                serde_json::from_slice(payload).map_err(bad_json(RELEASES))?
            };
            let limit = wire.limit.unwrap_or(DEFAULT_LIMIT as u64);
            if limit == 0 || limit > MAX_LIMIT as u64 {
                return Err(RequestError::BadField {
                    field: "limit",
                    message: format!("{limit} is outside 1..={MAX_LIMIT}"),
                });
            }
            Ok(Query::Releases {
                filter: filter(wire.env, wire.app)?,
                limit: limit as usize,
            })
        }
        other => Err(RequestError::UnknownSubject(other.to_owned())),
    }
}

/// The JSON answer to a valid query over the history, as of `now_ms`.
pub fn answer(history: &History, query: &Query, now_ms: i64) -> Vec<u8> {
    let json = match query {
        Query::Report {
            window_seconds,
            filter,
        } => serde_json::to_vec(&crate::dora::report(
            history,
            filter,
            *window_seconds,
            now_ms,
        )),
        Query::Releases { filter, limit } => serde_json::to_vec(&history.list(filter, *limit)),
    };
    json.unwrap_or_else(|e| error_reply(&format!("cannot encode the answer: {e}")))
}

/// `{"error": "..."}`.
pub fn error_reply(message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorReply {
        error: message.to_owned(),
    })
    .unwrap_or_else(|_| br#"{"error":"unprintable error"}"#.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(env: Option<&str>, app: Option<&str>) -> Filter {
        Filter {
            env: env.map(|e| EnvName::new(e).unwrap()),
            app: app.map(|a| AppName::new(a).unwrap()),
        }
    }

    #[test]
    fn valid_requests_become_queries() {
        let table: [(&str, &str, Query); 5] = [
            (
                REPORT,
                r#"{"window_seconds": 2592000}"#,
                Query::Report {
                    window_seconds: 2_592_000,
                    filter: f(None, None),
                },
            ),
            (
                REPORT,
                r#"{"window_seconds": 60, "env": "prod", "app": "web"}"#,
                Query::Report {
                    window_seconds: 60,
                    filter: f(Some("prod"), Some("web")),
                },
            ),
            (
                REPORT,
                r#"{"window_seconds": 60, "env": null}"#,
                Query::Report {
                    window_seconds: 60,
                    filter: f(None, None),
                },
            ),
            (
                RELEASES,
                "",
                Query::Releases {
                    filter: f(None, None),
                    limit: DEFAULT_LIMIT,
                },
            ),
            (
                RELEASES,
                r#"{"app": "web", "limit": 5}"#,
                Query::Releases {
                    filter: f(None, Some("web")),
                    limit: 5,
                },
            ),
        ];
        for (name, body, query) in table {
            assert_eq!(parse(name, body.as_bytes()), Ok(query), "{body}");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let table = [
            (REPORT, "", "not valid JSON for metrics.report"),
            (REPORT, "{}", "missing field `window_seconds`"),
            (
                REPORT,
                r#"{"window_seconds": 0}"#,
                "window_seconds: 0 is outside",
            ),
            (
                REPORT,
                r#"{"window_seconds": 99999999999}"#,
                "window_seconds: 99999999999 is outside",
            ),
            (REPORT, r#"{"window_seconds": -5}"#, "invalid value"),
            (REPORT, r#"{"window_seconds": "30d"}"#, "invalid type"),
            (
                REPORT,
                r#"{"window_seconds": 60, "env": "Prod"}"#,
                "env: environment name \"Prod\" is not a DNS label",
            ),
            (
                REPORT,
                r#"{"window_seconds": 60, "app": ""}"#,
                "app: app name is empty",
            ),
            (
                REPORT,
                r#"{"window_seconds": 60, "colour": "red"}"#,
                "unknown field `colour`",
            ),
            (RELEASES, r#"{"limit": 0}"#, "limit: 0 is outside 1..=1000"),
            (RELEASES, r#"{"limit": 5000}"#, "limit: 5000 is outside"),
            (RELEASES, "[1, 2]", "not valid JSON for releases.list"),
            ("releases.delete", "{}", "unknown query subject"),
        ];
        for (name, body, why) in table {
            let err = parse(name, body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(why), "{body}: {err}");
        }
        let huge = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(parse(RELEASES, &huge)
            .unwrap_err()
            .to_string()
            .contains("larger than the limit"));
    }

    #[test]
    fn errors_are_json_objects() {
        let reply: ErrorReply = serde_json::from_slice(&error_reply("bad \"window\"")).unwrap();
        assert_eq!(reply.error, "bad \"window\"");
    }

    #[test]
    fn answers_are_json_of_the_history() {
        let mut h = History::new();
        crate::testing::Script::release("staging", "web", 1_000)
            .succeed(2_000)
            .feed(&mut h);
        let list: Vec<crate::history::ReleaseView> = serde_json::from_slice(&answer(
            &h,
            &Query::Releases {
                filter: f(None, None),
                limit: 5,
            },
            10_000,
        ))
        .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].status, "succeeded");
        let report: crate::dora::Report = serde_json::from_slice(&answer(
            &h,
            &Query::Report {
                window_seconds: 60,
                filter: f(None, None),
            },
            60_000,
        ))
        .unwrap();
        assert_eq!(report.releases.succeeded, 1);
        assert_eq!(report.from, "1970-01-01T00:00:00Z");
    }
}
