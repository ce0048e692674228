//! Supervised child processes: every server of the sandbox runs under `baton-sandbox supervise`,
//! a small parent that kills the server when its own stdin reaches EOF. The library holds the
//! write end of that pipe, so when the process that started the sandbox dies for any reason —
//! including SIGKILL, or a test binary exiting with the sandbox in a static — the kernel closes
//! the pipe and the servers go with it. (Linux's parent-death signal is no substitute: it fires
//! when the spawning *thread* exits, and tokio's worker threads come and go.)

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use crate::error::{Result, SandboxError, ServerLog};

/// How long a server gets between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// What to run and where its output goes.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name used in logs and errors (`etcd`, `kube-apiserver`, …).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub envs: Vec<(String, String)>,
    /// Standard output and error of the server are appended here.
    pub log_path: PathBuf,
}

impl ProcessSpec {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>, log_path: PathBuf) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            log_path,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }
}

/// A running server. Dropping it terminates the server (SIGTERM, then SIGKILL after a grace),
/// blocking the dropping thread for at most that grace; prefer [`ManagedProcess::stop`].
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    /// The server itself, not its supervisor.
    pid: Pid,
    /// The supervisor, or the server when no supervisor binary was found.
    child: Option<Child>,
    /// Write end of the supervisor's stdin; closing it tells the supervisor to stop the server.
    lifeline: Option<ChildStdin>,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Starts the server under the supervisor (or directly, with a warning, if the
    /// `baton-sandbox` binary can't be found).
    pub fn spawn(spec: ProcessSpec) -> Result<Self> {
        let log = open_log(&spec.log_path)?;
        let log_err = clone_file(&log, &spec.log_path)?;
        match supervisor_binary() {
            Some(supervisor) => Self::spawn_supervised(spec, supervisor, log),
            None => {
                warn!(
                    server = %spec.name,
                    "baton-sandbox binary not found (set BATON_SANDBOX_BIN or build it with \
                     `cargo build -p baton-sandbox`); starting the server directly, so it will \
                     outlive this process if it is killed"
                );
                let mut command = Command::new(&spec.program);
                command
                    .args(&spec.args)
                    .envs(spec.envs.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log_err)
                    .process_group(0);
                let child = command.spawn().map_err(|source| SandboxError::Spawn {
                    name: spec.name.clone(),
                    program: spec.program.clone(),
                    source,
                })?;
                let pid = pid_of(&child);
                info!(server = %spec.name, pid = pid.as_raw(), log = %spec.log_path.display(), "started");
                Ok(Self {
                    name: spec.name,
                    pid,
                    child: Some(child),
                    lifeline: None,
                    log_path: spec.log_path,
                    status: None,
                })
            }
        }
    }

    fn spawn_supervised(spec: ProcessSpec, supervisor: &Path, log: File) -> Result<Self> {
        let mut command = Command::new(supervisor);
        command
            .arg("supervise")
            .arg("--grace-ms")
            .arg(DEFAULT_GRACE.as_millis().to_string())
            .arg("--")
            .arg(&spec.program)
            .args(&spec.args)
            .envs(spec.envs.iter().map(|(k, v)| (k, v)))
            // The supervisor and its server live in their own process group so that a Ctrl-C
            // at the terminal reaches only `baton-sandbox up`, which then stops them in order.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
            name: spec.name.clone(),
            program: supervisor.to_path_buf(),
            source,
        })?;
        let lifeline = child.stdin.take();
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            // The supervisor prints the pid right after spawning, or exits with the reason in
            // the log; either way this read returns promptly.
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        let Ok(raw) = line.trim().parse::<i32>() else {
            let status = child.wait().ok();
            return Err(SandboxError::NoPid {
                name: spec.name.clone(),
                program: spec.program.clone(),
                status: status.map(|s| s.to_string()).unwrap_or_default(),
                log_tail: log_tail(&spec.log_path, 20),
            });
        };
        let pid = Pid::from_raw(raw);
        info!(
            server = %spec.name,
            pid = raw,
            supervisor = child.id(),
            log = %spec.log_path.display(),
            "started"
        );
        Ok(Self {
            name: spec.name,
            pid,
            child: Some(child),
            lifeline,
            log_path: spec.log_path,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pid of the server itself (not of its supervisor).
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// The log's path and last lines, for startup errors.
    pub fn server_log(&self) -> Box<ServerLog> {
        Box::new(ServerLog {
            path: self.log_path.clone(),
            tail: self.log_tail(30),
        })
    }

    /// The exit status if the server has exited (reaps the supervisor).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.status = Some(status);
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Sends `signal` to the server itself. Only while its supervisor is alive: the supervisor
    /// reaps the server and exits right after, so its pid can't have been reused.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        match kill(self.pid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(SandboxError::Signal {
                name: self.name.clone(),
                pid: self.pid(),
                signal: signal.as_str(),
                source,
            }),
        }
    }

    /// SIGKILLs the server and waits until its supervisor has reaped it.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))
            .await
            .ok_or_else(|| SandboxError::Stop {
                name: self.name.clone(),
                pid: self.pid(),
            })
    }

    /// Waits up to `timeout` for the server to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the server is gone.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        if self.is_running() {
            debug!(server = %self.name, pid = self.pid(), "stopping");
            self.signal(Signal::SIGTERM)?;
            if self.wait_exit(grace).await.is_none() {
                warn!(server = %self.name, pid = self.pid(), ?grace, "did not stop on SIGTERM; killing");
                self.signal(Signal::SIGKILL)?;
                if self.wait_exit(Duration::from_secs(5)).await.is_none() {
                    self.kill_child();
                }
            }
        }
        self.lifeline.take();
        let status = self.try_status().map(|s| s.to_string()).unwrap_or_default();
        self.child = None;
        info!(server = %self.name, %status, "stopped");
        Ok(())
    }

    /// Sends SIGTERM without waiting, so that several servers can stop in parallel.
    pub fn begin_stop(&mut self) {
        let _ = self.signal(Signal::SIGTERM);
    }

    fn kill_child(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
    }

    fn stop_blocking(&mut self, grace: Duration) {
        if !self.is_running() {
            self.child = None;
            return;
        }
        let _ = self.signal(Signal::SIGTERM);
        // Closing the lifeline makes the supervisor enforce the grace itself, should this
        // thread not get to.
        self.lifeline.take();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.signal(Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && self.try_status().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_child();
        self.child = None;
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_blocking(DEFAULT_GRACE);
        }
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SandboxError::Io {
            what: "open server log",
            path: path.to_path_buf(),
            source,
        })
}

fn clone_file(file: &File, path: &Path) -> Result<File> {
    file.try_clone().map_err(|source| SandboxError::Io {
        what: "duplicate server log handle",
        path: path.to_path_buf(),
        source,
    })
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where the `baton-sandbox` binary is: `BATON_SANDBOX_BIN`, else next to the current
/// executable (agents in target/debug/) or in its parent directory (tests in target/debug/deps/).
pub fn supervisor_binary() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("BATON_SANDBOX_BIN") {
            return Some(PathBuf::from(path));
        }
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        let found = [Some(dir), dir.parent()]
            .into_iter()
            .flatten()
            .map(|d| d.join("baton-sandbox"))
            .find(|candidate| candidate.is_file());
        found
    })
    .as_deref()
}

/// Removes the sandbox's directory if the process that made it dies without cleaning up (a
/// sandbox kept in a static, a killed test): `baton-sandbox cleanup` waits for EOF on its stdin,
/// gives the supervisors their grace, and removes the directory. Dropped normally, it is
/// simply killed, since the sandbox removes its directory itself.
#[derive(Debug)]
pub struct Janitor {
    child: Child,
    lifeline: Option<ChildStdin>,
}

impl Janitor {
    /// `None` (with a warning already given by [`ManagedProcess::spawn`]'s lookup) when the
    /// `baton-sandbox` binary isn't around.
    pub fn spawn(dir: &Path) -> Option<Self> {
        let binary = supervisor_binary()?;
        let delay = DEFAULT_GRACE + Duration::from_secs(2);
        let mut child = Command::new(binary)
            .arg("cleanup")
            .arg("--delay-ms")
            .arg(delay.as_millis().to_string())
            .arg(dir)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .inspect_err(|error| warn!(%error, "failed to start the sandbox's janitor"))
            .ok()?;
        let lifeline = child.stdin.take();
        Some(Self { child, lifeline })
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lifeline.take();
    }
}

/// The hidden `baton-sandbox cleanup DIR`: once stdin reaches EOF, waits `delay` and removes
/// `dir`, which must be a sandbox directory (`baton-sandbox-*`).
pub fn cleanup(dir: &Path, delay: Duration) -> Result<()> {
    let is_sandbox_dir = dir
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("baton-sandbox-"));
    if !is_sandbox_dir {
        return Err(SandboxError::InvalidOptions {
            reason: format!("{} is not a sandbox directory", dir.display()),
        });
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    std::thread::sleep(delay);
    // Servers still shutting down may write meanwhile; a few tries settle it.
    let mut result = Ok(());
    for _ in 0..5 {
        result = std::fs::remove_dir_all(dir);
        match &result {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(500));
            }
            _ => return Ok(()),
        }
    }
    result.map_err(|source| SandboxError::Io {
        what: "remove the sandbox directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Polls `probe` until it succeeds, the process exits, or `timeout` passes.
pub async fn wait_ready<F, Fut>(
    process: &mut ManagedProcess,
    what: &'static str,
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), String>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(25);
    let mut last_error;
    loop {
        if let Some(status) = process.try_status() {
            return Err(SandboxError::Exited {
                name: process.name().to_string(),
                status: status.to_string(),
                log: process.server_log(),
            });
        }
        match tokio::time::timeout(Duration::from_secs(5), probe()).await {
            Ok(Ok(())) => {
                info!(server = %process.name(), elapsed = ?started.elapsed(), "{what} ready");
                return Ok(());
            }
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = "probe timed out after 5s".to_string(),
        }
        if started.elapsed() >= timeout {
            return Err(SandboxError::NotReady {
                name: process.name().to_string(),
                what,
                waited: timeout,
                last_error,
                log: process.server_log(),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Succeeds once something accepts TCP connections on `port` on loopback.
pub async fn probe_tcp(port: u16) -> std::result::Result<(), String> {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map(drop)
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))
}

/// Succeeds once `url` answers with a 2xx status.
pub async fn probe_http(
    client: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
) -> std::result::Result<(), String> {
    let mut request = client.get(url).timeout(Duration::from_secs(3));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("GET {url}: {status}: {}", body.trim()))
    }
}

/// A free TCP port on loopback (the OS picks it; a small race with other processes remains).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| SandboxError::Io {
            what: "find a free loopback port",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

/// The hidden `baton-sandbox supervise -- PROG ARGS…`: runs PROG, prints its pid on the first
/// line of stdout, and stops it (SIGTERM, then SIGKILL after `grace`) when stdin reaches EOF or
/// on SIGTERM/SIGINT/SIGHUP. Returns the exit code to exit with: the child's, or 128+signal.
pub async fn supervise(grace: Duration, program: OsString, args: Vec<OsString>) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};

    let program_path = PathBuf::from(&program);
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| SandboxError::Io {
            what: "duplicate the supervisor's stderr",
            path: PathBuf::from("/dev/stderr"),
            source,
        })?;
    let mut child = tokio::process::Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| SandboxError::Spawn {
            name: "supervised server".to_string(),
            program: program_path.clone(),
            source,
        })?;
    let raw_pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .unwrap_or(0);
    {
        let mut out = std::io::stdout().lock();
        // If the parent is already gone, stdin's EOF below takes care of it.
        let _ = writeln!(out, "{raw_pid}");
        let _ = out.flush();
    }
    let signal_stream = |kind: SignalKind| {
        signal(kind).map_err(|source| SandboxError::Io {
            what: "install the supervisor's signal handler",
            path: program_path.clone(),
            source,
        })
    };
    let mut term = signal_stream(SignalKind::terminate())?;
    let mut int = signal_stream(SignalKind::interrupt())?;
    let mut hup = signal_stream(SignalKind::hangup())?;
    let parent_gone = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let reason = tokio::select! {
        status = child.wait() => {
            return Ok(status.map(exit_code).unwrap_or(1));
        }
        () = parent_gone => "stdin closed",
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
    };
    eprintln!("baton-sandbox supervise: {reason}; stopping pid {raw_pid}");
    if raw_pid > 0 {
        let _ = kill(Pid::from_raw(raw_pid), Signal::SIGTERM);
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            eprintln!(
                "baton-sandbox supervise: pid {raw_pid} still running after {grace:?}; SIGKILL"
            );
            let _ = child.start_kill();
            child.wait().await
        }
    };
    Ok(status.map(exit_code).unwrap_or(1))
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
