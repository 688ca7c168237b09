//! Running the external programs KVP depends on (`hv_set_ifconfig`, `hv_get_dns_info`,
//! `hv_get_dhcp_info`, `ip`) so that none of them can hold the daemon: each runs with a deadline,
//! in its own process group that is killed (SIGKILL) and reaped when the deadline passes, with
//! stdin on `/dev/null`, stdout and stderr captured up to a limit (the rest is read and dropped, so
//! a chatty program never blocks on a full pipe), and no shell in between.
//!
//! The program must be named by an absolute path: nothing is looked up through `PATH`.
//!
//! Descriptors: the child starts with 0, 1 and 2 only. hvisd opens everything close-on-exec, and
//! anything it inherited without (a careless parent) is marked close-on-exec in the child before
//! the exec (`hvisd_sys::process::inherit_only_stdio`).
//!
//! A program that exits while something it started still holds its stdout or stderr is still
//! running as far as [`run`] is concerned: it waits for the pipes to close, and at the deadline the
//! whole process group is killed. Processes that left the group (`setsid`, daemons) are not
//! touched; ones still in it when the program exits normally are left alone as well.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Default cap on each of stdout and stderr (bytes kept; the rest is read and dropped).
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;

/// Without a pidfd (kernels before 5.3) the child's exit is noticed by looking this often.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What a program printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// The first `max_output` bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first `max_output` bytes of stderr.
    pub stderr: Vec<u8>,
    /// Bytes read past `max_output` and dropped, both streams together.
    pub discarded: u64,
}

impl Output {
    /// `Ok` if the program exited with status 0, else [`ScriptError::Failed`] naming it, its
    /// status and the start of its stderr.
    pub fn require_success(&self, program: &Path) -> Result<(), ScriptError> {
        if self.status.success() {
            return Ok(());
        }
        Err(ScriptError::Failed {
            program: program.to_path_buf(),
            status: self.status,
            stderr: escape_for_log(self.stderr.trim_ascii(), 160),
        })
    }
}

/// Why a program gave no usable result.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The path is relative: it would be looked up through `PATH` or the working directory.
    #[error("{}: not an absolute path; refusing to look it up", program.display())]
    NotAbsolute {
        /// The program as configured.
        program: PathBuf,
    },
    /// `fork`/`exec` failed (missing, not executable, out of processes...).
    #[error("{}: cannot start: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error from spawning.
        source: io::Error,
    },
    /// Still running (or its output still open) at the deadline; its process group was killed.
    #[error("{}: still running after {timeout:?}; its process group was killed", program.display())]
    TimedOut {
        /// The program.
        program: PathBuf,
        /// The deadline it was given.
        timeout: Duration,
    },
    /// Reading its output or waiting for it failed; its process group was killed.
    #[error("{}: reading its output or waiting for it failed: {source}", program.display())]
    Io {
        /// The program.
        program: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// It exited unsuccessfully (from [`Output::require_success`]).
    #[error("{}: {status}; stderr: \"{stderr}\"", program.display())]
    Failed {
        /// The program.
        program: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// The start of its stderr, escaped for a log line.
        stderr: String,
    },
}

/// Runs `program` with `args` (no shell), giving it `timeout` to exit and close its output, and
/// keeping at most `max_output` bytes of each of stdout and stderr. See the module docs.
pub fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    timeout: Duration,
    max_output: usize,
) -> Result<Output, ScriptError> {
    if !program.is_absolute() {
        return Err(ScriptError::NotAbsolute {
            program: program.to_path_buf(),
        });
    }
    let mut cmd = std::process::Command::new(program);
    hvisd_sys::process::inherit_only_stdio(&mut cmd);
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ScriptError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    let mut running = Running {
        child,
        exited: false,
        reaped: None,
        finished: false,
    };
    match running.collect(timeout, max_output) {
        Ok(Some((status, stdout, stderr, discarded))) => Ok(Output {
            status,
            stdout,
            stderr,
            discarded,
        }),
        Ok(None) => Err(ScriptError::TimedOut {
            program: program.to_path_buf(),
            timeout,
        }),
        Err(source) => Err(ScriptError::Io {
            program: program.to_path_buf(),
            source,
        }),
    }
    // `running` is dropped here: unless the program exited and its pipes closed, its process
    // group is killed and it is reaped.
}

/// A started child that is killed (with its process group) and reaped when dropped, unless it
/// already ended on its own.
struct Running {
    child: Child,
    /// The child has exited (seen with `WNOWAIT`: it stays a zombie, so its pid, which is also its
    /// process group's id, cannot be reused until it is reaped after the group is killed).
    exited: bool,
    /// Its status, once reaped.
    reaped: Option<ExitStatus>,
    /// The child exited and both pipes closed before the deadline.
    finished: bool,
}

type Collected = (ExitStatus, Vec<u8>, Vec<u8>, u64);

impl Running {
    /// Reads both pipes until they close and the child exits; `None` at the deadline.
    fn collect(&mut self, timeout: Duration, max_output: usize) -> io::Result<Option<Collected>> {
        let deadline = Instant::now() + timeout;
        let mut stdout = self.child.stdout.take();
        let mut stderr = self.child.stderr.take();
        let (mut out, mut err) = (Capture::new(max_output), Capture::new(max_output));
        let pidfd = Pid::from_raw(self.child.id() as i32)
            .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok());
        let pid = Pid::from_raw(self.child.id() as i32);
        loop {
            if !self.exited {
                self.exited = match pid {
                    Some(pid) => rustix::process::waitid(
                        WaitId::Pid(pid),
                        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
                    )?
                    .is_some(),
                    None => false,
                };
            }
            if stdout.is_none() && stderr.is_none() && self.exited {
                let status = self.child.wait()?;
                self.reaped = Some(status);
                self.finished = true;
                return Ok(Some((
                    status,
                    out.kept,
                    err.kept,
                    out.discarded + err.discarded,
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut wait = deadline - now;
            let (mut out_ready, mut err_ready) = (false, false);
            {
                let mut fds = Vec::with_capacity(3);
                if let Some(p) = &stdout {
                    fds.push(PollFd::new(p, PollFlags::IN));
                }
                if let Some(p) = &stderr {
                    fds.push(PollFd::new(p, PollFlags::IN));
                }
                if !self.exited {
                    match &pidfd {
                        Some(p) => fds.push(PollFd::new(p, PollFlags::IN)),
                        None => wait = wait.min(EXIT_POLL_INTERVAL),
                    }
                }
                let ts = Timespec {
                    tv_sec: wait.as_secs().try_into().unwrap_or(i64::MAX),
                    tv_nsec: wait.subsec_nanos().into(),
                };
                match rustix::event::poll(&mut fds, Some(&ts)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
                let mut it = fds.iter();
                if stdout.is_some() {
                    out_ready = it.next().is_some_and(|f| !f.revents().is_empty());
                }
                if stderr.is_some() {
                    err_ready = it.next().is_some_and(|f| !f.revents().is_empty());
                }
            }
            if out_ready && !out.read_from(&mut stdout)? {
                stdout = None;
            }
            if err_ready && !err.read_from(&mut stderr)? {
                stderr = None;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.finished {
            // Ended on its own: stragglers still in its group are left alone (module docs).
            return;
        }
        if let Some(pgid) = Pid::from_raw(self.child.id() as i32) {
            // The leader is not reaped yet (at most a zombie), so its group id still names its
            // group and cannot reach an unrelated process.
            let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
        }
        if self.reaped.is_none() {
            let _ = self.child.wait();
        }
    }
}

/// The first `max` bytes of a stream; the rest is counted and dropped.
struct Capture {
    kept: Vec<u8>,
    max: usize,
    discarded: u64,
}

impl Capture {
    fn new(max: usize) -> Capture {
        Capture {
            kept: Vec::new(),
            max,
            discarded: 0,
        }
    }

    /// One read from a pipe poll reported ready; `false` at end of file.
    fn read_from<R: Read>(&mut self, pipe: &mut Option<R>) -> io::Result<bool> {
        let Some(p) = pipe else {
            return Ok(false);
        };
        let mut buf = [0u8; 8192];
        let n = match p.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(false);
        }
        let keep = n.min(self.max - self.kept.len());
        self.kept.extend_from_slice(&buf[..keep]);
        self.discarded += (n - keep) as u64;
        Ok(true)
    }
}

/// Untrusted bytes for a log line, escaped and cut (see `hvisd_protocol::text`).
pub fn escape_for_log(bytes: &[u8], max: usize) -> String {
    hvisd_protocol::text::escape_bytes(bytes, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn output_and_status_are_returned() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "s", "echo out \"$1\"; echo err >&2; exit 3");
        let o = run(&p, &["arg one"], Duration::from_secs(5), 1024).unwrap();
        assert_eq!(o.stdout, b"out arg one\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.status.code(), Some(3));
        let e = o.require_success(&p).unwrap_err();
        assert!(e.to_string().contains("stderr: \"err\""), "{e}");
    }

    #[test]
    fn a_hung_program_and_its_children_are_killed_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("survived");
        let p = script(
            d.path(),
            "hang",
            &format!("(sleep 3; touch {}) &\nsleep 30", marker.display()),
        );
        let start = Instant::now();
        let e = run(&p, &[] as &[&str], Duration::from_millis(300), 1024).unwrap_err();
        assert!(matches!(e, ScriptError::TimedOut { .. }), "{e}");
        // Killed well before the background child would have touched the marker.
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "{:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(3500).saturating_sub(start.elapsed()));
        assert!(
            !marker.exists(),
            "a child of the hung program outlived the kill"
        );
    }

    #[test]
    fn a_program_that_exits_while_a_child_holds_its_output_times_out() {
        let d = tempfile::tempdir().unwrap();
        let p = script(d.path(), "bg", "sleep 30 &\necho started");
        let start = Instant::now();
        let e = run(&p, &[] as &[&str], Duration::from_millis(300), 1024).unwrap_err();
        assert!(matches!(e, ScriptError::TimedOut { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn output_of_a_chatty_program_is_bounded_and_the_rest_drained() {
        let d = tempfile::tempdir().unwrap();
        // 1 MiB on each stream: more than a pipe holds, so it only finishes if both are drained.
        let p = script(
            d.path(),
            "chatty",
            "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2; echo done >&2",
        );
        let o = run(&p, &[] as &[&str], Duration::from_secs(10), 4096).unwrap();
        assert!(o.status.success());
        assert_eq!(o.stdout.len(), 4096);
        assert_eq!(o.stderr.len(), 4096);
        assert_eq!(o.discarded, 2 * (1_048_576 - 4096) + 5);
    }

    #[test]
    fn stdin_is_dev_null_and_no_descriptor_of_ours_is_inherited() {
        let stdin = run(
            Path::new("/bin/readlink"),
            &["/proc/self/fd/0"],
            Duration::from_secs(5),
            4096,
        )
        .unwrap();
        assert_eq!(stdin.stdout, b"/dev/null\n");
        let d = tempfile::tempdir().unwrap();
        let held_path = d.path().join("held-by-the-parent");
        let _held = std::fs::File::create(&held_path).unwrap();
        let o = run(
            Path::new("/bin/ls"),
            &["-l", "/proc/self/fd"],
            Duration::from_secs(5),
            4096,
        )
        .unwrap();
        let listing = String::from_utf8(o.stdout).unwrap();
        assert!(!listing.contains("held-by-the-parent"), "{listing}");
        let fds: Vec<u32> = listing
            .lines()
            .filter_map(|l| l.split(" -> ").next()?.rsplit(' ').next()?.parse().ok())
            .collect();
        assert!([0, 1, 2].iter().all(|fd| fds.contains(fd)), "{listing}");
        // 0-2 and the one `ls` opens to list the directory: nothing inherited, not even what the
        // test harness started this process with.
        let unexpected: Vec<u32> = fds.iter().copied().filter(|fd| *fd > 2).collect();
        assert!(unexpected.len() <= 1, "{fds:?}");
    }

    #[test]
    fn relative_and_missing_programs_are_errors_naming_them() {
        let e = run(Path::new("ip"), &["route"], Duration::from_secs(1), 1024).unwrap_err();
        assert!(matches!(e, ScriptError::NotAbsolute { .. }));
        assert!(e.to_string().starts_with("ip: not an absolute path"), "{e}");
        let e = run(
            Path::new("/nonexistent/hv_get_dns_info"),
            &[] as &[&str],
            Duration::from_secs(1),
            1024,
        )
        .unwrap_err();
        assert!(matches!(e, ScriptError::Spawn { .. }));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/hv_get_dns_info: cannot start")
        );
    }

    #[test]
    fn log_escaping_shows_control_and_non_ascii_bytes_and_cuts() {
        let shown = escape_for_log(b"a\n$(touch x)\x1b\xc3\xa9`", 80);
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
        assert!(shown.starts_with("a\\n$(touch x)\\u{1b}"), "{shown}");
        let long = escape_for_log(&[b'1'; 200], 80);
        assert!(
            long.starts_with(&"1".repeat(80)) && long.contains("more bytes"),
            "{long}"
        );
    }
}
