//! Checks of compose.yaml and the Dockerfile: every file and binary they name exists, and a real
//! compose validator (docker-compose 1.29, installed by scripts/setup.sh) accepts the file.
//! There is no Docker engine on these machines, so nothing is built or started.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_yaml_ng::Value;

/// The repository's top folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The compose validator: `BATON_COMPOSE_VALIDATOR`, else the one scripts/setup.sh installs.
pub fn validator() -> PathBuf {
    std::env::var_os("BATON_COMPOSE_VALIDATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/baton/compose-venv/bin/docker-compose")
        })
}

/// Binaries the Dockerfile's final stage copies in.
fn dockerfile_binaries(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .filter_map(|l| {
            l.trim()
                .trim_end_matches('\\')
                .trim()
                .strip_prefix("/src/target/release/")
        })
        .map(|b| b.trim().to_owned())
        .collect()
}

pub fn check(root: &Path) -> Result<()> {
    let compose_path = root.join("compose.yaml");
    let mut compose: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&compose_path)?)
        .with_context(|| format!("parsing {}", compose_path.display()))?;
    // `<<: *agent` merges, as compose does.
    compose.apply_merge()?;
    let dockerfile =
        std::fs::read_to_string(root.join("Dockerfile")).context("reading Dockerfile")?;
    let shipped = dockerfile_binaries(&dockerfile);
    ensure!(shipped.len() == 7, "the Dockerfile ships {shipped:?}");
    for bin in &shipped {
        crate::target_bin(bin).with_context(|| {
            format!("the Dockerfile copies {bin}, which the workspace does not build")
        })?;
        ensure!(
            dockerfile.contains(&format!(
                "-p {}",
                if bin == "baton" { "baton-cli" } else { bin }
            )),
            "the Dockerfile does not build {bin}"
        );
    }

    // Credentials are made by `baton bus credentials`; check that it makes what compose reads.
    let work =
        std::env::temp_dir().join(format!("baton-compose-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work)?;
    let result = check_in(root, &compose, &shipped, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn check_in(root: &Path, compose: &Value, shipped: &[String], work: &Path) -> Result<()> {
    let out = std::process::Command::new(crate::target_bin("baton")?)
        .args(["bus", "credentials", "--out"])
        .arg(work.join("credentials"))
        .output()?;
    ensure!(
        out.status.success(),
        "baton bus credentials failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir_all(work.join("kube"))?;
    // Resolve a compose path: generated ones in the scratch folder, the rest in the repository.
    let resolve = |p: &str| -> PathBuf {
        let p = p.trim_start_matches("./");
        if p.starts_with("credentials") || p.starts_with("kube") {
            work.join(p)
        } else {
            root.join(p)
        }
    };
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .context("compose.yaml has no services")?;
    let mut agents = Vec::new();
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        if let Some(build) = service.get("build") {
            let context = build.get("context").and_then(Value::as_str).unwrap_or(".");
            let dockerfile = build
                .get("dockerfile")
                .and_then(Value::as_str)
                .unwrap_or("Dockerfile");
            ensure!(
                resolve(context).join(dockerfile).is_file(),
                "{name}: build file {dockerfile} missing"
            );
            let command = service
                .get("command")
                .and_then(Value::as_sequence)
                .context("service has no command")?;
            let program = command.first().and_then(Value::as_str).unwrap_or_default();
            ensure!(
                shipped.iter().any(|b| b == program),
                "{name} runs {program}, which the image does not ship"
            );
            if program != "baton" {
                agents.push(program.to_owned());
            }
        }
        for v in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let host = v
                .as_str()
                .and_then(|s| s.split(':').next())
                .unwrap_or_default();
            let host = host
                .strip_prefix("${BATON_KUBE_DIR:-")
                .map(|h| h.trim_end_matches('}'))
                .unwrap_or(host);
            if host.starts_with("./") {
                ensure!(
                    resolve(host).exists(),
                    "{name} mounts {host}, which does not exist"
                );
            }
        }
        if let Some(env_file) = service.get("env_file").and_then(Value::as_str) {
            let text = std::fs::read_to_string(resolve(env_file))
                .with_context(|| format!("{name}: env_file {env_file}"))?;
            for user in baton_core::bus::NATS_USERS {
                let var = format!("BATON_NKEY_{}=", user.to_uppercase().replace('-', "_"));
                ensure!(text.contains(&var), "{env_file} lacks {var}");
            }
        }
    }
    agents.sort();
    ensure!(
        agents
            == [
                "baton-builder",
                "baton-deployer",
                "baton-health-checker",
                "baton-metrics",
                "baton-notifier",
                "baton-rollback"
            ],
        "compose runs {agents:?}, not the six agents"
    );
    let nats_conf = root.join("bus-config/nats-server.conf");
    ensure!(
        nats_conf.is_file(),
        "bus-config/nats-server.conf is missing"
    );

    // The real validator, on a copy beside the generated credentials.
    let validator = validator();
    if !validator.is_file() {
        bail!(
            "compose validator {} missing: run scripts/setup.sh",
            validator.display()
        );
    }
    std::fs::copy(root.join("compose.yaml"), work.join("compose.yaml"))?;
    std::fs::copy(root.join("Dockerfile"), work.join("Dockerfile"))?;
    std::os::unix::fs::symlink(
        root.join("bus-config").canonicalize()?,
        work.join("bus-config"),
    )?;
    let out = std::process::Command::new(&validator)
        .args(["-f", "compose.yaml", "config", "-q"])
        .current_dir(work)
        .output()
        .with_context(|| format!("running {}", validator.display()))?;
    ensure!(
        out.status.success(),
        "docker-compose rejects compose.yaml: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
