//! The command build backend: runs a release's build argv — without a shell — in a fresh working
//! directory, with a timeout, and captures its output.
//!
//! The command runs in a process group of its own, and the whole group is killed when the
//! command ends, times out, or the handler is dropped (a shutdown past its grace): a build leaves
//! no processes behind. It inherits the agent's environment minus `BATON_*` and `NATS_*` (the
//! agent's own credentials are none of its business), plus `BATON_RELEASE_ID`, `BATON_APP`,
//! `BATON_ENV` and `BATON_IMAGE`.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::decide::CommandEnd;

/// The most output kept (the end of it: that is where a failing build says why).
pub const MAX_LOG_BYTES: usize = 8 * 1024 * 1024;
/// How long output is still read after the command ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a build command did.
#[derive(Debug)]
pub struct CommandOutput {
    pub end: CommandEnd,
    /// A header line with the argv, stdout and stderr interleaved as they came, and a footer.
    pub log: Vec<u8>,
}

/// Runs `argv` (argv[0] is the program, looked up in `PATH` when it has no `/`) with `env` added.
pub async fn run(argv: &[String], timeout: Duration, env: &[(&str, &str)]) -> CommandOutput {
    let started = Instant::now();
    let tail = Arc::new(Mutex::new(Tail::new(MAX_LOG_BYTES)));
    let end = run_inner(argv, timeout, env, &tail).await;
    let mut log = format!("$ {argv:?}\n").into_bytes();
    if let Ok(mut tail) = tail.lock() {
        if tail.dropped > 0 {
            log.extend_from_slice(
                format!(
                    "[… the first {} bytes of output were dropped …]\n",
                    tail.dropped
                )
                .as_bytes(),
            );
        }
        log.extend(tail.data.drain(..));
    }
    if !log.ends_with(b"\n") {
        log.push(b'\n');
    }
    log.extend_from_slice(
        format!("--- {end} after {:.1}s\n", started.elapsed().as_secs_f64()).as_bytes(),
    );
    CommandOutput { end, log }
}

async fn run_inner(
    argv: &[String],
    timeout: Duration,
    env: &[(&str, &str)],
    tail: &Arc<Mutex<Tail>>,
) -> CommandEnd {
    let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
        return CommandEnd::NotStarted("the argv is empty".into());
    };
    let dir = match tempfile::Builder::new().prefix("baton-build-").tempdir() {
        Ok(d) => d,
        Err(e) => return CommandEnd::NotStarted(format!("cannot create a working directory: {e}")),
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(&argv[1..])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("BATON_") || k.starts_with("NATS_") {
            command.env_remove(&key);
        }
    }
    command.envs(env.iter().copied());
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return CommandEnd::NotStarted(format!("{program}: {e}")),
    };
    let mut group = GroupKiller(child.id().and_then(|id| i32::try_from(id).ok()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(collect(out, tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(collect(err, tail.clone())));
    }
    let end = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => CommandEnd::Exited(code),
                (None, Some(signal)) => CommandEnd::Signalled(signal),
                (None, None) => CommandEnd::NotStarted(format!("unknown exit status {status}")),
            }
        }
        Ok(Err(e)) => CommandEnd::NotStarted(format!("waiting for {program}: {e}")),
        Err(_) => {
            group.kill();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, child.wait()).await;
            CommandEnd::TimedOut(timeout)
        }
    };
    // Whatever the command left running in its group goes with it (and closes the pipes).
    group.kill();
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN_TIMEOUT, reader).await.is_err() {
            abort.abort();
        }
    }
    end
}

async fn collect(mut stream: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buffer[..n]);
                }
            }
        }
    }
}

/// The last `limit` bytes of output.
struct Tail {
    data: VecDeque<u8>,
    dropped: u64,
    limit: usize,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self {
            data: VecDeque::new(),
            dropped: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.extend(bytes);
        if self.data.len() > self.limit {
            let excess = self.data.len() - self.limit;
            self.data.drain(..excess);
            self.dropped += excess as u64;
        }
    }
}

/// Kills the command's process group (once) when asked or dropped.
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (nothing left in the group) is the usual case after a clean exit.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn output_and_exit_code_are_captured_without_a_shell() {
        let out = run(
            &argv(&["/usr/bin/env"]),
            Duration::from_secs(10),
            &[("BATON_APP", "web")],
        )
        .await;
        assert_eq!(out.end, CommandEnd::Exited(0));
        let log = String::from_utf8_lossy(&out.log);
        assert!(log.contains("BATON_APP=web"), "{log}");
        assert!(
            log.ends_with("s\n") && log.contains("--- exited with code 0"),
            "{log}"
        );

        // A shell's syntax is just text to a program run without one.
        let out = run(
            &argv(&["/bin/echo", "a; false", "$(id)"]),
            Duration::from_secs(10),
            &[],
        )
        .await;
        assert_eq!(out.end, CommandEnd::Exited(0));
        assert!(String::from_utf8_lossy(&out.log).contains("a; false $(id)\n"));

        let out = run(&argv(&["/bin/false"]), Duration::from_secs(10), &[]).await;
        assert_eq!(out.end, CommandEnd::Exited(1));
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let started = Instant::now();
        let out = run(
            &argv(&["/bin/sleep", "30"]),
            Duration::from_millis(300),
            &[],
        )
        .await;
        assert_eq!(out.end, CommandEnd::TimedOut(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_program_does_not_start() {
        let out = run(
            &argv(&["/nonexistent/baton-tool"]),
            Duration::from_secs(5),
            &[],
        )
        .await;
        match out.end {
            CommandEnd::NotStarted(why) => {
                assert!(why.contains("/nonexistent/baton-tool"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_end_of_long_output_is_kept() {
        let mut t = Tail::new(4);
        t.push(b"abc");
        t.push(b"def");
        assert_eq!(t.data.iter().copied().collect::<Vec<_>>(), b"cdef");
        assert_eq!(t.dropped, 2);
    }
}
