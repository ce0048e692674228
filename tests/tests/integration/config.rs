//! `baton config`: validation that names every wrong field, versioned storage in the
//! `BATON_CONFIG` bucket, history, show and rollback — the real `baton` binary against a real
//! nats-server.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use baton_core::config::{store, Overrides};
use baton_tests::harness::trial;
use baton_tests::{repo_root, target_bin, BusEnv};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![
        the_example_file_of_the_repository_is_valid,
        an_invalid_file_is_refused_with_every_bad_field_named_and_nothing_is_stored,
        config_is_versioned_and_rolling_back_makes_an_old_revision_current_as_a_new_one,
        showing_or_rolling_back_an_unknown_revision_fails_clearly,
        every_limit_an_agent_would_refuse_is_refused_by_validate_naming_the_field,
    ]
}

/// Values each within what YAML and the config's types take, but past what an agent accepts.
const OUT_OF_RANGE: &str = "environments:
  prod: {cluster: c1, namespace: shop}
apps:
  web:
    strategy: canary
    analysis: {duration: 25h, interval: 1s}
    step_timeout: 5000000000s
    checks:
      - name: health
        http: {path: /health, timeout: 61s, retries: 11}
      - name: smoke
        smoke: {argv: [/bin/true], timeout: 11m}
      - name: p95
        latency: {path: /, requests: 1001, percentile: 95, threshold: 100ms}
  api:
    strategy: canary
    canary:
      steps:
        - {weight: 10, analysis: {duration: 30s, interval: 60s}}
        - {weight: 100}
";

const FIRST: &str = "environments:
  staging: {cluster: sandbox, namespace: shop-staging}
  production: {cluster: prod-eu, namespace: shop}
apps:
  web:
    port: 8080
    checks:
      - name: health
        http: {path: /health}
";

const SECOND: &str = "environments:
  staging: {cluster: sandbox, namespace: shop-staging}
  production: {cluster: prod-eu, namespace: shop}
apps:
  web:
    port: 9090
    strategy: canary
    canary: {steps: [{weight: 10}, {weight: 100}]}
    environments:
      production: {step_timeout: 10m}
";

const BAD: &str = "environments:
  staging: {cluster: sandbox, namespace: shop-staging}
  Prod: {cluster: prod-eu, namespace: shop}
apps:
  web:
    colour: blue
    port: 70000
    db_password: hunter2
    checks:
      - name: health
        http: {path: health}
      - name: p95
        latency: {path: /health, percentile: 120, threshold: 250ms}
    environments:
      qa: {port: 80}
";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

async fn every_limit_an_agent_would_refuse_is_refused_by_validate_naming_the_field() -> Result<()> {
    let env = BusEnv::start().await?;
    let path = write(env.sandbox.dir(), "range.yaml", OUT_OF_RANGE)?;
    let run = baton(
        &env.process_env(),
        &["config", "validate", &path.display().to_string()],
    )
    .await?;
    ensure!(run.code == Some(1), "exited {:?}: {}", run.code, run.stderr);
    for want in [
        "apps.web.analysis.duration: must be from 1s to 24h, not \"25h\"",
        "apps.web.step_timeout: must be from 1s to 4294967295s",
        "apps.web.checks[0].http.timeout: must be from 1ms to 1m",
        "apps.web.checks[0].http.retries: must be a whole number from 0 to 10",
        "apps.web.checks[1].smoke.timeout: must be from 1ms to 10m",
        "apps.web.checks[2].latency.requests: must be a whole number from 1 to 1000",
        "apps.api.canary.steps[0].analysis: interval (60s) is longer than duration (30s",
    ] {
        ensure!(
            run.stderr.contains(want),
            "validate does not say {want:?}:\n{}",
            run.stderr
        );
    }
    Ok(())
}

async fn baton(env: &[(String, String)], args: &[&str]) -> Result<Run> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(target_bin("baton")?)
            .args(args)
            .envs(env.iter().cloned())
            .env("BATON_ACTOR", "tester@ci")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("baton {} did not finish within 60s", args.join(" ")))??;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The revision number in "applied: revision N" / "rolled back: revision N …".
fn revision_in(stdout: &str) -> Result<u64> {
    stdout
        .split("revision ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no revision number in {stdout:?}"))
}

/// The revisions `baton config history` lists, newest first, with their sha256 prefixes.
fn history_rows(stdout: &str) -> Vec<(u64, String)> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.first()?.parse().ok()?, cols.get(3)?.to_string()))
        })
        .collect()
}

async fn the_example_file_of_the_repository_is_valid() -> Result<()> {
    let example = repo_root().join("examples/baton.yaml");
    let run = baton(&[], &["config", "validate", &example.display().to_string()]).await?;
    ensure!(run.ok(), "examples/baton.yaml is refused: {}", run.stderr);
    ensure!(
        run.stdout.trim() == "valid: 3 apps, 3 environments, 2 notification channels, 2 routes",
        "{:?}",
        run.stdout
    );
    Ok(())
}

async fn an_invalid_file_is_refused_with_every_bad_field_named_and_nothing_is_stored() -> Result<()>
{
    let env = BusEnv::start().await?;
    let vars = env.process_env();
    let bad = write(env.sandbox.dir(), "bad.yaml", BAD)?;
    let bad = bad.display().to_string();
    let expected = [
        "environments.Prod: not a DNS label",
        "apps.web.colour: unknown field",
        "apps.web.port: must be a TCP port",
        "apps.web.db_password: looks like a secret",
        "apps.web.checks[0].http.path: \"health\" must start with '/'",
        "apps.web.checks[1].latency.percentile: must be in (0, 100]",
        "apps.web.environments.qa: no such environment",
    ];

    for command in ["validate", "apply"] {
        let run = baton(&vars, &["config", command, &bad]).await?;
        ensure!(
            run.code == Some(1),
            "config {command} of a bad file exited with {:?}: {}{}",
            run.code,
            run.stdout,
            run.stderr
        );
        for want in expected {
            ensure!(
                run.stderr.contains(want),
                "config {command} does not name {want:?}:\n{}",
                run.stderr
            );
        }
        ensure!(
            run.stderr.contains("(7 problems)"),
            "config {command} does not count the problems:\n{}",
            run.stderr
        );
        ensure!(
            run.stderr.contains("credential files"),
            "the secret is not pointed to the credential files:\n{}",
            run.stderr
        );
    }

    // Nothing reached the bucket.
    let run = baton(&vars, &["config", "history"]).await?;
    ensure!(run.ok(), "history failed: {}", run.stderr);
    ensure!(
        run.stdout.contains("no configuration has been applied yet"),
        "{}",
        run.stdout
    );
    let run = baton(&vars, &["config", "show"]).await?;
    ensure!(!run.ok(), "show printed a configuration: {}", run.stdout);
    ensure!(
        run.stderr.contains("no configuration has been applied yet"),
        "{}",
        run.stderr
    );
    let cli = env.bus("cli").await?;
    ensure!(
        store::current(&cli).await?.is_none(),
        "something was stored"
    );
    ensure!(store::history(&cli).await?.is_empty());
    Ok(())
}

async fn config_is_versioned_and_rolling_back_makes_an_old_revision_current_as_a_new_one(
) -> Result<()> {
    let env = BusEnv::start().await?;
    let vars = env.process_env();
    let dir = env.sandbox.dir();
    let first = write(dir, "first.yaml", FIRST)?.display().to_string();
    let second = write(dir, "second.yaml", SECOND)?.display().to_string();

    let run = baton(&vars, &["config", "apply", &first]).await?;
    ensure!(run.ok(), "first apply failed: {}", run.stderr);
    ensure!(run.stdout.starts_with("applied:"), "{}", run.stdout);
    let r1 = revision_in(&run.stdout)?;

    let run = baton(&vars, &["config", "apply", &first]).await?;
    ensure!(
        run.ok(),
        "second apply of the same file failed: {}",
        run.stderr
    );
    ensure!(
        run.stdout.starts_with("unchanged:") && revision_in(&run.stdout)? == r1,
        "applying the same file again stored something: {}",
        run.stdout
    );

    let run = baton(&vars, &["config", "apply", &second]).await?;
    ensure!(run.ok(), "apply of a changed file failed: {}", run.stderr);
    ensure!(run.stdout.starts_with("applied:"), "{}", run.stdout);
    let r2 = revision_in(&run.stdout)?;
    ensure!(r2 > r1, "revision {r2} after {r1}");

    let run = baton(&vars, &["config", "history"]).await?;
    ensure!(run.ok(), "history failed: {}", run.stderr);
    let rows = history_rows(&run.stdout);
    let sha = |t: &str| store::sha256_hex(t)[..12].to_owned();
    ensure!(
        rows == vec![(r2, sha(SECOND)), (r1, sha(FIRST))],
        "history shows {rows:?}, expected {r2} then {r1}:\n{}",
        run.stdout
    );
    ensure!(
        run.stdout.contains("tester@ci"),
        "history does not say who applied:\n{}",
        run.stdout
    );

    let run = baton(&vars, &["config", "show"]).await?;
    ensure!(
        run.ok() && run.stdout == SECOND,
        "show: {:?}{}",
        run.stdout,
        run.stderr
    );
    let run = baton(&vars, &["config", "show", "--revision", &r1.to_string()]).await?;
    ensure!(
        run.ok() && run.stdout == FIRST,
        "show --revision {r1}: {:?}{}",
        run.stdout,
        run.stderr
    );

    let run = baton(
        &vars,
        &["config", "rollback", "--revision", &r1.to_string()],
    )
    .await?;
    ensure!(run.ok(), "rollback failed: {}", run.stderr);
    ensure!(run.stdout.starts_with("rolled back:"), "{}", run.stdout);
    let r3 = revision_in(&run.stdout)?;
    ensure!(
        r3 > r2,
        "the rollback is not a new revision: {r3} after {r2}"
    );

    let run = baton(&vars, &["config", "show"]).await?;
    ensure!(
        run.ok() && run.stdout == FIRST,
        "after the rollback show prints {:?}{}",
        run.stdout,
        run.stderr
    );
    let run = baton(&vars, &["config", "history"]).await?;
    let rows = history_rows(&run.stdout);
    ensure!(
        rows == vec![(r3, sha(FIRST)), (r2, sha(SECOND)), (r1, sha(FIRST))],
        "history after the rollback shows {rows:?}:\n{}",
        run.stdout
    );

    // Rolling back to what is already current stores nothing.
    let run = baton(
        &vars,
        &["config", "rollback", "--revision", &r1.to_string()],
    )
    .await?;
    ensure!(
        run.ok() && run.stdout.starts_with("unchanged:"),
        "{}{}",
        run.stdout,
        run.stderr
    );

    // What a release resolves comes from the current revision and says which one.
    let cli = env.bus("cli").await?;
    let (revision, config, text) = store::current(&cli)
        .await?
        .context("no current configuration")?;
    ensure!(revision == r3 && text == FIRST);
    let spec = config
        .resolve(
            "web",
            "production",
            &Overrides {
                image: "127.0.0.1:5000/web:v1".into(),
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(spec.port == 8080 && spec.namespace == "shop" && spec.cluster == "prod-eu");
    ensure!(
        spec.config_revision == r3,
        "spec from revision {}",
        spec.config_revision
    );
    let (meta, _) = store::at_revision(&cli, r3).await?;
    ensure!(
        meta.applied_by == "tester@ci",
        "applied by {:?}",
        meta.applied_by
    );
    ensure!(
        meta.applied_at.ends_with('Z') && meta.applied_at.len() == 20,
        "applied_at {:?} is not RFC 3339 UTC",
        meta.applied_at
    );
    Ok(())
}

async fn showing_or_rolling_back_an_unknown_revision_fails_clearly() -> Result<()> {
    let env = BusEnv::start().await?;
    let vars = env.process_env();
    let first = write(env.sandbox.dir(), "first.yaml", FIRST)?
        .display()
        .to_string();
    let run = baton(&vars, &["config", "apply", &first]).await?;
    ensure!(run.ok(), "apply failed: {}", run.stderr);
    let r1 = revision_in(&run.stdout)?;

    let missing = (r1 + 1000).to_string();
    for args in [
        ["config", "show", "--revision", missing.as_str()],
        ["config", "rollback", "--revision", missing.as_str()],
    ] {
        let run = baton(&vars, &args).await?;
        ensure!(
            run.code == Some(1),
            "{} exited with {:?}: {}",
            args.join(" "),
            run.code,
            run.stdout
        );
        let want = format!("no configuration revision {missing} (stored revisions: {r1})");
        ensure!(
            run.stderr.contains(&want),
            "{} does not say {want:?}:\n{}",
            args.join(" "),
            run.stderr
        );
    }
    let run = baton(&vars, &["config", "history"]).await?;
    ensure!(
        history_rows(&run.stdout).len() == 1,
        "a failed rollback stored something:\n{}",
        run.stdout
    );
    Ok(())
}
