//! The README's first command, `scripts/demo.sh`, run as a newcomer runs it (with the binaries
//! already built): it ends well, and its rolled-back release says why once.

use anyhow::{ensure, Context, Result};
use baton_tests::harness::trial;
use baton_tests::{repo_root, target_bin};
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![the_demo_runs_and_its_rolled_back_release_says_why_once]
}

async fn the_demo_runs_and_its_rolled_back_release_says_why_once() -> Result<()> {
    let baton = target_bin("baton")?;
    let bin_dir = baton.parent().context("the binaries' folder")?;
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts/demo.sh"))
        // The test command built them already.
        .env("BATON_NO_BUILD", "1")
        .env("BATON_BIN_DIR", bin_dir)
        .kill_on_drop(true)
        .output()
        .await
        .context("running scripts/demo.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("demo done"),
        "the demo did not finish: {stdout}"
    );
    // The live output of the broken release, from its request to the exit code.
    let live = stdout
        .split("== release web:v3")
        .nth(1)
        .and_then(|s| s.split("(baton release exited").next())
        .with_context(|| format!("no rolled-back release in the demo's output: {stdout}"))?;
    let failed = live
        .lines()
        .find(|l| l.contains("analysis.failed"))
        .with_context(|| format!("no analysis.failed in: {live}"))?;
    // `analysis.failed  step N: <reason> — <measurements>`
    let reason = failed
        .split_once(": ")
        .map(|(_, r)| r.split(" — ").next().unwrap_or(r).trim())
        .filter(|r| r.len() > 10)
        .with_context(|| format!("no reason in: {failed}"))?;
    ensure!(
        live.matches(reason).count() == 1,
        "the reason {reason:?} is said {} times:\n{live}",
        live.matches(reason).count()
    );
    ensure!(
        live.lines()
            .last()
            .into_iter()
            .chain(live.lines().rev().take(3))
            .any(|l| l.contains("rolled back") || l.contains("rolled_back")),
        "the release's end is not told: {live}"
    );
    Ok(())
}
