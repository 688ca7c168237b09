//! Strings from plugins, made safe to log: cut to a length, and escaped so
//! that a key cannot forge log lines or hide behind look-alike characters.

use std::fmt;

/// At most `max` bytes of `s`, never splitting a UTF-8 character.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Shows a plugin-supplied string (a key, a service name) in a log line or
/// an error: printable ASCII as is, `\` doubled, control characters and
/// everything beyond ASCII as Rust escapes (`\n`, `\u{1b}`, `\u{e9}`), and
/// cut after [`Escaped::MAX_CHARS`] characters of output with `...`.
pub(crate) struct Escaped<'a>(pub &'a str);

impl Escaped<'_> {
    /// Longest escaped text shown before the cut.
    pub const MAX_CHARS: usize = 64;
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = 0;
        for c in self.0.chars() {
            let one = match c {
                ' '..='~' if c != '\\' => EscapedChar::Plain(c),
                _ => EscapedChar::Escape(c.escape_default()),
            };
            let len = one.len();
            if shown + len > Self::MAX_CHARS {
                return f.write_str("...");
            }
            shown += len;
            match one {
                EscapedChar::Plain(c) => fmt::Write::write_char(f, c)?,
                EscapedChar::Escape(e) => write!(f, "{e}")?,
            }
        }
        Ok(())
    }
}

enum EscapedChar {
    Plain(char),
    Escape(std::char::EscapeDefault),
}

impl EscapedChar {
    fn len(&self) -> usize {
        match self {
            EscapedChar::Plain(_) => 1,
            EscapedChar::Escape(e) => e.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_never_splits_a_utf8_character() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("short", 64), "short");
        assert_eq!(truncate("", 0), "");
    }

    #[test]
    fn escaped_keys_show_control_and_non_ascii_characters_as_escapes() {
        assert_eq!(Escaped("app.version").to_string(), "app.version");
        assert_eq!(
            Escaped("a\nb\u{1b}[31m\0é\\").to_string(),
            "a\\nb\\u{1b}[31m\\u{0}\\u{e9}\\\\"
        );
    }

    #[test]
    fn escaped_keys_are_cut_after_64_characters() {
        let long = "k".repeat(512);
        let shown = Escaped(&long).to_string();
        assert_eq!(shown, format!("{}...", "k".repeat(64)));
        // An escape is never split.
        let shown = Escaped(&format!("{}\u{1b}", "k".repeat(60))).to_string();
        assert_eq!(shown, format!("{}...", "k".repeat(60)));
    }
}
