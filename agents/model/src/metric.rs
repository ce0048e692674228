//! Metric checks (`prometheus`, `webhook`): the condition a value must meet, how the series of a
//! result become values to judge, what errors count as, and the variables a query may use.
//! Shared by the configuration (which refuses what can't be evaluated, naming the field) and the
//! health-checker (which evaluates). Pure: no I/O.

use std::fmt;

/// The longest PromQL query (as written, before its variables are filled in): any text field's.
pub const MAX_QUERY_BYTES: usize = crate::limits::MAX_TEXT_BYTES;
/// The most consecutive errors a metric check may tolerate (`error_limit`).
pub const MAX_ERROR_LIMIT: u32 = 100;
/// Consecutive errors tolerated when the configuration says nothing (as Argo Rollouts' analysis).
pub const DEFAULT_ERROR_LIMIT: u32 = 4;
/// The longest field path of a webhook check.
pub const MAX_FIELD_BYTES: usize = 256;

/// The variables a query may name as `{{name}}`.
pub const VARIABLES: [&str; 8] = [
    "app",
    "namespace",
    "env",
    "track",
    "pods",
    "window",
    "release_id",
    "step",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    fn negation(self) -> Op {
        match self {
            Op::Lt => Op::Ge,
            Op::Le => Op::Gt,
            Op::Gt => Op::Le,
            Op::Ge => Op::Lt,
            Op::Eq => Op::Ne,
            Op::Ne => Op::Eq,
        }
    }
}

/// `result <op> <number>`, as written in the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    pub op: Op,
    pub bound: f64,
}

impl Condition {
    /// Parses `result < 0.01` (spaces optional; `result` may be left out).
    pub fn parse(text: &str) -> Result<Condition, String> {
        let expected =
            "a condition such as \"result < 0.01\" (<, <=, >, >=, == or != and a number)";
        let rest = text.trim();
        let rest = rest.strip_prefix("result").unwrap_or(rest).trim_start();
        let (op, rest) = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|r| (op, r)))
        .ok_or_else(|| format!("{text:?} is not {expected}"))?;
        let bound: f64 = rest
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not {expected}"))?;
        if !bound.is_finite() {
            return Err(format!("{text:?}: the bound must be a finite number"));
        }
        Ok(Condition { op, bound })
    }

    pub fn holds(&self, value: f64) -> bool {
        match self.op {
            Op::Lt => value < self.bound,
            Op::Le => value <= self.bound,
            Op::Gt => value > self.bound,
            Op::Ge => value >= self.bound,
            Op::Eq => value == self.bound,
            Op::Ne => value != self.bound,
        }
    }

    /// How a value compares, for a measurement: `0.2 >= 0.01` when it fails `< 0.01`.
    pub fn explain(&self, value: f64) -> String {
        let op = if self.holds(value) {
            self.op
        } else {
            self.op.negation()
        };
        format!("{} {} {}", short(value), op.symbol(), short(self.bound))
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "result {} {}", self.op.symbol(), short(self.bound))
    }
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').to_owned()
    }
}

/// How the series of a result are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregate {
    /// Every series must meet the condition.
    #[default]
    Each,
    Sum,
    Avg,
    Min,
    Max,
}

impl Aggregate {
    pub fn parse(text: &str) -> Result<Aggregate, String> {
        match text {
            "" | "each" => Ok(Aggregate::Each),
            "sum" => Ok(Aggregate::Sum),
            "avg" => Ok(Aggregate::Avg),
            "min" => Ok(Aggregate::Min),
            "max" => Ok(Aggregate::Max),
            other => Err(format!(
                "{other:?} is not one of each, sum, avg, min or max"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Each => "each",
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
        }
    }

    /// The values to judge: each series' own, or one made of them. `values` is not empty.
    pub fn apply(self, values: &[f64]) -> Vec<f64> {
        let fold = |init: f64, f: fn(f64, f64) -> f64| values.iter().copied().fold(init, f);
        match self {
            Aggregate::Each => values.to_vec(),
            Aggregate::Sum => vec![values.iter().sum()],
            Aggregate::Avg => vec![values.iter().sum::<f64>() / values.len().max(1) as f64],
            Aggregate::Min => vec![fold(f64::INFINITY, f64::min)],
            Aggregate::Max => vec![fold(f64::NEG_INFINITY, f64::max)],
        }
    }
}

/// Refuses a query that can't be sent: empty, longer than [`MAX_QUERY_BYTES`], or naming a
/// variable that isn't one of [`VARIABLES`].
pub fn check_query(query: &str) -> Result<(), String> {
    if query.trim().is_empty() {
        return Err("is empty".into());
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!("is longer than {MAX_QUERY_BYTES} bytes"));
    }
    template_variables(query).map(|_| ())
}

/// The `{{name}}`s of a template, refused when one is not a [`VARIABLES`] name or a brace is
/// left open.
pub fn template_variables(template: &str) -> Result<Vec<&str>, String> {
    variables_in(template, &VARIABLES)
}

/// The `{{name}}`s of a template, refused when one is not in `known` or a brace is left open.
pub fn variables_in<'a>(template: &'a str, known: &[&str]) -> Result<Vec<&'a str>, String> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        let after = &rest[at + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "has a \"{{\" that is never closed".to_owned())?;
        let name = after[..end].trim();
        if !known.contains(&name) {
            return Err(format!(
                "names {{{{{name}}}}}, which is not a variable: use {}",
                known
                    .iter()
                    .map(|v| format!("{{{{{v}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        found.push(name);
        rest = &after[end + 2..];
    }
    Ok(found)
}

/// Fills a template's variables from `value` (a name of [`VARIABLES`] to its text). A name
/// `value` does not know is left empty.
pub fn render(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find("}}") {
            Some(end) => {
                out.push_str(&value(after[..end].trim()));
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[at..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// A PromQL regular expression matching exactly these names (for `pod=~"{{pods}}"`): the
/// characters of a pod name need no escaping but the dot.
pub fn regex_alternation<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| n.replace('.', "\\\\."))
        .collect::<Vec<_>>()
        .join("|")
}

/// A dotted path into JSON (`result.score`, `checks.0.ok`), refused when empty or malformed.
pub fn field_path(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Err("is empty: name the answer's field, such as \"result.score\"".into());
    }
    if path.len() > MAX_FIELD_BYTES {
        return Err(format!("is longer than {MAX_FIELD_BYTES} bytes"));
    }
    let parts: Vec<&str> = path.split('.').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(format!(
            "{path:?} is not a dotted path of field names (such as \"result.score\")"
        ));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_hold() {
        let c = Condition::parse("result < 0.01").unwrap();
        assert_eq!(
            c,
            Condition {
                op: Op::Lt,
                bound: 0.01
            }
        );
        assert!(c.holds(0.005) && !c.holds(0.01));
        assert_eq!(c.explain(0.2), "0.2 >= 0.01");
        assert_eq!(c.to_string(), "result < 0.01");
        for (text, op, bound) in [
            ("result<=5", Op::Le, 5.0),
            (">= 0.99", Op::Ge, 0.99),
            ("result == 1", Op::Eq, 1.0),
            ("result != 0", Op::Ne, 0.0),
            ("  result >  -3 ", Op::Gt, -3.0),
        ] {
            assert_eq!(
                Condition::parse(text).unwrap(),
                Condition { op, bound },
                "{text}"
            );
        }
        for bad in [
            "",
            "result",
            "result ~ 1",
            "result < x",
            "< inf",
            "result < NaN",
            "score < 1",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aggregates_make_the_values_to_judge() {
        let v = [1.0, 3.0, 2.0];
        assert_eq!(Aggregate::Each.apply(&v), v.to_vec());
        assert_eq!(Aggregate::Sum.apply(&v), vec![6.0]);
        assert_eq!(Aggregate::Avg.apply(&v), vec![2.0]);
        assert_eq!(Aggregate::Min.apply(&v), vec![1.0]);
        assert_eq!(Aggregate::Max.apply(&v), vec![3.0]);
        assert_eq!(Aggregate::parse("").unwrap(), Aggregate::Each);
        assert!(Aggregate::parse("median").is_err());
    }

    #[test]
    fn templates_name_known_variables_only() {
        let q = r#"sum(rate(x{pod=~"{{pods}}",ns="{{ namespace }}"}[{{window}}]))"#;
        assert_eq!(
            template_variables(q).unwrap(),
            ["pods", "namespace", "window"]
        );
        assert!(template_variables("x{{secret}}")
            .unwrap_err()
            .contains("{{secret}}"));
        assert!(template_variables("x{{pods").is_err());
        let filled = render(q, |name| match name {
            "pods" => regex_alternation(["web-1", "web.2"]),
            "namespace" => "team-a".into(),
            "window" => "30s".into(),
            _ => String::new(),
        });
        assert_eq!(
            filled,
            r#"sum(rate(x{pod=~"web-1|web\\.2",ns="team-a"}[30s]))"#
        );
    }

    #[test]
    fn field_paths_are_dotted_names() {
        assert_eq!(field_path("result.score").unwrap(), ["result", "score"]);
        assert_eq!(field_path("ok").unwrap(), ["ok"]);
        for bad in ["", ".a", "a..b", "a b"] {
            assert!(field_path(bad).is_err(), "{bad:?}");
        }
    }
}
