//! What the builder does next, decided from the release's folded history alone. Pure: no tokio,
//! no NATS, no HTTP — so every case is a line in a table test.
//!
//! A release needs one build verdict (`build.succeeded` or `build.failed`). When the history has
//! one, there is nothing to do, however often the request is delivered. When it has
//! `build.started` but no verdict, an earlier attempt died midway (a crash, a shutdown): the build
//! runs again, without a second `build.started`.

use std::fmt;
use std::time::Duration;

use baton_core::config::build_timeout;
use baton_core::fold::ReleaseState;
use baton_core::EventType;
use baton_proto::v1::ReleaseSpec;

/// Docker Hub: the host in image references, and the host of its registry API.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The next thing to do for a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing: the release has its verdict already, or has ended.
    Nothing(&'static str),
    /// Publish `build.failed` with this reason without building (a spec the builder cannot use).
    Fail {
        reason: String,
    },
    Build(Plan),
}

/// A build to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The image as the spec names it (for `build.started` and the command's `{image}`).
    pub requested: String,
    pub image: ImageRef,
    pub backend: Backend,
    /// Whether to publish `build.started` (false when an earlier attempt did).
    pub announce: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Resolve a pushed image to its digest.
    Resolve,
    /// Run a command that builds and pushes the image, then resolve it.
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
}

impl Backend {
    /// The name carried by `build.started`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Resolve => "resolve",
            Backend::Command { .. } => "command",
        }
    }
}

/// Decides from the folded history. `trigger` is the spec of the request being handled, used
/// when the history (read just after) does not show it yet.
pub fn next(state: &ReleaseState, trigger: &ReleaseSpec) -> Next {
    if state.image_ref.is_some() {
        return Next::Nothing("the release has a build already");
    }
    if state
        .failure
        .as_ref()
        .is_some_and(|f| f.stage == EventType::BuildFailed)
    {
        return Next::Nothing("the release's build failed already");
    }
    if state.terminal.is_some() {
        return Next::Nothing("the release has ended");
    }
    let spec = state.spec.as_ref().unwrap_or(trigger);
    let announce = !state.build_started;
    let image = match ImageRef::parse(&spec.image) {
        Ok(image) => image,
        Err(e) => {
            return Next::Fail {
                reason: format!("image {:?} cannot be resolved: {e}", spec.image),
            }
        }
    };
    let backend = match spec.build.as_ref().filter(|b| !b.argv.is_empty()) {
        None => Backend::Resolve,
        Some(build) => {
            if build.argv[0].is_empty() {
                return Next::Fail {
                    reason: "build command has an empty program (spec.build.argv[0])".into(),
                };
            }
            let timeout = build_timeout(build.timeout_seconds);
            Backend::Command {
                argv: build.argv.clone(),
                timeout,
            }
        }
    };
    Next::Build(Plan {
        requested: spec.image.clone(),
        image,
        backend,
        announce,
    })
}

/// An image reference split as the registry API needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry as written in references (`127.0.0.1:5000`, `ghcr.io`, `docker.io`).
    pub registry: String,
    /// The repository path (`team/web`; `library/nginx` on Docker Hub for single names).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when the reference pins one.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `[host[:port]/]path[:tag][@sha256:…]` as docker does: the first component is a
    /// host when it has a `.` or `:` or is `localhost`; without one the image is on Docker Hub.
    pub fn parse(image: &str) -> Result<ImageRef, String> {
        baton_core::validate::image_reference(image)?;
        let (name_tag, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d.to_owned())),
            None => (image, None),
        };
        let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(name_tag[last_slash + i + 1..].to_owned()),
            ),
            None => (name_tag, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_ascii_lowercase(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host serving the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest when pinned, else the tag (`latest` by default).
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The immutable reference to deploy: `registry/repository@sha256:…`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether `s` is `sha256:` and 64 lowercase hex digits, the only digests Baton deploys.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What the placeholders of a build command stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vars<'a> {
    pub image: &'a str,
    pub app: &'a str,
    pub env: &'a str,
    pub release_id: &'a str,
}

/// Substitutes `{image}`, `{app}`, `{env}` and `{release_id}` inside each argument. It is a
/// template, not a shell: each argument stays one argument whatever it holds, and any other
/// text in braces is left as it is.
pub fn render_argv(template: &[String], vars: &Vars<'_>) -> Vec<String> {
    template.iter().map(|arg| render(arg, vars)).collect()
}

fn render(arg: &str, vars: &Vars<'_>) -> String {
    let table = [
        ("{image}", vars.image),
        ("{app}", vars.app),
        ("{env}", vars.env),
        ("{release_id}", vars.release_id),
    ];
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    'scan: while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        for (placeholder, value) in table {
            if let Some(after) = rest.strip_prefix(placeholder) {
                out.push_str(value);
                rest = after;
                continue 'scan;
            }
        }
        out.push('{');
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

/// How a build command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEnd {
    Exited(i32),
    Signalled(i32),
    TimedOut(Duration),
    NotStarted(String),
}

impl CommandEnd {
    /// `None` when the command succeeded; else the reason for `build.failed`.
    pub fn failure(&self) -> Option<String> {
        match self {
            CommandEnd::Exited(0) => None,
            CommandEnd::Exited(code) => Some(format!("build command exited with code {code}")),
            CommandEnd::Signalled(signal) => {
                Some(format!("build command was killed by signal {signal}"))
            }
            CommandEnd::TimedOut(after) => Some(format!(
                "build command timed out after {}s and was killed",
                after.as_secs()
            )),
            CommandEnd::NotStarted(why) => Some(format!("build command could not start: {why}")),
        }
    }
}

impl fmt::Display for CommandEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandEnd::Exited(code) => write!(f, "exited with code {code}"),
            CommandEnd::Signalled(signal) => write!(f, "killed by signal {signal}"),
            CommandEnd::TimedOut(after) => write!(f, "timed out after {}s", after.as_secs()),
            CommandEnd::NotStarted(why) => write!(f, "could not start: {why}"),
        }
    }
}

/// The object-store key of a release's build output.
pub fn log_key(release_id: &str) -> String {
    format!("builds/{release_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::event::Event;
    use baton_core::ids::EventKey;
    use baton_core::names::ReleaseId;
    use baton_proto::v1::envelope::Payload;
    use baton_proto::v1::*;

    fn spec(image: &str, argv: &[&str], timeout: u32) -> ReleaseSpec {
        ReleaseSpec {
            app: "web".into(),
            env: "staging".into(),
            namespace: "web".into(),
            image: image.into(),
            build: (!argv.is_empty()).then(|| BuildParams {
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                timeout_seconds: timeout,
            }),
            ..Default::default()
        }
    }

    fn history(rid: ReleaseId, payloads: Vec<Payload>) -> ReleaseState {
        let events: Vec<Event> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let key = format!("{i}");
                Event::new(rid, EventKey::Named(&key), p, Source::default(), "t", "")
            })
            .collect();
        baton_core::fold(&events)
    }

    fn requested(s: &ReleaseSpec) -> Payload {
        Payload::ReleaseRequested(ReleaseRequested {
            spec: Some(s.clone()),
        })
    }

    #[test]
    fn the_next_step_follows_from_the_history() {
        let rid = ReleaseId::generate();
        let resolve = spec("127.0.0.1:5000/web:v1", &[], 0);
        let command = spec("127.0.0.1:5000/web:v1", &["/usr/bin/make", "push"], 0);
        let started = Payload::BuildStarted(BuildStarted::default());
        let succeeded = Payload::BuildSucceeded(BuildSucceeded {
            image_ref: format!("127.0.0.1:5000/web@sha256:{}", "a".repeat(64)),
            digest: format!("sha256:{}", "a".repeat(64)),
            log_object: String::new(),
        });
        let failed = Payload::BuildFailed(BuildFailed {
            reason: "no".into(),
            log_object: String::new(),
        });
        let image = ImageRef::parse("127.0.0.1:5000/web:v1").unwrap();
        let plan = |backend: Backend, announce| {
            Next::Build(Plan {
                requested: "127.0.0.1:5000/web:v1".into(),
                image: image.clone(),
                backend,
                announce,
            })
        };
        let make = Backend::Command {
            argv: vec!["/usr/bin/make".into(), "push".into()],
            timeout: build_timeout(0),
        };
        let table = [
            (
                "a new request",
                vec![requested(&resolve)],
                plan(Backend::Resolve, true),
            ),
            (
                "a command build",
                vec![requested(&command)],
                plan(make.clone(), true),
            ),
            (
                "a build that died midway runs again, unannounced",
                vec![requested(&command), started.clone()],
                plan(make, false),
            ),
            (
                "a build with a verdict is done",
                vec![requested(&resolve), started.clone(), succeeded.clone()],
                Next::Nothing("the release has a build already"),
            ),
            (
                "even when the request comes again",
                vec![
                    requested(&resolve),
                    started.clone(),
                    succeeded,
                    requested(&resolve),
                ],
                Next::Nothing("the release has a build already"),
            ),
            (
                "a failed build is not retried",
                vec![requested(&resolve), started, failed],
                Next::Nothing("the release's build failed already"),
            ),
            (
                "an ended release is left alone",
                vec![
                    requested(&resolve),
                    Payload::ReleaseFailed(ReleaseFailed { reason: "x".into() }),
                ],
                Next::Nothing("the release has ended"),
            ),
            (
                "the trigger's spec stands in when the history lags",
                vec![],
                plan(Backend::Resolve, true),
            ),
        ];
        for (case, payloads, expected) in table {
            let state = history(rid, payloads);
            assert_eq!(next(&state, &resolve), expected, "{case}");
        }
    }

    #[test]
    fn build_timeouts_default_to_fifteen_minutes() {
        let rid = ReleaseId::generate();
        for (timeout, expected) in [(0, 900), (30, 30)] {
            let s = spec("web:v1", &["/bin/true"], timeout);
            let Next::Build(plan) = next(&history(rid, vec![requested(&s)]), &s) else {
                panic!("no build for timeout {timeout}");
            };
            assert_eq!(
                plan.backend,
                Backend::Command {
                    argv: vec!["/bin/true".into()],
                    timeout: Duration::from_secs(expected)
                }
            );
        }
    }

    #[test]
    fn unusable_specs_fail_the_build_with_a_reason() {
        let rid = ReleaseId::generate();
        for (s, expected) in [
            (
                spec("Web:v1", &[], 0),
                "image \"Web:v1\" cannot be resolved",
            ),
            (spec("web:v1", &["", "x"], 0), "empty program"),
        ] {
            match next(&history(rid, vec![requested(&s)]), &s) {
                Next::Fail { reason } => assert!(reason.contains(expected), "{reason}"),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn image_references_split_as_docker_splits_them() {
        let d = format!("sha256:{}", "b".repeat(64));
        let table = [
            (
                "nginx",
                ("docker.io", "library/nginx", Some("latest"), None),
                "registry-1.docker.io",
            ),
            (
                "nginx:1.25",
                ("docker.io", "library/nginx", Some("1.25"), None),
                "registry-1.docker.io",
            ),
            (
                "bitnami/redis:7",
                ("docker.io", "bitnami/redis", Some("7"), None),
                "registry-1.docker.io",
            ),
            (
                "index.docker.io/x/y",
                ("docker.io", "x/y", Some("latest"), None),
                "registry-1.docker.io",
            ),
            (
                "docker.io/nginx",
                ("docker.io", "library/nginx", Some("latest"), None),
                "registry-1.docker.io",
            ),
            (
                "127.0.0.1:5000/web:v1",
                ("127.0.0.1:5000", "web", Some("v1"), None),
                "127.0.0.1:5000",
            ),
            (
                "localhost/team/web",
                ("localhost", "team/web", Some("latest"), None),
                "localhost",
            ),
            (
                "ghcr.io/org/app/sub:v2",
                ("ghcr.io", "org/app/sub", Some("v2"), None),
                "ghcr.io",
            ),
            (
                "Registry.Example.com:443/web",
                ("registry.example.com:443", "web", Some("latest"), None),
                "registry.example.com:443",
            ),
        ];
        for (text, (registry, repository, reference, digest), api) in table {
            let r = ImageRef::parse(text).unwrap();
            assert_eq!(
                (
                    r.registry.as_str(),
                    r.repository.as_str(),
                    Some(r.reference()),
                    r.digest.as_deref()
                ),
                (registry, repository, reference, digest),
                "{text}"
            );
            assert_eq!(r.api_host(), api, "{text}");
        }
        let pinned = ImageRef::parse(&format!("127.0.0.1:5000/web:v1@{d}")).unwrap();
        assert_eq!(pinned.reference(), d);
        assert_eq!(pinned.tag.as_deref(), Some("v1"));
        assert_eq!(pinned.pinned(&d), format!("127.0.0.1:5000/web@{d}"));
        assert_eq!(pinned.to_string(), format!("127.0.0.1:5000/web:v1@{d}"));
        assert!(ImageRef::parse("web@sha256:12").is_err());
    }

    #[test]
    fn digests_are_sha256_in_lowercase_hex() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_sha256_digest(&good));
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            String::new(),
        ] {
            assert!(!is_sha256_digest(&bad), "{bad}");
        }
    }

    #[test]
    fn placeholders_are_substituted_inside_arguments_and_nothing_else() {
        let vars = Vars {
            image: "127.0.0.1:5000/web:v1",
            app: "web",
            env: "staging",
            release_id: "0190-x",
        };
        let table: &[(&str, &str)] = &[
            ("{image}", "127.0.0.1:5000/web:v1"),
            ("--tag={image}", "--tag=127.0.0.1:5000/web:v1"),
            ("{app}-{env}/{release_id}", "web-staging/0190-x"),
            ("{{app}}", "{web}"),
            ("{unknown} {app", "{unknown} {app"),
            ("$(rm -rf /); {app}", "$(rm -rf /); web"),
            ("{", "{"),
            ("", ""),
        ];
        for (template, expected) in table {
            assert_eq!(render(template, &vars), *expected, "{template}");
        }
        let argv = render_argv(&["/usr/bin/env".into(), "a b {app}".into()], &vars);
        assert_eq!(argv, ["/usr/bin/env", "a b web"]);
    }

    #[test]
    fn command_ends_give_the_reason_of_a_failed_build() {
        let table = [
            (CommandEnd::Exited(0), None),
            (
                CommandEnd::Exited(3),
                Some("build command exited with code 3"),
            ),
            (
                CommandEnd::Signalled(9),
                Some("build command was killed by signal 9"),
            ),
            (
                CommandEnd::TimedOut(Duration::from_secs(5)),
                Some("build command timed out after 5s and was killed"),
            ),
            (
                CommandEnd::NotStarted("no such file".into()),
                Some("build command could not start: no such file"),
            ),
        ];
        for (end, expected) in table {
            assert_eq!(end.failure().as_deref(), expected, "{end}");
        }
    }
}
