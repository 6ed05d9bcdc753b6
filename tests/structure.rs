//! The crate's shape, checked: `src/lib.rs` lists the top-level modules one
//! per line, lowest layer first, and a module may name (`crate::x`) only
//! modules listed above it. That keeps the import graph free of cycles, and
//! makes `lib.rs` the map a newcomer reads first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The top-level modules in `lib.rs`'s order: the layers, bottom first.
fn layers(root: &Path) -> Vec<String> {
    let lib = fs::read_to_string(root.join("src/lib.rs")).expect("read src/lib.rs");
    lib.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub mod ")
                .or_else(|| l.trim().strip_prefix("mod "))
        })
        .filter_map(|l| l.split_once(';'))
        .map(|(module, _comment)| module.to_owned())
        .collect()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a file names as `crate::<module>`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// The top-level module a source file belongs to (`src/ledger/orders.rs` →
/// `ledger`, `src/clock.rs` → `clock`); `None` for `lib.rs` and `main.rs`.
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(module) => Some(module.to_owned()),
        None => Some(first),
    }
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let order = layers(root);
    assert!(order.len() > 5, "lib.rs lists the modules: {order:?}");
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let src = root.join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    for file in &files {
        let Some(module) = owner(&src, file) else {
            continue;
        };
        let Some(&own) = rank.get(module.as_str()) else {
            panic!(
                "{} belongs to module `{module}`, which lib.rs does not list",
                file.display()
            );
        };
        let text = fs::read_to_string(file).expect("read source");
        for named in named_modules(&text) {
            match rank.get(named.as_str()) {
                Some(&r) if r > own => upward.push(format!(
                    "{}: `{module}` names `crate::{named}`, a layer above it",
                    file.strip_prefix(root).expect("under root").display()
                )),
                Some(_) => {}
                None => panic!(
                    "{}: `crate::{named}` is not a module lib.rs lists",
                    file.display()
                ),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the layer order of src/lib.rs (lower layers first):\n{}",
        upward.join("\n")
    );
}
