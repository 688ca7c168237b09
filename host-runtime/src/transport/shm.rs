//! The shm transport, guest side: find offers under a root directory and open their channels.
//!
//! The host writes `offer` last (by rename), so a directory with an `offer` file has its `ring` and
//! `doorbell` ready. An offer is identified by its file's (device, inode): a host that re-offers after
//! a restart renames a new file into place, which the runtime sees as a new offer to open.

use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::Doorbell;
use crate::offer::{MAX_OFFER_FILE_LEN, Offer, OfferError};
use hvisd_ring::{RingError, SharedMapping};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An offer found under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundOffer {
    /// `ROOT/<instance-id>`.
    pub dir: PathBuf,
    /// What the offer file says.
    pub offer: Offer,
    /// Which `offer` file this was: (device, inode).
    pub identity: (u64, u64),
}

/// Why an offer could not be read or opened.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The offer file is malformed.
    #[error("{dir}: {source}")]
    Offer {
        /// The offer directory.
        dir: PathBuf,
        /// What was wrong.
        source: OfferError,
    },
    /// The offer file is larger than any valid offer.
    #[error("{dir}/offer is {len} bytes; an offer is at most {MAX_OFFER_FILE_LEN}")]
    OfferTooLarge {
        /// The offer directory.
        dir: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The ring file's size does not match the offer.
    #[error("{dir}/ring is {actual} bytes but ring_size={ring_size} needs exactly {expected}")]
    RingFileSize {
        /// The offer directory.
        dir: PathBuf,
        /// The offered ring size.
        ring_size: u32,
        /// 2 * ring_size.
        expected: u64,
        /// What the file has.
        actual: u64,
    },
    /// The ring memory could not be mapped or is unusable.
    #[error("{dir}/ring: {source}")]
    Ring {
        /// The offer directory.
        dir: PathBuf,
        /// The ring error.
        source: RingError,
    },
    /// A file or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Wraps an I/O error with what was being done to which path.
pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ShmError + 'a {
    move |source| ShmError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The guest's view of an shm root.
#[derive(Debug, Clone)]
pub struct ShmRoot {
    root: PathBuf,
}

impl ShmRoot {
    /// A root directory owned by a host.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Lists the offers present now. Directories without an `offer` file are not offers yet and are
    /// skipped silently; malformed offers are returned as errors (the caller logs each once).
    pub fn scan(&self) -> io::Result<Vec<Result<FoundOffer, ShmError>>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let dir = entry.path();
            match read_offer(&dir, &name) {
                Ok(Some(offer)) => found.push(Ok(offer)),
                Ok(None) => {}
                Err(e) => found.push(Err(e)),
            }
        }
        found.sort_by(|a, b| match (a, b) {
            (Ok(a), Ok(b)) => a.dir.cmp(&b.dir),
            _ => std::cmp::Ordering::Equal,
        });
        Ok(found)
    }

    /// Opens a channel as the guest: maps `ring`, sets the feature bits, connects to `doorbell`.
    ///
    /// The host is not trusted with paths: the offer directory is opened without following
    /// symlinks and pinned, `ring` must be a regular file in it (a symlink could make the guest map
    /// and write one of its own files), and `doorbell` must be a socket in it, reached through the
    /// pinned directory (`/proc/self/fd/N/doorbell`, which also keeps long roots within the
    /// 108-byte socket path limit).
    pub fn open(&self, found: &FoundOffer, label: &str) -> Result<Channel, ShmError> {
        let dir_fd = open_dir_nofollow(&found.dir)?;
        let ring_path = found.dir.join("ring");
        let file: File = rustix::fs::openat(
            &dir_fd,
            "ring",
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| io_err("opening", &ring_path)(e.into()))?;
        let meta = file
            .metadata()
            .map_err(io_err("reading metadata of", &ring_path))?;
        if !meta.file_type().is_file() {
            return Err(io_err("checking", &ring_path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the ring must be a regular file",
            )));
        }
        let expected = found.offer.ring_file_len();
        if meta.len() != expected {
            return Err(ShmError::RingFileSize {
                dir: found.dir.clone(),
                ring_size: found.offer.ring_size,
                expected,
                actual: meta.len(),
            });
        }
        let ring_err = |source| ShmError::Ring {
            dir: found.dir.clone(),
            source,
        };
        // Offer::parse bounds ring_size to 64 MiB, so the length fits usize on every target we build.
        let ring_size = found.offer.ring_size as usize;
        let map = SharedMapping::map_file(&file, 2 * ring_size)
            .map_err(|e| ring_err(e.into()))?;
        let rings = RingPair::new(map, ring_size, Role::Guest).map_err(ring_err)?;
        rings.set_feature_bits();

        let doorbell_path = found.dir.join("doorbell");
        let stat = rustix::fs::statat(&dir_fd, "doorbell", AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("checking", &doorbell_path)(e.into()))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
            return Err(io_err("checking", &doorbell_path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the doorbell must be a socket",
            )));
        }
        let pinned = PathBuf::from(format!("/proc/self/fd/{}/doorbell", dir_fd.as_raw_fd()));
        let doorbell =
            Doorbell::connect(&pinned).map_err(io_err("connecting to", &doorbell_path))?;
        Ok(Channel::new(rings, doorbell, label))
    }
}

fn open_dir_nofollow(dir: &Path) -> Result<OwnedFd, ShmError> {
    rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening", dir)(e.into()))
}

fn read_offer(dir: &Path, name: &str) -> Result<Option<FoundOffer>, ShmError> {
    let path = dir.join("offer");
    let dir_fd = open_dir_nofollow(dir)?;
    // O_NONBLOCK: a FIFO planted as `offer` must not stall the scan; the type is checked below.
    let mut file = match rustix::fs::openat(
        &dir_fd,
        "offer",
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(io_err("opening", &path)(e.into())),
    };
    let meta = file
        .metadata()
        .map_err(io_err("reading metadata of", &path))?;
    if !meta.file_type().is_file() {
        return Err(io_err("checking", &path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an offer must be a regular file",
        )));
    }
    if meta.len() > MAX_OFFER_FILE_LEN {
        return Err(ShmError::OfferTooLarge {
            dir: dir.to_owned(),
            len: meta.len(),
        });
    }
    let mut text = String::new();
    // `take` bounds the read even if the file grows after the metadata call.
    (&mut file)
        .take(MAX_OFFER_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(io_err("reading", &path))?;
    let offer = Offer::parse_in_dir(&text, name).map_err(|source| ShmError::Offer {
        dir: dir.to_owned(),
        source,
    })?;
    Ok(Some(FoundOffer {
        dir: dir.to_owned(),
        offer,
        identity: (meta.dev(), meta.ino()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offer::PipeMode;
    use crate::transport::shm_host::publish_offer;

    fn offer() -> Offer {
        Offer {
            class_id: hvisd_protocol::guid::class_id::HEARTBEAT,
            instance_id: "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0".parse().unwrap(),
            ring_size: 8192,
            pipe: PipeMode::Message,
            conn_from_host: None,
        }
    }

    fn only_offer(root: &ShmRoot) -> Result<FoundOffer, ShmError> {
        let mut found = root.scan().unwrap();
        assert_eq!(found.len(), 1);
        found.pop().unwrap()
    }

    #[tokio::test]
    async fn a_ring_symlinked_to_a_guest_file_is_refused_and_the_file_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShmRoot::new(tmp.path().join("root"));
        std::fs::create_dir(root.path()).unwrap();
        let _published = publish_offer(root.path(), &offer()).unwrap();
        let victim = tmp.path().join("guest-secret");
        std::fs::write(&victim, vec![0xaa; 16384]).unwrap();
        let ring = root
            .path()
            .join(offer().instance_id.to_string())
            .join("ring");
        std::fs::remove_file(&ring).unwrap();
        std::os::unix::fs::symlink(&victim, &ring).unwrap();

        let found = only_offer(&root).unwrap();
        assert!(root.open(&found, "test").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), vec![0xaa; 16384]);
    }

    #[tokio::test]
    async fn a_fifo_offer_does_not_stall_the_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(offer().instance_id.to_string());
        std::fs::create_dir(&dir).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("offer"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = only_offer(&ShmRoot::new(tmp.path())).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
    }

    #[tokio::test]
    async fn a_doorbell_that_is_not_a_socket_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShmRoot::new(tmp.path());
        let _published = publish_offer(root.path(), &offer()).unwrap();
        let doorbell = tmp
            .path()
            .join(offer().instance_id.to_string())
            .join("doorbell");
        std::fs::remove_file(&doorbell).unwrap();
        std::fs::write(&doorbell, b"not a socket").unwrap();
        let found = only_offer(&root).unwrap();
        let err = root.open(&found, "test").err().unwrap();
        assert!(err.to_string().contains("socket"), "{err}");
    }

    #[tokio::test]
    async fn a_ring_file_of_the_wrong_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShmRoot::new(tmp.path());
        let _published = publish_offer(root.path(), &offer()).unwrap();
        let ring = tmp
            .path()
            .join(offer().instance_id.to_string())
            .join("ring");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ring)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let found = only_offer(&root).unwrap();
        assert!(matches!(
            root.open(&found, "test"),
            Err(ShmError::RingFileSize { actual: 4096, .. })
        ));
    }
}
