//! Guest file copy (fcopy): the host writes files into the guest (PowerShell's `Copy-VMFile`),
//! as `hv_fcopy_uio_daemon` does, within the operator's policy.
//!
//! Where a byte goes: the wire format is `hvisd_protocol::fcopy`; [`vmbus`] is the IC service
//! (any VMBus transport: `shm`, `uio`) that decodes a request and hands it to a
//! [`session::FcopySession`] on a blocking thread; the session creates, writes and commits the
//! file; [`resolve`] turns the host's directory into a descriptor beneath an allowed root,
//! refusing symlinks, `..` and anything outside `[fcopy] allowed_dirs`.
//!
//! A copy is written to a temporary file (`O_EXCL`, mode 0600) in the destination directory and
//! renamed to its name only once the host's `COMPLETE_FCOPY` arrives and every announced byte was
//! written and synced: nothing partial ever sits under the final name. `CANCEL_FCOPY`, a new
//! `START_FILE_COPY`, a refused request or the channel closing removes the temporary file.

pub mod resolve;
pub mod session;
pub mod vmbus;

use std::path::{Component, Path, PathBuf};

use hvisd_protocol::ic::status;
use serde::{Deserialize, Serialize};

/// `[fcopy]`: where the host may write files and what they look like.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FcopySection {
    /// Answer the host's fcopy channel (also `[services] fcopy`; both must be on).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The default destination; created (with `dir_mode`) when a copy targets it and it is
    /// missing.
    #[serde(default = "default_drop_dir")]
    pub drop_dir: PathBuf,
    /// Directories the host may write into (and below). Absent: `[drop_dir]` only.
    #[serde(default)]
    pub allowed_dirs: Option<Vec<PathBuf>>,
    /// The largest file the host may announce, in bytes.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: u64,
    /// Mode of a copied file once complete (`0o644`; no setuid, setgid or sticky bit).
    #[serde(default = "default_file_mode")]
    pub file_mode: u32,
    /// Mode of directories created for `CREATE_PATH` (and of `drop_dir` if hvisd creates it).
    #[serde(default = "default_dir_mode")]
    pub dir_mode: u32,
    /// Owner of copied files: a user name or a numeric uid (the group becomes the user's
    /// primary group unless `group` is set). Absent: the user hvisd runs as.
    #[serde(default)]
    pub owner: Option<String>,
    /// Group of copied files (numeric gid).
    #[serde(default)]
    pub group: Option<u32>,
}

fn yes() -> bool {
    true
}

/// Where copies land by default.
pub const DEFAULT_DROP_DIR: &str = "/var/lib/hvisd/fcopy";

fn default_drop_dir() -> PathBuf {
    DEFAULT_DROP_DIR.into()
}

fn default_max_file_size() -> u64 {
    4 << 30
}

fn default_file_mode() -> u32 {
    0o644
}

fn default_dir_mode() -> u32 {
    0o755
}

impl Default for FcopySection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("an empty [fcopy] table is valid"))
    }
}

/// Why the fcopy policy could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum FcopySetupError {
    /// `[fcopy] owner` names no user of this system.
    #[error("[fcopy] owner {0:?}: no such user")]
    UnknownOwner(String),
}

impl FcopySection {
    /// The directories copies may land in: `allowed_dirs`, or `drop_dir` alone.
    pub fn allowed_dirs(&self) -> Vec<PathBuf> {
        self.allowed_dirs
            .clone()
            .unwrap_or_else(|| vec![self.drop_dir.clone()])
    }

    /// Checks the section; `Err((field, why))` names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !plain_absolute(&self.drop_dir) {
            return Err((
                "fcopy.drop_dir",
                "must be an absolute path without \"..\" components",
            ));
        }
        if self.allowed_dirs().iter().any(|d| !plain_absolute(d)) {
            return Err((
                "fcopy.allowed_dirs",
                "every entry must be an absolute path without \"..\" components",
            ));
        }
        if self.allowed_dirs.as_ref().is_some_and(|d| d.is_empty()) {
            return Err((
                "fcopy.allowed_dirs",
                "is empty: turn fcopy off with enabled = false instead",
            ));
        }
        if self.max_file_size == 0 {
            return Err(("fcopy.max_file_size", "must be at least 1"));
        }
        if self.file_mode > 0o777 {
            return Err((
                "fcopy.file_mode",
                "must be at most 0o777: a file from the host never gets setuid, setgid or sticky bits",
            ));
        }
        if self.dir_mode > 0o777 {
            return Err(("fcopy.dir_mode", "must be at most 0o777"));
        }
        Ok(())
    }

    /// The policy the service enforces (looks the owner up).
    pub fn policy(&self) -> Result<FcopyPolicy, FcopySetupError> {
        let (uid, mut gid) = match &self.owner {
            None => (None, None),
            Some(owner) => match owner.parse::<u32>() {
                Ok(uid) => (Some(uid), None),
                Err(_) => {
                    let (uid, gid) = hvisd_sys::process::lookup_user(owner)
                        .ok_or_else(|| FcopySetupError::UnknownOwner(owner.clone()))?;
                    (Some(uid), Some(gid))
                }
            },
        };
        if self.group.is_some() {
            gid = self.group;
        }
        let mut roots: Vec<Root> = self
            .allowed_dirs()
            .into_iter()
            .map(|path| Root {
                components: path_components(&path),
                create_if_missing: path == self.drop_dir,
                path,
            })
            .collect();
        // The deepest root that holds a path is the one it is resolved from.
        roots.sort_by_key(|r| std::cmp::Reverse(r.components.len()));
        Ok(FcopyPolicy {
            roots,
            max_file_size: self.max_file_size,
            file_mode: self.file_mode,
            dir_mode: self.dir_mode,
            uid,
            gid,
        })
    }
}

fn plain_absolute(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| c == Component::ParentDir)
}

fn path_components(path: &Path) -> Vec<String> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// One allowed directory.
#[derive(Debug, Clone)]
pub struct Root {
    /// As configured.
    pub path: PathBuf,
    /// Its normal components, to match the host's path against.
    pub components: Vec<String>,
    /// `drop_dir`: created when missing.
    pub create_if_missing: bool,
}

/// What the operator allows the host to write: the checked form of [`FcopySection`].
#[derive(Debug, Clone)]
pub struct FcopyPolicy {
    /// Allowed directories, deepest first.
    pub roots: Vec<Root>,
    /// Largest file the host may announce.
    pub max_file_size: u64,
    /// Final mode of copied files.
    pub file_mode: u32,
    /// Mode of created directories.
    pub dir_mode: u32,
    /// Owner of copied files (`None`: unchanged).
    pub uid: Option<u32>,
    /// Group of copied files (`None`: unchanged).
    pub gid: Option<u32>,
}

/// A request the service refuses: the status the host gets and, for the log, why (with any
/// host path already escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// `icmsg_hdr.status` of the reply.
    pub status: u32,
    /// What was refused and why, for a person.
    pub reason: String,
}

impl Refusal {
    /// `HV_INVALIDARG`: the request itself is wrong (a bad name, a fragment out of bounds).
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::with(status::HV_INVALIDARG, reason)
    }

    /// `HV_E_ACCESSDENIED`: the policy does not allow this destination.
    pub fn denied(reason: impl Into<String>) -> Self {
        Self::with(status::HV_E_ACCESSDENIED, reason)
    }

    /// `HV_E_FAIL`: what `hv_fcopy_uio_daemon` answers for everything else.
    pub fn fail(reason: impl Into<String>) -> Self {
        Self::with(status::HV_E_FAIL, reason)
    }

    /// A failed system call: `HV_ERROR_DISK_FULL` for `ENOSPC`/`EDQUOT` (as
    /// `hv_fcopy_uio_daemon`), `HV_E_FAIL` otherwise.
    pub fn io(what: impl std::fmt::Display, err: rustix::io::Errno) -> Self {
        let status = if err == rustix::io::Errno::NOSPC || err == rustix::io::Errno::DQUOT {
            status::HV_ERROR_DISK_FULL
        } else {
            status::HV_E_FAIL
        };
        Self::with(status, format!("{what}: {err}"))
    }

    /// Any status.
    pub fn with(status: u32, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_allow_only_the_drop_dir() {
        let s = FcopySection::default();
        assert!(s.enabled);
        assert_eq!(s.drop_dir, Path::new(DEFAULT_DROP_DIR));
        assert_eq!(s.allowed_dirs(), [PathBuf::from(DEFAULT_DROP_DIR)]);
        assert_eq!(s.max_file_size, 4 << 30);
        assert_eq!(s.file_mode, 0o644);
        let p = s.policy().unwrap();
        assert_eq!(p.roots.len(), 1);
        assert!(p.roots[0].create_if_missing);
        assert_eq!(p.roots[0].components, ["var", "lib", "hvisd", "fcopy"]);
        assert_eq!((p.uid, p.gid), (None, None));
    }

    #[test]
    fn bad_sections_name_the_field() {
        let parse = |text: &str| toml::from_str::<FcopySection>(text).unwrap().validate();
        assert_eq!(parse("drop_dir = 'rel'").unwrap_err().0, "fcopy.drop_dir");
        assert_eq!(
            parse("allowed_dirs = ['/a/../etc']").unwrap_err().0,
            "fcopy.allowed_dirs"
        );
        assert_eq!(
            parse("allowed_dirs = []").unwrap_err().0,
            "fcopy.allowed_dirs"
        );
        assert_eq!(
            parse("file_mode = 0o4755").unwrap_err().0,
            "fcopy.file_mode"
        );
        assert_eq!(
            parse("max_file_size = 0").unwrap_err().0,
            "fcopy.max_file_size"
        );
        assert!(parse("file_mode = 0o600\nallowed_dirs = ['/srv', '/srv/in']").is_ok());
        assert!(toml::from_str::<FcopySection>("colour = 1").is_err());
    }

    #[test]
    fn owner_by_name_or_number() {
        let s: FcopySection = toml::from_str("owner = 'root'").unwrap();
        let p = s.policy().unwrap();
        assert_eq!((p.uid, p.gid), (Some(0), Some(0)));
        let s: FcopySection = toml::from_str("owner = '1234'\ngroup = 99").unwrap();
        let p = s.policy().unwrap();
        assert_eq!((p.uid, p.gid), (Some(1234), Some(99)));
        let s: FcopySection = toml::from_str("owner = 'no-such-user-hvisd'").unwrap();
        assert!(s.policy().is_err());
    }

    #[test]
    fn deepest_root_first() {
        let s: FcopySection = toml::from_str("allowed_dirs = ['/srv', '/srv/in/deep']").unwrap();
        let p = s.policy().unwrap();
        assert_eq!(p.roots[0].path, Path::new("/srv/in/deep"));
        assert!(!p.roots[0].create_if_missing);
    }
}
