//! The built-in permission table in `docs/filter.md` is the built-in rules
//! (`DEFAULT_RULES_JSON`): same rows, same order, same patterns, same verbs per
//! role. The table follows the HTML comment `MARKER`; each cell lists verbs in
//! the order list, get, create, update, delete, or says `all` or `none`.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests

use apitokens_core::rules::DEFAULT_RULES_JSON;
use apitokens_core::spec::RuleSpec;
use apitokens_core::Verb;
use std::collections::BTreeSet;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const DOC: &str = include_str!("../../docs/filter.md");
const MARKER: &str = "<!-- permissions table: checked by core/tests/docs_permissions.rs -->";
const HEADER: [&str; 4] = ["pattern", "viewer", "editor", "owner"];

/// Verbs as indexes into `Verb::ALL` (list, get, create, update, delete).
type Verbs = BTreeSet<usize>;

#[derive(Debug, PartialEq)]
struct Row {
    pattern: String,
    viewer: Verbs,
    editor: Verbs,
    owner: Verbs,
}

fn verb_index(verb: &str, what: &str) -> usize {
    Verb::ALL
        .iter()
        .position(|v| v.as_str() == verb)
        .unwrap_or_else(|| panic!("{what}: unknown verb {verb:?}"))
}

/// A rule's verbs for one role: `"*"` is every verb.
fn rule_verbs(verbs: &[String], what: &str) -> Verbs {
    if verbs.iter().any(|v| v == "*") {
        return (0..Verb::ALL.len()).collect();
    }
    verbs.iter().map(|v| verb_index(v, what)).collect()
}

/// A table cell: `all`, `none`, or verbs separated by commas, written in the
/// order of `Verb::ALL` without repeats.
fn cell_verbs(cell: &str, what: &str) -> Verbs {
    match cell {
        "all" => (0..Verb::ALL.len()).collect(),
        "none" => Verbs::new(),
        _ => {
            let list: Vec<usize> = cell.split(',').map(|v| verb_index(v.trim(), what)).collect();
            assert!(
                list.windows(2).all(|w| w[0] < w[1]),
                "{what}: {cell:?} is not in the order list, get, create, update, delete (or repeats a verb)"
            );
            assert!(
                list.len() < Verb::ALL.len(),
                "{what}: {cell:?} names every verb: write `all`"
            );
            list.into_iter().collect()
        }
    }
}

fn cells(line: &str) -> Vec<&str> {
    let line = line.trim();
    assert!(
        line.starts_with('|') && line.ends_with('|'),
        "docs/filter.md: not a table row: {line:?}"
    );
    line[1..line.len() - 1].split('|').map(str::trim).collect()
}

fn doc_rows() -> Vec<Row> {
    let start = DOC
        .find(MARKER)
        .unwrap_or_else(|| panic!("docs/filter.md: no {MARKER:?} before the permission table"));
    let mut lines = DOC[start + MARKER.len()..].lines().skip_while(|l| l.trim().is_empty());
    let header = lines.next().expect("docs/filter.md: the permission table is missing");
    assert_eq!(cells(header), HEADER, "docs/filter.md: the permission table's header");
    let rule = lines
        .next()
        .expect("docs/filter.md: the permission table has no separator line");
    assert!(
        cells(rule)
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':')),
        "docs/filter.md: the permission table's separator line: {rule:?}"
    );
    lines
        .take_while(|l| l.trim_start().starts_with('|'))
        .enumerate()
        .map(|(i, line)| {
            let what = format!("docs/filter.md, permission table row {}", i + 1);
            let c = cells(line);
            assert_eq!(c.len(), 4, "{what}: expected 4 cells, got {}: {line:?}", c.len());
            let pattern = c[0]
                .strip_prefix('`')
                .and_then(|p| p.strip_suffix('`'))
                .unwrap_or_else(|| panic!("{what}: the pattern is not in backticks: {:?}", c[0]));
            Row {
                pattern: pattern.to_owned(),
                viewer: cell_verbs(c[1], &format!("{what}, viewer")),
                editor: cell_verbs(c[2], &format!("{what}, editor")),
                owner: cell_verbs(c[3], &format!("{what}, owner")),
            }
        })
        .collect()
}

fn rule_rows() -> Vec<Row> {
    let specs: Vec<RuleSpec> = serde_json::from_str(DEFAULT_RULES_JSON).expect("DEFAULT_RULES_JSON parses");
    specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let what = format!("DEFAULT_RULES_JSON rule {}", i + 1);
            Row {
                viewer: rule_verbs(&spec.allow.viewer, &what),
                editor: rule_verbs(&spec.allow.editor, &what),
                owner: rule_verbs(&spec.allow.owner, &what),
                pattern: spec.path,
            }
        })
        .collect()
}

/// A row as the docs would write it, for failure messages.
fn show(row: &Row) -> String {
    let verbs = |set: &Verbs| match set.len() {
        0 => "none".to_owned(),
        n if n == Verb::ALL.len() => "all".to_owned(),
        _ => set
            .iter()
            .map(|&i| Verb::ALL[i].as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        "| `{}` | {} | {} | {} |",
        row.pattern,
        verbs(&row.viewer),
        verbs(&row.editor),
        verbs(&row.owner)
    )
}

#[test]
fn the_documented_permission_table_is_the_builtin_rules() {
    let docs = doc_rows();
    let rules = rule_rows();
    for (i, (doc, rule)) in docs.iter().zip(&rules).enumerate() {
        assert!(
            doc == rule,
            "docs/filter.md permission table row {} differs from DEFAULT_RULES_JSON rule {}:\n  docs:  {}\n  rules: {}",
            i + 1,
            i + 1,
            show(doc),
            show(rule)
        );
    }
    assert!(
        docs.len() == rules.len(),
        "docs/filter.md's permission table has {} rows, DEFAULT_RULES_JSON {} rules; the first unmatched: {}",
        docs.len(),
        rules.len(),
        docs.get(rules.len())
            .or(rules.get(docs.len()))
            .map(show)
            .unwrap_or_default()
    );
}

#[test]
fn the_cells_are_read_as_written() {
    assert_eq!(cell_verbs("all", "t"), (0..5).collect());
    assert_eq!(cell_verbs("none", "t"), Verbs::new());
    assert_eq!(cell_verbs("list, get, update", "t"), [0, 1, 3].into_iter().collect());
    assert_eq!(rule_verbs(&["*".to_owned()], "t"), cell_verbs("all", "t"));
    assert_eq!(
        rule_verbs(&["update".to_owned(), "get".to_owned()], "t"),
        cell_verbs("get, update", "t")
    );
}
