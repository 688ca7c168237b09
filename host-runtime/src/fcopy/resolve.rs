//! From the host's destination directory to a descriptor beneath an allowed root.
//!
//! The host's path is hostile. It is split and checked first (`GuestDir::parse`: absolute, no
//! `.` or `..`, no control characters, no over-long component), matched lexically against the
//! allowed roots, then walked one component at a time from the root's descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: the kernel refuses
//! any symlink, so a link planted inside an allowed directory cannot lead out of it, and a rename
//! racing the walk cannot either. Kernels before 5.6 lack `openat2`; there each single,
//! checked component is opened with `O_NOFOLLOW | O_DIRECTORY`, which refuses symlinks as well.
//! The roots themselves come from the operator's config and are opened as configured.

use std::os::fd::OwnedFd;

use hvisd_protocol::fcopy::GuestDir;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{FcopyPolicy, Refusal, Root};

/// The destination directory, opened.
#[derive(Debug)]
pub struct Destination {
    /// The directory (`O_RDONLY | O_DIRECTORY`: usable for `openat`, `renameat` and `fsync`).
    pub dir: OwnedFd,
    /// Directories created on the way (for the log).
    pub created: usize,
}

/// Opens the directory `path` names (the host's `path_name`, already parsed), creating missing
/// components when `create_path`; `shown` is the escaped path for messages.
pub fn open_destination(
    policy: &FcopyPolicy,
    path: &GuestDir<'_>,
    create_path: bool,
    shown: &str,
) -> Result<Destination, Refusal> {
    let (root, rest) = policy
        .roots
        .iter()
        .find_map(|root| path.strip_prefix(&root.components).map(|rest| (root, rest)))
        .ok_or_else(|| {
            Refusal::denied(format!(
                "destination \"{shown}\" is outside the allowed directories"
            ))
        })?;
    let mut dir = open_root(root, policy.dir_mode)?;
    let mut created = 0;
    for (i, name) in rest.iter().enumerate() {
        let at = || format!("\"{shown}\" (component {} \"{}\")", i + 1, escape(name));
        dir = match open_beneath(&dir, name) {
            Ok(next) => next,
            Err(Errno::NOENT) if create_path => {
                match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(policy.dir_mode)) {
                    Ok(()) => created += 1,
                    // Made by someone else meanwhile: opened (and checked) below like any other.
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(Refusal::io(format!("creating {}", at()), e)),
                }
                let next = open_beneath(&dir, name).map_err(|e| refusal(&dir, name, e, &at()))?;
                // mkdirat's mode passed through the umask; make it what the operator asked for.
                rustix::fs::fchmod(&next, Mode::from_raw_mode(policy.dir_mode))
                    .map_err(|e| Refusal::io(format!("chmod {}", at()), e))?;
                next
            }
            Err(Errno::NOENT) => {
                return Err(Refusal::fail(format!(
                    "{} does not exist and CREATE_PATH is not set",
                    at()
                )));
            }
            Err(e) => return Err(refusal(&dir, name, e, &at())),
        };
    }
    Ok(Destination { dir, created })
}

/// Opens an allowed root; `drop_dir` is created when missing.
fn open_root(root: &Root, dir_mode: u32) -> Result<OwnedFd, Refusal> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::open(&root.path, flags, Mode::empty()) {
        Err(Errno::NOENT) if root.create_if_missing => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(&root.path)
                .map_err(|e| {
                    Refusal::fail(format!("creating drop_dir {}: {e}", root.path.display()))
                })?;
            tracing::info!(dir = %root.path.display(), "fcopy: created the drop directory");
            rustix::fs::open(&root.path, flags, Mode::empty())
        }
        other => other,
    }
    .map_err(|e| Refusal::io(format!("allowed directory {}", root.path.display()), e))
}

/// Opens one checked component of `parent` as a directory, never through a symlink.
fn open_beneath(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(parent, name, flags, Mode::empty(), resolve) {
            // A rename elsewhere on the system raced the lookup; the kernel asks us to retry.
            Err(Errno::AGAIN) if tries < 3 => tries += 1,
            Err(Errno::NOSYS) => return rustix::fs::openat(parent, name, flags, Mode::empty()),
            other => return other,
        }
    }
}

/// The refusal for a component that could not be opened: a symlink is a policy matter
/// (`HV_E_ACCESSDENIED`), anything else a failure.
fn refusal(parent: &OwnedFd, name: &str, err: Errno, at: &str) -> Refusal {
    if is_symlink(parent, name) {
        return Refusal::denied(format!("{at} is a symbolic link"));
    }
    if err == Errno::NOTDIR {
        return Refusal::fail(format!("{at} is not a directory"));
    }
    Refusal::io(format!("opening {at}"), err)
}

/// Whether `parent/name` is a symbolic link (not followed).
pub fn is_symlink(parent: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// A host-supplied name, escaped for a message.
pub fn escape(name: &str) -> String {
    hvisd_protocol::text::escape(name, hvisd_protocol::text::DEFAULT_MAX_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcopy::FcopySection;
    use hvisd_protocol::ic::status;
    use std::path::Path;

    fn policy(roots: &[&Path]) -> FcopyPolicy {
        FcopySection {
            drop_dir: roots[0].to_owned(),
            allowed_dirs: Some(roots.iter().map(|r| r.to_path_buf()).collect()),
            ..Default::default()
        }
        .policy()
        .unwrap()
    }

    fn open(p: &FcopyPolicy, path: &str, create: bool) -> Result<Destination, Refusal> {
        open_destination(p, &GuestDir::parse(path).unwrap(), create, path)
    }

    #[test]
    fn paths_inside_a_root_open_and_others_are_denied() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("drop");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let p = policy(&[&root]);
        let shown = root.display().to_string();
        assert!(open(&p, &shown, false).is_ok());
        assert!(open(&p, &format!("{shown}/sub/"), false).is_ok());
        let outside = open(&p, &tmp.path().display().to_string(), false).unwrap_err();
        assert_eq!(outside.status, status::HV_E_ACCESSDENIED, "{outside}");
        // A sibling whose name starts like the root is not inside it.
        std::fs::create_dir(tmp.path().join("drop2")).unwrap();
        let sibling = open(&p, &format!("{shown}2"), false).unwrap_err();
        assert_eq!(sibling.status, status::HV_E_ACCESSDENIED);
        assert_eq!(
            open(&p, "/etc", false).unwrap_err().status,
            status::HV_E_ACCESSDENIED
        );
    }

    #[test]
    fn a_symlink_inside_a_root_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("drop");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(".", root.join("self")).unwrap();
        let p = policy(&[&root]);
        for link in ["escape", "self"] {
            for create in [false, true] {
                let err = open(&p, &format!("{}/{link}/x", root.display()), create).unwrap_err();
                assert_eq!(err.status, status::HV_E_ACCESSDENIED, "{link}: {err}");
                assert!(err.reason.contains("symbolic link"), "{err}");
            }
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn create_path_makes_missing_directories_with_the_configured_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("drop");
        std::fs::create_dir_all(&root).unwrap();
        let mut section = FcopySection {
            drop_dir: root.clone(),
            ..Default::default()
        };
        section.dir_mode = 0o750;
        let p = section.policy().unwrap();
        let path = format!("{}/a/b/c", root.display());
        let err = open(&p, &path, false).unwrap_err();
        assert_eq!(err.status, status::HV_E_FAIL);
        assert!(err.reason.contains("CREATE_PATH"), "{err}");
        assert!(!root.join("a").exists());
        let d = open(&p, &path, true).unwrap();
        assert_eq!(d.created, 3);
        let mode = std::fs::metadata(root.join("a/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(open(&p, &path, true).unwrap().created, 0);
        // A file where a directory should be.
        std::fs::write(root.join("file"), b"").unwrap();
        let err = open(&p, &format!("{}/file/x", root.display()), true).unwrap_err();
        assert_eq!(err.status, status::HV_E_FAIL);
        assert!(err.reason.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_missing_drop_dir_is_created_but_other_roots_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let drop = tmp.path().join("var/drop");
        let other = tmp.path().join("other");
        let p = policy(&[&drop, &other]);
        assert!(open(&p, &drop.display().to_string(), false).is_ok());
        assert!(drop.is_dir());
        let err = open(&p, &other.display().to_string(), true).unwrap_err();
        assert_eq!(err.status, status::HV_E_FAIL);
        assert!(!other.exists());
    }
}
