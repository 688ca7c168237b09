//! Freezing and thawing file systems: the mechanism under a VSS backup. What to freeze and in
//! which order is decided elsewhere (the plan); this module makes sure of four things:
//!
//! - **it freezes what was planned**: each mount point is opened (no symlink as the last
//!   component) and its mount id (`statx`) compared with the one the plan was made from, so a
//!   directory swapped by a local user between plan and freeze is refused, not frozen;
//! - **a failure leaves nothing frozen**: if one `FIFREEZE` fails (other than `EBUSY`, a file
//!   system someone else froze, which is left to them), everything frozen so far is thawed;
//! - **nothing stays frozen**: a watchdog thread, armed before the first `FIFREEZE`, thaws
//!   everything when the window passes its limit, whatever the host, the hooks, the workers or
//!   the async runtime do; it is a plain thread holding its own descriptors;
//! - **a killed daemon is recovered**: the set about to be frozen is journaled on a tmpfs
//!   (`/run`) before the first `FIFREEZE`; [`recover`] at start thaws whatever a killed
//!   hvisd left frozen.
//!
//! `FIFREEZE` and `FITHAW` themselves are in `hvisd-sys` (the crate that holds `unsafe`); a
//! [`FreezeBackend`] lets `hvisd sim` run the same code with a dry-run backend when it may not
//! freeze anything.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// Performs the freeze and thaw of one file system, given a descriptor of its mount point.
pub trait FreezeBackend: Send + Sync + 'static {
    /// `FIFREEZE`.
    fn freeze(&self, mount_point: BorrowedFd<'_>) -> Result<(), Errno>;
    /// `FITHAW`.
    fn thaw(&self, mount_point: BorrowedFd<'_>) -> Result<(), Errno>;
    /// `"fifreeze"` or `"dry-run"`, for logs and reports.
    fn name(&self) -> &'static str;
}

/// The real thing: `FIFREEZE`/`FITHAW`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifreeze;

impl FreezeBackend for Fifreeze {
    fn freeze(&self, mount_point: BorrowedFd<'_>) -> Result<(), Errno> {
        hvisd_sys::freeze::freeze(mount_point)
    }
    fn thaw(&self, mount_point: BorrowedFd<'_>) -> Result<(), Errno> {
        hvisd_sys::freeze::thaw(mount_point)
    }
    fn name(&self) -> &'static str {
        "fifreeze"
    }
}

/// Opens and checks everything, freezes nothing (`hvisd sim` without root, tests of the logic).
#[derive(Debug, Default, Clone, Copy)]
pub struct DryRun;

impl FreezeBackend for DryRun {
    fn freeze(&self, _: BorrowedFd<'_>) -> Result<(), Errno> {
        Ok(())
    }
    fn thaw(&self, _: BorrowedFd<'_>) -> Result<(), Errno> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "dry-run"
    }
}

/// One file system to freeze, as the plan names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Its mount point.
    #[serde(with = "path_bytes")]
    pub mount_point: PathBuf,
    /// The mount id the plan saw (`/proc/self/mountinfo`, `statx`'s `stx_mnt_id`).
    pub mount_id: u64,
}

/// Why a freeze did not happen (nothing is left frozen in any case).
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// File systems are frozen already (a FREEZE without a THAW in between).
    #[error("file systems are already frozen ({0} of them); thaw first")]
    AlreadyFrozen(usize),
    /// A mount point could not be opened.
    #[error("opening mount point {path}: {source}")]
    Open {
        /// The mount point.
        path: String,
        /// Why.
        source: Errno,
    },
    /// The directory at the mount point is not the mount the plan saw.
    #[error("{path} is no longer the mount the plan saw (mount id {expected}, now {found})")]
    Moved {
        /// The mount point.
        path: String,
        /// The planned mount id.
        expected: u64,
        /// What is there now.
        found: u64,
    },
    /// The journal could not be written: nothing was frozen (a freeze that could not be undone
    /// after a crash is not started).
    #[error("writing the freeze journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `FIFREEZE` failed; what was frozen before it was thawed again.
    #[error("freezing {path}: {source}")]
    Freeze {
        /// The mount point.
        path: String,
        /// The error.
        source: Errno,
    },
    /// The watchdog fired while the freeze was still in progress; everything was thawed.
    #[error("the freeze took longer than the frozen-window limit of {0:?}; everything was thawed")]
    Watchdog(Duration),
}

/// What a freeze did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FreezeReport {
    /// The mount points frozen, in order.
    #[serde(serialize_with = "paths_lossy")]
    pub frozen: Vec<PathBuf>,
    /// Mount points left alone because someone else had frozen them (`EBUSY`).
    #[serde(serialize_with = "paths_lossy")]
    pub already_frozen: Vec<PathBuf>,
    /// Time spent in `FIFREEZE` calls, microseconds.
    pub freeze_us: u64,
    /// The backend (`fifreeze` or `dry-run`).
    pub backend: &'static str,
}

/// What a thaw did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThawReport {
    /// The mount points thawed, in order.
    #[serde(serialize_with = "paths_lossy")]
    pub thawed: Vec<PathBuf>,
    /// Mount points that could not be thawed, and why (left in the journal for the next start).
    pub failed: Vec<(String, String)>,
    /// From the first `FIFREEZE` to the last `FITHAW` (or the watchdog's), microseconds.
    pub window_us: u64,
    /// The watchdog had thawed everything already.
    pub watchdog_fired: bool,
}

mod path_bytes {
    use super::*;
    pub fn serialize<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(p.as_os_str().as_bytes())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        Ok(PathBuf::from(OsString::from_vec(bytes)))
    }
}

fn paths_lossy<S: serde::Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(paths.iter().map(|p| p.to_string_lossy()))
}

/// The journal of a freeze in progress.
#[derive(Debug, Serialize, Deserialize)]
struct JournalFile {
    /// Format version.
    version: u32,
    /// The daemon that wrote it.
    pid: u32,
    /// What it was about to freeze, in order.
    targets: Vec<Target>,
}

/// Opens `target`'s mount point and checks it is the planned mount.
fn open_target(target: &Target) -> Result<OwnedFd, FreezeError> {
    let path = || target.mount_point.to_string_lossy().into_owned();
    let fd = rustix::fs::open(
        &target.mount_point,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|source| FreezeError::Open {
        path: path(),
        source,
    })?;
    let stx = rustix::fs::statx(
        &fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|source| FreezeError::Open {
        path: path(),
        source,
    })?;
    if stx.stx_mnt_id != target.mount_id {
        return Err(FreezeError::Moved {
            path: path(),
            expected: target.mount_id,
            found: stx.stx_mnt_id,
        });
    }
    Ok(fd)
}

/// Commands to the watchdog thread.
enum Watch {
    /// Thaw everything at this instant unless disarmed first.
    Arm(Instant),
    /// A file system was frozen: thaw it if the watchdog fires.
    Frozen(PathBuf, OwnedFd),
    /// Stand down; answers whether it had fired.
    Disarm(mpsc::Sender<bool>),
}

/// Called (on the watchdog thread) after the watchdog thawed everything.
pub type OnWatchdog = Arc<dyn Fn(&[PathBuf]) + Send + Sync>;

/// The frozen file systems of this daemon and the watchdog over them.
pub struct Freezer {
    backend: Arc<dyn FreezeBackend>,
    journal: PathBuf,
    max_window: Duration,
    state: Mutex<State>,
    watch: mpsc::Sender<Watch>,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    /// Frozen by us, in freeze order.
    frozen: Vec<(PathBuf, OwnedFd)>,
    since: Option<Instant>,
}

impl Freezer {
    /// A freezer using `backend`, journaling to `journal` (on a tmpfs), whose watchdog thaws
    /// everything `max_window` after the first `FIFREEZE` and then calls `on_watchdog`.
    pub fn new(
        backend: Arc<dyn FreezeBackend>,
        journal: PathBuf,
        max_window: Duration,
        on_watchdog: OnWatchdog,
    ) -> std::io::Result<Freezer> {
        let (watch, rx) = mpsc::channel();
        let fired = Arc::new(AtomicBool::new(false));
        let thread_fired = fired.clone();
        let thread_backend = backend.clone();
        let thread_journal = journal.clone();
        std::thread::Builder::new()
            .name("hvisd-vss-watchdog".into())
            .spawn(move || {
                watchdog(
                    rx,
                    thread_backend,
                    thread_journal,
                    thread_fired,
                    on_watchdog,
                )
            })?;
        Ok(Freezer {
            backend,
            journal,
            max_window,
            state: Mutex::default(),
            watch,
            fired,
        })
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// The frozen-window limit.
    pub fn max_window(&self) -> Duration {
        self.max_window
    }

    /// How many file systems are frozen now.
    pub fn frozen_count(&self) -> usize {
        self.state().frozen.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Freezes `targets` in order (blocking: call it off the async workers). On any error
    /// nothing is left frozen.
    pub fn freeze(&self, targets: &[Target]) -> Result<FreezeReport, FreezeError> {
        let mut state = self.state();
        if !state.frozen.is_empty() {
            return Err(FreezeError::AlreadyFrozen(state.frozen.len()));
        }
        // Open and check everything before freezing anything.
        let mut opened = Vec::with_capacity(targets.len());
        for t in targets {
            opened.push((t.mount_point.clone(), open_target(t)?));
        }
        self.write_journal(targets)?;
        self.fired.store(false, Ordering::SeqCst);
        let start = Instant::now();
        let _ = self.watch.send(Watch::Arm(start + self.max_window));
        state.since = Some(start);
        let mut report = FreezeReport {
            backend: self.backend.name(),
            ..Default::default()
        };
        for (path, fd) in opened {
            if self.fired.load(Ordering::SeqCst) {
                drop(state);
                self.undo();
                return Err(FreezeError::Watchdog(self.max_window));
            }
            match self.backend.freeze(fd.as_fd()) {
                Ok(()) => {
                    if let Ok(dup) = rustix::io::fcntl_dupfd_cloexec(&fd, 0) {
                        let _ = self.watch.send(Watch::Frozen(path.clone(), dup));
                    }
                    report.frozen.push(path.clone());
                    state.frozen.push((path, fd));
                }
                // Frozen by someone else: theirs to thaw.
                Err(Errno::BUSY) => report.already_frozen.push(path),
                Err(source) => {
                    let path = path.to_string_lossy().into_owned();
                    drop(state);
                    self.undo();
                    return Err(FreezeError::Freeze { path, source });
                }
            }
        }
        report.freeze_us = start.elapsed().as_micros() as u64;
        if state.frozen.is_empty() {
            // Nothing of ours is frozen: no window to watch.
            self.disarm();
            state.since = None;
            let _ = std::fs::remove_file(&self.journal);
        }
        Ok(report)
    }

    /// Thaws everything frozen, in reverse order (blocking). `EINVAL` (not frozen: the watchdog
    /// or someone else thawed it) counts as thawed.
    pub fn thaw(&self) -> ThawReport {
        let watchdog_fired = self.disarm();
        let mut state = self.state();
        let window = state.since.take().map(|t| t.elapsed()).unwrap_or_default();
        let mut report = ThawReport {
            watchdog_fired,
            window_us: window.as_micros() as u64,
            ..Default::default()
        };
        for (path, fd) in state.frozen.drain(..).rev() {
            match self.backend.thaw(fd.as_fd()) {
                Ok(()) | Err(Errno::INVAL) => report.thawed.push(path),
                Err(e) => report
                    .failed
                    .push((path.to_string_lossy().into_owned(), e.to_string())),
            }
        }
        if report.failed.is_empty() {
            let _ = std::fs::remove_file(&self.journal);
        }
        report
    }

    /// Whether the watchdog thawed everything since the last freeze began.
    pub fn watchdog_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Thaws what this freeze froze so far, after a failure.
    fn undo(&self) {
        let report = self.thaw();
        for (path, why) in &report.failed {
            tracing::error!(mount = %path, "could not thaw after a failed freeze: {why}");
        }
    }

    fn disarm(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.watch.send(Watch::Disarm(tx)).is_err() {
            return self.fired.load(Ordering::SeqCst);
        }
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| self.fired.load(Ordering::SeqCst))
    }

    fn write_journal(&self, targets: &[Target]) -> Result<(), FreezeError> {
        let err = |source| FreezeError::Journal {
            path: self.journal.to_string_lossy().into_owned(),
            source,
        };
        if let Some(dir) = self.journal.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let text = serde_json::to_vec(&JournalFile {
            version: 1,
            pid: std::process::id(),
            targets: targets.to_vec(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.journal.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &self.journal).map_err(err)
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        if self.frozen_count() > 0 {
            let report = self.thaw();
            tracing::warn!(
                thawed = report.thawed.len(),
                "the freezer was dropped with file systems frozen; thawed them"
            );
        }
    }
}

/// The watchdog thread: sleeps until armed, then until the deadline or a disarm.
fn watchdog(
    rx: mpsc::Receiver<Watch>,
    backend: Arc<dyn FreezeBackend>,
    journal: PathBuf,
    fired: Arc<AtomicBool>,
    on_watchdog: OnWatchdog,
) {
    let mut deadline: Option<Instant> = None;
    let mut frozen: Vec<(PathBuf, OwnedFd)> = Vec::new();
    loop {
        let cmd = match deadline {
            None => match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            },
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The freezer is gone with file systems frozen: thaw them now.
                    thaw_all(&*backend, &mut frozen);
                    return;
                }
            },
        };
        match cmd {
            Some(Watch::Arm(at)) => {
                deadline = Some(at);
                frozen.clear();
            }
            Some(Watch::Frozen(path, fd)) => frozen.push((path, fd)),
            Some(Watch::Disarm(answer)) => {
                deadline = None;
                frozen.clear();
                let _ = answer.send(fired.load(Ordering::SeqCst));
            }
            None => {
                // The window is over.
                deadline = None;
                fired.store(true, Ordering::SeqCst);
                let thawed = thaw_all(&*backend, &mut frozen);
                let _ = std::fs::remove_file(&journal);
                tracing::error!(
                    mounts = thawed.len(),
                    "VSS watchdog: the frozen window passed its limit; thawed everything"
                );
                on_watchdog(&thawed);
            }
        }
    }
}

fn thaw_all(backend: &dyn FreezeBackend, frozen: &mut Vec<(PathBuf, OwnedFd)>) -> Vec<PathBuf> {
    let mut thawed = Vec::new();
    for (path, fd) in frozen.drain(..).rev() {
        match backend.thaw(fd.as_fd()) {
            Ok(()) | Err(Errno::INVAL) => thawed.push(path),
            Err(e) => {
                tracing::error!(mount = %path.display(), "VSS watchdog: thaw failed: {e}");
            }
        }
    }
    thawed
}

/// What [`recover`] found.
#[derive(Debug, Default, Serialize)]
pub struct Recovery {
    /// The daemon that left the journal.
    pub pid: Option<u32>,
    /// Mount points thawed (or found not frozen).
    #[serde(serialize_with = "paths_lossy")]
    pub thawed: Vec<PathBuf>,
    /// Mount points that could not be checked or thawed, and why.
    pub failed: Vec<(String, String)>,
}

/// At start: thaws whatever a killed hvisd left frozen, from its journal, and removes the
/// journal. A mount point that is no longer the journaled mount is left alone (and reported).
pub fn recover(backend: &dyn FreezeBackend, journal: &Path) -> Option<Recovery> {
    let bytes = std::fs::read(journal).ok()?;
    let mut recovery = Recovery::default();
    match serde_json::from_slice::<JournalFile>(&bytes) {
        Ok(file) => {
            recovery.pid = Some(file.pid);
            for t in file.targets.iter().rev() {
                match open_target(t) {
                    Ok(fd) => match backend.thaw(fd.as_fd()) {
                        Ok(()) | Err(Errno::INVAL) => recovery.thawed.push(t.mount_point.clone()),
                        Err(e) => recovery
                            .failed
                            .push((t.mount_point.to_string_lossy().into_owned(), e.to_string())),
                    },
                    Err(e) => recovery
                        .failed
                        .push((t.mount_point.to_string_lossy().into_owned(), e.to_string())),
                }
            }
        }
        Err(e) => recovery.failed.push((
            journal.to_string_lossy().into_owned(),
            format!("unreadable journal: {e}"),
        )),
    }
    let _ = std::fs::remove_file(journal);
    Some(recovery)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Records calls; fails `FIFREEZE` on the mount point named `fail`.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail: Option<PathBuf>,
        frozen_now: AtomicUsize,
    }

    impl FreezeBackend for Arc<Recorder> {
        fn freeze(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
            let path = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ))
            .unwrap_or_default();
            if self.fail.as_deref() == Some(path.as_path()) {
                return Err(Errno::IO);
            }
            self.frozen_now.fetch_add(1, Ordering::SeqCst);
            self.calls
                .lock()
                .unwrap()
                .push(format!("freeze {}", path.display()));
            Ok(())
        }
        fn thaw(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
            let path = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ))
            .unwrap_or_default();
            self.frozen_now.fetch_sub(1, Ordering::SeqCst);
            self.calls
                .lock()
                .unwrap()
                .push(format!("thaw {}", path.display()));
            Ok(())
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
    }

    fn target(path: &Path) -> Target {
        let stx = rustix::fs::statx(
            rustix::fs::CWD,
            path,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::MNT_ID,
        )
        .unwrap();
        Target {
            mount_point: path.to_owned(),
            mount_id: stx.stx_mnt_id,
        }
    }

    fn dirs(n: usize) -> (tempfile::TempDir, Vec<Target>) {
        let d = tempfile::tempdir().unwrap();
        let targets = (0..n)
            .map(|i| {
                let p = d.path().join(format!("m{i}"));
                std::fs::create_dir(&p).unwrap();
                target(&p)
            })
            .collect();
        (d, targets)
    }

    fn freezer(rec: &Arc<Recorder>, journal: PathBuf, window: Duration) -> Freezer {
        Freezer::new(Arc::new(rec.clone()), journal, window, Arc::new(|_| {})).unwrap()
    }

    #[test]
    fn freezes_in_order_journals_first_and_thaws_in_reverse() {
        let (d, targets) = dirs(3);
        let rec = Arc::new(Recorder::default());
        let journal = d.path().join("run/vss.json");
        let f = freezer(&rec, journal.clone(), Duration::from_secs(60));
        let report = f.freeze(&targets).unwrap();
        assert_eq!(report.frozen.len(), 3);
        assert!(journal.exists(), "journaled while frozen");
        assert!(matches!(
            f.freeze(&targets),
            Err(FreezeError::AlreadyFrozen(3))
        ));
        let thawed = f.thaw();
        assert!(thawed.failed.is_empty() && !thawed.watchdog_fired);
        assert!(!journal.exists());
        let calls = rec.calls.lock().unwrap().clone();
        let names: Vec<String> = calls
            .iter()
            .map(|c| c.rsplit('/').next().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["m0", "m1", "m2", "m2", "m1", "m0"]);
        assert!(calls[0].starts_with("freeze") && calls[3].starts_with("thaw"));
    }

    #[test]
    fn one_failure_thaws_what_was_frozen() {
        let (d, targets) = dirs(3);
        let rec = Arc::new(Recorder {
            fail: Some(targets[2].mount_point.clone()),
            ..Default::default()
        });
        let f = freezer(&rec, d.path().join("vss.json"), Duration::from_secs(60));
        let e = f.freeze(&targets).unwrap_err();
        assert!(matches!(e, FreezeError::Freeze { .. }), "{e}");
        assert_eq!(rec.frozen_now.load(Ordering::SeqCst), 0);
        assert_eq!(f.frozen_count(), 0);
        assert!(!d.path().join("vss.json").exists());
    }

    #[test]
    fn a_swapped_mount_point_is_refused_before_anything_is_frozen() {
        let (d, mut targets) = dirs(2);
        targets[1].mount_id += 1;
        let rec = Arc::new(Recorder::default());
        let f = freezer(&rec, d.path().join("vss.json"), Duration::from_secs(60));
        assert!(matches!(f.freeze(&targets), Err(FreezeError::Moved { .. })));
        // A symlink in place of the mount point is refused too.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&targets[0].mount_point, &link).unwrap();
        let t = Target {
            mount_point: link,
            mount_id: targets[0].mount_id,
        };
        assert!(matches!(f.freeze(&[t]), Err(FreezeError::Open { .. })));
        assert!(rec.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn the_watchdog_thaws_everything_when_the_window_passes() {
        let (d, targets) = dirs(2);
        let rec = Arc::new(Recorder::default());
        let fired = Arc::new(Mutex::new(Vec::new()));
        let seen = fired.clone();
        let f = Freezer::new(
            Arc::new(rec.clone()),
            d.path().join("vss.json"),
            Duration::from_millis(200),
            Arc::new(move |thawed| seen.lock().unwrap().extend_from_slice(thawed)),
        )
        .unwrap();
        f.freeze(&targets).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            rec.frozen_now.load(Ordering::SeqCst),
            0,
            "thawed by the watchdog"
        );
        assert_eq!(fired.lock().unwrap().len(), 2);
        assert!(f.watchdog_fired());
        assert!(!d.path().join("vss.json").exists());
        // The host's THAW afterwards: EINVAL-free here (the recorder thaws twice), reported.
        let report = f.thaw();
        assert!(report.watchdog_fired);
    }

    #[test]
    fn recover_thaws_what_a_killed_daemon_journaled() {
        let (d, targets) = dirs(2);
        let journal = d.path().join("vss.json");
        {
            let rec = Arc::new(Recorder::default());
            let f = freezer(&rec, journal.clone(), Duration::from_secs(60));
            f.freeze(&targets).unwrap();
            // "Killed": the journal stays (forget skips the Drop that would thaw).
            std::mem::forget(f);
        }
        assert!(journal.exists());
        let rec = Arc::new(Recorder::default());
        let r = recover(&rec, &journal).expect("a journal");
        assert_eq!(r.thawed.len(), 2);
        assert!(r.failed.is_empty());
        assert!(!journal.exists());
        assert!(recover(&rec, &journal).is_none());
    }
}
