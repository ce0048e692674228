//! What the docs ship, read as a user reads them: the files they name, and the YAML snippets and
//! example configuration whose queries the tests run as written (no copy of them in a test).

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

/// The fenced code blocks of language `lang` (```` ```yaml ````) in the section of `markdown`
/// headed `heading` (`### Metric analysis`), up to the next heading of any level.
pub fn fenced_blocks(markdown: &str, heading: &str, lang: &str) -> Vec<String> {
    let mut in_section = false;
    let mut block: Option<String> = None;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if let Some(text) = block.as_mut() {
            if line.trim_start().starts_with("```") {
                out.extend(block.take());
            } else {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        }
        if line.starts_with('#') {
            in_section = line.trim_start_matches('#').trim() == heading;
            continue;
        }
        if in_section && line.trim_start().strip_prefix("```") == Some(lang) {
            block = Some(String::new());
        }
    }
    out
}

/// A file of the repository, as text.
pub fn read(file: &str) -> Result<String> {
    std::fs::read_to_string(crate::repo_root().join(file))
        .with_context(|| format!("reading {file}"))
}

/// The headings of a Markdown text, without their `#`s.
pub fn headings(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.push(line.trim_start_matches('#').trim().to_owned());
        }
    }
    out
}

/// The files under `dir` (relative to the repository) whose names end in one of `extensions`,
/// relative to the repository, sorted.
pub fn files_under(dir: &str, extensions: &[&str]) -> Result<Vec<String>> {
    let root = crate::repo_root();
    let mut out = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        let entries =
            std::fs::read_dir(root.join(&folder)).with_context(|| format!("listing {folder}"))?;
        for entry in entries {
            let entry = entry?;
            let name = format!("{folder}/{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                folders.push(name);
            } else if extensions.iter().any(|e| name.ends_with(&format!(".{e}"))) {
                out.push(name);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every check of a YAML document: the items of its `checks:` lists at any depth (a whole
/// configuration, or a README snippet that is only `checks:`).
pub fn checks(doc: &serde_yaml_ng::Value) -> Vec<serde_yaml_ng::Value> {
    let mut out = Vec::new();
    collect_checks(doc, &mut out);
    out
}

fn collect_checks(v: &serde_yaml_ng::Value, out: &mut Vec<serde_yaml_ng::Value>) {
    use serde_yaml_ng::Value;
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    (Some("checks"), Value::Sequence(checks)) => out.extend(checks.iter().cloned()),
                    _ => collect_checks(v, out),
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| collect_checks(v, out)),
        _ => {}
    }
}

/// The documents of a YAML text, split at its `---` lines.
fn documents(text: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            out.push(String::new());
        } else if let Some(last) = out.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    out
}

/// A `prometheus` check the README or a file of `examples/` ships, as written there.
#[derive(Debug, Clone)]
pub struct ShippedCheck {
    /// Where: `readme`, or `example-` and the file's path under `examples/` (`example-baton`).
    pub place: String,
    pub check: serde_yaml_ng::Value,
}

impl ShippedCheck {
    pub fn name(&self) -> &str {
        self.check
            .get("name")
            .and_then(serde_yaml_ng::Value::as_str)
            .unwrap_or("")
    }

    /// `place-name`: unique among the shipped checks, and a valid check name.
    pub fn test_name(&self) -> String {
        format!("{}-{}", self.place, self.name())
    }

    pub fn query(&self) -> Result<String> {
        self.check["prometheus"]["query"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{}: no prometheus.query", self.test_name()))
    }
}

/// Every `prometheus` check the README (in its YAML snippets) and `examples/` (in every YAML
/// file) ship, each as written.
pub fn shipped_prometheus_checks() -> Result<Vec<ShippedCheck>> {
    let mut texts: Vec<(String, String)> = Vec::new();
    let readme = read("README.md")?;
    for heading in headings(&readme) {
        for block in fenced_blocks(&readme, &heading, "yaml") {
            texts.push(("readme".to_owned(), block));
        }
    }
    for file in files_under("examples", &["yaml", "yml"])? {
        let place = file
            .trim_start_matches("examples/")
            .trim_end_matches(".yaml")
            .trim_end_matches(".yml")
            .replace(['/', '.', '_'], "-");
        texts.push((format!("example-{place}"), read(&file)?));
    }
    let mut out = Vec::new();
    for (place, text) in texts {
        // A file may hold several documents (`---`), as Kubernetes manifests do.
        for document in documents(&text) {
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&document)
                .with_context(|| format!("parsing {place}'s YAML:\n{document}"))?;
            out.extend(
                checks(&doc)
                    .into_iter()
                    .filter(|c| c.get("prometheus").is_some())
                    .map(|check| ShippedCheck {
                        place: place.clone(),
                        check,
                    }),
            );
        }
    }
    Ok(out)
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

    #[test]
    fn fenced_blocks_are_those_of_their_section() {
        let md = "## A\n```yaml\na: 1\n```\n### B\ntext\n```yaml\nb: 2\n```\n```sh\nls\n```\n## C\n```yaml\nc: 3\n```\n";
        assert_eq!(fenced_blocks(md, "B", "yaml"), ["b: 2\n"]);
    }

    #[test]
    fn checks_are_found_at_any_depth() {
        let yaml = "apps:\n  web:\n    checks:\n      - {name: a, http: {}}\n      - {name: b}\n\
                    checks:\n  - {name: c, smoke: {}}\n";
        let doc = serde_yaml_ng::from_str(yaml).expect("parse");
        let names: Vec<String> = checks(&doc)
            .iter()
            .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn the_readme_and_the_example_ship_an_error_rate_each_with_a_query() {
        let shipped = shipped_prometheus_checks().expect("shipped checks");
        let names: Vec<String> = shipped.iter().map(ShippedCheck::test_name).collect();
        for name in ["readme-error-rate", "example-baton-error-rate"] {
            assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
        }
        for check in &shipped {
            let query = check.query().expect("query");
            assert!(query.contains("{{pods}}"), "{query}");
        }
    }
}
