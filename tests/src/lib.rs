//! Helpers for the end-to-end tests: build and find the `hvisd` binary, run it as a child process that
//! is always killed (by its PID) and reaped, and read what it printed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_owned()
}

/// Builds the `hvisd` binary once per test process (same profile as the tests) and returns its path.
///
/// The tests live in their own package, so Cargo does not hand them the binary; building it here is
/// cheap when it is up to date and keeps `cargo test --workspace` self-sufficient.
pub fn hvisd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "hvisd", "--bin", "hvisd"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build for the hvisd binary");
        assert!(status.success(), "cargo build -p hvisd failed");
        // This test binary is target/<profile>/deps/<name>; the hvisd binary is target/<profile>/hvisd.
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary inside target/<profile>/deps");
        let bin = profile_dir.join("hvisd");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// A child process that is killed by its PID and reaped when dropped, so no test leaves one behind.
pub struct ChildGuard {
    child: Option<Child>,
    stderr_path: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `hvisd ARGS`; stdout is discarded, stderr goes to a file readable with [`Self::stderr`].
    pub fn spawn_hvisd(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for stderr");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(hvisd_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning hvisd");
        Self {
            child: Some(child),
            stderr_path,
            _stderr_dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// What the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until stderr contains `needle`, or panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.stderr().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no {needle:?} in the log within {timeout:?}:\n{}",
            self.stderr()
        );
    }

    /// Counts occurrences of `needle` in stderr.
    pub fn log_count(&self, needle: &str) -> usize {
        self.stderr().matches(needle).count()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Only this child, by its own PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A guest runtime (`hvisd run --transport shm:ROOT`) running as its own process.
pub struct GuestProcess {
    /// The process.
    pub process: ChildGuard,
}

impl GuestProcess {
    /// Starts `hvisd run` on an shm root.
    pub fn start_shm(root: &Path) -> Self {
        let transport = format!("shm:{}", root.display());
        let process = ChildGuard::spawn_hvisd(&["run", "--transport", &transport]);
        process.wait_for_log("watching shm root", Duration::from_secs(30));
        Self { process }
    }

    /// Starts `hvisd run` on an shm root with a config file.
    pub fn start_shm_with_config(root: &Path, config: &Path) -> Self {
        let transport = format!("shm:{}", root.display());
        let config = config.display().to_string();
        let process =
            ChildGuard::spawn_hvisd(&["run", "--transport", &transport, "--config", &config]);
        process.wait_for_log("watching shm root", Duration::from_secs(30));
        Self { process }
    }
}

/// Runs `hvisd host --root ROOT script FILE` to completion (bounded by `timeout`) and returns its output.
pub fn run_host_script(root: &Path, script_json: &str, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temp dir for the script");
    let script = dir.path().join("script.json");
    std::fs::write(&script, script_json).expect("writing the script");
    let mut child = Command::new(hvisd_bin())
        .args(["host", "--root"])
        .arg(root)
        .arg("script")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning hvisd host");
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child
        .wait_with_output()
        .expect("collecting hvisd host output")
}

/// Parses a host transcript (the JSON array `hvisd host` prints).
pub fn transcript(output: &Output) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(&output.stdout);
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(entries)) => entries,
        _ => panic!(
            "host printed no transcript.\nstdout:\n{text}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}
