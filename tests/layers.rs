//! The module layers written in `src/lib.rs` hold: every `crate::x` path in
//! a module of `src/` names a module of a lower layer (or its own), so there
//! is no import cycle and no import back up the layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom, as `src/lib.rs` "# Layout" lists them.
const LAYERS: &[&[&str]] = &[
    &["main", "demo"],
    &["server"],
    &["maintenance"],
    &["http"],
    &["app"],
    &["gate"],
    &["hub"],
    &["proxy"],
    &["sockets"],
    &["error"],
    &["session", "token", "auth", "routing", "hooks", "tls"],
    &["config"],
    &["formats"],
    &["ids", "time", "telemetry", "shutdown", "outbound"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/gate/shared.rs` → `gate`, `src/app.rs` → `app`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next().expect("a path component");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_string()
}

/// Module names after `crate::` in code (comments are not imports).
fn crate_refs(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.push(name);
            }
            rest = after;
        }
        // `use crate::{a::X, b::{Y, Z}}` groups: the first name of each
        // top-level item.
        if let Some(i) = code.find("crate::{") {
            let mut depth = 0;
            let mut item_start = true;
            let mut name = String::new();
            for c in code[i + "crate::{".len()..].chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_alphanumeric() || c == '_') => name.push(c),
                    _ if !name.is_empty() => {
                        refs.push(std::mem::take(&mut name));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                refs.push(name);
            }
        }
    }
    refs
}

#[test]
fn no_module_imports_a_layer_above_its_own_or_beside_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} files in src/", files.len());
    let mut violations = Vec::new();
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "bin" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            violations.push(format!(
                "module `{module}` ({}) is in no layer",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("reading a source file");
        for used in crate_refs(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l > own => edges.entry(module.clone()).or_default().push(used),
                Some(_) => violations.push(format!(
                    "{} uses crate::{used}, which is not below `{module}`",
                    file.display()
                )),
                None => violations.push(format!(
                    "{} uses crate::{used}, a module in no layer",
                    file.display()
                )),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
    // The checker itself sees real imports: the gate uses the hub and the
    // sockets, the relay the close table.
    assert!(edges["gate"].iter().any(|m| m == "hub"), "{edges:?}");
    assert!(edges["proxy"].iter().any(|m| m == "sockets"), "{edges:?}");
}

#[test]
fn the_checker_finds_paths_in_use_groups_and_ignores_comments() {
    let refs = crate_refs(
        "use crate::{app::App, error::{ApiError, Body}, time};\n// crate::hub is a comment\nlet x = crate::ids::random_id();",
    );
    assert_eq!(refs, vec!["app", "error", "time", "ids"]);
}
