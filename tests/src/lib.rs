//! Helpers for the end-to-end tests: build and find the `hvisd` binary, run it as a child process that
//! is always killed (by its PID) and reaped, and read what it printed; and [`freeze_sandbox`], a
//! private namespace with a tmpfs root where tests may freeze loop-mounted images they made.

#![forbid(unsafe_code)]

pub mod freeze_sandbox;

pub use freeze_sandbox::{
    FreezeSandbox, FsType, ImageSpec, SandboxError, SandboxImage, SandboxProcess,
};

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
/// `$HVISD_E2E_BIN` names a binary to test instead (an installed one, or a copy kept apart from a
/// target directory that other builds share).
pub fn hvisd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("HVISD_E2E_BIN") {
            return PathBuf::from(bin);
        }
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

/// Builds the example and test plugins (release, once per test process) and returns the directory
/// that holds their `.wasm` files: what `hvisd sim --plugins DIR` takes. A clean checkout has no
/// built plugins, so a test that runs `hvisd sim` passes this rather than relying on the default
/// search path.
pub fn example_plugins_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let built = hvisd_plugin_host::build::build_plugins(
            &hvisd_plugin_host::build::plugins_workspace(),
            "release",
        )
        .expect("building the plugins");
        built["status-echo"]
            .parent()
            .expect("a built plugin lies in a directory")
            .to_owned()
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
        wait_for_text("the log", || self.stderr(), needle, timeout);
    }

    /// Counts occurrences of `needle` in stderr.
    pub fn log_count(&self, needle: &str) -> usize {
        self.stderr().matches(needle).count()
    }

    /// Sends `signal` to this child, by its own PID (a no-op once it has been reaped).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Waits up to `timeout` for the process to exit and returns how it ended (`None`: still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// How many descriptors the process has open (`/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
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

/// Polls `read` until what it returns contains `needle`; after `timeout`, panics with the text,
/// calling it `what`.
pub(crate) fn wait_for_text(
    what: &str,
    read: impl Fn() -> String,
    needle: &str,
    timeout: Duration,
) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if read().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {needle:?} in {what} within {timeout:?}:\n{}", read());
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
///
/// Its output goes through pipes read only once it has exited: for scripts whose transcript may
/// pass a pipe's capacity (64 KiB, a few hundred actions), use [`HostProcess`].
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

/// `hvisd host --root ROOT script FILE` running in the background, so that several hosts can act on
/// one root at once; killed by its PID if dropped before [`HostProcess::finish`].
pub struct HostProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl HostProcess {
    /// Starts the host on `root` with the script `script_json`. Its stdout (the transcript) and
    /// stderr go to files, not pipes: nothing reads them before the host exits, and the transcript
    /// of a script with thousands of actions would fill a pipe and stall the host.
    pub fn start(root: &Path, script_json: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the script");
        let script = dir.path().join("script.json");
        std::fs::write(&script, script_json).expect("writing the script");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let child = Command::new(hvisd_bin())
            .args(["host", "--root"])
            .arg(root)
            .arg("script")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawning hvisd host");
        Self {
            child: Some(child),
            dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the host is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for the host to exit (killing it after `timeout`) and returns what it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let Some(mut child) = self.child.take() else {
            panic!("the host was already collected");
        };
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().expect("reaping hvisd host");
                }
            }
        };
        let read = |name: &str| std::fs::read(self.dir.path().join(name)).unwrap_or_default();
        Output {
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Only this child, by its own PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

/// An ext4 image this test made, loop-mounted at a directory of its own; on drop (every exit
/// path that unwinds) it is thawed, if anything froze it, and unmounted (the loop device goes
/// with it). `None` unless running as root with `mkfs.ext4` and loop devices.
pub struct LoopMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl LoopMount {
    /// Makes a `size_mib` ext4 image and mounts it.
    pub fn ext4(size_mib: u64) -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .ok()?;
        let quiet = |cmd: &mut Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)) {
            return None;
        }
        if !quiet(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt),
        ) {
            return None;
        }
        Some(Self { dir, mounted: true })
    }

    /// The mount point.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.path();
            // Thaw first: unmounting a frozen file system would hang.
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let unmounted = Command::new("umount")
                .arg(&mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                // Still busy (a process of the test holds a descriptor in it): detach it now;
                // the kernel finishes the unmount when the last user lets go.
                let _ = Command::new("umount")
                    .arg("--lazy")
                    .arg(&mnt)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
