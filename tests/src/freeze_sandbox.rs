//! A freeze sandbox: a private mount and PID namespace whose root is a fresh tmpfs, holding
//! loop-mounted ext4 and xfs images that the sandbox itself made, so that end-to-end tests can
//! freeze file systems (`FIFREEZE`/`FITHAW`) on a shared machine without any file system of the
//! machine within reach.
//!
//! # Why
//!
//! Freezing a file system that other processes use (`/`, a home, the build directory) stalls every
//! writer on it until someone thaws it, and a test that dies in between can hang the machine. In
//! the sandbox the only file systems a process can name are the tmpfs root (tmpfs refuses
//! `FIFREEZE` with `EOPNOTSUPP`), a fresh `/proc`, tmpfs `/tmp`, `/run` and `/dev/shm`, and the
//! images. `/dev` holds only `null`, `zero`, `full`, `random`, `urandom` and the images' loop
//! devices (no disk of the machine); `/proc` only shows the sandbox's own processes, so
//! `/proc/PID/root` cannot lead out of it either.
//!
//! # How the namespace is built
//!
//! 1. A holder process is started: `setpriv --pdeathsig KILL unshare --mount --propagation
//!    private --pid --fork --kill-child sh -c 'read _; exec /bin/sleep infinity'`, in `/`. The
//!    `unshare` process (the holder, our child) keeps the mount namespace; its forked child is
//!    PID 1 of the new PID namespace. The sandbox waits until the holder's `/proc/PID/ns/mnt`
//!    differs from the test's and no mount in it is `shared:` any more, so nothing done inside
//!    can propagate back. Every process the sandbox starts inherits only stdin, stdout and
//!    stderr (`hvisd_sys::process::inherit_only_stdio`), whatever the test process leaked.
//! 2. `nsenter` into that namespace mounts a tmpfs on an empty directory of a temporary directory
//!    (the host never sees it: it checks that). The sandbox fills it through
//!    `/proc/HOLDER/root/...`: `/bin` with `hvisd` (at [`HVISD`]) and a small toolbox of host
//!    programs (`sh`, `cat`, `mount`, `umount`, `fsfreeze`, ...), every shared library `ldd`
//!    names and the dynamic loader, minimal `/etc/passwd` and `/etc/group`, and the `/dev` nodes.
//! 3. It mounts `/proc` (from inside the PID namespace), tmpfs on `/tmp`, `/run` and `/dev/shm`;
//!    it makes each image (a sparse file in the temporary directory, `mkfs.ext4` or `mkfs.xfs`)
//!    and mounts it with `mount -o loop` at the caller's mount point, so the loop device has the
//!    autoclear flag and goes away with the last mount of the file system.
//! 4. `pivot_root` moves the tmpfs to `/` (for every process of the namespace: the holder and
//!    PID 1 have `/` as root and working directory), and `umount -l /.old-root` detaches the old
//!    root. The sandbox checks that the holder's mount table is exactly the expected one with a
//!    tmpfs at `/`, then lets PID 1 `exec` the copied `/bin/sleep`, so that no process in the
//!    sandbox runs a file of the real root or holds a descriptor of it (its stdio included).
//!
//! Later commands run in it with `nsenter --mount=/proc/HOLDER/ns/mnt
//! --pid=/proc/HOLDER/ns/pid_for_children`; entering the mount namespace sets their root and
//! working directory to the tmpfs (no `--root`/`--wd`: those open paths of the host before
//! entering). Before each `nsenter` the sandbox checks that the holder is still in the namespace
//! it built.
//!
//! # What the guard does
//!
//! [`FreezeSandbox::close`], or `Drop` (which also runs while a panicking test unwinds), thaws
//! every image (`fsfreeze --unfreeze` until the kernel says it is not frozen), unmounts it inside
//! (lazily if it is busy), kills the holder by its PID (its `--kill-child` then kills PID 1, and
//! the kernel every process left in the PID namespace), waits until no loop device is bound to
//! the image any more (a frozen or still-mounted file system would keep it bound), and removes
//! the temporary directory. If a loop device stays bound (the holder died while an image was
//! frozen), [`release_image`] mounts the device in a throw-away private namespace, thaws it and
//! unmounts it. What it could not undo, `Drop` prints loudly (and `close` returns), with the
//! temporary directory kept for inspection.
//!
//! # If the test process is killed
//!
//! `SIGKILL` runs no destructor. The holder and every `nsenter` the sandbox started carry
//! `PR_SET_PDEATHSIG = SIGKILL`, so they die with the thread that created the sandbox; the PID
//! namespace dies with its PID 1, and the mount namespace with its last process, which unmounts
//! the images and frees their loop devices. An image that was frozen at that moment stays frozen
//! (freezing takes an active reference on the super block, which outlives the last mount) and
//! keeps its loop device: `losetup -a` shows it, and [`release_image`] (or by hand, in a private
//! mount namespace, `mount /dev/loopN DIR && fsfreeze -u DIR; umount DIR`) ends it. Nothing else
//! of the machine waits on it, but that is why hvisd has a freeze watchdog and why tests keep
//! frozen windows short. The image files stay in `$TMPDIR/hvisd-freeze-sandbox.*` (sparse: a
//! few MiB for ext4, ~65 MiB for xfs, whose log `mkfs.xfs` writes out).
//!
//! Create, use and drop a sandbox on the same thread: the parent-death signal is tied to the thread
//! that spawned the holder, so a sandbox built on a helper thread dies when that thread ends.
//!
//! # Example
//!
//! ```no_run
//! use hvisd_e2e::freeze_sandbox::{FreezeSandbox, ImageSpec};
//! use std::time::Duration;
//!
//! let Some(sandbox) = FreezeSandbox::builder()
//!     .image(ImageSpec::ext4("/mnt/a", 16))
//!     .image(ImageSpec::xfs("/mnt/b", 300))
//!     .build_or_skip()
//! else {
//!     return; // not root, or a tool is missing: the reason is printed
//! };
//! let daemon = sandbox.spawn(&["run", "--transport", "shm:/run/hvisd-sim"], &[]);
//! daemon.wait_for_log("watching shm root", Duration::from_secs(30));
//! sandbox.freeze("/mnt/a");
//! let mut writer = sandbox.spawn_program("/bin/sh", &["-c", "echo x > /mnt/a/f"], &[]);
//! assert!(writer.wait_exit(Duration::from_millis(300)).is_none()); // blocked
//! assert!(sandbox.thaw("/mnt/a"));
//! assert!(writer.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
//! print!("{}", sandbox.run_ok("cat /proc/self/mountinfo"));
//! sandbox.close().expect("nothing left mounted or frozen");
//! ```

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hvisd_sys::process::inherit_only_stdio;
use rustix::process::Signal;

/// Where the `hvisd` binary sits inside the sandbox.
pub const HVISD: &str = "/bin/hvisd";

/// When this environment variable is `1`, [`SandboxBuilder::build_or_skip`] panics instead of
/// skipping (CI sets it: it runs as root and installs the tools, so a skip there is a bug).
pub const REQUIRE_ENV: &str = "HVISD_E2E_REQUIRE_FREEZE_SANDBOX";

/// `PATH` of every process started inside (`/usr/bin` and `/sbin` are links to `/bin`).
const INSIDE_PATH: &str = "/bin";

/// `PATH` for the host's tools (the sandbox clears the environment of what it runs).
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host tools the sandbox itself runs.
const HOST_TOOLS: &[&str] = &[
    "setpriv",
    "unshare",
    "nsenter",
    "mount",
    "umount",
    "pivot_root",
    "fsfreeze",
    "ldd",
    "sh",
];

/// Programs copied into the sandbox's `/bin` that it cannot work without: the holder's shell and
/// `sleep`, the guard's `umount`, and what tests need to freeze and look around.
const REQUIRED_INSIDE: &[&str] = &["sh", "sleep", "cat", "stat", "mount", "umount", "fsfreeze"];

/// Programs copied into `/bin` when the host has them.
const OPTIONAL_INSIDE: &[&str] = &[
    "ls",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "touch",
    "dd",
    "sync",
    "head",
    "tail",
    "grep",
    "sed",
    "sort",
    "wc",
    "tr",
    "cut",
    "tee",
    "env",
    "id",
    "readlink",
    "timeout",
    "findmnt",
    "ps",
    "mountpoint",
];

/// The directories the sandbox mounts besides the images (and `/`).
const SANDBOX_MOUNTS: &[&str] = &["/proc", "/tmp", "/run", "/dev/shm"];

/// Inside path of the directory that holds the logs of spawned processes.
const LOG_DIR: &str = "/.sandbox/log";

/// Bound on each tool the sandbox runs (mkfs, mount, umount, ...).
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Holder's PID 1: waits until the root has been pivoted, then runs the sandbox's own `sleep`
/// with the sandbox's own `/dev/null` as stdio (so it keeps no descriptor of the host either).
const HOLDER_SCRIPT: &str = "read _go; exec /bin/sleep infinity </dev/null >/dev/null 2>&1";

/// A file system the sandbox can make an image of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    /// `mkfs.ext4` (e2fsprogs).
    Ext4,
    /// `mkfs.xfs` (xfsprogs).
    Xfs,
}

impl FsType {
    /// The name `mount -t` and `/proc/self/mountinfo` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }

    /// The smallest image `mkfs` accepts: xfsprogs refuses file systems under 300 MB since
    /// 5.19 (and its log alone is 64 MiB, written out, so an xfs image costs ~65 MiB of disk).
    pub fn min_size_mib(self) -> u64 {
        match self {
            Self::Ext4 => 8,
            Self::Xfs => 300,
        }
    }

    fn mkfs(self) -> &'static str {
        match self {
            Self::Ext4 => "mkfs.ext4",
            Self::Xfs => "mkfs.xfs",
        }
    }

    fn mkfs_args(self) -> &'static [&'static str] {
        match self {
            // Initialise inode tables and journal now: a lazy-init thread writing behind the
            // test's back would blur what a freeze blocks.
            Self::Ext4 => &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
            Self::Xfs => &["-q", "-f"],
        }
    }

    fn package(self) -> &'static str {
        match self {
            Self::Ext4 => "e2fsprogs",
            Self::Xfs => "xfsprogs",
        }
    }
}

/// An image the caller asks for.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// Its file system.
    pub fs: FsType,
    /// Its size (the file is sparse: it costs what `mkfs` and the test write).
    pub size_mib: u64,
    /// Where it is mounted inside the sandbox (absolute, e.g. `/mnt/a`).
    pub mount_point: PathBuf,
}

impl ImageSpec {
    /// An ext4 image of `size_mib` MiB at `mount_point`.
    pub fn ext4(mount_point: impl Into<PathBuf>, size_mib: u64) -> Self {
        Self {
            fs: FsType::Ext4,
            size_mib,
            mount_point: mount_point.into(),
        }
    }

    /// An xfs image of `size_mib` MiB (at least [`FsType::min_size_mib`]) at `mount_point`.
    pub fn xfs(mount_point: impl Into<PathBuf>, size_mib: u64) -> Self {
        Self {
            fs: FsType::Xfs,
            size_mib,
            mount_point: mount_point.into(),
        }
    }
}

/// An image the sandbox made and mounted.
#[derive(Clone, Debug)]
pub struct SandboxImage {
    /// Its file system.
    pub fs: FsType,
    /// Where it is mounted inside the sandbox.
    pub mount_point: PathBuf,
    /// The image file, on the host (in the sandbox's temporary directory).
    pub image: PathBuf,
    /// The loop device it is mounted from (`/dev/loopN`; the node also exists inside).
    pub loop_device: PathBuf,
    /// The device number of the mounted file system (`st_dev` of its files).
    pub dev: (u32, u32),
}

/// Why a sandbox could not be built or torn down.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This machine or user cannot have a sandbox (not root, a tool missing, no loop devices).
    #[error("freeze sandbox unavailable: {0}")]
    Unavailable(String),
    /// A step of building it failed (what was built so far has been torn down).
    #[error("freeze sandbox setup, {step}: {detail}")]
    Setup {
        /// What the sandbox was doing.
        step: String,
        /// What went wrong, with the tool's output.
        detail: String,
    },
    /// Tearing it down left something behind.
    #[error("freeze sandbox cleanup left problems:\n  {}", .0.join("\n  "))]
    Cleanup(Vec<String>),
}

impl SandboxError {
    /// Whether the test should be skipped (as opposed to failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    fn setup(step: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Setup {
            step: step.into(),
            detail: detail.to_string(),
        }
    }
}

/// One line of a `/proc/PID/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number of the mounted file system.
    pub dev: (u32, u32),
    /// Mount point, relative to the reading process's root, unescaped.
    pub mount_point: String,
    /// Optional fields (`shared:N`, `master:N`, ...).
    pub optional: Vec<String>,
    /// File system type.
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, `tmpfs`, ...), unescaped.
    pub source: String,
}

/// Parses a `/proc/PID/mountinfo` text; lines that do not parse are left out.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let mut right = right.split(' ');
            Some(MountEntry {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: unescape_mountinfo(fields.get(4)?),
                optional: fields.get(6..)?.iter().map(|s| s.to_string()).collect(),
                fs_type: right.next()?.to_string(),
                source: unescape_mountinfo(right.next()?),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host PIDs of every process whose mount namespace is `namespace_id` (`mnt:[N]`, as
/// [`FreezeSandbox::namespace_id`] gives it).
pub fn processes_in_mount_namespace(namespace_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|link| link.as_os_str() == namespace_id)
        })
        .collect()
}

/// The loop devices bound to `image`, e.g. `["/dev/loop3"]`, from
/// `/sys/block/loop*/loop/backing_file` (unlike `losetup -j`, this still finds a device whose
/// image file has been deleted).
pub fn loop_devices_of(image: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut devices: Vec<String> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_str()?.to_string();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
            let backing = backing.ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            (Path::new(backing) == image).then(|| format!("/dev/{name}"))
        })
        .collect();
    devices.sort();
    devices
}

/// What to build: the `hvisd` binary to copy in, the images, extra tools.
pub struct SandboxBuilder {
    hvisd: Option<PathBuf>,
    images: Vec<ImageSpec>,
    tools: Vec<String>,
}

impl SandboxBuilder {
    /// Copies this `hvisd` binary in instead of [`crate::hvisd_bin`] (which the sandbox only
    /// builds once it knows it can run here).
    pub fn hvisd(mut self, path: impl Into<PathBuf>) -> Self {
        self.hvisd = Some(path.into());
        self
    }

    /// Adds an image.
    pub fn image(mut self, spec: ImageSpec) -> Self {
        self.images.push(spec);
        self
    }

    /// Also copies the host program `name` (found in `PATH`, with its libraries) into `/bin`.
    pub fn tool(mut self, name: &str) -> Self {
        self.tools.push(name.to_string());
        self
    }

    /// Builds the sandbox. [`SandboxError::Unavailable`] when not root, when a tool is missing
    /// or without loop devices; [`SandboxError::Setup`] when a step fails (after tearing down
    /// what it had built).
    pub fn build(self) -> Result<FreezeSandbox, SandboxError> {
        let euid = rustix::process::geteuid();
        if !euid.is_root() {
            return Err(SandboxError::Unavailable(format!(
                "not root (euid {}): namespaces, loop mounts and FIFREEZE need root",
                euid.as_raw()
            )));
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err(SandboxError::Unavailable(
                "no /dev/loop-control: this kernel has no loop devices".into(),
            ));
        }
        validate_specs(&self.images)?;
        for name in HOST_TOOLS {
            host_tool(name).map_err(SandboxError::Unavailable)?;
        }
        for spec in &self.images {
            host_tool(spec.fs.mkfs()).map_err(|_| {
                SandboxError::Unavailable(format!(
                    "`{}` not found in PATH (install {})",
                    spec.fs.mkfs(),
                    spec.fs.package()
                ))
            })?;
        }
        let mut programs = Vec::new();
        for name in REQUIRED_INSIDE {
            programs.push((
                name.to_string(),
                host_tool(name).map_err(SandboxError::Unavailable)?,
            ));
        }
        for name in OPTIONAL_INSIDE {
            if let Ok(path) = host_tool(name) {
                programs.push((name.to_string(), path));
            }
        }
        for name in &self.tools {
            programs.push((
                name.clone(),
                host_tool(name).map_err(SandboxError::Unavailable)?,
            ));
        }
        let hvisd = self.hvisd.unwrap_or_else(crate::hvisd_bin);
        if !hvisd.is_file() {
            return Err(SandboxError::setup(
                "hvisd binary",
                format!("{} is not a file", hvisd.display()),
            ));
        }
        programs.push(("hvisd".into(), hvisd));
        let dir = tempfile::Builder::new()
            .prefix("hvisd-freeze-sandbox.")
            .tempdir()
            .map_err(|e| SandboxError::setup("temporary directory", e))?;
        let sandbox = FreezeSandbox::start_holder(dir)?;
        sandbox.setup(&self.images, &programs)
    }

    /// [`Self::build`] for a test: `None` (with the reason printed) when the sandbox is
    /// unavailable here, unless [`REQUIRE_ENV`] is `1`; panics when setup fails.
    pub fn build_or_skip(self) -> Option<FreezeSandbox> {
        match self.build() {
            Ok(sandbox) => Some(sandbox),
            Err(e) if e.is_unavailable() && std::env::var(REQUIRE_ENV).as_deref() != Ok("1") => {
                eprintln!("skipping: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Mount points must be absolute, plain (no `..`), distinct, not `/` and not where the sandbox
/// mounts its own file systems.
fn validate_specs(specs: &[ImageSpec]) -> Result<(), SandboxError> {
    let mut seen = BTreeSet::new();
    for spec in specs {
        let mp = &spec.mount_point;
        let plain = mp.is_absolute()
            && mp.components().count() > 1
            && mp
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        let reserved = SANDBOX_MOUNTS
            .iter()
            .chain(&["/dev", "/.sandbox"])
            .any(|m| mp.starts_with(m));
        if !plain || reserved || !seen.insert(mp.clone()) {
            return Err(SandboxError::setup(
                "image spec",
                format!(
                    "mount point {} must be absolute, without `..`, not `/`, not under \
                     /proc, /dev, /tmp, /run or /.sandbox, and used once",
                    mp.display()
                ),
            ));
        }
        if spec.size_mib < spec.fs.min_size_mib() {
            return Err(SandboxError::setup(
                "image spec",
                format!(
                    "{} image at {} is {} MiB; {} needs at least {} MiB",
                    spec.fs.name(),
                    mp.display(),
                    spec.size_mib,
                    spec.fs.mkfs(),
                    spec.fs.min_size_mib()
                ),
            ));
        }
    }
    Ok(())
}

/// What the sandbox and the processes it started share: enough to thaw the images from the
/// host, which a process stuck on a frozen image needs before it can die.
struct Shared {
    holder_pid: u32,
    namespace_id: String,
    fsfreeze: PathBuf,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    /// The holder's root is the tmpfs: `/proc/HOLDER/root/MOUNT_POINT` names an image.
    pivoted: bool,
    /// The holder is being or has been killed: its PID may be reused, nothing may use it.
    closed: bool,
    mount_points: Vec<PathBuf>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `/proc/HOLDER/root` + `inside`.
    fn host_path(&self, inside: &Path) -> PathBuf {
        let relative = inside.strip_prefix("/").unwrap_or(inside);
        Path::new(&format!("/proc/{}/root", self.holder_pid)).join(relative)
    }

    /// Thaws every image; the problems it met (an image that stays frozen is one).
    fn thaw_all(&self) -> Vec<String> {
        let state = self.state();
        if !state.pivoted || state.closed {
            return Vec::new();
        }
        state
            .mount_points
            .iter()
            .filter_map(|mp| {
                thaw_path(&self.fsfreeze, &self.host_path(mp))
                    .err()
                    .map(|e| format!("thawing {}: {e}", mp.display()))
            })
            .collect()
    }

    /// Thaws one image; whether it was frozen.
    fn thaw(&self, mount_point: &Path) -> Result<bool, String> {
        let state = self.state();
        if !state.pivoted || state.closed {
            return Err("the sandbox is not running".into());
        }
        thaw_path(&self.fsfreeze, &self.host_path(mount_point)).map(|thaws| thaws > 0)
    }
}

/// `fsfreeze --unfreeze PATH` until the kernel answers `EINVAL` (not frozen); how many thaws
/// it took. Thawing is always safe, whatever `path` turns out to be.
fn thaw_path(fsfreeze: &Path, path: &Path) -> Result<u32, String> {
    for thaws in 0..4 {
        let mut cmd = Command::new(fsfreeze);
        cmd.arg("--unfreeze").arg(path);
        let out = run_tool(&mut cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("Invalid argument") {
                return Ok(thaws);
            }
            return Err(stderr.trim().to_string());
        }
    }
    Err("still frozen after 4 thaws".into())
}

/// A private mount and PID namespace with a tmpfs root, the `hvisd` binary and loop-mounted
/// images; see the [module documentation](self). Torn down by [`Self::close`] or on drop.
pub struct FreezeSandbox {
    shared: Arc<Shared>,
    holder: Option<Child>,
    dir: Option<tempfile::TempDir>,
    /// Image files made so far (also those that never got mounted), for the loop check.
    made: Vec<PathBuf>,
    images: Vec<SandboxImage>,
    next_log: AtomicU32,
}

impl FreezeSandbox {
    /// Starts describing a sandbox; it will hold a copy of [`crate::hvisd_bin`] unless
    /// [`SandboxBuilder::hvisd`] names another binary.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder {
            hvisd: None,
            images: Vec::new(),
            tools: Vec::new(),
        }
    }

    /// Step 1: the holder, and a wait until its namespaces are its own and private.
    fn start_holder(dir: tempfile::TempDir) -> Result<Self, SandboxError> {
        let tool = |name| host_tool(name).map_err(SandboxError::Unavailable);
        let fsfreeze = tool("fsfreeze")?;
        let mut holder = Command::new(tool("setpriv")?);
        inherit_only_stdio(&mut holder);
        let mut holder = holder
            .args(["--pdeathsig", "KILL", "--"])
            .arg(tool("unshare")?)
            .args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args(["--kill-child", "--"])
            .arg(tool("sh")?)
            .args(["-c", HOLDER_SCRIPT])
            .current_dir("/")
            .env_clear()
            .env("PATH", HOST_PATH)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| SandboxError::setup("starting the holder (setpriv unshare)", e))?;
        let holder_pid = holder.id();
        let namespace_id = match wait_for_private_namespace(&mut holder) {
            Ok(id) => id,
            Err(e) => {
                let _ = holder.kill();
                let output = holder.wait_with_output();
                let stderr = output
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                return Err(SandboxError::setup(
                    "waiting for the holder's namespaces",
                    format!("{e}; holder stderr: {}", stderr.trim()),
                ));
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                holder_pid,
                namespace_id,
                fsfreeze,
                state: Mutex::new(SharedState::default()),
            }),
            holder: Some(holder),
            dir: Some(dir),
            made: Vec::new(),
            images: Vec::new(),
            next_log: AtomicU32::new(0),
        })
    }

    /// Steps 2 to 4. On error the sandbox is dropped, which tears down what was built.
    fn setup(
        mut self,
        specs: &[ImageSpec],
        programs: &[(String, PathBuf)],
    ) -> Result<Self, SandboxError> {
        // Canonical, as the kernel reports loop devices' backing files.
        let dir = self
            .dir
            .as_ref()
            .map(|d| std::fs::canonicalize(d.path()))
            .ok_or_else(|| SandboxError::setup("setup", "no temporary directory"))?
            .map_err(|e| SandboxError::setup("temporary directory", e))?;
        let stage = dir.join("root");
        std::fs::create_dir(&stage).map_err(|e| SandboxError::setup("staging directory", e))?;

        // Step 2: the tmpfs root, mounted inside only.
        self.inside_tool(
            "mounting the tmpfs root",
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "mode=0755,size=1g",
                "hvisd-sandbox",
            ],
            Some(&stage),
        )?;
        let staged = self.shared.host_path(&stage);
        let host_dev = std::fs::metadata(&stage).map(|m| m.dev());
        let inside_dev = std::fs::metadata(&staged).map(|m| m.dev());
        let parent_dev = std::fs::metadata(&dir).map(|m| m.dev());
        match (host_dev, inside_dev, parent_dev) {
            (Ok(host), Ok(inside), Ok(parent)) if host == parent && inside != host => {}
            other => {
                return Err(SandboxError::setup(
                    "checking the tmpfs root",
                    format!(
                        "the tmpfs at {} must be visible inside only (dev host/inside/parent: \
                         {other:?})",
                        stage.display()
                    ),
                ));
            }
        }
        populate(&staged, programs, specs)
            .map_err(|e| SandboxError::setup("filling the tmpfs root", e))?;

        // Step 3: /proc (from inside the PID namespace), the tmpfs directories, the images.
        let proc_dir = stage.join("proc");
        self.inside_tool(
            "mounting /proc",
            &["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc"],
            Some(&proc_dir),
        )?;
        for (inside, options) in [
            ("tmp", "mode=1777,size=256m"),
            ("run", "mode=0755,size=256m"),
            ("dev/shm", "mode=1777,size=64m"),
        ] {
            self.inside_tool(
                &format!("mounting /{inside}"),
                &["mount", "-t", "tmpfs", "-o", options, "tmpfs"],
                Some(&stage.join(inside)),
            )?;
        }
        std::fs::create_dir(dir.join("images")).map_err(|e| SandboxError::setup("images", e))?;
        for (index, spec) in specs.iter().enumerate() {
            let image = dir
                .join("images")
                .join(format!("{index}.{}.img", spec.fs.name()));
            self.made.push(image.clone());
            make_image(spec, &image)?;
            let target = stage.join(
                spec.mount_point
                    .strip_prefix("/")
                    .unwrap_or(&spec.mount_point),
            );
            let mut args = vec!["mount", "-t", spec.fs.name(), "-o", "loop"];
            let image_arg = image.to_string_lossy().into_owned();
            args.push(&image_arg);
            self.inside_tool(
                &format!(
                    "mounting the {} image at {}",
                    spec.fs.name(),
                    spec.mount_point.display()
                ),
                &args,
                Some(&target),
            )?;
        }

        // Step 4: pivot, detach the old root, check, and let PID 1 leave the host's files.
        let old_root = stage.join(".old-root");
        let stage_arg = stage.to_string_lossy().into_owned();
        self.inside_tool("pivot_root", &["pivot_root", &stage_arg], Some(&old_root))?;
        self.shared.state().pivoted = true;
        self.inside_tool(
            "detaching the old root",
            &["/bin/umount", "-l", "/.old-root"],
            None,
        )?;
        std::fs::remove_dir(self.shared.host_path(Path::new("/.old-root")))
            .map_err(|e| SandboxError::setup("removing /.old-root", e))?;
        self.check_mounts(specs)?;
        self.shared.state().mount_points = specs.iter().map(|s| s.mount_point.clone()).collect();
        self.release_pid1()?;
        Ok(self)
    }

    /// Checks the holder's mount table is exactly ours (nothing of the old root left), records
    /// the images' loop devices and makes their nodes in `/dev`.
    fn check_mounts(&mut self, specs: &[ImageSpec]) -> Result<(), SandboxError> {
        let mounts = self.mounts();
        let root_is_tmpfs = mounts
            .iter()
            .any(|m| m.mount_point == "/" && m.fs_type == "tmpfs");
        let expected: BTreeSet<String> = SANDBOX_MOUNTS
            .iter()
            .map(|m| m.to_string())
            .chain(["/".to_string()])
            .chain(
                specs
                    .iter()
                    .map(|s| s.mount_point.to_string_lossy().into_owned()),
            )
            .collect();
        let found: BTreeSet<String> = mounts.iter().map(|m| m.mount_point.clone()).collect();
        if !root_is_tmpfs || found != expected || mounts.len() != expected.len() {
            return Err(SandboxError::setup(
                "checking the mount table after pivot_root",
                format!("expected a tmpfs / and {expected:?}, found {mounts:#?}"),
            ));
        }
        for (spec, image) in specs.iter().zip(&self.made) {
            let mount_point = spec.mount_point.to_string_lossy();
            let Some(entry) = mounts.iter().find(|m| m.mount_point == mount_point) else {
                continue;
            };
            if entry.fs_type != spec.fs.name() || !entry.source.starts_with("/dev/loop") {
                return Err(SandboxError::setup(
                    "checking the images",
                    format!("{mount_point} is {entry:?}"),
                ));
            }
            let node = self.shared.host_path(Path::new(&entry.source));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &node,
                rustix::fs::FileType::BlockDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                rustix::fs::makedev(entry.dev.0, entry.dev.1),
            )
            .map_err(|e| SandboxError::setup(format!("mknod {}", entry.source), e))?;
            self.images.push(SandboxImage {
                fs: spec.fs,
                mount_point: spec.mount_point.clone(),
                image: image.clone(),
                loop_device: PathBuf::from(&entry.source),
                dev: entry.dev,
            });
        }
        Ok(())
    }

    /// Lets the holder's PID 1 `exec` the sandbox's `/bin/sleep` and waits until it has.
    fn release_pid1(&mut self) -> Result<(), SandboxError> {
        let holder = self
            .holder
            .as_mut()
            .ok_or_else(|| SandboxError::setup("releasing PID 1", "no holder"))?;
        let pid1 = children_of(holder.id())
            .first()
            .copied()
            .ok_or_else(|| SandboxError::setup("releasing PID 1", "the holder has no child"))?;
        if let Some(mut stdin) = holder.stdin.take() {
            stdin
                .write_all(b"go\n")
                .map_err(|e| SandboxError::setup("releasing PID 1", e))?;
        }
        holder.stderr.take();
        let root_dev = std::fs::metadata(self.shared.host_path(Path::new("/")))
            .map(|m| m.dev())
            .map_err(|e| SandboxError::setup("releasing PID 1", e))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let exe_dev = std::fs::metadata(format!("/proc/{pid1}/exe")).map(|m| m.dev());
            if exe_dev.is_ok_and(|dev| dev == root_dev) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(SandboxError::setup(
            "releasing PID 1",
            format!("PID {pid1} does not run /bin/sleep of the sandbox"),
        ))
    }

    /// `nsenter` into the sandbox, after checking the holder is still in the namespace it built.
    fn enter(&self) -> Result<Command, String> {
        let pid = self.shared.holder_pid;
        if self.holder.is_none() {
            return Err("the sandbox has been closed".into());
        }
        let current = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map_err(|e| format!("holder {pid} is gone: {e}"))?;
        if current.as_os_str() != self.shared.namespace_id.as_str() {
            return Err(format!(
                "holder {pid} is in {} instead of {}",
                current.display(),
                self.shared.namespace_id
            ));
        }
        let mut cmd = Command::new(host_tool("setpriv")?);
        inherit_only_stdio(&mut cmd);
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(host_tool("nsenter")?)
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg(format!("--pid=/proc/{pid}/ns/pid_for_children"))
            .arg("--")
            .current_dir("/")
            .env_clear()
            .env("LC_ALL", "C");
        Ok(cmd)
    }

    /// Runs a tool inside (`args[0]` resolved in the sandbox's root: the host's before the
    /// pivot, the sandbox's after), with `path` as its last argument.
    fn inside_tool(
        &self,
        step: &str,
        args: &[&str],
        path: Option<&Path>,
    ) -> Result<Output, SandboxError> {
        let mut cmd = self.enter().map_err(|e| SandboxError::setup(step, e))?;
        let path_var = if self.shared.state().pivoted {
            INSIDE_PATH
        } else {
            HOST_PATH
        };
        cmd.env("PATH", path_var).args(args);
        if let Some(path) = path {
            cmd.arg(path);
        }
        run_tool(&mut cmd, TOOL_TIMEOUT)
            .and_then(succeeded)
            .map_err(|e| SandboxError::setup(step, e))
    }

    /// The holder's PID (the `unshare` process that keeps the namespaces).
    pub fn holder_pid(&self) -> u32 {
        self.shared.holder_pid
    }

    /// The mount namespace, as `/proc/PID/ns/mnt` names it (`mnt:[4026532237]`).
    pub fn namespace_id(&self) -> &str {
        &self.shared.namespace_id
    }

    /// The images, in the order they were asked for.
    pub fn images(&self) -> &[SandboxImage] {
        &self.images
    }

    /// The image mounted at `mount_point`; panics if there is none.
    pub fn image(&self, mount_point: &str) -> &SandboxImage {
        self.images
            .iter()
            .find(|i| i.mount_point == Path::new(mount_point))
            .unwrap_or_else(|| panic!("no image at {mount_point}"))
    }

    /// The host path of `inside` (`/proc/HOLDER/root/...`), to read or write files of the
    /// sandbox from the test. Absolute symbolic links met on the way resolve against the *host's*
    /// root: do not follow links the sandboxed processes made.
    pub fn host_path(&self, inside: impl AsRef<Path>) -> PathBuf {
        self.shared.host_path(inside.as_ref())
    }

    /// The sandbox's mount table, as its processes see it.
    pub fn mounts(&self) -> Vec<MountEntry> {
        let text = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.shared.holder_pid));
        parse_mountinfo(&text.unwrap_or_default())
    }

    /// Starts `hvisd ARGS` inside with `RUST_LOG=info` and `env` (applied after, so they win).
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> SandboxProcess {
        let mut full_env = vec![("RUST_LOG", "info")];
        full_env.extend_from_slice(env);
        self.spawn_program(HVISD, args, &full_env)
    }

    /// Starts `program ARGS` inside (a path inside, e.g. `/bin/sh`), with an environment of
    /// `PATH=/bin`, `HOME=/root`, `LC_ALL=C` and `env`; stdin is the sandbox's `/dev/null`,
    /// stdout and stderr go to files of the sandbox's tmpfs.
    pub fn spawn_program(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> SandboxProcess {
        self.try_spawn(program, args, env)
            .unwrap_or_else(|e| panic!("freeze sandbox: starting {program}: {e}"))
    }

    fn try_spawn(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<SandboxProcess, String> {
        let n = self.next_log.fetch_add(1, Ordering::Relaxed);
        // Every descriptor the program gets is of the sandbox's own file systems: none of them
        // leads to a file system of the host.
        let log = |suffix: &str| self.host_path(format!("{LOG_DIR}/{n}.{suffix}"));
        let open_log = |path: &Path| -> Result<(File, File), String> {
            let writer = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let reader = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok((writer, reader))
        };
        let (stdout, stdout_reader) = open_log(&log("stdout"))?;
        let (stderr, stderr_reader) = open_log(&log("stderr"))?;
        let stdin = File::open(self.host_path("/dev/null")).map_err(|e| e.to_string())?;
        let mut cmd = self.enter()?;
        cmd.env("PATH", INSIDE_PATH)
            .env("HOME", "/root")
            .envs(env.iter().copied())
            .arg(program)
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        let mut nsenter = cmd.spawn().map_err(|e| e.to_string())?;
        // nsenter forks to enter the PID namespace: the program is its only child.
        let start = Instant::now();
        let mut inner = None;
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(&pid) = children_of(nsenter.id()).first() {
                inner = pidfd_of_child(pid, nsenter.id()).map(|fd| (pid, fd));
                break;
            }
            if matches!(nsenter.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(SandboxProcess {
            nsenter: Some(nsenter),
            exit: None,
            inner,
            stdout: stdout_reader,
            stderr: stderr_reader,
            shared: Arc::clone(&self.shared),
            program: program.to_string(),
        })
    }

    /// Runs `sh -c CMD` inside and returns what it printed; killed after 60 s.
    pub fn run(&self, cmd: &str) -> Output {
        self.run_with_timeout(cmd, Duration::from_secs(60))
    }

    /// Runs `sh -c CMD` inside; killed after `timeout` (its stderr then says so).
    pub fn run_with_timeout(&self, cmd: &str, timeout: Duration) -> Output {
        self.run_program("/bin/sh", &["-c", cmd], timeout)
    }

    /// Runs `program ARGS` inside to completion; killed after `timeout`.
    fn run_program(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        let mut process = self.spawn_program(program, args, &[]);
        let mut stderr_note = String::new();
        let status = process.wait_exit(timeout).unwrap_or_else(|| {
            stderr_note = format!(
                "\n[freeze sandbox: `{program} {}` still ran after {timeout:?}; killed]",
                args.join(" ")
            );
            process.signal(Signal::KILL);
            process
                .wait_exit(Duration::from_secs(5))
                .unwrap_or_else(|| ExitStatus::from_raw(Signal::KILL.as_raw()))
        });
        Output {
            status,
            stdout: process.stdout().into_bytes(),
            stderr: (process.stderr() + &stderr_note).into_bytes(),
        }
    }

    /// Runs `sh -c CMD` inside, panics with its output unless it succeeds, returns its stdout.
    pub fn run_ok(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{cmd}` in the freeze sandbox: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Freezes the image at `mount_point` (`fsfreeze -f` inside); panics for anything that is
    /// not one of the sandbox's images, or if the kernel refuses.
    pub fn freeze(&self, mount_point: &str) {
        let image = self.image(mount_point);
        let dev = std::fs::metadata(self.host_path(&image.mount_point)).map(|m| m.dev());
        assert_eq!(
            dev.ok(),
            Some(rustix::fs::makedev(image.dev.0, image.dev.1)),
            "{mount_point} no longer holds the sandbox's image; not freezing it"
        );
        let mount_point = image.mount_point.to_string_lossy();
        let out = self.run_program(
            "/bin/fsfreeze",
            &["--freeze", &mount_point],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "fsfreeze --freeze {mount_point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Thaws the image at `mount_point` from the host; whether it was frozen. Panics if the
    /// kernel refuses for another reason than "not frozen".
    pub fn thaw(&self, mount_point: &str) -> bool {
        let image = self.image(mount_point);
        self.shared
            .thaw(&image.mount_point)
            .unwrap_or_else(|e| panic!("thawing {mount_point}: {e}"))
    }

    /// Tears the sandbox down (see the [module documentation](self)); the problems, if any.
    pub fn close(mut self) -> Result<(), SandboxError> {
        let problems = self.shutdown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Cleanup(problems))
        }
    }

    /// Thaw, unmount, kill the holder, wait for the loop devices, remove the files. Runs once.
    fn shutdown(&mut self) -> Vec<String> {
        let Some(holder) = self.holder.as_mut() else {
            return Vec::new();
        };
        // A holder that died on its own took the namespace with it: there is nothing left to
        // thaw or unmount through it, only loop devices to release (below).
        let holder_alive = matches!(holder.try_wait(), Ok(None));
        if !holder_alive {
            // Reaped: its PID may be reused from now on.
            self.shared.state().closed = true;
        }
        let mut problems = Vec::new();
        if holder_alive {
            problems.extend(self.shared.thaw_all());
        }
        if holder_alive && self.shared.state().pivoted {
            let mounted = self.mounts();
            for image in &self.images {
                let mp = image.mount_point.to_string_lossy().into_owned();
                // The test may have unmounted it itself.
                if !mounted
                    .iter()
                    .any(|m| m.mount_point == mp && m.dev == image.dev)
                {
                    continue;
                }
                if let Err(e) = self.unmount_inside(&mp) {
                    problems.push(format!("unmounting {mp}: {e}"));
                }
            }
        }
        // From here on the holder's PID must not be used: it is reaped below.
        self.shared.state().closed = true;
        if let Some(mut holder) = self.holder.take() {
            // Its --kill-child SIGKILLs PID 1, whose end SIGKILLs the rest of the PID namespace;
            // the mount namespace ends with its last process.
            let _ = holder.kill();
            let _ = holder.wait();
        }
        for image in &self.made {
            if let Err(e) = release_image(image) {
                problems.push(e);
            }
        }
        if let Some(dir) = self.dir.take() {
            if problems.is_empty() {
                if let Err(e) = dir.close() {
                    problems.push(format!("removing the temporary directory: {e}"));
                }
            } else {
                problems.push(format!("kept {} for inspection", dir.keep().display()));
            }
        }
        problems
    }

    /// `umount MP` inside; lazily if it is busy (a process still has a file open there).
    fn unmount_inside(&self, mount_point: &str) -> Result<(), String> {
        let umount = |lazy: bool| -> Result<Output, String> {
            let mut cmd = self.enter()?;
            cmd.env("PATH", INSIDE_PATH).arg("/bin/umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(mount_point);
            run_tool(&mut cmd, Duration::from_secs(20)).and_then(succeeded)
        };
        match umount(false) {
            Ok(_) => Ok(()),
            Err(busy) => umount(true)
                .map(|_| ())
                .map_err(|lazy| format!("{busy}; lazily: {lazy}")),
        }
    }
}

impl Drop for FreezeSandbox {
    fn drop(&mut self) {
        let problems = self.shutdown();
        if !problems.is_empty() {
            let bar = "!".repeat(78);
            eprintln!(
                "{bar}\nFREEZE SANDBOX (holder {}) COULD NOT CLEAN UP:\n  {}\n\
                 Check `losetup -a` and `findmnt`. A loop device still bound to an image may be \
                 a frozen file system: in a private mount namespace, mount it and run \
                 `fsfreeze -u` on it, then unmount it.\n{bar}",
                self.shared.holder_pid,
                problems.join("\n  ")
            );
        }
    }
}

/// Waits until no loop device is bound to `image` (a sandbox's image file); if one stays, which
/// is what a file system frozen when its namespace died does (the frozen super block keeps its
/// device open), mounts that device in a throw-away private mount namespace, checks it is still
/// bound to `image`, thaws and unmounts it, and waits again. The guard does this on its own; a
/// test that killed a process owning a sandbox can call it for the images it left.
pub fn release_image(image: &Path) -> Result<(), String> {
    let wait = |limit: Duration| {
        let start = Instant::now();
        loop {
            let devices = loop_devices_of(image);
            if devices.is_empty() || start.elapsed() > limit {
                return devices;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Unmounted images lose their device within milliseconds of their namespace's end.
    let devices = wait(Duration::from_secs(3));
    if devices.is_empty() {
        return Ok(());
    }
    let mut notes = Vec::new();
    for device in &devices {
        match thaw_orphan(device, image) {
            Ok(()) => notes.push(format!("thawed {device} through a fresh mount")),
            Err(e) => notes.push(format!("recovering {device}: {e}")),
        }
    }
    let left = wait(Duration::from_secs(5));
    if left.is_empty() {
        return Ok(());
    }
    Err(format!(
        "loop device(s) {left:?} still bound to {} ({})",
        image.display(),
        notes.join("; ")
    ))
}

/// Mounts `device` in a private mount namespace of its own and, if it is still bound to
/// `image` (not reused by someone else since), thaws it; then unmounts it.
fn thaw_orphan(device: &str, image: &Path) -> Result<(), String> {
    let scratch = tempfile::Builder::new()
        .prefix("hvisd-freeze-sandbox-recover.")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let script = r#"mount "$1" "$2" || exit 1
        backing=$(cat "/sys/block/${1#/dev/}/loop/backing_file")
        if [ "${backing% (deleted)}" = "$3" ]; then fsfreeze --unfreeze "$2"; fi
        umount "$2""#;
    let mut cmd = Command::new(host_tool("unshare")?);
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(host_tool("sh")?)
        .args(["-c", script, "sh", device])
        .arg(scratch.path())
        .arg(image)
        .env_clear()
        .env("PATH", HOST_PATH)
        .env("LC_ALL", "C");
    run_tool(&mut cmd, Duration::from_secs(20))
        .and_then(succeeded)
        .map(|_| ())
}

/// A process started inside the sandbox by [`FreezeSandbox::spawn`] or
/// [`FreezeSandbox::spawn_program`]. Dropping it SIGKILLs it and reaps it; a process stuck on a
/// frozen image cannot die until the image is thawed, so after 2 s the drop thaws the sandbox's
/// images (and says so).
pub struct SandboxProcess {
    /// The `nsenter` that started the program (our child); it exits as the program does.
    nsenter: Option<Child>,
    exit: Option<ExitStatus>,
    /// The program's host PID and a pidfd for it (signals never reach a reused PID).
    inner: Option<(u32, OwnedFd)>,
    stdout: File,
    stderr: File,
    shared: Arc<Shared>,
    program: String,
}

impl SandboxProcess {
    /// The program's PID on the host (0 if it ended before it could be seen).
    pub fn pid(&self) -> u32 {
        self.inner.as_ref().map(|(pid, _)| *pid).unwrap_or(0)
    }

    /// What it has written to stdout so far.
    pub fn stdout(&self) -> String {
        read_all(&self.stdout)
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        read_all(&self.stderr)
    }

    /// Waits until stderr contains `needle`, or panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let what = format!("the log of {}", self.program);
        crate::wait_for_text(&what, || self.stderr(), needle, timeout);
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// Sends `signal` to the program (through its pidfd: a no-op once it has ended).
    pub fn signal(&self, signal: Signal) {
        if let Some((_, pidfd)) = &self.inner {
            let _ = rustix::process::pidfd_send_signal(pidfd, signal);
        }
    }

    /// Waits up to `timeout` for it to end; how it ended (`None`: still running). A program
    /// killed by a signal shows as killed by that signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        let nsenter = self.nsenter.as_mut()?;
        let start = Instant::now();
        loop {
            match nsenter.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    return Some(status);
                }
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// Its `/proc/PID/mountinfo` (paths as it sees them), while it runs.
    pub fn mountinfo(&self) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).ok()
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        self.signal(Signal::KILL);
        if self.wait_exit(Duration::from_secs(2)).is_some() {
            return;
        }
        eprintln!(
            "freeze sandbox: {} (pid {}) still runs 2 s after SIGKILL, probably blocked on a \
             frozen image: thawing the sandbox's images",
            self.program,
            self.pid()
        );
        for problem in self.shared.thaw_all() {
            eprintln!("freeze sandbox: {problem}");
        }
        if self.wait_exit(Duration::from_secs(5)).is_some() {
            return;
        }
        // Leave it to the sandbox: ending the holder ends every process of the namespace.
        if let Some(nsenter) = self.nsenter.as_mut() {
            let _ = nsenter.kill();
        }
        if self.wait_exit(Duration::from_secs(1)).is_none() {
            eprintln!(
                "freeze sandbox: {} (pid {}) did not end; the sandbox's close will end it",
                self.program,
                self.pid()
            );
        }
    }
}

/// The whole of a log file, read from offset 0 (the writer's offset is not ours).
fn read_all(file: &File) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match file.read_at(&mut buf, bytes.len() as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Finds `name` in the host's `PATH` (and the sbin directories, which a non-login root may
/// lack).
fn host_tool(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(HOST_PATH.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
        .ok_or_else(|| format!("`{name}` not found in PATH"))
}

/// The direct children of `pid` (`/proc/PID/task/PID/children`).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A pidfd for `pid`, checked (after opening it) to be a child of `parent`, so that it cannot
/// name a process that reused the PID.
fn pidfd_of_child(pid: u32, parent: u32) -> Option<OwnedFd> {
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let ppid: u32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    (ppid == parent).then_some(fd)
}

/// Waits until the holder has its own mount and PID namespaces, has forked PID 1, and no mount
/// in its namespace is shared (so nothing mounted inside can propagate to the host).
fn wait_for_private_namespace(holder: &mut Child) -> Result<String, String> {
    let pid = holder.id();
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    let own_mnt = ns("self", "mnt").ok_or("cannot read /proc/self/ns/mnt")?;
    let own_pid = ns("self", "pid_for_children").ok_or("cannot read /proc/self/ns/pid")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(status)) = holder.try_wait() {
            return Err(format!("the holder exited: {status}"));
        }
        let id = pid.to_string();
        let mnt = ns(&id, "mnt");
        let pid_ns = ns(&id, "pid_for_children");
        let private = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).is_ok_and(|text| {
            parse_mountinfo(&text)
                .iter()
                .all(|m| !m.optional.iter().any(|o| o.starts_with("shared:")))
        });
        if let (Some(mnt), Some(pid_ns)) = (mnt, pid_ns)
            && mnt != own_mnt
            && pid_ns != own_pid
            && private
            && !children_of(pid).is_empty()
        {
            return Ok(mnt.to_string_lossy().into_owned());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err("the holder did not get private namespaces within 10 s".into())
}

/// Makes the sandbox's directories, copies the programs with their libraries, writes `/etc`
/// and makes the `/dev` nodes, all under `root` (the tmpfs, seen from the host).
fn populate(
    root: &Path,
    programs: &[(String, PathBuf)],
    specs: &[ImageSpec],
) -> Result<(), String> {
    let at = |inside: &str| root.join(inside.trim_start_matches('/'));
    let mkdir = |inside: &str| {
        std::fs::create_dir_all(at(inside)).map_err(|e| format!("mkdir {inside}: {e}"))
    };
    for dir in [
        "/bin",
        "/usr",
        "/etc",
        "/dev/shm",
        "/proc",
        "/tmp",
        "/run",
        "/root",
        LOG_DIR,
        "/.old-root",
    ] {
        mkdir(dir)?;
    }
    for spec in specs {
        mkdir(&spec.mount_point.to_string_lossy())?;
    }
    // Relative links, so that they resolve inside the tmpfs from the host as well.
    for (link, target) in [
        ("/usr/bin", "../bin"),
        ("/usr/sbin", "../bin"),
        ("/sbin", "bin"),
    ] {
        std::os::unix::fs::symlink(target, at(link)).map_err(|e| format!("ln {link}: {e}"))?;
    }
    let mut libraries = BTreeSet::new();
    for (name, host) in programs {
        let target = at(&format!("/bin/{name}"));
        // Plain 0755: no set-user-ID bit (mount and umount have it on the host).
        std::fs::copy(host, &target)
            .and_then(|_| std::fs::set_permissions(&target, PermissionsExt::from_mode(0o755)))
            .map_err(|e| format!("copying {}: {e}", host.display()))?;
        libraries.extend(shared_libraries(host)?);
    }
    for library in &libraries {
        let target = at(&library.to_string_lossy());
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        std::fs::copy(library, &target)
            .map_err(|e| format!("copying {}: {e}", library.display()))?;
    }
    std::fs::write(
        at("/etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .map_err(|e| format!("/etc/passwd: {e}"))?;
    std::fs::write(at("/etc/group"), "root:x:0:\nnogroup:x:65534:\n")
        .map_err(|e| format!("/etc/group: {e}"))?;
    for (name, minor) in [
        ("null", 3),
        ("zero", 5),
        ("full", 7),
        ("random", 8),
        ("urandom", 9),
    ] {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            at(&format!("/dev/{name}")),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, minor),
        )
        .map_err(|e| format!("mknod /dev/{name}: {e}"))?;
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, at(link)).map_err(|e| format!("ln {link}: {e}"))?;
    }
    Ok(())
}

/// The shared libraries `binary` loads, the dynamic loader included, as `ldd` resolves them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let mut cmd = Command::new(host_tool("ldd")?);
    cmd.arg(binary).env_clear().env("LC_ALL", "C");
    let out = run_tool(&mut cmd, TOOL_TIMEOUT)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(format!("ldd {}: {}", binary.display(), text.trim()));
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/.../libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
        // `linux-vdso.so.1 (0x...)` (in the kernel, nothing to copy), `libx.so => not found`.
        let resolved = line.split_once(" => ").map_or(line, |(_, right)| right);
        if resolved.starts_with("not found") {
            return Err(format!("ldd {}: {line}", binary.display()));
        }
        let path = resolved.split(" (").next().unwrap_or_default();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Makes the sparse image file and its file system.
fn make_image(spec: &ImageSpec, image: &Path) -> Result<(), SandboxError> {
    let step = format!("making the {} image {}", spec.fs.name(), image.display());
    File::create(image)
        .and_then(|f| f.set_len(spec.size_mib << 20))
        .map_err(|e| SandboxError::setup(&step, e))?;
    let mkfs = host_tool(spec.fs.mkfs()).map_err(SandboxError::Unavailable)?;
    let mut cmd = Command::new(mkfs);
    cmd.args(spec.fs.mkfs_args())
        .arg(image)
        .env_clear()
        .env("PATH", HOST_PATH)
        .env("LC_ALL", "C");
    run_tool(&mut cmd, TOOL_TIMEOUT)
        .and_then(succeeded)
        .map(|_| ())
        .map_err(|e| SandboxError::setup(&step, e))
}

/// Runs a tool to completion (stdin from `/dev/null`, output captured), killing it through a
/// pidfd after `timeout`.
fn run_tool(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!(
        "`{}`",
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    inherit_only_stdio(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let pidfd = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => {
            if let Some(pidfd) = &pidfd {
                let _ = rustix::process::pidfd_send_signal(pidfd, Signal::KILL);
            }
            let _ = rx.recv_timeout(Duration::from_secs(2));
            Err(format!("{what}: no answer within {timeout:?}, killed"))
        }
    }
}

/// The output of a tool that succeeded, or an error with what it printed.
fn succeeded(output: Output) -> Result<Output, String> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = concat!(
            "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 shared:2 - ext4 /dev/loop3 rw\n",
            "80 52 0:40 / / rw,relatime - tmpfs hvisd-sandbox rw,size=1048576k\n",
            "garbage\n",
        );
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].dev, (98, 0));
        assert_eq!(mounts[0].mount_point, "/mnt/with space");
        assert_eq!(mounts[0].optional, ["master:1", "shared:2"]);
        assert_eq!(mounts[0].fs_type, "ext4");
        assert_eq!(mounts[0].source, "/dev/loop3");
        assert_eq!(mounts[1].mount_point, "/");
        assert!(mounts[1].optional.is_empty());
    }

    #[test]
    fn mount_points_must_be_plain_absolute_and_not_the_sandboxes_own() {
        for bad in [
            "relative",
            "/",
            "/mnt/../etc",
            "/proc/x",
            "/tmp/a",
            "/run",
            "/dev/x",
        ] {
            assert!(
                validate_specs(&[ImageSpec::ext4(bad, 16)]).is_err(),
                "{bad} accepted"
            );
        }
        assert!(validate_specs(&[ImageSpec::ext4("/mnt/a", 16)]).is_ok());
        assert!(
            validate_specs(&[ImageSpec::ext4("/mnt/a", 16), ImageSpec::ext4("/mnt/a", 16)])
                .is_err()
        );
        assert!(validate_specs(&[ImageSpec::xfs("/mnt/b", 64)]).is_err());
    }
}
