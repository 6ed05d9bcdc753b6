//! Text from outside (a CA's problem details, identifiers, URLs) made
//! safe for terminals, line-based logs and the notify command's
//! environment: control characters and bidirectional overrides escaped, so
//! a CA cannot forge a line of `status --check` or of the log, or drive a
//! terminal with escape sequences.

use std::borrow::Cow;
use std::fmt;

/// `s` with its control characters escaped (`\n`, `\x1b`, `\u{202e}`),
/// for terminals and line-based logs; borrowed when there are none.
pub(crate) fn escape_control(s: &str) -> Cow<'_, str> {
    // Printable ASCII, nearly always: a byte scan (`status` runs this on
    // every cell of 10,000 rows).
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    // Writing to a String cannot fail.
    let _ = fmt::Write::write_str(&mut EscapeControl(&mut out), s);
    Cow::Owned(out)
}

/// C0 and C1 controls and DEL (a terminal acts on them; a newline forges a
/// line), and the bidirectional overrides that make text read other than
/// it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A `fmt::Write` that escapes control characters on their way to `W`.
pub(crate) struct EscapeControl<W>(pub(crate) W);

impl<W: fmt::Write> fmt::Write for EscapeControl<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|(_, c)| needs_escape(*c)) {
            self.0.write_str(&rest[..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if u32::from(c) < 0x100 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape_control("a.example ok"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("\x1b[31mred\nCERTD OK: forged\r\t\0\x7f\u{9b}\u{202e}é"),
            "\\x1b[31mred\\nCERTD OK: forged\\r\\t\\x00\\x7f\\x9b\\u{202e}é"
        );
    }
}
