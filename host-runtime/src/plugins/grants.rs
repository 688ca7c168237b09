//! Directory grants, opened by the core for a plugin worker.
//!
//! A grant is opened from its absolute path without following any symlink on the way
//! (`openat2(RESOLVE_NO_SYMLINKS)`), so the directory the worker gets is the one the operator
//! named. It may not cover a path of the runtime (the plugin cache, the KVP pool directory) nor
//! overlap another plugin's grant: a plugin given `/var` would otherwise reach the pools through
//! its own grant.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Why a grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dirs grant `{path}`: {problem}")]
pub struct GrantError {
    /// The grant's host path.
    pub path: String,
    /// What is wrong, and how to fix it.
    pub problem: String,
}

fn normal(path: &Path) -> Result<(), &'static str> {
    if !path.is_absolute() {
        return Err("not an absolute path");
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err("contains `.` or `..`; name the directory itself");
    }
    Ok(())
}

/// Whether `outer` is `inner` or one of its ancestors (both normal absolute paths).
fn covers(outer: &Path, inner: &Path) -> bool {
    inner.starts_with(outer)
}

/// Checks every plugin's grants against the runtime's own paths and against each other; returns
/// the problems, each with the plugin it concerns.
pub fn check_all(
    grants: &[(String, PathBuf)],
    runtime_paths: &[(&str, &Path)],
) -> Vec<(String, GrantError)> {
    let mut problems = Vec::new();
    for (i, (plugin, path)) in grants.iter().enumerate() {
        let shown = path.display().to_string();
        if let Err(problem) = normal(path) {
            problems.push((
                plugin.clone(),
                GrantError {
                    path: shown,
                    problem: problem.into(),
                },
            ));
            continue;
        }
        for (what, runtime) in runtime_paths {
            if covers(path, runtime) {
                problems.push((
                    plugin.clone(),
                    GrantError {
                        path: shown.clone(),
                        problem: format!(
                            "it covers the {what} ({}); grant a directory of the application only",
                            runtime.display()
                        ),
                    },
                ));
            }
        }
        for (other_plugin, other) in &grants[..i] {
            if other_plugin != plugin && (covers(path, other) || covers(other, path)) {
                problems.push((
                    plugin.clone(),
                    GrantError {
                        path: shown.clone(),
                        problem: format!(
                            "it overlaps plugin `{other_plugin}`'s grant {}; plugins get separate directories",
                            other.display()
                        ),
                    },
                ));
            }
        }
    }
    problems
}

/// Opens a grant: a directory, reached from `/` without following any symlink.
pub fn open(path: &Path) -> Result<OwnedFd, GrantError> {
    let err = |problem: String| GrantError {
        path: path.display().to_string(),
        problem,
    };
    normal(path).map_err(|p| err(p.into()))?;
    rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => {
            err("a component of the path is a symlink; grant the real directory".into())
        }
        rustix::io::Errno::NOTDIR => err("not a directory".into()),
        e => err(format!("cannot open it: {e}")),
    })
}

/// The freeze hooks among `manifests` with a read-write directory on a file system `plan`
/// freezes, each with the sentence that refuses it: a hook writes during the freeze, and a write
/// to a frozen file system blocks until the thaw (or the watchdog).
pub fn hooks_writing_to_frozen(
    manifests: &[hvisd_plugin_host::PluginManifest],
    plan: &hvisd_vss::Plan,
) -> Vec<(String, GrantError)> {
    let mut problems = Vec::new();
    for m in manifests {
        if !m.worlds.contains(&hvisd_plugin_host::World::FreezeHook) {
            continue;
        }
        for d in &m.dirs {
            if d.access != hvisd_plugin_host::manifest::Access::ReadWrite {
                continue;
            }
            let Ok(st) = rustix::fs::stat(&d.host) else {
                continue;
            };
            let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
            if let Some(frozen) = plan
                .freeze
                .iter()
                .find(|p| p.mount.device.major == major && p.mount.device.minor == minor)
            {
                problems.push((
                    m.name.clone(),
                    GrantError {
                        path: d.host.display().to_string(),
                        problem: format!(
                            "a freeze hook's read-write directory on {}, which backups freeze: \
                             the hook would block writing there during the freeze. Grant a \
                             directory on a file system that is not frozen (under /run, say), or \
                             exclude that mount in [vss.policy]",
                            frozen.mount.name()
                        ),
                    },
                ));
                break;
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_may_not_cover_runtime_paths_or_overlap_each_other() {
        let runtime = [
            ("plugin cache", Path::new("/var/cache/hvisd/plugins")),
            ("KVP pool directory", Path::new("/var/lib/hyperv")),
        ];
        let grants = vec![
            ("a".to_owned(), PathBuf::from("/var/lib/app")),
            ("b".to_owned(), PathBuf::from("/var/lib")),
            ("c".to_owned(), PathBuf::from("/srv/data/../etc")),
            ("d".to_owned(), PathBuf::from("/srv/d")),
            ("d".to_owned(), PathBuf::from("/srv/d/sub")),
        ];
        let problems = check_all(&grants, &runtime);
        let of = |p: &str| problems.iter().filter(|(n, _)| n == p).count();
        assert_eq!(of("a"), 0, "{problems:?}");
        assert_eq!(of("b"), 2, "covers the pools and overlaps a: {problems:?}");
        assert_eq!(of("c"), 1, "{problems:?}");
        assert_eq!(of("d"), 0, "a plugin's own grants may nest: {problems:?}");
    }

    #[test]
    fn a_symlink_anywhere_on_the_path_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        assert!(open(&real).is_ok());
        let err = open(&d.path().join("link")).unwrap_err();
        assert!(err.problem.contains("symlink"), "{err}");
        std::fs::write(d.path().join("file"), b"").unwrap();
        assert!(open(&d.path().join("file")).is_err());
    }
}
