//! `baton-sandbox supervise`: the server dies with the process that started it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}

fn supervise_sleep() -> (std::process::Child, Pid) {
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_baton-sandbox"))
        .args(["supervise", "--grace-ms", "2000", "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn baton-sandbox supervise");
    let mut line = String::new();
    BufReader::new(supervisor.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("read the pid line");
    let pid = Pid::from_raw(line.trim().parse().expect("the first line is a pid"));
    assert!(alive(pid));
    (supervisor, pid)
}

fn wait_gone(pid: Pid) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn server_is_killed_when_the_parent_closes_the_lifeline() {
    let (mut supervisor, pid) = supervise_sleep();
    drop(supervisor.stdin.take());
    let status = supervisor.wait().unwrap();
    assert!(wait_gone(pid), "sleep {pid} outlived its supervisor");
    // sleep dies of SIGTERM: 128 + 15
    assert_eq!(status.code(), Some(143));
}

#[test]
fn supervisor_exits_with_the_servers_status() {
    let (mut supervisor, pid) = supervise_sleep();
    // Keep the lifeline open (`wait` would close it): the supervisor must notice the exit itself.
    let _lifeline = supervisor.stdin.take();
    kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(supervisor.wait().unwrap().code(), Some(137));
}
