//! The shm transport, guest side: find offers under a root directory and open their channels.
//!
//! The host writes `offer` last (by rename), so a directory with an `offer` file has its `ring` and
//! `doorbell` ready. An offer is identified by its file's (device, inode): a host that re-offers after
//! a restart renames a new file into place, which the runtime sees as a new offer to open.

use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::Doorbell;
use crate::offer::{MAX_OFFER_FILE_LEN, Offer, OfferError};
use hvisd_ring::{RingError, SharedMapping};
use rustix::fs::{Mode, OFlags};
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

/// Most offer directories one scan looks at; a host that makes more gets the rest ignored (and
/// counted), so it cannot make the runtime hold unbounded state or descriptors.
pub const MAX_OFFER_DIRS: usize = 1024;

/// What one scan of a root found.
#[derive(Debug, Default)]
pub struct ShmScan {
    /// Offers, or (identity, problem) for malformed ones, in identity order.
    pub offers: Vec<Result<FoundOffer, (String, ShmError)>>,
    /// Directories without an `offer` file yet (a host still preparing one).
    pub pending: Vec<PathBuf>,
    /// Directories not looked at because of [`MAX_OFFER_DIRS`].
    pub skipped: usize,
}

impl FoundOffer {
    /// What identifies this offer: its directory and which `offer` file (device, inode); a
    /// replaced offer gets a new identity.
    pub fn identity(&self) -> String {
        let (dev, ino) = self.identity;
        format!(
            "{}@{dev}:{ino}",
            hvisd_protocol::text::escape_bytes(self.dir.as_os_str().as_encoded_bytes(), 256)
        )
    }
}

fn scan_key(entry: &Result<FoundOffer, (String, ShmError)>) -> String {
    match entry {
        Ok(found) => found.identity(),
        Err((identity, _)) => identity.clone(),
    }
}

/// Why an offer could not be read or opened.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The offer's directory entry is a symlink.
    #[error("{}: an offer directory must not be a symlink; refused", shown(dir))]
    Symlink {
        /// The entry.
        dir: PathBuf,
    },
    /// The directory name is not UTF-8 (so it cannot be a GUID).
    #[error("offer directory {name:?} is not named by an instance GUID")]
    BadName {
        /// The name, escaped.
        name: String,
    },
    /// The offer file is malformed.
    #[error("{}: {source}", shown(dir))]
    Offer {
        /// The offer directory.
        dir: PathBuf,
        /// What was wrong.
        source: OfferError,
    },
    /// The offer file is larger than any valid offer.
    #[error(
        "{}/offer is {len} bytes; an offer is at most {MAX_OFFER_FILE_LEN}",
        shown(dir)
    )]
    OfferTooLarge {
        /// The offer directory.
        dir: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The ring file's size does not match the offer.
    #[error(
        "{}/ring is {actual} bytes but ring_size={ring_size} needs exactly {expected}",
        shown(dir)
    )]
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
    #[error("{}/ring: {source}", shown(dir))]
    Ring {
        /// The offer directory.
        dir: PathBuf,
        /// The ring error.
        source: RingError,
    },
    /// A file or socket operation failed.
    #[error("{what} {}: {source}", shown(path))]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A host-chosen path, escaped for messages.
fn shown(path: &Path) -> String {
    hvisd_protocol::text::escape_bytes(path.as_os_str().as_encoded_bytes(), 256)
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

    /// Lists the offers present now, in a total order (by identity). Directories without an
    /// `offer` file are not offers yet and are skipped silently; a malformed offer is returned as
    /// an error with an identity of its own (directory name and inode), so the caller can log
    /// each once. At most [`MAX_OFFER_DIRS`] directories are looked at; the rest are counted.
    pub fn scan(&self) -> io::Result<ShmScan> {
        let mut scan = ShmScan::default();
        let mut looked_at = 0usize;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let file_type = entry.file_type().ok();
            if file_type.is_some_and(|t| t.is_symlink()) {
                // An offer directory must be a real directory of the root: a symlink could point
                // anywhere on this machine. Refused, and reported like any broken offer.
                let name = entry.file_name();
                let shown = hvisd_protocol::text::escape_bytes(name.as_encoded_bytes(), 64);
                let identity = format!("{shown}@{}", std::os::unix::fs::DirEntryExt::ino(&entry));
                scan.offers
                    .push(Err((identity, ShmError::Symlink { dir: entry.path() })));
                continue;
            }
            if !file_type.is_some_and(|t| t.is_dir()) {
                continue;
            }
            if looked_at == MAX_OFFER_DIRS {
                scan.skipped += 1;
                continue;
            }
            looked_at += 1;
            let name = entry.file_name();
            let shown = hvisd_protocol::text::escape_bytes(name.as_encoded_bytes(), 64);
            let identity = format!("{shown}@{}", std::os::unix::fs::DirEntryExt::ino(&entry));
            let Some(name) = name.to_str() else {
                scan.offers
                    .push(Err((identity.clone(), ShmError::BadName { name: shown })));
                continue;
            };
            match read_offer(&entry.path(), name) {
                Ok(Some(offer)) => scan.offers.push(Ok(offer)),
                Ok(None) => scan.pending.push(entry.path()),
                Err(e) => scan.offers.push(Err((identity, e))),
            }
        }
        // A total order: sorting with a comparator that is not one may panic (Rust >= 1.81).
        scan.offers.sort_by_cached_key(scan_key);
        Ok(scan)
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
        let map = SharedMapping::map_file(&file, 2 * ring_size).map_err(|e| ring_err(e.into()))?;
        let rings = RingPair::new(map, ring_size, Role::Guest).map_err(ring_err)?;
        rings.set_feature_bits();

        let doorbell_path = found.dir.join("doorbell");
        let (_socket, pinned) = pin_socket(&dir_fd, &found.dir, "doorbell")?;
        let doorbell =
            Doorbell::connect(&pinned).map_err(io_err("connecting to", &doorbell_path))?;
        Ok(Channel::new(rings, doorbell, label))
    }
}

/// Pins the socket `dir/name` (O_PATH, no link followed), checks it is a socket, and returns the
/// pinned descriptor with the `/proc/self/fd/N` path to connect through while it is held:
/// swapping the entry after the check cannot make the daemon connect to another socket of this
/// machine, and the path stays within the 108-byte socket path limit however long the root is.
pub(crate) fn pin_socket(
    dir_fd: &OwnedFd,
    dir: &Path,
    name: &str,
) -> Result<(OwnedFd, PathBuf), ShmError> {
    let path = dir.join(name);
    let socket = rustix::fs::openat(
        dir_fd,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening", &path)(e.into()))?;
    let stat = rustix::fs::fstat(&socket).map_err(|e| io_err("checking", &path)(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(io_err("checking", &path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the {name} must be a socket"),
        )));
    }
    let pinned = PathBuf::from(format!("/proc/self/fd/{}", socket.as_raw_fd()));
    Ok((socket, pinned))
}

/// Opens a directory without following a symlink in its last component.
pub(crate) fn open_dir_nofollow(dir: &Path) -> Result<OwnedFd, ShmError> {
    rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening", dir)(e.into()))
}

/// Tells the runtime when an shm root may have changed (inotify on the root and on each offer
/// directory), so an idle runtime sleeps instead of polling. Events are only hints: any event
/// leads to a full scan, and a missed one is made up by the runtime's slow fallback scan.
pub struct ShmWatcher {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl ShmWatcher {
    /// Watches `root` for directories appearing and disappearing.
    pub fn new(root: &Path) -> io::Result<Self> {
        use rustix::fs::inotify;
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(&fd, root, Self::mask())?;
        Ok(Self {
            fd: hvisd_sys::async_fd::register(fd, tokio::io::Interest::READABLE)?,
        })
    }

    fn mask() -> rustix::fs::inotify::WatchFlags {
        use rustix::fs::inotify::WatchFlags as W;
        W::CREATE
            | W::DELETE
            | W::MOVED_FROM
            | W::MOVED_TO
            | W::CLOSE_WRITE
            | W::DELETE_SELF
            | W::MOVE_SELF
            | W::ONLYDIR
            | W::DONT_FOLLOW
    }

    /// Also watches an offer directory (an `offer` renamed into place, a rescind). Returns the
    /// watch descriptor (the same one again for a directory already watched), or `None` on a
    /// failure (the kernel's watch limit), which leaves that directory to the fallback scan.
    pub fn watch(&self, dir: &Path) -> Option<i32> {
        rustix::fs::inotify::add_watch(self.fd.get_ref(), dir, Self::mask()).ok()
    }

    /// Waits for the next batch of events and consumes it. Cancel safe: events are read only in
    /// the poll that returns.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                match rustix::io::read(self.fd.get_ref(), &mut buf[..]) {
                    Ok(0) => break,
                    Ok(_) => got = true,
                    Err(rustix::io::Errno::AGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if got {
                return Ok(());
            }
        }
    }
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
        let mut found = root.scan().unwrap().offers;
        assert_eq!(found.len(), 1);
        found.pop().unwrap().map_err(|(_, e)| e)
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

    #[tokio::test]
    async fn a_doorbell_symlinked_to_another_socket_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShmRoot::new(tmp.path().join("root"));
        std::fs::create_dir(root.path()).unwrap();
        let _published = publish_offer(root.path(), &offer()).unwrap();
        // Some other service's socket on this machine.
        let victim = tmp.path().join("victim.sock");
        let _listener = crate::doorbell::SeqpacketListener::bind(&victim).unwrap();
        let doorbell = root
            .path()
            .join(offer().instance_id.to_string())
            .join("doorbell");
        std::fs::remove_file(&doorbell).unwrap();
        std::os::unix::fs::symlink(&victim, &doorbell).unwrap();
        let found = only_offer(&root).unwrap();
        let err = root.open(&found, "test").err().unwrap();
        assert!(err.to_string().contains("doorbell"), "{err}");
    }

    #[test]
    fn many_offers_some_malformed_sort_in_a_total_order_without_panicking() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..90u32 {
            let dir = tmp
                .path()
                .join(format!("{i:08x}-0000-4000-8000-000000000000"));
            std::fs::create_dir(&dir).unwrap();
            let text = match i % 3 {
                0 => "garbage".to_string(),
                1 => format!(
                    "class_id=57164f39-9115-4e78-ab55-382f3bd5422d\ninstance_id={i:08x}-0000-4000-8000-000000000000\nring_size=8192\n"
                ),
                _ => "class_id=57164f39-9115-4e78-ab55-382f3bd5422d\n".to_string(),
            };
            std::fs::write(dir.join("offer"), text).unwrap();
        }
        let scan = ShmRoot::new(tmp.path()).scan().unwrap();
        assert_eq!(scan.offers.len(), 90);
        assert_eq!(scan.offers.iter().filter(|o| o.is_ok()).count(), 30);
        let keys: Vec<String> = scan.offers.iter().map(scan_key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
