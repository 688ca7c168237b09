//! Loading a precompiled plugin component (`.cwasm`): native code that wasmtime maps and runs
//! without re-checking it, so whoever can write the file can run code in the loading process.
//!
//! The one `unsafe` call (`Component::deserialize`) is reachable only through a
//! [`TrustedArtifact`], whose constructors check where the bytes come from:
//!
//! - [`TrustedArtifact::open_in`]: a file in a directory (given as a pinned descriptor) that
//!   belongs to this process's user and that nobody else can write, opened without following
//!   links, itself owned by that user and writable by nobody else;
//! - [`TrustedArtifact::from_fd`]: a descriptor handed over by the privileged core (the plugin
//!   worker's case): a read-only regular file owned by the core's user and writable by nobody
//!   else, so the worker can load only what the core compiled.
//!
//! wasmtime additionally checks the artifact's header and that it was compiled by an engine
//! with a compatible configuration.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Why an artifact cannot be trusted or read.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: rustix::io::Errno,
    },
    /// The file or its directory is not what a trusted artifact must be.
    #[error("{what}: {problem}")]
    Untrusted {
        /// Which file.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// Reading failed.
    #[error("reading the artifact: {0}")]
    Read(#[from] std::io::Error),
}

/// The bytes of a `.cwasm` whose provenance was checked (see the module docs).
pub struct TrustedArtifact {
    bytes: Vec<u8>,
}

/// The largest artifact read (plugins are small; a huge file is refused, not read).
pub const MAX_ARTIFACT_BYTES: u64 = 256 << 20;

fn check_owner_and_mode(
    what: &'static str,
    stat: &rustix::fs::Stat,
    owner: u32,
    regular: bool,
) -> Result<(), ArtifactError> {
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    let wanted_kind = if regular {
        rustix::fs::FileType::RegularFile
    } else {
        rustix::fs::FileType::Directory
    };
    if kind != wanted_kind {
        return Err(ArtifactError::Untrusted {
            what,
            problem: format!("is a {kind:?}, not a {wanted_kind:?}"),
        });
    }
    if stat.st_uid != owner {
        return Err(ArtifactError::Untrusted {
            what,
            problem: format!("is owned by uid {}, not uid {owner}", stat.st_uid),
        });
    }
    if stat.st_mode & 0o022 != 0 {
        return Err(ArtifactError::Untrusted {
            what,
            problem: format!("mode {:o} lets others write it", stat.st_mode & 0o7777),
        });
    }
    Ok(())
}

fn read_bounded(fd: OwnedFd) -> Result<Vec<u8>, ArtifactError> {
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_ARTIFACT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ARTIFACT_BYTES {
        return Err(ArtifactError::Untrusted {
            what: "artifact",
            problem: format!("is larger than {MAX_ARTIFACT_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

impl TrustedArtifact {
    /// Opens `name` in the directory `dir` (see the module docs for the checks).
    pub fn open_in(dir: BorrowedFd<'_>, name: &str) -> Result<Self, ArtifactError> {
        let me = rustix::process::geteuid().as_raw();
        let dir_stat = rustix::fs::fstat(dir).map_err(|source| ArtifactError::Os {
            what: "fstat of the artifact directory",
            source,
        })?;
        check_owner_and_mode("artifact directory", &dir_stat, me, false)?;
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|source| ArtifactError::Os {
            what: "opening the artifact",
            source,
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|source| ArtifactError::Os {
            what: "fstat of the artifact",
            source,
        })?;
        check_owner_and_mode("artifact", &stat, me, true)?;
        Ok(Self {
            bytes: read_bounded(fd)?,
        })
    }

    /// Takes a descriptor received from the core, which runs as `core_uid`.
    pub fn from_fd(fd: OwnedFd, core_uid: u32) -> Result<Self, ArtifactError> {
        let stat = rustix::fs::fstat(&fd).map_err(|source| ArtifactError::Os {
            what: "fstat of the artifact descriptor",
            source,
        })?;
        check_owner_and_mode("artifact descriptor", &stat, core_uid, true)?;
        let flags = rustix::fs::fcntl_getfl(fd.as_fd()).map_err(|source| ArtifactError::Os {
            what: "fcntl(F_GETFL) of the artifact descriptor",
            source,
        })?;
        if flags.contains(OFlags::WRONLY) || flags.contains(OFlags::RDWR) {
            return Err(ArtifactError::Untrusted {
                what: "artifact descriptor",
                problem: "is open for writing; the core hands artifacts over read-only".into(),
            });
        }
        Ok(Self {
            bytes: read_bounded(fd)?,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the artifact is empty (wasmtime refuses it).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Loads the component of a checked artifact into `engine`.
pub fn load_component(engine: &Engine, artifact: &TrustedArtifact) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` requires bytes produced by wasmtime's own compiler for a
    // compatible engine and not altered since. A `TrustedArtifact` can only be built from a file
    // that only this user (or, in a worker, only the core's user) can write, which only the
    // core's cache writes, with artifacts it compiled itself (see the module docs). wasmtime
    // checks the header and the engine compatibility hash before using the code.
    unsafe { Component::deserialize(engine, &artifact.bytes) }
}
