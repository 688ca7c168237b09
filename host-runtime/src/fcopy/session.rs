//! One fcopy channel's copy in progress: START creates a temporary file, WRITEs fill it, COMPLETE
//! syncs it and renames it into place, CANCEL (or anything that ends the copy early) removes it.
//!
//! Blocking code (file I/O, `fsync`): the IC service runs it on a blocking thread.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hvisd_protocol::fcopy::{FcopyOperation, GuestDir, StartFcopy, check_file_name};
use hvisd_protocol::ic::status;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::resolve::{self, escape};
use super::{FcopyPolicy, Refusal};

/// A request, owned, as the session takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcopyOp {
    /// `START_FILE_COPY`.
    Start(StartFcopy),
    /// `WRITE_TO_FILE`.
    Write {
        /// Where `data` goes.
        offset: u64,
        /// The fragment.
        data: Vec<u8>,
    },
    /// `COMPLETE_FCOPY`.
    Complete,
    /// `CANCEL_FCOPY`.
    Cancel,
    /// A request that could not be decoded (a bad name, a fragment past its message) or an
    /// unknown operation: ends any copy in progress and is answered with `refusal`.
    Refused {
        /// The operation the header named.
        operation: FcopyOperation,
        /// The answer.
        refusal: Refusal,
    },
}

/// What a request that was not refused did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// A copy started (`replaced`: an unfinished one was dropped for it).
    Started {
        /// The destination, escaped.
        path: String,
        /// Directories created for `CREATE_PATH`.
        created_dirs: usize,
        /// An unfinished copy was removed first.
        replaced: bool,
    },
    /// A fragment was written.
    Written,
    /// The file is in place.
    Completed {
        /// The destination, escaped.
        path: String,
        /// Its size.
        bytes: u64,
    },
    /// The copy was dropped (or there was none).
    Cancelled {
        /// A copy was in progress.
        had_copy: bool,
    },
}

/// The copy in progress on one channel.
pub struct FcopySession {
    policy: Arc<FcopyPolicy>,
    copy: Option<Copy>,
}

/// One file being written: the temporary file, removed on drop unless committed.
struct Copy {
    dir: OwnedFd,
    temp_name: String,
    file: OwnedFd,
    final_name: String,
    /// The destination (directory and name), escaped, for messages.
    shown: String,
    overwrite: bool,
    file_size: u64,
    /// Every byte below this was written (writes may not leave gaps).
    written_end: u64,
    /// Bytes received in all, rewrites included.
    received: u64,
    committed: bool,
}

impl Drop for Copy {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the name is ours (created with O_EXCL) and unique.
            let _ = rustix::fs::unlinkat(&self.dir, self.temp_name.as_str(), AtFlags::empty());
        }
    }
}

impl FcopySession {
    /// A session with no copy in progress.
    pub fn new(policy: Arc<FcopyPolicy>) -> Self {
        FcopySession { policy, copy: None }
    }

    /// Whether a copy is in progress.
    pub fn in_progress(&self) -> bool {
        self.copy.is_some()
    }

    /// Applies one request. A refusal ends any copy in progress (its temporary file is
    /// removed): a host whose request was refused starts over.
    pub fn apply(&mut self, op: FcopyOp) -> Result<Done, Refusal> {
        let result = match op {
            FcopyOp::Start(start) => self.start(&start),
            FcopyOp::Write { offset, data } => self.write(offset, &data),
            FcopyOp::Complete => self.complete(),
            FcopyOp::Cancel => Ok(Done::Cancelled {
                had_copy: self.copy.take().is_some(),
            }),
            FcopyOp::Refused { refusal, .. } => Err(refusal),
        };
        if result.is_err() {
            self.copy = None;
        }
        result
    }

    fn start(&mut self, start: &StartFcopy) -> Result<Done, Refusal> {
        let replaced = self.copy.take().is_some();
        let shown_dir = escape(&start.path_name);
        let shown = format!(
            "{}/{}",
            shown_dir.trim_end_matches('/'),
            escape(&start.file_name)
        );
        let dir = GuestDir::parse(&start.path_name)
            .map_err(|e| Refusal::invalid(format!("destination directory \"{shown_dir}\": {e}")))?;
        check_file_name(&start.file_name)
            .map_err(|e| Refusal::invalid(format!("file name of \"{shown}\": {e}")))?;
        if start.file_size > self.policy.max_file_size {
            return Err(Refusal::with(
                status::HV_ERROR_DISK_FULL,
                format!(
                    "\"{shown}\": the host announces {} bytes, more than [fcopy] max_file_size ({})",
                    start.file_size, self.policy.max_file_size
                ),
            ));
        }
        let destination =
            resolve::open_destination(&self.policy, &dir, start.flags.create_path(), &shown_dir)?;
        let overwrite = start.flags.overwrite();
        match rustix::fs::statat(
            &destination.dir,
            start.file_name.as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(_) if !overwrite => {
                return Err(Refusal::with(
                    status::HV_ERROR_ALREADY_EXISTS,
                    format!("\"{shown}\" exists and the host did not ask to overwrite it"),
                ));
            }
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(Refusal::fail(format!("\"{shown}\" is a directory")));
            }
            // A file or a symlink is replaced by the rename (a symlink is never followed).
            Ok(_) | Err(Errno::NOENT) => {}
            Err(e) => return Err(Refusal::io(format!("checking \"{shown}\""), e)),
        }
        let (temp_name, file) = create_temp(&destination.dir)
            .map_err(|e| Refusal::io(format!("creating a temporary file for \"{shown}\""), e))?;
        self.copy = Some(Copy {
            dir: destination.dir,
            temp_name,
            file,
            final_name: start.file_name.clone(),
            shown: shown.clone(),
            overwrite,
            file_size: start.file_size,
            written_end: 0,
            received: 0,
            committed: false,
        });
        Ok(Done::Started {
            path: shown,
            created_dirs: destination.created,
            replaced,
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<Done, Refusal> {
        let copy = self
            .copy
            .as_mut()
            .ok_or_else(|| Refusal::fail("WRITE_TO_FILE with no copy started"))?;
        let shown = &copy.shown;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= copy.file_size)
            .ok_or_else(|| {
                Refusal::invalid(format!(
                    "\"{shown}\": a fragment of {} bytes at offset {offset} ends past the announced \
                     file_size {}",
                    data.len(),
                    copy.file_size
                ))
            })?;
        if offset > copy.written_end {
            return Err(Refusal::invalid(format!(
                "\"{shown}\": a fragment at offset {offset} leaves a gap after byte {}",
                copy.written_end
            )));
        }
        // Rewrites of what was already written are accepted, up to twice the file in all.
        let received = copy.received.saturating_add(data.len() as u64);
        if received > copy.file_size.saturating_mul(2) {
            return Err(Refusal::invalid(format!(
                "\"{shown}\": the host sent {received} bytes for a file of {}",
                copy.file_size
            )));
        }
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            match rustix::io::pwrite(&copy.file, rest, at) {
                Ok(0) => {
                    return Err(Refusal::fail(format!(
                        "\"{shown}\": write made no progress"
                    )));
                }
                Ok(n) => {
                    rest = &rest[n..];
                    at += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(Refusal::io(format!("writing \"{shown}\""), e)),
            }
        }
        copy.received = received;
        copy.written_end = copy.written_end.max(end);
        Ok(Done::Written)
    }

    fn complete(&mut self) -> Result<Done, Refusal> {
        let mut copy = self
            .copy
            .take()
            .ok_or_else(|| Refusal::fail("COMPLETE_FCOPY with no copy started"))?;
        let shown = copy.shown.clone();
        if copy.written_end != copy.file_size {
            return Err(Refusal::fail(format!(
                "\"{shown}\": COMPLETE_FCOPY after {} of {} bytes",
                copy.written_end, copy.file_size
            )));
        }
        let io = |what: &str| {
            let shown = shown.clone();
            let what = what.to_owned();
            move |e| Refusal::io(format!("{what} \"{shown}\""), e)
        };
        rustix::fs::fsync(&copy.file).map_err(io("syncing"))?;
        rustix::fs::fchmod(&copy.file, Mode::from_raw_mode(self.policy.file_mode))
            .map_err(io("chmod"))?;
        if self.policy.uid.is_some() || self.policy.gid.is_some() {
            rustix::fs::fchown(
                &copy.file,
                self.policy.uid.map(rustix::fs::Uid::from_raw),
                self.policy.gid.map(rustix::fs::Gid::from_raw),
            )
            .map_err(io("chown"))?;
        }
        commit(&copy).map_err(|e| match e {
            Errno::EXIST => Refusal::with(
                status::HV_ERROR_ALREADY_EXISTS,
                format!(
                    "\"{shown}\" appeared during the copy and the host did not ask to overwrite it"
                ),
            ),
            e => Refusal::io(format!("renaming into \"{shown}\""), e),
        })?;
        copy.committed = true;
        // The rename is durable once the directory is synced; the file is in place either way.
        if let Err(e) = rustix::fs::fsync(&copy.dir) {
            tracing::warn!(path = %shown, error = %e, "fcopy: syncing the directory failed");
        }
        Ok(Done::Completed {
            path: shown,
            bytes: copy.file_size,
        })
    }
}

/// Renames the temporary file to its final name: replacing what is there with `overwrite`,
/// never otherwise (`RENAME_NOREPLACE`, or `link` + `unlink` on file systems without it).
fn commit(copy: &Copy) -> Result<(), Errno> {
    let (dir, temp, name) = (&copy.dir, copy.temp_name.as_str(), copy.final_name.as_str());
    if copy.overwrite {
        return rustix::fs::renameat(dir, temp, dir, name);
    }
    match rustix::fs::renameat_with(dir, temp, dir, name, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            rustix::fs::linkat(dir, temp, dir, name, AtFlags::empty())?;
            let _ = rustix::fs::unlinkat(dir, temp, AtFlags::empty());
            Ok(())
        }
        other => other,
    }
}

/// Creates `.hvisd-fcopy-<random>.tmp` in `dir` with `O_EXCL` and mode 0600.
fn create_temp(dir: &OwnedFd) -> Result<(String, OwnedFd), Errno> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = Errno::EXIST;
    for _ in 0..16 {
        let mut random = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut random[..], rustix::rand::GetRandomFlags::empty());
        let unique = u64::from_le_bytes(random) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(".hvisd-fcopy-{unique:016x}.tmp");
        match rustix::fs::openat(dir, name.as_str(), flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((name, fd)),
            Err(Errno::EXIST) => last = Errno::EXIST,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcopy::FcopySection;
    use hvisd_protocol::fcopy::CopyFlags;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    struct Rig {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        session: FcopySession,
    }

    fn rig(configure: impl FnOnce(&mut FcopySection)) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("drop");
        std::fs::create_dir_all(&root).unwrap();
        let mut section = FcopySection {
            drop_dir: root.clone(),
            ..Default::default()
        };
        configure(&mut section);
        let session = FcopySession::new(Arc::new(section.policy().unwrap()));
        Rig {
            _tmp: tmp,
            root,
            session,
        }
    }

    fn start(dir: &Path, name: &str, size: u64, overwrite: bool, create: bool) -> FcopyOp {
        FcopyOp::Start(StartFcopy {
            file_name: name.into(),
            path_name: dir.display().to_string(),
            flags: CopyFlags::new(overwrite, create),
            file_size: size,
        })
    }

    fn write(offset: u64, data: &[u8]) -> FcopyOp {
        FcopyOp::Write {
            offset,
            data: data.to_vec(),
        }
    }

    /// Names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn copy_file(r: &mut Rig, name: &str, data: &[u8], overwrite: bool) -> Result<Done, Refusal> {
        let root = r.root.clone();
        r.session
            .apply(start(&root, name, data.len() as u64, overwrite, false))?;
        for (i, chunk) in data.chunks(6144).enumerate() {
            r.session.apply(write(i as u64 * 6144, chunk))?;
        }
        r.session.apply(FcopyOp::Complete)
    }

    #[test]
    fn a_complete_copy_lands_under_its_name_with_the_final_mode_and_nothing_else() {
        let mut r = rig(|s| s.file_mode = 0o640);
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let root = r.root.clone();
        r.session
            .apply(start(&root, "f.bin", 20_000, false, false))
            .unwrap();
        // Before COMPLETE only the temporary file exists, mode 0600.
        let names = listing(&root);
        assert_eq!(names.len(), 1);
        assert!(names[0].starts_with(".hvisd-fcopy-"), "{names:?}");
        let mode = std::fs::metadata(root.join(&names[0]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for (i, chunk) in data.chunks(6144).enumerate() {
            assert_eq!(
                r.session.apply(write(i as u64 * 6144, chunk)),
                Ok(Done::Written)
            );
        }
        assert!(!root.join("f.bin").exists());
        let done = r.session.apply(FcopyOp::Complete).unwrap();
        assert!(
            matches!(done, Done::Completed { bytes: 20_000, .. }),
            "{done:?}"
        );
        assert_eq!(std::fs::read(root.join("f.bin")).unwrap(), data);
        let mode = std::fs::metadata(root.join("f.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(listing(&root), ["f.bin"]);
        assert!(!r.session.in_progress());
    }

    #[test]
    fn an_existing_file_is_refused_without_overwrite_and_replaced_with_it() {
        let mut r = rig(|_| {});
        std::fs::write(r.root.join("f"), b"old").unwrap();
        let err = copy_file(&mut r, "f", b"new!", false).unwrap_err();
        assert_eq!(err.status, status::HV_ERROR_ALREADY_EXISTS, "{err}");
        assert_eq!(std::fs::read(r.root.join("f")).unwrap(), b"old");
        assert_eq!(listing(&r.root), ["f"]);
        copy_file(&mut r, "f", b"new!", true).unwrap();
        assert_eq!(std::fs::read(r.root.join("f")).unwrap(), b"new!");
        assert_eq!(listing(&r.root), ["f"]);
    }

    #[test]
    fn a_file_that_appears_during_the_copy_is_not_clobbered_without_overwrite() {
        let mut r = rig(|_| {});
        let root = r.root.clone();
        r.session.apply(start(&root, "f", 3, false, false)).unwrap();
        r.session.apply(write(0, b"new")).unwrap();
        std::fs::write(root.join("f"), b"theirs").unwrap();
        let err = r.session.apply(FcopyOp::Complete).unwrap_err();
        assert_eq!(err.status, status::HV_ERROR_ALREADY_EXISTS);
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"theirs");
        assert_eq!(listing(&root), ["f"]);
    }

    #[test]
    fn overwrite_replaces_a_symlink_instead_of_following_it() {
        let mut r = rig(|_| {});
        let target = r._tmp.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, r.root.join("link")).unwrap();
        copy_file(&mut r, "link", b"data", true).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let meta = std::fs::symlink_metadata(r.root.join("link")).unwrap();
        assert!(meta.file_type().is_file());
    }

    #[test]
    fn writes_beyond_the_announced_size_or_with_gaps_are_refused_and_end_the_copy() {
        let mut r = rig(|_| {});
        let root = r.root.clone();
        r.session
            .apply(start(&root, "f", 10, false, false))
            .unwrap();
        let err = r.session.apply(write(8, b"abc")).unwrap_err();
        assert_eq!(err.status, status::HV_INVALIDARG);
        assert!(err.reason.contains("past the announced file_size"), "{err}");
        assert!(!r.session.in_progress());
        assert_eq!(listing(&root), Vec::<String>::new());
        // Later fragments of that copy fail too; nothing is completed.
        assert_eq!(
            r.session.apply(write(0, b"a")).unwrap_err().status,
            status::HV_E_FAIL
        );
        assert!(r.session.apply(FcopyOp::Complete).is_err());

        r.session
            .apply(start(&root, "f", 10, false, false))
            .unwrap();
        r.session.apply(write(0, b"abc")).unwrap();
        let err = r.session.apply(write(4, b"efg")).unwrap_err();
        assert_eq!(err.status, status::HV_INVALIDARG);
        assert!(err.reason.contains("gap"), "{err}");
        assert_eq!(listing(&root), Vec::<String>::new());
    }

    #[test]
    fn rewrites_are_bounded_and_a_short_copy_never_completes() {
        let mut r = rig(|_| {});
        let root = r.root.clone();
        r.session.apply(start(&root, "f", 4, false, false)).unwrap();
        r.session.apply(write(0, b"ab")).unwrap();
        r.session.apply(write(0, b"ab")).unwrap(); // a rewrite
        let err = r.session.apply(FcopyOp::Complete).unwrap_err();
        assert!(err.reason.contains("after 2 of 4 bytes"), "{err}");
        assert_eq!(listing(&root), Vec::<String>::new());

        r.session.apply(start(&root, "f", 4, false, false)).unwrap();
        for _ in 0..4 {
            r.session.apply(write(0, b"ab")).unwrap();
        }
        let err = r.session.apply(write(0, b"ab")).unwrap_err();
        assert!(err.reason.contains("sent 10 bytes"), "{err}");
        assert_eq!(listing(&root), Vec::<String>::new());
    }

    #[test]
    fn cancel_a_new_start_or_dropping_the_session_leaves_nothing() {
        let mut r = rig(|_| {});
        let root = r.root.clone();
        r.session.apply(start(&root, "a", 6, false, false)).unwrap();
        r.session.apply(write(0, b"abc")).unwrap();
        assert_eq!(
            r.session.apply(FcopyOp::Cancel),
            Ok(Done::Cancelled { had_copy: true })
        );
        assert_eq!(listing(&root), Vec::<String>::new());
        assert_eq!(
            r.session.apply(FcopyOp::Cancel),
            Ok(Done::Cancelled { had_copy: false })
        );

        r.session.apply(start(&root, "a", 6, false, false)).unwrap();
        r.session.apply(write(0, b"abc")).unwrap();
        let done = r.session.apply(start(&root, "b", 0, false, false)).unwrap();
        assert!(matches!(done, Done::Started { replaced: true, .. }));
        assert_eq!(listing(&root).len(), 1, "only b's temporary file");
        r.session.apply(FcopyOp::Complete).unwrap();
        assert_eq!(listing(&root), ["b"]);

        r.session.apply(start(&root, "c", 6, false, false)).unwrap();
        r.session.apply(write(0, b"abc")).unwrap();
        drop(r.session);
        assert_eq!(listing(&root), ["b"]);
    }

    #[test]
    fn hostile_names_and_sizes_are_refused_before_anything_is_created() {
        let mut r = rig(|s| s.max_file_size = 100);
        let root = r.root.clone();
        let cases: Vec<(FcopyOp, u32)> = vec![
            (start(&root, "../x", 1, false, false), status::HV_INVALIDARG),
            (start(&root, "..", 1, false, false), status::HV_INVALIDARG),
            (start(&root, "a\nb", 1, false, false), status::HV_INVALIDARG),
            (
                start(&root.join("../drop"), "x", 1, false, true),
                status::HV_INVALIDARG,
            ),
            (
                start(Path::new("relative/dir"), "x", 1, false, true),
                status::HV_INVALIDARG,
            ),
            (
                start(r._tmp.path(), "x", 1, false, false),
                status::HV_E_ACCESSDENIED,
            ),
            (
                start(Path::new("/etc"), "x", 1, true, true),
                status::HV_E_ACCESSDENIED,
            ),
            (
                start(&root, "big", 101, false, false),
                status::HV_ERROR_DISK_FULL,
            ),
            (
                start(&root, &"n".repeat(256), 1, false, false),
                status::HV_INVALIDARG,
            ),
        ];
        for (op, want) in cases {
            let err = r.session.apply(op.clone()).unwrap_err();
            assert_eq!(err.status, want, "{op:?}: {err}");
            // The message escapes what the host sent.
            assert!(!err.reason.contains('\n'), "{err}");
        }
        assert_eq!(listing(&root), Vec::<String>::new());
        assert_eq!(listing(r._tmp.path()), ["drop"]);
    }

    #[test]
    fn create_path_copies_into_new_directories_only_inside_the_root() {
        let mut r = rig(|_| {});
        let root = r.root.clone();
        let deep = root.join("x/y");
        let err = r
            .session
            .apply(start(&deep, "f", 0, false, false))
            .unwrap_err();
        assert_eq!(err.status, status::HV_E_FAIL);
        r.session.apply(start(&deep, "f", 0, false, true)).unwrap();
        r.session.apply(FcopyOp::Complete).unwrap();
        assert!(deep.join("f").is_file());
    }

    #[test]
    fn operations_without_a_copy_fail_and_refused_requests_end_one() {
        let mut r = rig(|_| {});
        assert_eq!(
            r.session.apply(write(0, b"x")).unwrap_err().status,
            status::HV_E_FAIL
        );
        assert_eq!(
            r.session.apply(FcopyOp::Complete).unwrap_err().status,
            status::HV_E_FAIL
        );
        let root = r.root.clone();
        r.session.apply(start(&root, "f", 1, false, false)).unwrap();
        let err = r
            .session
            .apply(FcopyOp::Refused {
                operation: FcopyOperation(9),
                refusal: Refusal::fail("unknown operation"),
            })
            .unwrap_err();
        assert_eq!(err.status, status::HV_E_FAIL);
        assert!(!r.session.in_progress());
        assert_eq!(listing(&root), Vec::<String>::new());
    }
}
