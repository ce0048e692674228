//! Where the server binaries are. `scripts/setup.sh` installs nats-server, etcd and
//! docker-registry as Debian packages and builds the three Kubernetes control-plane binaries
//! into `~/.cache/baton/kube-<version>/bin`; each location can be overridden from the
//! environment.

use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

/// The Kubernetes version `scripts/setup.sh` builds (Debian's source package version).
pub const KUBE_VERSION: &str = "1.20.5+really1.20.2";
/// The name of that build in the cache: the version and what `scripts/setup.sh` changes in its
/// vendored sources (reflect2 1.0.2, without which the API server crashes on custom resources).
pub const KUBE_BUILD: &str = "1.20.5+really1.20.2-reflect2-1.0.2";

pub fn nats_server() -> Result<PathBuf> {
    find("nats-server", "BATON_NATS_SERVER")
}

pub fn etcd() -> Result<PathBuf> {
    find("etcd", "BATON_ETCD")
}

pub fn docker_registry() -> Result<PathBuf> {
    find("docker-registry", "BATON_REGISTRY_BIN")
}

pub fn prometheus() -> Result<PathBuf> {
    find("prometheus", "BATON_PROMETHEUS_BIN")
}

/// One of kube-apiserver, kube-controller-manager, kube-scheduler.
pub fn kube(name: &'static str) -> Result<PathBuf> {
    let dir = kube_bin_dir();
    let path = dir.join(name);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(SandboxError::BinaryNotFound {
            name,
            looked_in: path.display().to_string(),
            env: "BATON_KUBE_BIN_DIR",
        })
    }
}

/// `BATON_KUBE_BIN_DIR`, else `~/.cache/baton/kube-<build>/bin` (see [`KUBE_BUILD`]).
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BATON_KUBE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache
        .join("baton")
        .join(format!("kube-{KUBE_BUILD}"))
        .join("bin")
}

/// `$env` if set, else the first `name` on PATH, then in /usr/sbin and /usr/bin (Debian puts
/// nats-server in /usr/sbin, which isn't on every user's PATH).
fn find(name: &'static str, env: &'static str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(SandboxError::BinaryNotFound {
                name,
                looked_in: format!("{} (from {env})", path.display()),
                env,
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| SandboxError::BinaryNotFound {
            name,
            looked_in: "PATH, /usr/sbin, /usr/bin".to_string(),
            env,
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
