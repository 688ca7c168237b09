//! Text that came from a peer (a host, a plugin, another local program) on its way into a log
//! line or an error message: control characters, escapes and non-ASCII are shown escaped and the
//! length is capped, so a peer can neither forge log lines (newlines, fake prefixes), drive the
//! operator's terminal (ANSI escapes) nor flood the log through one field.
//!
//! And how many such lines a peer can cause: a host can send a malformed packet a million times a
//! second, so every warning about peer input passes through a [`LogBudget`] (a few lines in a
//! burst, then a trickle; the lines denied are counted and reported with the next one allowed),
//! most simply with [`throttled!`](crate::throttled), one budget per call site.

use std::fmt;
use std::time::{Duration, Instant};

/// Longest text shown by [`Escaped`] before it is cut (characters of the input).
pub const DEFAULT_MAX_CHARS: usize = 200;

/// Displays a peer's text escaped and cut: printable ASCII stays as is, `\n`, `\t`, `\\`, `"`
/// and every other character are written as Rust escapes (`\u{1b}`), and more than `max` input
/// characters end in `…(N more bytes)`.
#[derive(Clone, Copy)]
pub struct Escaped<'a> {
    text: &'a str,
    max: usize,
}

impl<'a> Escaped<'a> {
    /// `text`, cut at [`DEFAULT_MAX_CHARS`].
    pub fn new(text: &'a str) -> Self {
        Self::with_max(text, DEFAULT_MAX_CHARS)
    }

    /// `text`, cut at `max` characters.
    pub fn with_max(text: &'a str, max: usize) -> Self {
        Self { text, max }
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.text.char_indices().enumerate() {
            if shown == self.max {
                return write!(f, "…({} more bytes)", self.text.len() - i);
            }
            match c {
                ' '..='~' if c != '\\' => f.write_fmt(format_args!("{c}"))?,
                _ => f.write_fmt(format_args!("{}", c.escape_default()))?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// [`Escaped`] as an owned string, cut at `max` characters.
pub fn escape(text: &str, max: usize) -> String {
    Escaped::with_max(text, max).to_string()
}

/// Bytes that should be text (a key, a path component) shown escaped: invalid UTF-8 is replaced
/// first, then escaped as [`Escaped`].
pub fn escape_bytes(bytes: &[u8], max: usize) -> String {
    escape(&String::from_utf8_lossy(bytes), max)
}

/// A token bucket of log lines.
#[derive(Debug, Clone)]
pub struct LogBudget {
    burst: u32,
    tokens: f64,
    per_second: f64,
    last: Instant,
    suppressed: u64,
}

impl LogBudget {
    /// Allows `burst` lines at once and `per_minute` lines a minute after that.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self {
            burst,
            tokens: f64::from(burst),
            per_second: f64::from(per_minute) / 60.0,
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// The budget for warnings about one channel's packets: 10 at once, then 6 a minute.
    pub fn per_channel() -> Self {
        Self::new(10, 6)
    }

    /// Whether a line may be written now. `Some(n)`: yes, and `n` lines were suppressed since the
    /// last one allowed (say so in the line); `None`: no (it is counted).
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * self.per_second).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Lines denied since the last one allowed.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// How long until the next line would be allowed.
    pub fn refill_in(&self) -> Duration {
        if self.tokens >= 1.0 || self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.per_second)
    }
}

/// A note to append to a line when earlier ones were suppressed.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar lines suppressed)")
    }
}

/// A `tracing` event with a budget per call site ([`LogBudget::new(10, 6)`](LogBudget::new)):
/// for lines a peer can trigger at will (a malformed packet, a refused request). The number of
/// lines suppressed since the last one is attached as the field `suppressed`.
/// `throttled!(warn, "text {}", x)`, `throttled!(info, field = 1, "text")`.
#[macro_export]
macro_rules! throttled {
    ($level:ident, $($arg:tt)+) => {{
        static BUDGET: ::std::sync::Mutex<Option<$crate::text::LogBudget>> =
            ::std::sync::Mutex::new(None);
        let allowed = {
            let mut budget = BUDGET.lock().unwrap_or_else(|p| p.into_inner());
            budget
                .get_or_insert_with(|| $crate::text::LogBudget::new(10, 6))
                .allow()
        };
        if let Some(suppressed) = allowed {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_burst_then_a_trickle_and_the_suppressed_count() {
        let mut b = LogBudget::new(3, 60);
        let t0 = Instant::now();
        b.last = t0;
        assert_eq!(b.allow_at(t0), Some(0));
        assert_eq!(b.allow_at(t0), Some(0));
        assert_eq!(b.allow_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(b.allow_at(t0), None);
        }
        assert_eq!(b.suppressed(), 1000);
        // One line a second refills.
        assert_eq!(b.allow_at(t0 + Duration::from_millis(1001)), Some(1000));
        assert_eq!(b.allow_at(t0 + Duration::from_millis(1002)), None);
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(2), " (2 similar lines suppressed)");
    }

    #[test]
    fn control_characters_and_escapes_cannot_reach_the_log_raw() {
        let forged = "ok\n2026-12-07T00:00:00Z INFO hvisd: fake line\x1b[31m";
        let shown = Escaped::new(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
        assert!(
            shown.contains("\\n") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        assert_eq!(Escaped::new("plain text").to_string(), "plain text");
        assert_eq!(Escaped::new("a\\b").to_string(), "a\\\\b");
        assert_eq!(Escaped::new("é").to_string(), "\\u{e9}");
    }

    #[test]
    fn long_text_is_cut_with_a_count() {
        let long = "x".repeat(1000);
        assert_eq!(
            Escaped::with_max(&long, 10).to_string(),
            "xxxxxxxxxx…(990 more bytes)"
        );
        assert_eq!(escape_bytes(b"\xff\x00k", 10), "\\u{fffd}\\u{0}k");
    }
}
