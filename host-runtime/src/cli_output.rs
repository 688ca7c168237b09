//! How the `hvisd` command prints: its standard output, which a reader may close early
//! (`hvisd sim | head -1`), and its one error line.
//!
//! Rust ignores `SIGPIPE`, so a write to a closed pipe fails with `EPIPE` (and `println!`
//! panics). Every command writes through [`Stdout`], which marks that failure as [`StdoutClosed`];
//! `main` then exits quietly with [`EXIT_STDOUT_CLOSED`] (141, what a shell reports for a
//! program killed by `SIGPIPE`, as `cat` or `grep` would be): no message, no panic, and
//! `set -o pipefail` scripts still learn that the output was cut short.

use std::io::{self, Write};

/// The exit status when the reader of standard output went away: 128 + `SIGPIPE`.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// The marker inside the `io::Error` a write to a closed standard output returns.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// The process's standard output, locked, with `EPIPE` turned into [`StdoutClosed`].
pub struct Stdout(io::StdoutLock<'static>);

/// Standard output for a command's results.
pub fn stdout() -> Stdout {
    Stdout(io::stdout().lock())
}

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).map_err(mark)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

/// Writes `text` and a newline to standard output and flushes it.
pub fn print_line(text: &str) -> io::Result<()> {
    let mut out = stdout();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes `text` (or any bytes) as it is to standard output and flushes it.
pub fn print(text: impl AsRef<[u8]>) -> io::Result<()> {
    let mut out = stdout();
    out.write_all(text.as_ref())?;
    out.flush()
}

/// True if `err` (or anything in its chain) is a write to a standard output its reader closed.
pub fn is_stdout_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.is::<StdoutClosed>()
            || e.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// An error and its causes on one line, each text once: `X: Y: Z`.
///
/// Many errors already include their source in their own text (`reading FILE: No such file or
/// directory`) and also return it from `source()`; printing the chain as it is would repeat
/// the cause. A cause whose text the line already holds is left out.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for e in err.chain() {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct Reading {
        path: &'static str,
        source: io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the config")]
    struct Loading(#[source] Reading);

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Transparent(#[from] Loading);

    fn not_found() -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn a_cause_already_in_the_text_is_printed_once() {
        let err = Reading {
            path: "/etc/hvisd/hvisd.toml",
            source: not_found(),
        };
        assert_eq!(
            error_line(&err.into()),
            "reading /etc/hvisd/hvisd.toml: No such file or directory"
        );
    }

    #[test]
    fn a_chain_is_joined_once_per_text_across_context_and_transparent_layers() {
        let err = Transparent(Loading(Reading {
            path: "x.toml",
            source: not_found(),
        }));
        let err = anyhow::Error::new(err);
        assert_eq!(
            error_line(&err),
            "loading the config: reading x.toml: No such file or directory"
        );
        let wrapped = err.context("hvisd run");
        assert_eq!(
            error_line(&wrapped),
            "hvisd run: loading the config: reading x.toml: No such file or directory"
        );
    }

    #[test]
    fn a_closed_stdout_is_recognised_through_wrapping_errors() {
        let closed = mark(io::Error::from(io::ErrorKind::BrokenPipe));
        let wrapped = anyhow::Error::new(closed).context("printing the transcript");
        assert!(is_stdout_closed(&wrapped));
        // A broken pipe elsewhere (a socket, a worker's pipe) is an ordinary error.
        let other = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&other));
    }
}
