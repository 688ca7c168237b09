//! The shm transport, guest side: find offers under a root directory and open their channels.
//!
//! The host writes `offer` last (by rename), so a directory with an `offer` file has its `ring` and
//! `doorbell` ready. An offer is identified by its file's (device, inode): a host that re-offers after
//! a restart renames a new file into place, which the runtime sees as a new offer to open.

use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::Doorbell;
use crate::offer::{MAX_OFFER_FILE_LEN, Offer, OfferError};
use hvisd_ring::{RingError, SharedMapping};
use std::fs::File;
use std::io::{self, Read};
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
    pub fn open(&self, found: &FoundOffer, label: &str) -> Result<Channel, ShmError> {
        let ring_path = found.dir.join("ring");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ring_path)
            .map_err(io_err("opening", &ring_path))?;
        let actual = file
            .metadata()
            .map_err(io_err("reading metadata of", &ring_path))?
            .len();
        let expected = found.offer.ring_file_len();
        if actual != expected {
            return Err(ShmError::RingFileSize {
                dir: found.dir.clone(),
                ring_size: found.offer.ring_size,
                expected,
                actual,
            });
        }
        let ring_err = |source| ShmError::Ring {
            dir: found.dir.clone(),
            source,
        };
        // Offer::parse bounds ring_size to 64 MiB, so the length fits usize on every target we build.
        let ring_size = found.offer.ring_size as usize;
        let map = SharedMapping::map_file(&file, 2 * ring_size).map_err(ring_err)?;
        let rings = RingPair::new(map, ring_size, Role::Guest).map_err(ring_err)?;
        rings.set_feature_bits();
        let doorbell_path = found.dir.join("doorbell");
        let doorbell =
            Doorbell::connect(&doorbell_path).map_err(io_err("connecting to", &doorbell_path))?;
        Ok(Channel::new(rings, doorbell, label))
    }
}

fn read_offer(dir: &Path, name: &str) -> Result<Option<FoundOffer>, ShmError> {
    let path = dir.join("offer");
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening", &path)(e)),
    };
    let meta = file
        .metadata()
        .map_err(io_err("reading metadata of", &path))?;
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
