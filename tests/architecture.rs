//! The shape of `src/` that ARCHITECTURE.md promises, checked on the source text.
//!
//! The module graph follows the data path (ARCHITECTURE.md, "Layering"): these tests fail when
//! a module imports one it must not.
//!
//! - The graph of the library's modules has no cycle (the config/locator loop, store ->
//!   handlers, metrics -> handlers and the like stay gone).
//! - Each module imports only the modules the table in [`ALLOWED`] lists for it: a stage knows
//!   the stages before it and the shared vocabulary, never a later stage.
//!
//! A module here is a top-level module of `src/` (`edge`, `journal`, ...), or one child of a
//! folder whose children are separate concerns (`geo::locator`, `handlers::runtime`, ...).
//! Only code counts: comments and `#[cfg(test)]` modules are skipped, since tests may reach
//! anywhere.
//!
//! And the core stays readable: no function in the pipeline, the plan, the gateway or the
//! configuration is longer than [`MAX_FUNCTION_LINES`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Folders whose children are modules of their own in this graph.
const SPLIT: &[&str] = &["geo", "handlers", "routing", "control", "client"];

/// Who may import whom. Anything not listed is refused, so a new module or import must be
/// placed here on purpose. Imports inside one folder (`handlers::kv` -> `handlers::runtime`)
/// are the folder's own business and not listed.
const ALLOWED: &[(&str, &[&str])] = &[
    // Shared vocabulary and support: no stage.
    ("event", &[]),
    ("shutdown", &[]),
    ("topic", &[]),
    ("notify", &[]),
    ("signing", &[]),
    ("files", &["shutdown"]),
    ("pem", &["files"]),
    ("metrics", &["event"]),
    // Folders whose children are listed one by one declare them and import nothing.
    ("client", &[]),
    ("control", &[]),
    ("handlers", &[]),
    // The database, and the journal on it (the buffer between the edge and the pipeline).
    ("store", &["event", "metrics"]),
    ("journal", &["store", "metrics"]),
    // The typed configuration: support, and the settings types the stages below it define
    // for it (store limits, the journal's default, route specs); none of those imports the
    // config.
    (
        "config",
        &[
            "files",
            "signing",
            "store",
            "journal",
            "routing",
            "routing::predicate",
        ],
    ),
    // The data path: each stage knows the stages before it, never one after.
    (
        "edge",
        &[
            "config", "event", "files", "journal", "metrics", "pem", "shutdown", "store", "topic",
        ],
    ),
    ("routing", &["event", "topic"]),
    ("routing::predicate", &["event"]),
    ("geo", &["event"]),
    ("geo::residency", &[]),
    (
        "geo::locator",
        &[
            "config",
            "event",
            "files",
            "routing",
            "routing::predicate",
            "store",
        ],
    ),
    ("handlers::breaker", &[]),
    ("handlers::examples", &[]),
    ("handlers::runtime", &["event", "metrics"]),
    ("handlers::kv", &["store"]),
    (
        "handlers::registry",
        &["config", "event", "files", "metrics", "signing", "store"],
    ),
    (
        "pipeline",
        &[
            "config",
            "event",
            "geo",
            "geo::locator",
            "geo::residency",
            "handlers::breaker",
            "handlers::registry",
            "handlers::runtime",
            "metrics",
            "routing",
            "routing::predicate",
            "shutdown",
            "store",
        ],
    ),
    // The uplink also hands module requests that arrive from upstream to the control plane,
    // in the control plane's types.
    (
        "uplink",
        &[
            "config",
            "control::modules",
            "event",
            "files",
            "geo::residency",
            "metrics",
            "pem",
            "shutdown",
            "store",
        ],
    ),
    // Beside the path: the control plane and the operator's client of it.
    (
        "control::dead_letters",
        &["config", "edge", "event", "store"],
    ),
    (
        "control::modules",
        &[
            "config",
            "edge",
            "event",
            "handlers::registry",
            "metrics",
            "signing",
            "store",
        ],
    ),
    // The operator's connection is the uplink's own client.
    ("client::exchange", &["config", "pem", "uplink"]),
    (
        "client::dead_letters",
        &["config", "control::dead_letters", "event"],
    ),
    (
        "client::modules",
        &["config", "control::modules", "signing"],
    ),
    // Wiring: the plan turns a configuration into the stages' settings, the gateway starts them.
    ("plan", &["*"]),
    ("gateway", &["*"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to in this graph, or `None` for files outside the library.
fn module_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    let top = parts.first()?.clone();
    if matches!(top.as_str(), "main" | "lib" | "cli") {
        return None;
    }
    if SPLIT.contains(&top.as_str()) && parts.len() > 1 && parts[1] != "mod" {
        return Some(format!("{top}::{}", parts[1]));
    }
    Some(top)
}

/// The module a `crate::a::b` path names in this graph.
fn target_of(first: &str, second: Option<&str>, known: &BTreeSet<String>) -> String {
    if let Some(second) = second {
        let child = format!("{first}::{second}");
        if SPLIT.contains(&first) && known.contains(&child) {
            return child;
        }
    }
    first.to_string()
}

/// The code of a file without comments and without its `#[cfg(test)]` modules.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    let mut skipping_test_module = false;
    let mut depth_at_test = 0usize;
    let mut depth = 0usize;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string (a URL) is rare in these files; cutting there only
            // loses the rest of that line, never adds an import.
            Some(i) => &line[..i],
            None => line,
        };
        if trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test && trimmed.starts_with("mod ") && !skipping_test_module {
            skipping_test_module = true;
            depth_at_test = depth;
        }
        pending_cfg_test = pending_cfg_test && trimmed.starts_with("#[");
        for c in code.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if skipping_test_module {
            if depth == depth_at_test && code.contains('}') {
                skipping_test_module = false;
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every `crate::a` or `crate::a::b` in the code, with `use crate::{a::b, c}` expanded.
fn crate_paths(code: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let mut names = item.trim().split("::");
                if let Some(first) = names.next().filter(|n| !n.is_empty()) {
                    let second = names.next().map(|s| {
                        s.trim_matches(|c: char| !c.is_alphanumeric() && c != '_')
                            .to_string()
                    });
                    found.push((first.to_string(), second));
                }
            }
        } else {
            let ident = |s: &str| -> String {
                s.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            };
            let first = ident(after);
            let second = after[first.len()..]
                .strip_prefix("::")
                .map(ident)
                .filter(|s| !s.is_empty());
            if !first.is_empty() {
                found.push((first, second));
            }
        }
        rest = &rest[i + "crate::".len()..];
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut known = BTreeSet::new();
    for file in &files {
        if let Some(m) = module_of(file.strip_prefix(&src).expect("under src")) {
            known.insert(m);
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(file.strip_prefix(&src).expect("under src")) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        let entry = edges.entry(from.clone()).or_default();
        for (first, second) in crate_paths(&code_only(&text)) {
            let to = target_of(&first, second.as_deref(), &known);
            let same_folder = from.split("::").next() == to.split("::").next();
            if to != from && !same_folder {
                entry.insert(to);
            }
        }
    }
    edges
}

#[test]
fn every_import_is_one_the_layering_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, tos) in graph() {
        let Some(may) = allowed.get(from.as_str()) else {
            wrong.push(format!("{from} is not in the layering table"));
            continue;
        };
        for to in tos {
            if !may.contains(&"*") && !may.contains(&to.as_str()) {
                wrong.push(format!("{from} imports {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_cycle() {
    let edges = graph();
    // Depth-first search with colours; a grey node reached again closes a cycle.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match colour.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, edges, colour, path) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(node.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for node in edges.keys() {
        if colour.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut path = Vec::new();
            if let Some(cycle) = visit(node, &edges, &mut colour, &mut path) {
                panic!("a cycle in the module graph: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_reader_finds_imports_and_skips_comments_and_tests() {
    let text = "use crate::{config::Config, geo::locator::Locator};\n\
                // use crate::uplink;\n\
                fn f() { crate::store::open(); }\n\
                #[cfg(test)]\n\
                mod tests {\n    use crate::gateway;\n    fn g() { if true { } }\n}\n\
                fn h() { crate::metrics::add(); }\n";
    let paths = crate_paths(&code_only(text));
    let firsts: Vec<&str> = paths.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(firsts, ["config", "geo", "store", "metrics"]);
    assert_eq!(paths[1].1.as_deref(), Some("locator"));
}

/// The longest function the core files may have, in lines from `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 80;

/// The files and folders whose functions [`MAX_FUNCTION_LINES`] bounds.
const SHORT_FUNCTIONS: &[&str] = &["pipeline", "plan.rs", "gateway.rs", "config.rs"];

/// Each function in `code` (comments and test modules already removed): its name and lines.
fn function_lengths(code: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let before = &trimmed[..at];
        let is_item = before.split_whitespace().all(|w| {
            matches!(
                w,
                "pub" | "pub(crate)" | "pub(super)" | "async" | "const" | "unsafe"
            )
        });
        if !is_item {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body: from the first `{` after the signature to the brace that closes it. A
        // declaration without a body (in a trait) ends at `;` first.
        let mut depth = 0usize;
        let mut opened = false;
        let mut end = None;
        'lines: for (i, l) in lines.iter().enumerate().skip(start) {
            for c in l.chars() {
                match c {
                    ';' if !opened => break 'lines,
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth = depth.saturating_sub(1);
                        if opened && depth == 0 {
                            end = Some(i);
                            break 'lines;
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(end) = end {
            found.push((name, end - start + 1));
        }
    }
    found
}

#[test]
fn functions_in_the_core_stay_short() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .iter()
            .next()
            .map(|p| p.to_string_lossy().into_owned());
        if !first.is_some_and(|f| SHORT_FUNCTIONS.contains(&f.as_str())) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (name, length) in function_lengths(&code_only(&text)) {
            if length > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}: fn {name} has {length} lines",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_reader_measures_a_function_from_fn_to_its_brace() {
    let code = "pub fn a() {\n    if x { y(); }\n}\nfn b();\nasync fn c(\n    v: u8,\n) -> u8 {\n    v\n}\nlet f = |x| x;\n";
    assert_eq!(
        function_lengths(code),
        [("a".to_string(), 3), ("c".to_string(), 5)]
    );
}
