//! The daemon's log output, held in memory while file systems are frozen.
//!
//! hvisd's log lines go to stderr, which is usually a pipe to journald. While a backup has file
//! systems frozen, whatever reads that pipe may itself be blocked writing to a frozen file
//! system; a daemon writing its log could then block on a full pipe in the middle of the
//! freeze, with the thaw still to do. So between the start of a freeze and the end of its thaw
//! the lines are kept in memory (up to [`HELD_MAX`] bytes; beyond, they are counted and
//! dropped) and written out once everything is thawed.

use std::io::Write;
use std::sync::Mutex;

/// Bytes of log output kept while held.
pub const HELD_MAX: usize = 1 << 20;

#[derive(Default)]
struct Gate {
    held: bool,
    buffer: Vec<u8>,
    dropped: u64,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    held: false,
    buffer: Vec::new(),
    dropped: 0,
});

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// From now on log output is kept in memory (idempotent).
pub fn hold() {
    gate().held = true;
}

/// Writes what was kept and lets output through again; says how much was dropped, if any.
pub fn release() {
    let (buffer, dropped) = {
        let mut g = gate();
        if !g.held {
            return;
        }
        g.held = false;
        (
            std::mem::take(&mut g.buffer),
            std::mem::take(&mut g.dropped),
        )
    };
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&buffer);
    if dropped > 0 {
        let _ = writeln!(
            err,
            "hvisd: {dropped} bytes of log output were dropped while file systems were frozen"
        );
    }
    let _ = err.flush();
}

/// Whether output is being held.
pub fn is_held() -> bool {
    gate().held
}

/// A `tracing_subscriber` writer: stderr, or memory while held.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatedStderr;

impl Write for GatedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut g = gate();
            if g.held {
                if g.buffer.len() + buf.len() <= HELD_MAX {
                    g.buffer.extend_from_slice(buf);
                } else {
                    g.dropped += buf.len() as u64;
                }
                return Ok(buf.len());
            }
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if is_held() {
            return Ok(());
        }
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for GatedStderr {
    type Writer = GatedStderr;
    fn make_writer(&'a self) -> Self::Writer {
        GatedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_output_is_kept_bounded_and_released() {
        hold();
        let mut w = GatedStderr;
        w.write_all(b"line while frozen\n").unwrap();
        assert_eq!(gate().buffer, b"line while frozen\n");
        let big = vec![b'x'; HELD_MAX];
        w.write_all(&big).unwrap();
        assert_eq!(gate().buffer.len(), b"line while frozen\n".len());
        assert_eq!(gate().dropped, HELD_MAX as u64);
        release();
        assert!(!is_held());
        assert!(gate().buffer.is_empty());
        assert_eq!(gate().dropped, 0);
    }
}
