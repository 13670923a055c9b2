//! The shape of the source tree, checked so it cannot drift:
//!
//! - within each crate, the top-level modules depend on each other without
//!   a circle (a module names another through `crate::name`, in a `use` or
//!   in a path; comments do not count). Run it alone with
//!   `cargo test -p edgefleet-tests --test architecture`;
//! - no source file is longer than [`MAX_LINES`] unless it is listed in
//!   [`LONG_FILES`] with what the one thing it holds is;
//! - library modules report errors as typed (`thiserror`) values: `anyhow`
//!   appears only at the edges listed in [`ANYHOW_EDGES`].

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use edgefleet_tests::repo_root;

/// The crates whose module graphs are checked: (crate, its `src`).
const CRATES: &[&str] = &["shared", "agent", "fleet-server", "fleetctl", "tests"];

/// Longest source file, in lines.
const MAX_LINES: usize = 800;

/// Files allowed to be longer, and the one thing each holds.
const LONG_FILES: &[(&str, &str)] = &[(
    "fleet-server/src/rollout/planner.rs",
    "the rollout planner: one state machine (waves, gates, device states and their counts)",
)];

/// Where `anyhow` may be used: binaries and the wiring that starts them.
const ANYHOW_EDGES: &[&str] = &[
    "agent/src/main.rs",
    "agent/src/lib.rs",
    "fleet-server/src/bin/",
    "fleet-server/src/lib.rs",
    // Starts a whole demo fleet (server, agents, models) for one command.
    "fleet-server/src/demo.rs",
    // The CLI: its commands are the binary's edge, where errors become
    // messages and exit codes.
    "fleetctl/src/",
    "shared/src/bin/",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src` belongs to; `None` for the crate
/// roots (`lib.rs`, `main.rs`, `bin/`), which wire every module.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_string())
}

/// Source text without comments (`//` to the end of a line).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| line.find("//").map_or(line, |i| &line[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The top-level modules `text` names through `crate::`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        // `edgefleet_crate::` or `$crate::` are not this crate's root.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b}`: the first name of each item.
            let mut depth = 0usize;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// Module → the modules it names, for one crate.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = top_module(src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let entry = graph.entry(module.clone()).or_default();
        for named in named_modules(&code(&text)) {
            if named != module {
                entry.insert(named);
            }
        }
    }
    // Only edges between this crate's modules (not `crate::SomeType`
    // re-exported at the root).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// One circle in `graph`, as the modules along it, if there is any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_checker_finds_names_and_circles() {
    let names = named_modules(
        "use crate::{api::{a, b}, store::X};\nlet x = crate::clock::now(); $crate::no; edgefleet_crate::no",
    );
    let want: BTreeSet<String> = ["api", "store", "clock"].map(String::from).into();
    assert_eq!(names, want);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let mut acyclic = graph.clone();
    acyclic.insert("c".into(), BTreeSet::new());
    assert_eq!(find_cycle(&acyclic), None);
}

#[test]
fn no_crate_has_a_circle_between_its_modules() {
    let root = repo_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        if !src.is_dir() {
            continue;
        }
        let graph = module_graph(&src);
        assert!(!graph.is_empty(), "no modules found in {}", src.display());
        if let Some(cycle) = find_cycle(&graph) {
            problems.push(format!("{krate}: {}", cycle.join(" -> ")));
        }
    }
    assert!(
        problems.is_empty(),
        "modules that depend on each other in a circle (move what both need into \
         one of them, or into a module of its own):\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_source_file_is_longer_than_it_should_be() {
    let root = repo_root();
    let mut files = Vec::new();
    for krate in CRATES {
        for dir in ["src", "tests", "benches", "examples"] {
            rust_files(&root.join(krate).join(dir), &mut files);
        }
    }
    let mut long = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .to_string_lossy()
            .replace('\\', "/");
        let lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count();
        if lines > MAX_LINES && !LONG_FILES.iter().any(|(path, _)| *path == rel) {
            long.push(format!("{rel}: {lines} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split them by what they hold, or list one \
         that holds one thing in LONG_FILES with what it is):\n{}",
        long.join("\n")
    );
    for (path, _) in LONG_FILES {
        assert!(
            root.join(path).is_file(),
            "LONG_FILES lists {path}, which is gone"
        );
    }
}

#[test]
fn anyhow_stays_at_the_edges() {
    let root = repo_root();
    let mut found = Vec::new();
    for krate in ["shared", "agent", "fleet-server", "fleetctl"] {
        let mut files = Vec::new();
        rust_files(&root.join(krate).join("src"), &mut files);
        for file in files {
            let rel = file
                .strip_prefix(&root)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('\\', "/");
            if ANYHOW_EDGES.iter().any(|edge| rel.starts_with(edge)) {
                continue;
            }
            let text = code(&std::fs::read_to_string(&file).unwrap_or_default());
            // Unit tests may use it.
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            if text.contains("anyhow") {
                found.push(rel);
            }
        }
    }
    assert!(
        found.is_empty(),
        "library modules using anyhow (give them a thiserror enum whose variants \
         carry the offending value):\n{}",
        found.join("\n")
    );
}
