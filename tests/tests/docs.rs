//! The manual checked against the repository, so it cannot drift:
//!
//! - every relative link in the README, CONTRIBUTING.md, the changelog,
//!   `docs/` and the `cross/` and `devices/` READMEs points at a file that
//!   exists, and every `#anchor` at a heading of that file;
//! - the README stays a front door: at most 250 lines, both commands in
//!   its first screen (the test command the one `.ci/run` runs), a link to
//!   every page of `docs/`;
//! - `docs/configuration.md` lists every key the agent's and the fleet
//!   server's config files accept (and the server's environment variable
//!   for each), and no key the code does not know;
//! - no run or issue numbers in the prose, and no package registry's
//!   address in the scripts (they fetch by package name).
//!
//! Plain Rust over the files: no mdBook, no network, runs in milliseconds.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use edgefleet_tests::repo_root;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The Markdown files whose links are checked.
fn markdown_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "CHANGELOG.md",
        "cross/README.md",
        "devices/README.md",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    files.extend(docs_pages());
    files
}

/// Every page of the manual.
fn docs_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("readable docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages
}

/// The text outside fenced code blocks, with inline code spans blanked,
/// one entry per line (line numbers kept for messages).
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut prose = String::new();
        for (n, part) in line.split('`').enumerate() {
            // Odd parts are inside a code span.
            if n % 2 == 0 {
                prose.push_str(part);
            } else {
                prose.push_str(&" ".repeat(part.len() + 2));
            }
        }
        out.push((i + 1, prose));
    }
    out
}

/// `[text](target)` and `![alt](target)` targets on one line of prose.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        // Balanced parentheses, as Markdown allows inside a destination.
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.trim_matches(['<', '>']).to_string());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (repeats get `-1`, `-2`...).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

fn is_external(target: &str) -> bool {
    target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:")
}

#[test]
fn relative_links_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().expect("a file has a directory");
        for (line_no, line) in prose_lines(&text) {
            for target in link_targets(&line) {
                if target.is_empty() || is_external(&target) {
                    continue;
                }
                checked += 1;
                let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                let place = format!(
                    "{}:{line_no}: {target}",
                    file.strip_prefix(repo_root()).unwrap_or(&file).display()
                );
                if !resolved.exists() {
                    broken.push(format!("{place} (no such file)"));
                    continue;
                }
                if !anchor.is_empty() {
                    if resolved.extension().is_none_or(|e| e != "md") {
                        broken.push(format!(
                            "{place} (an anchor into a file that is not Markdown)"
                        ));
                    } else if !anchors(&read(&resolved)).contains(anchor) {
                        broken.push(format!("{place} (no heading with that anchor)"));
                    }
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn readme_is_a_front_door() {
    let root = repo_root();
    let readme = read(&root.join("README.md"));
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines (at most 250): move detail into a docs/ page and link it"
    );
    // The first screen: both commands, exactly.
    let first_screen: String = readme.lines().take(50).collect::<Vec<_>>().join("\n");
    for command in [
        "cargo run --release -p fleet-server -- demo",
        "./scripts/test",
    ] {
        assert!(
            first_screen.contains(&format!("\n{command}\n")),
            "README's first 50 lines must hold the command `{command}` on a line of its own"
        );
    }
    // CI runs exactly the README's test command.
    let ci = read(&root.join(".ci/run"));
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(
        last,
        Some("./scripts/test"),
        ".ci/run must end with the README's test command"
    );

    // Every page of the manual is reachable from the front door.
    let linked: BTreeSet<PathBuf> = prose_lines(&readme)
        .iter()
        .flat_map(|(_, line)| link_targets(line))
        .filter(|t| !is_external(t))
        .map(|t| root.join(t.split('#').next().unwrap_or("")))
        .collect();
    let unlinked: Vec<String> = docs_pages()
        .into_iter()
        .filter(|p| !linked.contains(p))
        .map(|p| p.strip_prefix(&root).unwrap_or(&p).display().to_string())
        .collect();
    assert!(unlinked.is_empty(), "README.md does not link: {unlinked:?}");
}

/// "stop" or "(issue" followed by a number: the history of how the code
/// got here belongs in CHANGELOG.md, not in the manual.
#[test]
fn the_manual_tells_no_history() {
    let mut found = Vec::new();
    let mut files = markdown_files();
    files.retain(|f| !f.ends_with("CHANGELOG.md"));
    for file in files {
        for (i, line) in read(&file).lines().enumerate() {
            let lower = line.to_lowercase();
            let numbered_after = |word: &str| {
                lower.match_indices(word).any(|(at, _)| {
                    lower[at + word.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit())
                })
            };
            if numbered_after("stop ") || numbered_after("(issue ") {
                found.push(format!("{}:{}: {line}", file.display(), i + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "run or issue numbers:\n{}",
        found.join("\n")
    );
}

/// Scripts fetch packages by name through pip, cargo, npm and apt-get
/// (which honour the machine's own mirrors), never from a hard-wired
/// registry address.
#[test]
fn scripts_name_no_registry_address() {
    // Spelled in pieces so this file does not match its own check.
    let hosts = [
        ["static.crates", ".io"],
        ["index.crates", ".io"],
        ["crates", ".io/api"],
        ["pypi", ".org"],
        ["pythonhosted", ".org"],
        ["registry.npmjs", ".org"],
        ["deb.debian", ".org"],
        ["ftp.debian", ".org"],
        ["security.debian", ".org"],
        ["archive.ubuntu", ".com"],
        ["ports.ubuntu", ".com"],
        ["static.rust-lang", ".org"],
    ]
    .map(|[a, b]| format!("{a}{b}"));
    let root = repo_root();
    let mut files = Vec::new();
    for dir in [
        "scripts", "cross", ".ci", "devices", "bench", "models", "docs",
    ] {
        collect_files(&root.join(dir), &mut files);
    }
    files.extend(markdown_files());
    files.extend(
        [
            "tests/browser/package.json",
            "tests/browser/package-lock.json",
            "Cross.toml",
        ]
        .iter()
        .map(|f| root.join(f)),
    );
    let mut found = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // binary (models, screenshots)
        };
        for (i, line) in text.lines().enumerate() {
            if let Some(host) = hosts.iter().find(|h| line.contains(h.as_str())) {
                found.push(format!("{}:{}: {host}", file.display(), i + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "registry addresses:\n{}",
        found.join("\n")
    );
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "node_modules") {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

// ---------------------------------------------------------------------------
// The configuration reference.

/// The part of a page under the `## ` heading that starts with `title`, up
/// to the next `## ` heading.
fn section<'a>(page: &'a str, title: &str) -> &'a str {
    let start = page
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no `## {title}` section"));
    let body = &page[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |e| e + 3);
    &body[..end]
}

/// The rows of the section's key tables (those whose header's first cell
/// is "key"), as (keys named in the first cell, whole row).
fn key_rows(section: &str) -> Vec<(Vec<String>, String)> {
    let mut rows = Vec::new();
    let mut in_key_table = false;
    for line in section.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let first = line
            .trim_matches('|')
            .split('|')
            .next()
            .unwrap_or("")
            .trim();
        if first == "key" {
            in_key_table = true;
            continue;
        }
        if !in_key_table || first.starts_with("---") {
            continue;
        }
        rows.push((code_spans(first), line.to_string()));
    }
    rows
}

fn code_spans(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Checks one program's keys against its section of the reference.
/// `env` gives the environment variable that sets a key, where there is one.
fn check_reference(
    program: &str,
    keys: &[config_keys::Key],
    section: &str,
    env: impl Fn(&config_keys::Key) -> Option<String>,
) {
    let rows = key_rows(section);
    let mut problems = Vec::new();
    let documented: BTreeSet<&String> = rows.iter().flat_map(|(keys, _)| keys).collect();
    let spans: BTreeSet<String> = code_spans(section).into_iter().collect();
    for key in keys {
        let dotted = key.dotted();
        match &key.shape {
            config_keys::Shape::Table(_) => {
                let header = if key.in_array {
                    format!("[[{dotted}]]")
                } else {
                    format!("[{dotted}]")
                };
                if !spans.contains(&header) {
                    problems.push(format!("the table `{header}` is not named"));
                }
            }
            config_keys::Shape::Value(variants) => {
                let Some((_, row)) = rows.iter().find(|(keys, _)| keys.contains(&dotted)) else {
                    problems.push(format!("`{dotted}` has no row in a key table"));
                    continue;
                };
                let row_spans: BTreeSet<String> = code_spans(row)
                    .iter()
                    .map(|s| s.trim_matches('"').to_string())
                    .collect();
                for variant in variants {
                    if !row_spans.contains(*variant) {
                        problems.push(format!(
                            "`{dotted}`'s row does not name its value `{variant}`"
                        ));
                    }
                }
                if let Some(var) = env(key) {
                    if !row_spans.contains(&var) {
                        problems.push(format!("`{dotted}`'s row does not name `{var}`"));
                    }
                }
            }
        }
    }
    let known: BTreeSet<String> = keys.iter().map(config_keys::Key::dotted).collect();
    for name in documented {
        if !known.contains(name) {
            problems.push(format!(
                "`{name}` is documented but the code has no such key"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md, {program}:\n{}",
        problems.join("\n")
    );
}

#[test]
fn configuration_reference_lists_every_agent_key() {
    let keys = config_keys::of::<edgefleet_agent::config::AgentConfig>();
    assert!(keys.len() > 40, "only {} agent keys traced", keys.len());
    let page = read(&repo_root().join("docs/configuration.md"));
    check_reference("the agent", &keys, section(&page, "Agent"), |_| None);
}

#[test]
fn configuration_reference_lists_every_server_key() {
    let keys = config_keys::of::<fleet_server::config::ServerConfig>();
    assert!(keys.len() > 15, "only {} server keys traced", keys.len());
    let page = read(&repo_root().join("docs/configuration.md"));
    check_reference(
        "the fleet server",
        &keys,
        section(&page, "Fleet server"),
        |key| {
            Some(format!(
                "{}{}",
                fleet_server::config::ENV_PREFIX,
                key.path.join("__").to_uppercase()
            ))
        },
    );
}

#[test]
fn the_key_tracer_sees_nested_optional_and_array_keys() {
    let keys = config_keys::of::<edgefleet_agent::config::AgentConfig>();
    let find = |dotted: &str| {
        keys.iter()
            .find(|k| k.dotted() == dotted)
            .unwrap_or_else(|| panic!("{dotted} not traced"))
    };
    // Optional tables and values that default to None.
    assert!(matches!(find("mqtt").shape, config_keys::Shape::Table(_)));
    assert!(matches!(
        find("mqtt.ca_pem").shape,
        config_keys::Shape::Value(_)
    ));
    assert!(matches!(
        find("outbox.telemetry").shape,
        config_keys::Shape::Table(_)
    ));
    // Arrays of tables, and enum values.
    assert!(find("models").in_array);
    find("models.test_vector");
    assert_eq!(
        find("outbox.telemetry.overflow").shape,
        config_keys::Shape::Value(vec!["drop-oldest", "reject-new", "downsample", "never"])
    );
    assert_eq!(
        find("mqtt.delete_on").shape,
        config_keys::Shape::Value(vec!["receipt", "puback"])
    );
}

/// Lists the keys a config type accepts by driving its own `Deserialize`
/// implementation with a deserializer that answers nothing but records
/// what it is asked for: `#[derive(Deserialize)]` hands every struct's
/// field names and every enum's variant names to the deserializer. Each
/// pass follows one path of field names down to one key and stops there
/// (with an error), so no value ever has to be made up; one pass per key.
/// Keys added to the code, `Option` ones included, show up without
/// anything to maintain here.
mod config_keys {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Shape {
        /// A table, with its field names.
        Table(Vec<&'static str>),
        /// A value; an enum's variant names (the values it accepts).
        Value(Vec<&'static str>),
    }

    #[derive(Debug, Clone)]
    pub struct Key {
        pub path: Vec<&'static str>,
        pub shape: Shape,
        /// An array (`[[models]]`, `onnxruntime_providers = [...]`).
        pub in_array: bool,
    }

    impl Key {
        pub fn dotted(&self) -> String {
            self.path.join(".")
        }
    }

    /// Every key of `T` below its top level, tables included.
    pub fn of<T: DeserializeOwned>() -> Vec<Key> {
        let mut keys = Vec::new();
        let mut pending: Vec<Vec<&'static str>> = vec![Vec::new()];
        while let Some(path) = pending.pop() {
            let found = RefCell::new(None);
            let stopped = T::deserialize(Tracer {
                path: &path,
                depth: 0,
                in_array: false,
                found: &found,
            });
            assert!(stopped.is_err(), "the tracer never lets a value be made");
            let (shape, in_array) = found
                .into_inner()
                .unwrap_or_else(|| panic!("could not reach {}", path.join(".")));
            if let Shape::Table(fields) = &shape {
                for field in fields {
                    let mut next = path.clone();
                    next.push(field);
                    pending.push(next);
                }
            }
            if !path.is_empty() {
                keys.push(Key {
                    path,
                    shape,
                    in_array,
                });
            }
        }
        keys.sort_by(|a, b| a.path.cmp(&b.path));
        keys
    }

    #[derive(Debug)]
    pub struct Stop(String);

    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Stop(msg.to_string())
        }
    }

    #[derive(Clone, Copy)]
    struct Tracer<'a> {
        /// The field names to follow from the top.
        path: &'a [&'static str],
        /// How many of them are followed already.
        depth: usize,
        /// Reached through a sequence.
        in_array: bool,
        found: &'a RefCell<Option<(Shape, bool)>>,
    }

    impl Tracer<'_> {
        fn arrived(&self) -> bool {
            self.depth == self.path.len()
        }

        fn record<T>(&self, shape: Shape) -> Result<T, Stop> {
            if self.arrived() {
                *self.found.borrow_mut() = Some((shape, self.in_array));
                Err(Stop("traced".into()))
            } else {
                Err(Stop(format!(
                    "{} is a value, not a table",
                    self.path[..self.depth].join(".")
                )))
            }
        }
    }

    impl<'de> de::Deserializer<'de> for Tracer<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            self.record(Shape::Value(Vec::new()))
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_some(self)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            visitor: V,
        ) -> Result<V::Value, Stop> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_seq(OneElement(Some(Tracer {
                in_array: true,
                ..self
            })))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            if self.arrived() {
                return self.record(Shape::Table(fields.to_vec()));
            }
            let field = self.path[self.depth];
            visitor.visit_map(OneEntry {
                key: Some(field),
                value: Some(Tracer {
                    depth: self.depth + 1,
                    in_array: false,
                    ..self
                }),
            })
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.record(Shape::Value(variants.to_vec()))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct tuple tuple_struct map identifier ignored_any
        }
    }

    /// A sequence of one element, traced.
    struct OneElement<'a>(Option<Tracer<'a>>);

    impl<'de> SeqAccess<'de> for OneElement<'_> {
        type Error = Stop;

        fn next_element_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<Option<S::Value>, Stop> {
            match self.0.take() {
                Some(tracer) => seed.deserialize(tracer).map(Some),
                None => Ok(None),
            }
        }
    }

    /// A table with the one field on the path, traced.
    struct OneEntry<'a> {
        key: Option<&'static str>,
        value: Option<Tracer<'a>>,
    }

    impl<'de> MapAccess<'de> for OneEntry<'_> {
        type Error = Stop;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Stop> {
            match self.key.take() {
                Some(key) => seed
                    .deserialize(de::value::StrDeserializer::<Stop>::new(key))
                    .map(Some),
                None => Ok(None),
            }
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Stop> {
            let tracer = self
                .value
                .take()
                .ok_or_else(|| Stop("a value asked for twice".into()))?;
            seed.deserialize(tracer)
        }
    }
}
