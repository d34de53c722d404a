//! The layering of `nbt-user/src` (docs/layout.md), checked: every `crate::` or `super::` path
//! in a module's code (tests excluded) must lead to a module of a lower layer, or of its own
//! folder; and no modules import each other in a circle, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level modules of nbt-user, lowest layer first. A module may import from its own
/// folder and from the folders before it in this list, never after.
pub const LAYERS: &[&[&str]] = &[
    &["error"],
    &["units"],
    &["sys"],
    &["enforce"],
    &["telemetry"],
    &["receipt"],
    &["learning"],
    &["state"],
    &["schedule"],
    &["plan"],
    &["run"],
    &["swarm"],
    &["agent"],
    &["demo"],
    &["report"],
    &["cmd"],
    // The fuzz targets' entry points (docs/fuzzing.md): above everything they fuzz.
    &["fuzzing"],
];

/// Module path (`enforce::cgroup`) → the source of its non-test code, for every module under
/// `src` but the crate roots.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("reading nbt-user/src")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    dirs.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("reading a module");
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
            found.insert(name, code);
        }
    }
    found
}

/// The longest known module that `path` (`a::b::C`) starts with.
fn resolve(path: &[&str], known: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The segments of each path that starts at `prefix` in `code` (`crate::a::b`, or each member of
/// `crate::a::{b, c}`), without the prefix.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[at + prefix.len()..];
        let mut segments = Vec::new();
        loop {
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for member in group.split(',') {
                    let member = ident(member.trim());
                    if !member.is_empty() {
                        let mut path = segments.clone();
                        path.push(member.to_string());
                        paths.push(path);
                    }
                }
                break;
            }
            let segment = ident(rest);
            if segment.is_empty() {
                paths.push(segments);
                break;
            }
            segments.push(segment.to_string());
            match rest[segment.len()..].strip_prefix("::") {
                Some(next) => rest = next,
                None => {
                    paths.push(segments);
                    break;
                }
            }
        }
    }
    paths
}

/// Each module's imports of other modules (not of itself or its ancestors).
pub fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut edges = BTreeMap::new();
    for (module, code) in &known {
        let mut deps = BTreeSet::new();
        let parent: Vec<&str> = module.split("::").collect();
        let parent = &parent[..parent.len() - 1];
        let mut add = |path: Vec<String>, from: &[&str]| {
            let mut full: Vec<&str> = from.to_vec();
            full.extend(path.iter().map(String::as_str));
            if let Some(target) = resolve(&full, &known) {
                let ancestor = module == &target || module.starts_with(&format!("{target}::"));
                if !ancestor {
                    deps.insert(target);
                }
            }
        };
        for path in paths_after(code, "crate::") {
            add(path, &[]);
        }
        // `super` is the parent module, whether this one is a file or a folder's mod.rs.
        for path in paths_after(code, "super::") {
            add(path, parent);
        }
        edges.insert(module.clone(), deps);
    }
    edges
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// What breaks the layering: imports that go up, or sideways into another folder of the same
/// layer; then every circle of modules.
pub fn violations(src: &Path) -> Vec<String> {
    let edges = imports(src);
    let mut found = Vec::new();
    for (module, deps) in &edges {
        let Some(layer) = layer_of(module) else {
            found.push(format!("{module}: a top-level module missing from LAYERS"));
            continue;
        };
        let top = module.split("::").next().unwrap();
        for dep in deps {
            let dep_top = dep.split("::").next().unwrap();
            match layer_of(dep) {
                Some(l) if l < layer || dep_top == top => {}
                _ => found.push(format!("{module} imports {dep}, which is not below it")),
            }
        }
    }
    found.extend(circles(&edges));
    found
}

/// The circles of the import graph, each as `a -> b -> a`.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        module: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        found: &mut Vec<String>,
    ) {
        marks.insert(module.to_string(), Mark::Open);
        stack.push(module.to_string());
        for dep in edges.get(module).into_iter().flatten() {
            match marks.get(dep.as_str()) {
                Some(Mark::Open) => {
                    let start = stack.iter().position(|m| m == dep).unwrap();
                    let mut circle = stack[start..].to_vec();
                    circle.push(dep.clone());
                    found.push(format!("circle: {}", circle.join(" -> ")));
                }
                Some(Mark::Done) => {}
                None => visit(dep, edges, marks, stack, found),
            }
        }
        stack.pop();
        marks.insert(module.to_string(), Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut found = Vec::new();
    for module in edges.keys() {
        if !marks.contains_key(module.as_str()) {
            visit(module, edges, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../nbt-user/src")
    }

    #[test]
    fn imports_run_only_downward_and_in_no_circle() {
        let found = violations(&src());
        assert!(found.is_empty(), "{}", found.join("\n"));
    }

    #[test]
    fn the_checker_sees_imports_and_would_see_a_circle() {
        let edges = imports(&src());
        // Known imports, so that a parser that sees nothing cannot pass the test above.
        assert!(edges["cmd::live"].contains("state::live"), "{edges:?}");
        assert!(edges["run"].contains("plan"), "{edges:?}");
        assert!(
            edges["state::cleanup"].contains("state::hwcaps"),
            "{edges:?}"
        );
        let mut looped = edges.clone();
        looped
            .get_mut("sys::proc")
            .unwrap()
            .insert("cmd".to_string());
        assert!(circles(&looped).iter().any(|c| c.contains("sys::proc")));
    }

    #[test]
    fn paths_are_read_with_their_groups() {
        let code =
            "use crate::enforce::{cgroup::Layout, gate};\nlet x = crate::units::parse_size(a);";
        let paths = paths_after(code, "crate::");
        assert!(paths.contains(&vec!["enforce".into(), "cgroup".into()]));
        assert!(paths.contains(&vec!["enforce".into(), "gate".into()]));
        assert!(paths.contains(&vec!["units".into(), "parse_size".into()]));
    }
}
