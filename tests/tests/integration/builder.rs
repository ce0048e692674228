//! The builder agent as a real process against real registries: it pins a release's image to its
//! digest, fails the build with a clear reason when the image is missing or the registry is
//! unreachable, runs build commands without a shell and stores their output, answers basic and
//! bearer-token authentication, and builds a release once however often it is requested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use baton_core::bus::{Bus, LOGS_BUCKET};
use baton_core::event::{Event, EventType};
use baton_core::ids::EventKey;
use baton_core::names::{AppName, EnvName, ReleaseId};
use baton_core::subject::EventSubject;
use baton_proto::v1::envelope::Payload;
use baton_proto::v1::{BuildFailed, BuildParams, BuildSucceeded, ReleaseRequested, ReleaseSpec};
use baton_sandbox::process::{self, ManagedProcess, ProcessSpec};
use baton_tests::cluster::shared;
use baton_tests::harness::trial;
use baton_tests::{eventually, sample_spec, AgentProcess, BusEnv};
use libtest_mimic::Trial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn trials() -> Vec<Trial> {
    crate::trials![
        a_pushed_image_is_pinned_to_the_digest_the_registry_holds,
        a_missing_image_fails_the_build_with_a_reason_naming_the_image_and_registry,
        an_unreachable_registry_fails_the_build_naming_the_registry,
        a_build_command_runs_without_a_shell_and_its_output_is_stored_and_linked,
        a_failing_or_hanging_build_command_fails_the_build_with_its_log_linked,
        a_release_requested_twice_is_built_once,
        a_build_cut_short_by_a_crash_runs_again_under_the_same_announcement,
        a_bad_credentials_file_stops_the_builder_at_start_with_the_reason,
        a_registry_with_basic_auth_is_read_with_the_credentials_file,
        a_registry_with_token_auth_is_read_with_a_token_from_its_realm,
    ]
}

const VERDICT_TIMEOUT: Duration = Duration::from_secs(90);
const ACK_SERIES: &str =
    "baton_events_handled_total{consumer=\"builder-release-requested\",outcome=\"ack\"}";

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A bus of its own with a builder running on it, and the CLI's connection.
struct Fixture {
    // Dropped in this order: the agent, its connection, then the bus.
    builder: AgentProcess,
    cli: Bus,
    _env: BusEnv,
}

impl Fixture {
    async fn start(extra: &[(&str, &str)]) -> Result<Fixture> {
        let env = BusEnv::start().await?;
        let builder = AgentProcess::start(&env, "builder", extra, env.sandbox.dir()).await?;
        let cli = env.bus("cli").await?;
        Ok(Fixture {
            builder,
            cli,
            _env: env,
        })
    }

    /// Publishes `release.requested` for `rid` as the CLI does.
    async fn request(&self, rid: ReleaseId, spec: ReleaseSpec, key: EventKey<'_>) -> Result<()> {
        // Backed by a stored configuration revision, as the CLI's requests are.
        let spec = self._env.configured(spec).await?;
        let subject = EventSubject::new(
            EnvName::new(spec.env.clone())?,
            AppName::new(spec.app.clone())?,
            rid,
            EventType::ReleaseRequested,
        );
        let event = Event::new(
            rid,
            key,
            Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
            self.cli.source(),
            "tester",
            "",
        );
        self.cli.publish(&subject, &event).await?;
        Ok(())
    }

    /// The release's history once it holds a build verdict.
    async fn verdict(&self, rid: ReleaseId) -> Result<Vec<Event>> {
        let cli = &self.cli;
        eventually("a build verdict", VERDICT_TIMEOUT, || async move {
            let history = cli.release_history(rid).await?;
            Ok(history
                .iter()
                .any(|e| {
                    matches!(
                        e.event_type,
                        EventType::BuildSucceeded | EventType::BuildFailed
                    )
                })
                .then_some(history))
        })
        .await
        .with_context(|| format!("builder log:\n{}", self.builder.process.log_tail(30)))
    }

    /// The stored build log under `key`.
    async fn log(&self, key: &str) -> Result<String> {
        let store = self.cli.jetstream().get_object_store(LOGS_BUCKET).await?;
        let mut object = store
            .get(key)
            .await
            .with_context(|| format!("no object {key} in {LOGS_BUCKET}"))?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn types(history: &[Event]) -> Vec<EventType> {
    history.iter().map(|e| e.event_type).collect()
}

fn succeeded(history: &[Event]) -> Result<BuildSucceeded> {
    history
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::BuildSucceeded(b)) => Some(b.clone()),
            _ => None,
        })
        .with_context(|| format!("no build.succeeded in {:?}", types(history)))
}

fn failed(history: &[Event]) -> Result<BuildFailed> {
    history
        .iter()
        .find_map(|e| match e.payload() {
            Some(Payload::BuildFailed(b)) => Some(b.clone()),
            _ => None,
        })
        .with_context(|| format!("no build.failed in {:?}", types(history)))
}

fn command_spec(image: &str, argv: &[&str], timeout_seconds: u32) -> ReleaseSpec {
    ReleaseSpec {
        build: Some(BuildParams {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            timeout_seconds,
        }),
        ..sample_spec("staging", "web", image)
    }
}

async fn a_pushed_image_is_pinned_to_the_digest_the_registry_holds() -> Result<()> {
    let cluster = shared()?;
    let name = unique("bld-ok");
    let digest = cluster.registry()?.push_image(&name, "v1", &[]).await?;
    let f = Fixture::start(&[("BATON_PLAIN_HTTP_REGISTRIES", &cluster.registry)]).await?;
    let rid = ReleaseId::generate();
    let image = format!("{}/{name}:v1", cluster.registry);
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;

    let history = f.verdict(rid).await?;
    ensure!(
        types(&history)
            == [
                EventType::ReleaseRequested,
                EventType::BuildStarted,
                EventType::BuildSucceeded
            ],
        "history is {:?}",
        types(&history)
    );
    let Some(Payload::BuildStarted(started)) = history[1].payload() else {
        bail!("the second event is not build.started");
    };
    ensure!(
        started.image == image && started.backend == "resolve",
        "build.started says {started:?}"
    );
    let built = succeeded(&history)?;
    ensure!(
        built.image_ref == format!("{}/{name}@{digest}", cluster.registry),
        "image_ref is {}, the registry holds {digest}",
        built.image_ref
    );
    ensure!(built.digest == digest, "digest is {}", built.digest);
    ensure!(
        built.log_object.is_empty(),
        "a resolve links a log: {}",
        built.log_object
    );
    // The builder's verdict is caused by the request and carries its actor.
    ensure!(
        history[2].envelope.causation_id == history[0].envelope.id
            && history[2].envelope.actor == "tester",
        "build.succeeded is not linked to the request: {:?}",
        history[2].envelope
    );
    Ok(())
}

async fn a_missing_image_fails_the_build_with_a_reason_naming_the_image_and_registry() -> Result<()>
{
    let cluster = shared()?;
    let pushed = unique("bld-tag");
    cluster.registry()?.push_image(&pushed, "v1", &[]).await?;
    let f = Fixture::start(&[("BATON_PLAIN_HTTP_REGISTRIES", &cluster.registry)]).await?;
    // A repository the registry never saw, and a tag it does not have.
    let cases = [
        // (distribution 2.8 says MANIFEST_UNKNOWN for both; others say NAME_UNKNOWN for the first)
        format!("{}/{}:v1", cluster.registry, unique("bld-none")),
        format!("{}/{pushed}:v2", cluster.registry),
    ];
    for image in cases {
        let rid = ReleaseId::generate();
        f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
            .await?;
        let history = f.verdict(rid).await?;
        let failure = failed(&history)?;
        ensure!(
            failure.reason.contains(&image)
                && failure.reason.contains("not found")
                && failure
                    .reason
                    .contains(&format!("registry {}", cluster.registry))
                && failure.reason.contains("_UNKNOWN"),
            "reason for {image}: {:?}",
            failure.reason
        );
        ensure!(
            types(&history)
                == [
                    EventType::ReleaseRequested,
                    EventType::BuildStarted,
                    EventType::BuildFailed
                ],
            "history is {:?}",
            types(&history)
        );
    }
    Ok(())
}

async fn an_unreachable_registry_fails_the_build_naming_the_registry() -> Result<()> {
    let cluster = shared()?;
    // A loopback port nothing listens on.
    let closed = format!("127.0.0.1:{}", process::free_port()?);
    let f = Fixture::start(&[
        ("BATON_PLAIN_HTTP_REGISTRIES", &closed),
        ("BATON_REGISTRY_RETRY_SECONDS", "5"),
    ])
    .await?;
    let rid = ReleaseId::generate();
    f.request(
        rid,
        sample_spec("staging", "web", &format!("{closed}/web:v1")),
        EventKey::Once,
    )
    .await?;
    let failure = failed(&f.verdict(rid).await?)?;
    ensure!(
        failure
            .reason
            .starts_with(&format!("registry {closed} unreachable:"))
            && failure.reason.contains("Connection refused"),
        "reason: {:?}",
        failure.reason
    );
    ensure!(
        f.builder
            .process
            .log_tail(200)
            .contains("registry trouble; will ask again"),
        "the builder did not retry before giving up"
    );

    // The shared registry speaks plain HTTP but is not listed as such: TLS to it fails at once,
    // with a hint instead of a wait.
    let rid = ReleaseId::generate();
    let image = format!("{}/web:v1", cluster.registry);
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let failure = failed(&f.verdict(rid).await?)?;
    ensure!(
        failure
            .reason
            .starts_with(&format!("registry {} unreachable:", cluster.registry))
            && failure.reason.contains("--plain-http-registry"),
        "reason: {:?}",
        failure.reason
    );
    Ok(())
}

async fn a_build_command_runs_without_a_shell_and_its_output_is_stored_and_linked() -> Result<()> {
    let cluster = shared()?;
    let name = unique("bld-cmd");
    let digest = cluster.registry()?.push_image(&name, "v1", &[]).await?;
    let f = Fixture::start(&[("BATON_PLAIN_HTTP_REGISTRIES", &cluster.registry)]).await?;
    let rid = ReleaseId::generate();
    let image = format!("{}/{name}:v1", cluster.registry);
    // `env NOTE=… env` prints its environment: placeholders are filled inside arguments, and
    // shell syntax stays text.
    let spec = command_spec(
        &image,
        &[
            "/usr/bin/env",
            "NOTE=building {app} in {env} as {release_id}; $(false) | {image}",
            "/usr/bin/env",
        ],
        0,
    );
    f.request(rid, spec, EventKey::Once).await?;
    let history = f.verdict(rid).await?;
    let Some(Payload::BuildStarted(started)) = history.get(1).and_then(Event::payload) else {
        bail!("no build.started second: {:?}", types(&history));
    };
    ensure!(started.backend == "command", "backend {}", started.backend);
    let built = succeeded(&history)?;
    ensure!(
        built.image_ref == format!("{}/{name}@{digest}", cluster.registry),
        "image_ref {}",
        built.image_ref
    );
    ensure!(
        built.log_object == format!("builds/{rid}"),
        "log_object {:?}",
        built.log_object
    );
    let log = f.log(&built.log_object).await?;
    for expected in [
        format!("NOTE=building web in staging as {rid}; $(false) | {image}\n"),
        format!("BATON_RELEASE_ID={rid}\n"),
        format!("BATON_IMAGE={image}\n"),
        "BATON_APP=web\n".into(),
        "BATON_ENV=staging\n".into(),
        "--- exited with code 0".into(),
    ] {
        ensure!(log.contains(&expected), "log lacks {expected:?}:\n{log}");
    }
    // The agent's own connection settings are not handed to the build.
    for secret in [
        "BATON_CREDENTIALS=",
        "NATS_URL=",
        "BATON_PLAIN_HTTP_REGISTRIES=",
    ] {
        ensure!(!log.contains(secret), "the build saw {secret}:\n{log}");
    }
    Ok(())
}

async fn a_failing_or_hanging_build_command_fails_the_build_with_its_log_linked() -> Result<()> {
    let f = Fixture::start(&[]).await?;
    // The image is never looked up: the build failed before.
    let image = "127.0.0.1:9/never:v1";
    let cases = [
        (
            command_spec(image, &["/bin/ls", "/nonexistent-{app}"], 0),
            "build command exited with code 2",
            "/nonexistent-web",
        ),
        (
            command_spec(image, &["/bin/sleep", "600"], 1),
            "build command timed out after 1s",
            "--- timed out after 1s",
        ),
        (
            command_spec(image, &["no-such-build-tool-{app}"], 0),
            "build command could not start: no-such-build-tool-web",
            "could not start",
        ),
    ];
    for (spec, reason, in_log) in cases {
        let rid = ReleaseId::generate();
        f.request(rid, spec, EventKey::Once).await?;
        let history = f.verdict(rid).await?;
        let failure = failed(&history)?;
        ensure!(
            failure.reason.starts_with(reason),
            "reason {:?}, expected {reason:?}",
            failure.reason
        );
        ensure!(
            failure.log_object == format!("builds/{rid}"),
            "log_object {:?}",
            failure.log_object
        );
        let log = f.log(&failure.log_object).await?;
        ensure!(log.contains(in_log), "log lacks {in_log:?}:\n{log}");
    }
    Ok(())
}

async fn a_release_requested_twice_is_built_once() -> Result<()> {
    let cluster = shared()?;
    let name = unique("bld-twice");
    cluster.registry()?.push_image(&name, "v1", &[]).await?;
    let f = Fixture::start(&[("BATON_PLAIN_HTTP_REGISTRIES", &cluster.registry)]).await?;
    let rid = ReleaseId::generate();
    let spec = sample_spec("staging", "web", &format!("{}/{name}:v1", cluster.registry));
    f.request(rid, spec.clone(), EventKey::Once).await?;
    f.verdict(rid).await?;
    // The same request again, as a new message of the stream.
    f.request(rid, spec, EventKey::Named("again")).await?;
    f.builder
        .wait_metric(ACK_SERIES, 2.0, Duration::from_secs(60))
        .await?;
    let history = f.cli.release_history(rid).await?;
    ensure!(
        types(&history)
            == [
                EventType::ReleaseRequested,
                EventType::BuildStarted,
                EventType::BuildSucceeded,
                EventType::ReleaseRequested
            ],
        "history is {:?}",
        types(&history)
    );
    // Not merely dropped as a duplicate by the stream: the builder published nothing the second time.
    for t in ["build.started", "build.succeeded"] {
        let published = f
            .builder
            .metric(&format!("baton_events_published_total{{type=\"{t}\"}}"))
            .await?;
        ensure!(
            published == 1.0,
            "the builder published {t} {published} times"
        );
    }
    Ok(())
}

async fn a_build_cut_short_by_a_crash_runs_again_under_the_same_announcement() -> Result<()> {
    let cluster = shared()?;
    let name = unique("bld-crash");
    let digest = cluster.registry()?.push_image(&name, "v1", &[]).await?;
    let env = BusEnv::start().await?;
    let plain = [("BATON_PLAIN_HTTP_REGISTRIES", cluster.registry.as_str())];
    let mut first = AgentProcess::start(&env, "builder", &plain, env.sandbox.dir()).await?;
    let cli = env.bus("cli").await?;
    let rid = ReleaseId::generate();
    let image = format!("{}/{name}:v1", cluster.registry);
    let subject = EventSubject::new(
        EnvName::new("staging")?,
        AppName::new("web")?,
        rid,
        EventType::ReleaseRequested,
    );
    let spec = env
        .configured(command_spec(&image, &["/bin/sleep", "3"], 0))
        .await?;
    let request = Event::new(
        rid,
        EventKey::Once,
        Payload::ReleaseRequested(ReleaseRequested { spec: Some(spec) }),
        cli.source(),
        "tester",
        "",
    );
    cli.publish(&subject, &request).await?;
    eventually("build.started", Duration::from_secs(30), || async {
        let history = cli.release_history(rid).await?;
        Ok(types(&history)
            .contains(&EventType::BuildStarted)
            .then_some(()))
    })
    .await?;
    // Mid-build: the command sleeps for 3 s.
    first.process.kill9().await?;
    ensure!(
        !types(&cli.release_history(rid).await?).contains(&EventType::BuildSucceeded),
        "the build finished before the crash"
    );

    // A new builder takes the request over once the dead one's ack wait runs out.
    let second_logs = env.sandbox.dir().join("second");
    std::fs::create_dir_all(&second_logs)?;
    let second = AgentProcess::start(&env, "builder", &plain, &second_logs).await?;
    let f = Fixture {
        builder: second,
        cli,
        _env: env,
    };
    let history = f.verdict(rid).await?;
    ensure!(
        types(&history)
            == [
                EventType::ReleaseRequested,
                EventType::BuildStarted,
                EventType::BuildSucceeded
            ],
        "history is {:?}",
        types(&history)
    );
    let built = succeeded(&history)?;
    ensure!(built.digest == digest, "digest {}", built.digest);
    let log = f.log(&built.log_object).await?;
    ensure!(log.contains("--- exited with code 0"), "log:\n{log}");
    ensure!(
        f.builder
            .process
            .log_tail(100)
            .contains("an earlier attempt started this build"),
        "the second builder did not build again:\n{}",
        f.builder.process.log_tail(30)
    );
    Ok(())
}

async fn a_bad_credentials_file_stops_the_builder_at_start_with_the_reason() -> Result<()> {
    let env = BusEnv::start().await?;
    let file = env.sandbox.dir().join("bad-auth.json");
    std::fs::write(&file, r#"{"auths": {"ghcr.io": {"auth": "not base64!"}}}"#)?;
    let file = file.display().to_string();
    let started = AgentProcess::start(
        &env,
        "builder",
        &[("BATON_REGISTRY_AUTH", &file)],
        env.sandbox.dir(),
    )
    .await;
    let Err(e) = started else {
        bail!("the builder started with a broken credentials file");
    };
    let e = format!("{e:#}");
    ensure!(
        e.contains("exited before it was ready")
            && e.contains(&format!("registry credentials {file}"))
            && e.contains("auths.\"ghcr.io\".auth is not base64"),
        "{e}"
    );
    ensure!(
        !e.contains("not base64!"),
        "the secret is in the message: {e}"
    );
    Ok(())
}

// --- registries with authentication ---

/// Base64 (standard with padding, or URL-safe without) of `bytes`.
fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url_safe {
            out.push_str(&"=="[..3 - chunk.len()]);
        }
    }
    out
}

/// A docker-registry of its own, on storage shared with an anonymous one (the sandbox's client
/// pushes without credentials), with `auth` as its authentication config.
struct AuthRegistry {
    host: String,
    /// The anonymous twin on the same storage, to push to.
    open: baton_sandbox::RegistryServer,
    _process: ManagedProcess,
}

impl AuthRegistry {
    async fn start(dir: &Path, auth: serde_json::Value) -> Result<AuthRegistry> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let open = baton_sandbox::RegistryServer::start(dir, &http).await?;
        let port = process::free_port()?;
        let host = format!("127.0.0.1:{port}");
        let config = serde_json::json!({
            "version": 0.1,
            "log": { "level": "info", "accesslog": { "disabled": true } },
            "storage": { "filesystem": { "rootdirectory": dir.join("registry") } },
            "http": { "addr": host },
            "auth": auth,
        });
        let config_path = dir.join("auth-registry.yml");
        std::fs::write(&config_path, config.to_string())?;
        let spec = ProcessSpec::new(
            "auth-registry",
            baton_sandbox::bins::docker_registry()?,
            dir.join("auth-registry.log"),
        )
        .arg("serve")
        .arg(&config_path);
        let mut server = ManagedProcess::spawn(spec)?;
        let url = format!("http://{host}/v2/");
        process::wait_ready(&mut server, "/v2/", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let status = http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .status();
                if status == 401 {
                    Ok(())
                } else {
                    Err(format!("GET {url}: {status}, expected 401"))
                }
            }
        })
        .await?;
        Ok(AuthRegistry {
            host,
            open,
            _process: server,
        })
    }

    async fn push(&self, name: &str) -> Result<String> {
        Ok(self.open.client()?.push_image(name, "v1", &[]).await?)
    }
}

/// A docker config.json with `user:password` for `hosts`, written to `dir`.
fn auth_file(dir: &Path, hosts: &[&str], user: &str, password: &str) -> Result<PathBuf> {
    let auth = base64(format!("{user}:{password}").as_bytes(), false);
    let auths: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| ((*h).to_owned(), serde_json::json!({ "auth": auth })))
        .collect();
    let path = dir.join("registry-auth.json");
    std::fs::write(&path, serde_json::json!({ "auths": auths }).to_string())?;
    Ok(path)
}

/// A bcrypt hash of `password`, as docker-registry's htpasswd wants it, by crypt(3) (libxcrypt
/// does bcrypt), reached through perl because nothing else on a base Debian system exposes it.
async fn bcrypt(password: &str) -> Result<String> {
    let out = tokio::process::Command::new("perl")
        .args([
            "-e",
            "print crypt($ARGV[0], $ARGV[1])",
            password,
            "$2b$05$abcdefghijklmnopqrstuu",
        ])
        .output()
        .await
        .context("running perl for a bcrypt hash")?;
    let hash = String::from_utf8(out.stdout)?;
    ensure!(
        out.status.success() && hash.starts_with("$2b$05$") && hash.len() == 60,
        "crypt(3) made no bcrypt hash ({hash:?}); the system's libcrypt lacks bcrypt"
    );
    Ok(hash)
}

async fn a_registry_with_basic_auth_is_read_with_the_credentials_file() -> Result<()> {
    let dir = TempDir::new()?;
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, format!("tester:{}\n", bcrypt("s3cret").await?))?;
    let registry = AuthRegistry::start(
        &dir,
        serde_json::json!({ "htpasswd": { "realm": "baton-test", "path": htpasswd } }),
    )
    .await?;
    let name = unique("bld-basic");
    let digest = registry.push(&name).await?;
    let image = format!("{}/{name}:v1", registry.host);

    // With the credentials the image resolves.
    let auth = auth_file(&dir, &[&registry.host], "tester", "s3cret")?;
    let auth = auth.display().to_string();
    let f = Fixture::start(&[
        ("BATON_PLAIN_HTTP_REGISTRIES", &registry.host),
        ("BATON_REGISTRY_AUTH", &auth),
    ])
    .await?;
    let rid = ReleaseId::generate();
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let built = succeeded(&f.verdict(rid).await?)?;
    ensure!(
        built.image_ref == format!("{}/{name}@{digest}", registry.host),
        "image_ref {}",
        built.image_ref
    );

    // Without them the build fails, saying why.
    let f = Fixture::start(&[("BATON_PLAIN_HTTP_REGISTRIES", &registry.host)]).await?;
    let rid = ReleaseId::generate();
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let failure = failed(&f.verdict(rid).await?)?;
    ensure!(
        failure.reason.contains(&format!(
            "registry {} refused access to image {image}",
            registry.host
        )) && failure.reason.contains("--registry-auth has none"),
        "reason: {:?}",
        failure.reason
    );
    drop(f);

    // With a wrong password too.
    let wrong = dir.join("wrong");
    std::fs::create_dir_all(&wrong)?;
    let auth = auth_file(&wrong, &[&registry.host], "tester", "guess")?;
    let auth = auth.display().to_string();
    let f = Fixture::start(&[
        ("BATON_PLAIN_HTTP_REGISTRIES", &registry.host),
        ("BATON_REGISTRY_AUTH", &auth),
    ])
    .await?;
    let rid = ReleaseId::generate();
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let failure = failed(&f.verdict(rid).await?)?;
    ensure!(
        failure.reason.contains("refused access") && failure.reason.contains("HTTP 401"),
        "reason: {:?}",
        failure.reason
    );
    Ok(())
}

/// A directory of one test, removed when dropped (declare it first, so the servers using it
/// stop before).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(unique("baton-builder-test"));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Docker's token service, as small as the registry allows: it checks basic credentials, and
/// answers a JWT signed (RS256, by openssl) with a key whose self-signed certificate the registry
/// trusts, granting what the scope asks for.
struct TokenServer {
    addr: SocketAddr,
    /// The query strings of the requests it answered with a token.
    granted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

const TOKEN_ISSUER: &str = "baton-test-issuer";
const TOKEN_SERVICE: &str = "baton-test-registry";

impl TokenServer {
    async fn start(dir: &Path, user: &str, password: &str) -> Result<(TokenServer, PathBuf)> {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        let status = tokio::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=baton-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .context("running openssl")?;
        ensure!(status.success(), "openssl req failed: {status}");
        let der = tokio::process::Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .await?;
        ensure!(der.status.success(), "openssl x509 failed");
        let x5c = base64(&der.stdout, false);
        let expected = format!(
            "Basic {}",
            base64(format!("{user}:{password}").as_bytes(), false)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let granted = Arc::new(Mutex::new(Vec::new()));
        let log = granted.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (key, x5c, expected, log) =
                    (key.clone(), x5c.clone(), expected.clone(), log.clone());
                tokio::spawn(async move {
                    let _ = serve_token(conn, &key, &x5c, &expected, &log).await;
                });
            }
        });
        Ok((
            TokenServer {
                addr,
                granted,
                task,
            },
            cert,
        ))
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_token(
    mut conn: tokio::net::TcpStream,
    key: &Path,
    x5c: &str,
    expected_auth: &str,
    granted: &Mutex<Vec<String>>,
) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        ensure!(n > 0 && head.len() < 64 * 1024, "bad request");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/");
    let url = reqwest::Url::parse(&format!("http://token{target}"))?;
    let authorized = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("authorization") && v.trim() == expected_auth
        })
    });
    let (status, body) = if !authorized {
        (
            "401 Unauthorized",
            r#"{"details":"wrong credentials"}"#.to_owned(),
        )
    } else {
        let service = url
            .query_pairs()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let access: Vec<serde_json::Value> = url
            .query_pairs()
            .filter(|(k, _)| k == "scope")
            .filter_map(|(_, scope)| {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                }))
            })
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5c": [x5c] });
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "tester", "aud": service,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64(header.to_string().as_bytes(), true),
            base64(claims.to_string().as_bytes(), true)
        );
        let mut openssl = tokio::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = openssl.stdin.take().context("openssl stdin")?;
        stdin.write_all(signing_input.as_bytes()).await?;
        drop(stdin);
        let signature = openssl.wait_with_output().await?;
        ensure!(signature.status.success(), "openssl dgst failed");
        granted
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(url.query().unwrap_or_default().to_owned());
        let token = format!("{signing_input}.{}", base64(&signature.stdout, true));
        ("200 OK", serde_json::json!({ "token": token }).to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await?;
    Ok(())
}

async fn a_registry_with_token_auth_is_read_with_a_token_from_its_realm() -> Result<()> {
    let dir = TempDir::new()?;
    let (tokens, cert) = TokenServer::start(&dir, "tester", "s3cret").await?;
    let realm_host = tokens.addr.to_string();
    let registry = AuthRegistry::start(
        &dir,
        serde_json::json!({ "token": {
            "realm": format!("http://{realm_host}/token"),
            "service": TOKEN_SERVICE,
            "issuer": TOKEN_ISSUER,
            "rootcertbundle": cert,
        }}),
    )
    .await?;
    let name = unique("bld-token");
    let digest = registry.push(&name).await?;
    let image = format!("{}/{name}:v1", registry.host);
    let auth = auth_file(&dir, &[&registry.host], "tester", "s3cret")?;
    let auth = auth.display().to_string();
    // The token service is reached over plain HTTP too, so it is listed: credentials go over
    // plain HTTP only to hosts listed so.
    let plain = format!("{},{realm_host}", registry.host);
    let f = Fixture::start(&[
        ("BATON_PLAIN_HTTP_REGISTRIES", &plain),
        ("BATON_REGISTRY_AUTH", &auth),
    ])
    .await?;
    let rid = ReleaseId::generate();
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let built = succeeded(&f.verdict(rid).await?)?;
    ensure!(
        built.image_ref == format!("{}/{name}@{digest}", registry.host),
        "image_ref {}",
        built.image_ref
    );
    let granted = tokens
        .granted
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let expected_scope = format!("scope=repository%3A{name}%3Apull");
    ensure!(
        granted.iter().any(|q| q.contains(&format!("service={TOKEN_SERVICE}"))
            && q.contains(&expected_scope)),
        "token requests: {granted:?}"
    );
    drop(f);

    // Without the token service listed, the builder will not send the credentials over plain HTTP.
    let f = Fixture::start(&[
        ("BATON_PLAIN_HTTP_REGISTRIES", &registry.host),
        ("BATON_REGISTRY_AUTH", &auth),
    ])
    .await?;
    let rid = ReleaseId::generate();
    f.request(rid, sample_spec("staging", "web", &image), EventKey::Once)
        .await?;
    let failure = failed(&f.verdict(rid).await?)?;
    ensure!(
        failure
            .reason
            .contains("will not send credentials over plain HTTP"),
        "reason: {:?}",
        failure.reason
    );
    Ok(())
}
