//! The CLI's errors: clear messages and exit 1 for usage, input and connection errors (2 is kept
//! for "rolled back").

use anyhow::{ensure, Result};
use baton_tests::harness::trial;
use baton_tests::{target_bin, BusEnv};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![usage_input_and_connection_errors_exit_1_with_a_clear_message]
}

async fn run(env: &[(String, String)], args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = tokio::process::Command::new(target_bin("baton")?)
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .await?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

async fn usage_input_and_connection_errors_exit_1_with_a_clear_message() -> Result<()> {
    let bus = BusEnv::start().await?;
    let env = bus.process_env();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["release"], "required"),
        (
            vec![
                "release", "web", "--env", "staging", "--image", "web:v1", "--colour", "red",
            ],
            "unexpected argument",
        ),
        (
            vec![
                "release", "Web_App", "--env", "staging", "--image", "web:v1",
            ],
            "is not a DNS label",
        ),
        (
            vec!["release", "web", "--env", "staging", "--image", "web:v1"],
            "no configuration has been applied",
        ),
        (
            vec![
                "release",
                "web",
                "--env",
                "staging",
                "--image",
                "web:v1",
                "--commit-time",
                "yesterday",
            ],
            "RFC 3339",
        ),
        (vec!["status", "not-a-release"], "not a UUID"),
        (
            vec!["status", "01890a5d-ac96-774b-bcce-b302099a8057"],
            "no release",
        ),
        (
            vec!["rollback", "web", "--env", "staging"],
            "no configuration has been applied",
        ),
        (vec!["metrics", "--window", "fortnight"], "--window"),
        (vec!["history", "--limit", "0"], "--limit"),
        (
            vec!["bus", "status", "--output", "xml"],
            "invalid value 'xml'",
        ),
        (vec!["bus", "status", "--as", "nobody"], "nobody.nk"),
    ];
    // Malformed commit times, some cutting a character in two: an error, never a panic.
    let release = [
        "release",
        "web",
        "--env",
        "staging",
        "--image",
        "web:v1",
        "--commit-time",
    ];
    let bad_times = [
        "2026-11-26T09:30:00+0é:0",
        "2026-11-26T09:30:0é",
        "2026-02-30T00:00:00Z",
        "2026-11-26T09:30:00",
    ];
    let cases = cases.into_iter().chain(bad_times.iter().map(|t| {
        let mut args = release.to_vec();
        args.push(t);
        (args, "is not an RFC 3339 time")
    }));
    for (args, says) in cases {
        let (code, text) = run(&env, &args).await?;
        ensure!(
            code == Some(1),
            "baton {} exited {code:?}:\n{text}",
            args.join(" ")
        );
        ensure!(
            text.contains(says),
            "baton {} does not say {says:?}:\n{text}",
            args.join(" ")
        );
        ensure!(
            !text.contains("panicked"),
            "baton {} panicked:\n{text}",
            args.join(" ")
        );
    }
    // Nothing listening: a connection error, at once.
    let port = baton_sandbox::process::free_port()?;
    let nowhere = vec![("NATS_URL".to_string(), format!("nats://127.0.0.1:{port}"))];
    let (code, text) = run(
        &nowhere,
        &["status", "01890a5d-ac96-774b-bcce-b302099a8057"],
    )
    .await?;
    ensure!(
        code == Some(1) && text.contains("connecting to NATS"),
        "exit {code:?}:\n{text}"
    );
    let (code, _) = run(&env, &["--help"]).await?;
    ensure!(code == Some(0), "--help exited {code:?}");
    Ok(())
}
