//! Debug builds only: what a compromised worker would try once it runs arbitrary native code,
//! run after the confinement and reported to the core, so a test can prove each one fails. Not
//! compiled into release builds.

/// Runs each attempt (`open:PATH`, `write:PATH`, `socket:inet`, `socket:unix:PATH`,
/// `fifreeze:PATH`, `ptrace:PID`, `kill:PID`, `exec:PATH`, `fork`, `setuid:0`) and says what
/// happened: `denied: ...` or `ALLOWED`.
pub(super) fn attempt(attempts: &[String]) -> Vec<(String, String)> {
    attempts.iter().map(|a| (a.clone(), try_one(a))).collect()
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
        // Appends (creating the file if needed) and never truncates: nothing is lost even if
        // the attempt were allowed.
        "write" => verdict(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(arg),
        ),
        "socket" => match arg {
            "inet" => verdict(std::net::TcpStream::connect("127.0.0.1:1")),
            unix => verdict(std::os::unix::net::UnixStream::connect(
                unix.strip_prefix("unix:").unwrap_or(unix),
            )),
        },
        // FIFREEZE on the file system of PATH (`/proc/self/fd/N` for an inherited descriptor).
        "fifreeze" => match std::fs::File::open(arg) {
            Ok(file) => {
                let r = hvisd_sys::freeze::freeze(&file);
                // Never leave anything frozen, even if the attempt were allowed.
                if r.is_ok() {
                    let _ = hvisd_sys::freeze::thaw(&file);
                }
                verdict(r)
            }
            Err(e) => format!("denied: cannot even open it: {e}"),
        },
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
