//! What the command line prints: tables and shortened cells, every cell
//! escaped (`crate::text`), and the log's format: the text log's field
//! formatter escapes values too, and `RUST_LOG` is read strictly.

use std::fmt;
use std::io::IsTerminal;

use crate::app::sink::write_stdout_all;
use crate::text::{EscapeControl, escape_control};

use super::LogFormat;

/// The text log's field formatter: the default's layout (`message`, then
/// `name=value`), with control characters escaped. Values logged with `%`
/// are written with their `Display`, raw, by the default formatter; a CA's
/// problem detail with a newline would forge a second log line.
pub(super) struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapedVisitor {
            out: EscapeControl(writer),
            separate: false,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapedVisitor<W> {
    out: EscapeControl<W>,
    separate: bool,
    result: fmt::Result,
}

impl<W: fmt::Write> tracing::field::Visit for EscapedVisitor<W> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // As the default: a message as written, other strings quoted.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        if self.result.is_err() {
            return;
        }
        let sep = if self.separate { " " } else { "" };
        self.separate = true;
        self.result = match field.name() {
            "message" => write!(self.out, "{sep}{value:?}"),
            name => write!(
                self.out,
                "{sep}{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

/// Logs go to standard error, one line per event; `RUST_LOG` overrides the
/// configured level.
///
/// `RUST_LOG` takes `target=level` directives (`certd=debug,warn`), read by
/// `Targets`: the same syntax as `EnvFilter` without span and field
/// filters, and without the regex engine those need, a quarter of a MiB
/// of code in every running daemon. A `RUST_LOG` that does not parse, or
/// names a level that does not exist, is an error: a daemon that silently
/// logs less than asked for hides what the operator is looking for.
pub(super) fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => parse_rust_log(&spec)?,
        _ => format!("certd={level},warn")
            .parse::<Targets>()
            // The configuration only admits the five level names.
            .unwrap_or_default(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // journald stamps every line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    match (format, journald) {
        (LogFormat::Json, _) => registry.with(fmt.json()).init(),
        (LogFormat::Text, true) => registry
            .with(fmt.fmt_fields(EscapedFields).without_time())
            .init(),
        (LogFormat::Text, false) => registry.with(fmt.fmt_fields(EscapedFields)).init(),
    }
    Ok(())
}

/// The levels `RUST_LOG` may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `RUST_LOG` as `Targets`. `Targets` takes a bare word that is no level
/// (`RUST_LOG=verbose`) for a target with every level, which turns all of
/// certd's own logging off: only levels, `certd` and module paths
/// (`certd::order`) stand alone here.
fn parse_rust_log(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let bad = |why: String| {
        format!(
            "RUST_LOG={spec:?}: {why}; use target=level directives, e.g. \
             RUST_LOG=certd=debug,warn (levels: {})",
            LOG_LEVELS.join(", ")
        )
    };
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.split_once('=') {
            Some((_, level))
                if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) =>
            {
                return Err(bad(format!("{:?} is not a level", level.trim())));
            }
            None if !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
                && directive != "certd"
                && !directive.contains("::") =>
            {
                return Err(bad(format!(
                    "{directive:?} is neither a level nor target=level"
                )));
            }
            _ => {}
        }
    }
    spec.parse().map_err(|e| bad(format!("{e}")))
}

/// `s` cut to `max` characters, with an ellipsis when cut.
pub(super) fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// Prints rows as left-aligned columns; the last column is not padded.
pub(super) fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut out = String::new();
    push_table(&mut out, rows);
    write_stdout_all(&out);
}

/// Appends rows as left-aligned columns to `out`, one line each, every cell
/// with its control characters escaped.
fn push_table<const N: usize>(out: &mut String, rows: &[[impl AsRef<str>; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(escape_control(cell.as_ref()).chars().count());
        }
    }
    out.reserve(rows.len() * (widths.iter().sum::<usize>() + 2 * N + 1));
    for row in rows {
        let line_start = out.len();
        for (i, cell) in row.iter().enumerate() {
            let cell = escape_control(cell.as_ref());
            out.push_str(&cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // The last column may be empty: no trailing blanks.
        let kept = out[line_start..].trim_end().len();
        out.truncate(line_start + kept);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn tables_escape_every_cell() {
        let mut out = String::new();
        push_table(&mut out, &[["a\nb", "\x1b[2J"], ["c", "d"]]);
        assert_eq!(out, "a\\nb  \\x1b[2J\nc     d\n");
    }

    /// A log writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(EscapedFields)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .without_time(),
        );
        let detail = "\x1b[31mbad\nWARN certd: forged";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(detail = %detail, quoted = detail, n = 3, "renewal failed: {detail}");
        });
        let text = String::from_utf8(captured.0.lock().expect("log").clone()).expect("UTF-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains("renewal failed: \\x1b[31mbad\\nWARN certd: forged"),
            "{text}"
        );
        assert!(
            text.contains("detail=\\x1b[31mbad\\nWARN certd: forged"),
            "{text}"
        );
        assert!(text.contains("quoted=\"\\u{1b}[31mbad\\nWARN"), "{text}");
        assert!(text.contains(" n=3"), "{text}");
    }
}
