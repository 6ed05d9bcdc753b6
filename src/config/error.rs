//! Configuration errors, located: every one names the file, the line and
//! column, and the key path (`certificate[2].domains[0]`), so an operator
//! can fix it without guessing. Also serde's wording, put in the file's terms.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A configuration error, located in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

/// serde's wording of a type mismatch ("invalid type: map, expected a
/// sequence") in the file's terms, with the usual fix.
pub(super) fn reword(key: &str, message: &str) -> String {
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    else {
        return message.to_owned();
    };
    if key == "certificate" && found == "map" {
        return "`[certificate]` must be written `[[certificate]]` (double brackets), \
                one table per certificate"
            .into();
    }
    let found = match found.split_once(' ') {
        Some(("integer", n)) => format!("the number {}", n.trim_matches('`')),
        Some(("floating", n)) => format!(
            "the number {}",
            n.trim_start_matches("point ").trim_matches('`')
        ),
        Some(("string", v)) => format!("the string {v}"),
        _ if found == "map" => "a table".into(),
        _ if found == "sequence" => "a list".into(),
        _ => found.to_owned(),
    };
    let expected = match expected {
        "a sequence" => "a list in brackets, like [\"a\", \"b\"]",
        "a string" => "a quoted string",
        "i64" | "u64" | "u32" | "i32" | "usize" => "a whole number",
        "f64" => "a number",
        "a boolean" => "true or false",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// Resolves byte offsets in the source text to lines, columns and key paths.
pub(super) struct Located<'a> {
    pub(super) path: &'a Path,
    text: &'a str,
}

impl<'a> Located<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Self {
        Self { path, text }
    }

    /// Builds an error at `span`; `key` overrides the key path guessed from
    /// the text (the guess is the table header above the line plus the key
    /// on the line, e.g. `certificate[1].key_type`).
    pub(super) fn error(
        &self,
        span: Range<usize>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        self.spot(span, key).error(message)
    }

    /// Where `span` is, for an error found later (see [`Spot`]).
    pub(super) fn spot(&self, span: Range<usize>, key: Option<String>) -> Spot {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Spot {
            path: self.path.to_owned(),
            line,
            column,
            key: key.unwrap_or_else(|| self.guess_key(line_start)),
        }
    }

    /// `guess_key` for the line holding `offset`.
    pub(super) fn guess_key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        self.guess_key(self.text[..offset].rfind('\n').map_or(0, |i| i + 1))
    }

    fn guess_key(&self, line_start: usize) -> String {
        let line = self.text[line_start..].lines().next().unwrap_or("");
        let table = self.table_above(line_start);
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            return table.unwrap_or_else(|| trimmed.to_owned());
        }
        let key = line.split('=').next().unwrap_or("").trim().to_owned();
        match (table, key.is_empty()) {
            (Some(t), false) => format!("{t}.{key}"),
            (Some(t), true) => t,
            (None, false) => key,
            (None, true) => "(top level)".into(),
        }
    }

    /// The table header in force at `offset`, with an index for arrays of
    /// tables (`[[certificate]]` → `certificate[N]`).
    fn table_above(&self, offset: usize) -> Option<String> {
        let mut current = None;
        let mut counts: HashMap<String, usize> = HashMap::default();
        let mut pos = 0;
        for line in self.text.split_inclusive('\n') {
            if pos > offset {
                break;
            }
            let t = line.trim();
            // Up to the first `]`: a header missing one (`[[certificate]`)
            // is the error being located, and must not name the key
            // `certificate][0]`.
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split(']').next()) {
                let name = name.trim().to_owned();
                let n = counts.entry(name.clone()).or_insert(0);
                current = Some(format!("{name}[{n}]"));
                *n += 1;
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
                current = Some(name.trim().to_owned());
            }
            pos += line.len();
        }
        current
    }
}

/// A place in the file, kept for a value checked only after parsing (a
/// file it names, read by `resolve`), so that error still names the line.
#[derive(Debug, Clone)]
pub(super) struct Spot {
    path: PathBuf,
    line: usize,
    column: usize,
    key: String,
}

impl Spot {
    pub(super) fn error(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: self.line,
            column: self.column,
            key: self.key.clone(),
            message,
        }
    }
}

/// The key path of a certificate's value in errors, as
/// `certificate[3].domains[1]`; formatted only when an error is reported.
pub(super) struct CertKey {
    pub(super) index: usize,
    pub(super) field: &'static str,
    pub(super) item: Option<usize>,
}

impl fmt::Display for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate[{}].{}", self.index, self.field)?;
        match self.item {
            Some(i) => write!(f, "[{i}]"),
            None => Ok(()),
        }
    }
}
