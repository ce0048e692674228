//! What the docs ship, read as a user reads them: the files they name.

use std::path::Path;

use anyhow::{Context, Result};

/// The repository's top-level folders: a backticked name starting with one of them is a path
/// that must exist.
const TOP_LEVEL: &[&str] = &[
    ".ci",
    "agents",
    "bus-config",
    "cli",
    "deploy",
    "docs",
    "examples",
    "proto",
    "sandbox",
    "scripts",
    "tests",
];

/// The repository paths a Markdown text names in backticks (`agents/model/src/ids.rs`), without
/// a `:line` or `#anchor` suffix; patterns and placeholders (`agents/*`, `<name>`) are left out.
pub fn named_paths(markdown: &str) -> Vec<String> {
    let mut out: Vec<String> = markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| !t.contains(char::is_whitespace))
        .filter(|t| !t.contains(['*', '<', '{', '$']))
        .filter(|t| {
            t.split_once('/')
                .is_some_and(|(top, _)| TOP_LEVEL.contains(&top))
        })
        .map(|t| {
            let t = t.split_once('#').map_or(t, |(p, _)| p);
            t.split_once(':').map_or(t, |(p, _)| p).to_owned()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The paths `file` (relative to the repository) names that do not exist.
pub fn missing_paths(file: &str) -> Result<Vec<String>> {
    let root = crate::repo_root();
    let text =
        std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
    Ok(named_paths(&text)
        .into_iter()
        .filter(|p| !root.join(Path::new(p)).exists())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repository_path_the_docs_name_exists() {
        for file in ["docs/decisions.md", "docs/security.md", "README.md"] {
            let missing = missing_paths(file).expect("read");
            assert!(
                missing.is_empty(),
                "{file} names paths that do not exist: {missing:?}"
            );
        }
    }

    #[test]
    fn paths_are_the_backticked_names_under_a_top_level_folder() {
        let text = "see `agents/model/src/ids.rs:12` and `docs/install.md#durability`, \
                    not `agents/*`, `baton.dev/track`, `a b/c` or `deploy/<overlay>`";
        assert_eq!(
            named_paths(text),
            ["agents/model/src/ids.rs", "docs/install.md"]
        );
    }
}
