//! The crate's shape, checked: `src/lib.rs` lists the top-level modules one
//! per line, lowest layer first, and a module may name (`crate::x`) only
//! modules listed above it. That keeps the import graph free of cycles, and
//! makes `lib.rs` the map a newcomer reads first.
//!
//! And SQL only in the ledger: outside `src/ledger/`, the code names the
//! `sqlx` crate only as `sqlx::PgPool`, the handle a fleet host opens and
//! passes to the ledger. Every way to run a statement (`query`, `query_as`,
//! `query_scalar`, `raw_sql`, the `Executor` trait, connections,
//! transactions, listeners, migrations) is a path through `sqlx`, so this
//! one rule catches them all, however they are imported. `tests/` is not
//! checked: its fleet tests read rows directly to assert what the code
//! wrote.

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

/// The `sqlx` paths `text` names outside comments other than
/// `sqlx::PgPool`, one per offending line (`file:line: text`).
fn sql_outside_ledger(name: &str, text: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split_once("//").map_or(line, |(code, _comment)| code);
        let mut rest = code;
        while let Some(at) = rest.find("sqlx") {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + "sqlx".len()..];
            rest = after;
            if before.is_some_and(ident) || after.chars().next().is_some_and(ident) {
                continue;
            }
            let pool = after
                .strip_prefix("::PgPool")
                .is_some_and(|tail| !tail.chars().next().is_some_and(ident));
            if !pool {
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
                break;
            }
        }
    }
    found
}

#[test]
fn only_the_ledger_speaks_sql() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let ledger = src.join("ledger");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut outside = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(&ledger)) {
        let text = fs::read_to_string(file).expect("read source");
        let name = file.strip_prefix(root).expect("under root").display();
        outside.extend(sql_outside_ledger(&name.to_string(), &text));
    }
    assert!(
        outside.is_empty(),
        "SQL belongs in src/ledger/ (outside it, only `sqlx::PgPool` may be named):\n{}",
        outside.join("\n")
    );
}

#[test]
fn the_sql_rule_sees_every_way_in() {
    for bad in [
        "let n: i64 = sqlx::query_scalar(\"SELECT 1\")",
        "use sqlx::{PgPool, Executor};",
        "use sqlx::postgres::PgConnection;",
        "let tx: sqlx::Transaction<'_, Postgres> = todo!();",
        "x.map_err(|e: sqlx::Error| e)",
        "use ::sqlx as db;",
        "let p = sqlx::PgPoolOptions::new();",
    ] {
        assert_eq!(sql_outside_ledger("f.rs", bad).len(), 1, "{bad}");
    }
    for fine in [
        "use sqlx::PgPool;",
        "pub fn pool(&self) -> &sqlx::PgPool {",
        "// sqlx's pool retries until its timeout",
        "let my_sqlx_thing = 1; let sqlxish = 2;",
    ] {
        assert!(sql_outside_ledger("f.rs", fine).is_empty(), "{fine}");
    }
}
