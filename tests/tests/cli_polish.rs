//! The `hvisd` command as an operator meets it: output into a pipe whose reader went away, one
//! line per error, `plugin check` on a file that is not a component, `kvp list` on a missing pool
//! directory, and the systemd readiness notifications of `hvisd run`.

use hvisd_e2e::{example_plugins_dir, hvisd_bin};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `hvisd ARGS` with its standard output a pipe whose read end is already closed (so the
/// first write fails with EPIPE, whenever it comes).
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = rustix::pipe::pipe().expect("pipe");
    drop(reader);
    Command::new(hvisd_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("running hvisd")
}

fn hvisd(args: &[&str]) -> Output {
    Command::new(hvisd_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("running hvisd")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_quiet_sigpipe_exit(what: &str, out: &Output) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(141),
        "{what}: expected the quiet exit status 141, got {:?}\n{err}",
        out.status
    );
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("error:"),
        "{what}: a closed reader is not an error worth a message\n{err}"
    );
}

#[test]
fn output_into_a_closed_pipe_exits_quietly_with_141_instead_of_panicking() {
    // The simulator's transcript is printed once the tour is over: a late EPIPE.
    let plugins = example_plugins_dir();
    let out = run_into_closed_pipe(&["sim", "--plugins", plugins.to_str().unwrap()]);
    assert_quiet_sigpipe_exit("hvisd sim", &out);

    for shell in ["bash", "zsh", "fish"] {
        let out = run_into_closed_pipe(&["completions", shell]);
        assert_quiet_sigpipe_exit(&format!("hvisd completions {shell}"), &out);
    }
    let out = run_into_closed_pipe(&["man"]);
    assert_quiet_sigpipe_exit("hvisd man", &out);

    let pools = tempfile::tempdir().unwrap();
    let dir = pools.path().to_str().unwrap();
    let set = hvisd(&["kvp", "--pool-dir", dir, "set", "k", "v"]);
    assert!(set.status.success(), "{}", stderr(&set));
    let out = run_into_closed_pipe(&["kvp", "--pool-dir", dir, "list"]);
    assert_quiet_sigpipe_exit("hvisd kvp list", &out);
}

/// The lines of stderr that report the command's error.
fn error_lines(out: &Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_error_and_its_cause_are_printed_once_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/hvisd.toml");
    let missing = missing.to_str().unwrap();

    let out = hvisd(&["sim", "--config", missing]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "one error line:\n{}", stderr(&out));
    let line = &lines[0];
    assert!(line.contains(missing), "{line}");
    assert_eq!(
        line.matches("No such file or directory").count(),
        1,
        "the cause once: {line}"
    );
    assert!(
        !stderr(&out).contains("Caused by"),
        "no cause list repeating the line:\n{}",
        stderr(&out)
    );

    // A malformed config: the parser's message (several lines of its own, quoting the line) once,
    // after the path.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[kvp]\nno_such_key = 1\n").unwrap();
    let out = hvisd(&["sim", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(error_lines(&out).len(), 1, "{err}");
    assert_eq!(err.matches("unknown field").count(), 1, "{err}");
}

#[test]
fn plugin_check_on_a_file_that_is_not_a_component_says_so_in_one_line_or_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 2] = [
        (
            "notes.txt",
            b"these are notes, not a plugin\n",
            "no WebAssembly header",
        ),
        (
            "core.wasm",
            // The preamble of a core module (version 1, layer 0) and an empty type section.
            b"\0asm\x01\x00\x00\x00\x01\x01\x00",
            "core WebAssembly module",
        ),
    ];
    for (name, bytes, why) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let path = file.to_str().unwrap();

        let out = hvisd(&["plugin", "check", path]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "one line:\n{err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("not a WebAssembly component"), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(err.contains(path), "{err}");
        assert!(out.stdout.is_empty(), "nothing on stdout without --json");

        let out = hvisd(&["plugin", "check", path, "--json"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("--json prints JSON ({e}): {:?}", out.stdout));
        assert_eq!(json["ok"], false, "{json}");
        assert_eq!(json["path"], path, "{json}");
        let error = json["error"].as_str().unwrap();
        assert!(error.contains("not a WebAssembly component"), "{json}");
        assert!(!error.contains('\n'), "{json}");
    }
}

#[test]
fn kvp_list_on_a_missing_pool_dir_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("hyperv");
    let out = hvisd(&["kvp", "--pool-dir", missing.to_str().unwrap(), "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!missing.exists(), "the pool directory was created");

    // An existing directory without pools lists nothing and is left as it was.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = hvisd(&[
        "kvp",
        "--pool-dir",
        empty.to_str().unwrap(),
        "list",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let left: Vec<_> = std::fs::read_dir(&empty).unwrap().collect();
    assert!(left.is_empty(), "kvp list created {left:?}");
}

/// `hvisd run` under a fake service manager: the datagrams it sends to `$NOTIFY_SOCKET`.
struct Notified {
    socket: UnixDatagram,
}

impl Notified {
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 256];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Kills (by its PID) and reaps the child on every exit path.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &std::process::Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid");
    rustix::process::kill_process(pid, signal).expect("signalling hvisd");
}

#[test]
fn run_tells_systemd_ready_once_started_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notified = Notified {
        socket: UnixDatagram::bind(&notify_path).unwrap(),
    };
    let root = dir.path().join("shm");
    std::fs::create_dir(&root).unwrap();
    let child = Command::new(hvisd_bin())
        .args(["run", "--transport"])
        .arg(format!("shm:{}", root.display()))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning hvisd run");
    let mut running = Running(child);

    assert_eq!(
        notified.next(Duration::from_secs(30)).as_deref(),
        Some("READY=1")
    );
    signal(&running.0, rustix::process::Signal::TERM);
    assert_eq!(
        notified.next(Duration::from_secs(10)).as_deref(),
        Some("STOPPING=1")
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "hvisd did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_negotiation_log_line_names_the_framework_and_the_message_version() {
    let out = Command::new(hvisd_bin())
        .arg("sim")
        .arg("--plugins")
        .arg(example_plugins_dir())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running hvisd sim");
    assert!(out.status.success(), "{}", stderr(&out));
    // The tour's KVP offer settles on framework 3.0 and message version 4.0.
    let err = stderr(&out);
    assert!(
        err.lines().any(|l| l.contains("service=\"kvp\"")
            && l.contains("IC versions negotiated: framework 3.0, message 4.0")),
        "{err}"
    );
}
