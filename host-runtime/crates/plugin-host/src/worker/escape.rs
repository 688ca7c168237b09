//! Debug builds only: what a compromised worker would try once it runs arbitrary native code,
//! run after the confinement and reported to the core, so a test can prove each one fails. Not
//! compiled into release builds.

use std::os::fd::AsRawFd;

/// Runs each attempt (`open:PATH`, `write:PATH`, `socket:inet`, `socket:unix:PATH`,
/// `fifreeze:FD`, `ptrace:PID`, `kill:PID`, `exec:PATH`, `fork`, `setuid:0`) and says what
/// happened: `denied: ...` or `ALLOWED`.
pub(super) fn attempt(attempts: &[String]) -> Vec<(String, String)> {
    attempts
        .iter()
        .map(|a| (a.clone(), try_one(a)))
        .collect()
}

fn verdict<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => "ALLOWED".into(),
        Err(e) => format!("denied: {e}"),
    }
}

fn try_one(attempt: &str) -> String {
    let (what, arg) = attempt.split_once(':').unwrap_or((attempt, ""));
    match what {
        "open" => verdict(std::fs::File::open(arg)),
        "write" => verdict(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(arg),
        ),
        "socket" => match arg {
            "inet" => verdict(std::net::TcpStream::connect("127.0.0.1:1")),
            unix => verdict(std::os::unix::net::UnixStream::connect(
                unix.strip_prefix("unix:").unwrap_or(unix),
            )),
        },
        "fifreeze" => {
            let fd: i32 = arg.parse().unwrap_or(-1);
            match hvisd_sys::process::adopt_inherited_fd(fd) {
                Ok(owned) => {
                    let r = hvisd_sys::freeze::freeze(&owned);
                    // Never leave anything frozen, even if the attempt were allowed.
                    let _ = hvisd_sys::freeze::thaw(&owned);
                    let _ = owned.as_raw_fd();
                    verdict(r)
                }
                Err(e) => format!("denied: {e}"),
            }
        }
        "ptrace" | "kill" => {
            let pid = arg
                .parse::<i32>()
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            match pid {
                Some(pid) if what == "kill" => verdict(rustix::process::kill_process(
                    pid,
                    rustix::process::Signal::TERM,
                )),
                Some(pid) => verdict(hvisd_sys::process::ptrace_attach(pid)),
                None => "denied: no such pid".into(),
            }
        }
        "exec" => verdict(std::process::Command::new(arg).status()),
        "fork" => verdict(hvisd_sys::process::fork_and_exit_child()),
        "setuid" => verdict(rustix::thread::set_thread_res_uid(
            rustix::process::Uid::ROOT,
            rustix::process::Uid::ROOT,
            rustix::process::Uid::ROOT,
        )),
        other => format!("unknown attempt {other}"),
    }
}
