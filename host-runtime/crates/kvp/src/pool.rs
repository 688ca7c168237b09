//! The pool files `<dir>/.kvp_pool_0..4`: 2560-byte records (512-byte key, 2048-byte value, both
//! NUL-padded UTF-8), shared with other programs.
//!
//! # Who else touches these files
//! * cloud-init's Hyper-V reporting handler (and azure-init, WALinuxAgent) *append* records to
//!   `.kvp_pool_1`: `open(O_APPEND)`, `flock(LOCK_EX)`, `write`, unlock. Once per boot cloud-init
//!   also truncates that file, with no lock at all.
//! * `hv_kvp_daemon` (which hvisd replaces) locks with `fcntl(F_SETLKW)` and rewrites in place.
//! * `hvisd kvp ...` (another process) uses this module with the same locks.
//! * Any local user can `flock` a pool file (they are 0644) and hold the lock for ever.
//!
//! # How hvisd writes
//! A write takes **both** `flock(LOCK_EX)` and an exclusive `fcntl` record lock (open file
//! description lock, which conflicts with `hv_kvp_daemon`'s classic one), without ever blocking:
//! the attempts are non-blocking and retried until [`StoreOptions::lock_timeout`], after which the
//! operation fails with [`StoreError::Locked`] naming the holder when the kernel says who it is.
//! Under the locks the file is re-read if anything changed since it was last read (another
//! writer, a truncation), and then only the bytes that change are written in place: a SET of an
//! existing key rewrites that one record, a new key appends one record, a DELETE shifts the
//! records after it (as the C daemon's `strcpy` loop does) and truncates. The file keeps its inode,
//! so an appender that opened it earlier always appends to the live file (the old rewrite-and-
//! rename scheme had to chase appends into replaced files).
//!
//! # What survives what
//! * **A killed hvisd (`kill -9`)**: a write is in the page cache as soon as `pwrite` returns, and
//!   the request is answered only after that, so every acknowledged change survives. Overwriting
//!   existing bytes (a SET of an existing key, a DELETE) is journaled first: the new bytes go to
//!   `.kvp_pool_N.journal` (checksummed) before they are written in place, and the next writer that
//!   takes the pool's lock replays an entry that a kill interrupted, so a record is never left half
//!   old, half new. An append interrupted by a kill can leave a partial trailing record, which
//!   every reader ignores (as the C daemon's `fread` of whole records does) and the next writer
//!   cuts off.
//! * **A power loss**: nothing is `fsync`ed unless [`StoreOptions::sync`] is set; writes of the
//!   last seconds (the kernel's writeback interval, 30 s at most by default) can be lost, but the
//!   file is never truncated: records written earlier stay. `hv_kvp_daemon` rewrites its whole
//!   pool in place (`fopen("w")`, truncating first) on every change, so a power loss at the wrong
//!   moment leaves it empty or torn.
//! * **Readers** never see a torn record from hvisd: they take shared locks, which exclude our
//!   exclusive ones.
//!
//! # Bounds
//! At most [`StoreOptions::max_records`] records per pool are created by hvisd (a SET of a new
//! key past it fails with [`StoreError::PoolFull`]); files larger than [`MAX_POOL_FILE`] are
//! refused. One descriptor per pool and one per journal are held open.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisd_protocol::kvp::{MAX_KEY_SIZE, MAX_VALUE_SIZE, Pool};
use hvisd_protocol::kvp_daemon::cstr;
use hvisd_sys::lock::LockKind;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};

/// Bytes per record.
pub const RECORD_SIZE: usize = MAX_KEY_SIZE + MAX_VALUE_SIZE;
/// Largest pool file hvisd reads (about 26 000 records); a larger file is refused with an error.
pub const MAX_POOL_FILE: u64 = 64 << 20;

/// One record exactly as it is on disk.
#[derive(Clone, PartialEq, Eq)]
pub struct Record(Box<[u8; RECORD_SIZE]>);

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Record({:?} = {:?})",
            self.key_lossy(),
            self.value_lossy()
        )
    }
}

impl Record {
    /// A zero-padded record. Keys are cut to 511 bytes, values to 2047 (room for the NUL); callers
    /// that must not cut check against `MAX_KEY_LEN`/`MAX_VALUE_LEN` first.
    pub fn new(key: &[u8], value: &[u8]) -> Record {
        let mut r = Record(Box::new([0u8; RECORD_SIZE]));
        let k = key.len().min(MAX_KEY_SIZE - 1);
        r.0[..k].copy_from_slice(&key[..k]);
        let v = value.len().min(MAX_VALUE_SIZE - 1);
        r.0[MAX_KEY_SIZE..MAX_KEY_SIZE + v].copy_from_slice(&value[..v]);
        r
    }

    fn from_bytes(b: &[u8]) -> Record {
        let mut r = Record(Box::new([0u8; RECORD_SIZE]));
        r.0.copy_from_slice(&b[..RECORD_SIZE]);
        r
    }

    /// The whole 512-byte key field.
    pub fn key_field(&self) -> &[u8] {
        &self.0[..MAX_KEY_SIZE]
    }

    /// The whole 2048-byte value field.
    pub fn value_field(&self) -> &[u8] {
        &self.0[MAX_KEY_SIZE..]
    }

    /// Mutable key field.
    pub fn key_field_mut(&mut self) -> &mut [u8] {
        &mut self.0[..MAX_KEY_SIZE]
    }

    /// Mutable value field.
    pub fn value_field_mut(&mut self) -> &mut [u8] {
        &mut self.0[MAX_KEY_SIZE..]
    }

    /// Key bytes up to the NUL (bounded by the field, unlike C's `strlen`).
    pub fn key(&self) -> &[u8] {
        cstr(self.key_field())
    }

    /// Value bytes up to the NUL.
    pub fn value(&self) -> &[u8] {
        cstr(self.value_field())
    }

    /// The key as text (invalid UTF-8 replaced).
    pub fn key_lossy(&self) -> String {
        String::from_utf8_lossy(self.key()).into_owned()
    }

    /// The value as text (invalid UTF-8 replaced).
    pub fn value_lossy(&self) -> String {
        String::from_utf8_lossy(self.value()).into_owned()
    }

    /// The 2560 bytes as written to disk.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }

    fn is_all_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

/// The records of a pool, in file order. Records are shared with published snapshots (cloning
/// this is cheap); changing one copies only that record if a snapshot still holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records(Vec<Arc<Record>>);

impl Records {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The records in file order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Record> + ExactSizeIterator {
        self.0.iter().map(|r| &**r)
    }

    /// Record `i`.
    pub fn get(&self, i: usize) -> Option<&Record> {
        self.0.get(i).map(|r| &**r)
    }

    /// Index of the first record matching `pred`.
    pub fn position(&self, mut pred: impl FnMut(&Record) -> bool) -> Option<usize> {
        self.0.iter().position(|r| pred(r))
    }

    /// Appends a record.
    pub fn push(&mut self, record: Record) {
        self.0.push(Arc::new(record));
    }

    /// Removes the last record.
    pub fn pop(&mut self) -> Option<Record> {
        self.0.pop().map(Arc::unwrap_or_clone)
    }

    /// Removes record `i`, shifting the later ones.
    pub fn remove(&mut self, i: usize) -> Record {
        Arc::unwrap_or_clone(self.0.remove(i))
    }

    /// Keeps the records matching `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&Record) -> bool) {
        self.0.retain(|r| keep(r));
    }

    /// The records from `i` on, as bytes.
    fn bytes_from(&self, i: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len().saturating_sub(i) * RECORD_SIZE);
        for r in self.0.iter().skip(i) {
            out.extend_from_slice(r.as_bytes());
        }
        out
    }
}

impl std::ops::Index<usize> for Records {
    type Output = Record;
    fn index(&self, i: usize) -> &Record {
        &self.0[i]
    }
}

impl std::ops::IndexMut<usize> for Records {
    fn index_mut(&mut self, i: usize) -> &mut Record {
        Arc::make_mut(&mut self.0[i])
    }
}

impl FromIterator<Record> for Records {
    fn from_iter<I: IntoIterator<Item = Record>>(iter: I) -> Self {
        Records(iter.into_iter().map(Arc::new).collect())
    }
}

/// The records of one pool as last read or written, and which file state they belong to.
#[derive(Debug)]
pub struct Snapshot {
    id: FileId,
    path: PathBuf,
    /// The records.
    pub records: Records,
}

/// The latest [`Snapshot`] of each pool, published by the store's owner for readers on other
/// threads: a reader that finds the file unchanged since (one `stat`, which no other process's
/// lock can stall) answers from it without a trip to the owner thread.
#[derive(Debug, Default)]
pub struct Published {
    pools: [std::sync::RwLock<Option<Arc<Snapshot>>>; 5],
    /// While writes are held (see [`PoolStore::hold`]) the files are not the truth: every read
    /// goes to the owner, which answers from its held records.
    held: std::sync::atomic::AtomicBool,
}

impl Published {
    /// The snapshot of `pool` if the file is unchanged since it was taken (and writes are not
    /// held).
    pub fn fresh(&self, pool: Pool) -> Option<Arc<Snapshot>> {
        if self.held.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let snap = self.pools[pool as usize]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let meta = std::fs::symlink_metadata(&snap.path).ok()?;
        (FileId::of(&meta) == snap.id).then_some(snap)
    }

    fn set(&self, pool: Pool, snap: Option<Arc<Snapshot>>) {
        *self.pools[pool as usize]
            .write()
            .unwrap_or_else(|p| p.into_inner()) = snap;
    }
}

/// Why a pool operation failed. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on a pool file failed.
    #[error("KVP pool {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What hvisd was doing, e.g. "reading".
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pool file is larger than [`MAX_POOL_FILE`].
    #[error("KVP pool {path}: file is {size} bytes, hvisd reads at most {MAX_POOL_FILE}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process held a conflicting lock for the whole lock timeout.
    #[error("KVP pool {path}: still locked by {holder} after {waited_ms} ms; try again later")]
    Locked {
        /// The file.
        path: PathBuf,
        /// Who holds it, as far as the kernel tells (`/proc/locks`), e.g. "pid 4242 (python3), flock WRITE".
        holder: String,
        /// How long hvisd waited.
        waited_ms: u64,
    },
    /// The pool has as many records as hvisd creates.
    #[error("KVP pool {pool}: it holds {max} records, the most hvisd creates; delete keys first")]
    PoolFull {
        /// The pool.
        pool: Pool,
        /// The cap.
        max: usize,
    },
    /// The pool directory or a pool file is not what hvisd may trust.
    #[error("KVP pool {path}: {problem}")]
    Untrusted {
        /// The path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The pool store's thread has stopped (the runtime is shutting down).
    #[error("the KVP pool store has stopped")]
    Stopped,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn rio<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> StoreError + 'a {
    move |e| StoreError::Io {
        path: path.to_path_buf(),
        what,
        source: e.into(),
    }
}

/// How the pool files are written.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How long a lock attempt may wait for other processes' locks before the operation fails.
    pub lock_timeout: Duration,
    /// Most records hvisd lets a pool reach by adding keys.
    pub max_records: usize,
    /// `fdatasync` after every write (survives power loss; costs a disk flush per SET).
    pub sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: Duration::from_millis(1000),
            max_records: 1024,
            sync: false,
        }
    }
}

/// What a change to a pool's records did, so that only those bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing to write.
    None,
    /// Record `i` changed in place.
    Modified(usize),
    /// One record was pushed at the end.
    Appended,
    /// Records from `i` on changed and there is one record fewer (a DELETE's shift).
    Removed(usize),
    /// Anything else: the whole file is rewritten in place.
    Rewritten,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

struct PoolFile {
    name: String,
    path: PathBuf,
    file: Option<File>,
    journal: Option<File>,
    cached: Option<(FileId, Records)>,
    reads: u64,
}

/// The five pool files of one directory, owned by one thread (the runtime's pool-store thread,
/// see [`crate::store`], or the `hvisd kvp` command).
pub struct PoolStore {
    dir: PathBuf,
    dir_fd: OwnedFd,
    pools: Vec<PoolFile>,
    options: StoreOptions,
    published: Arc<Published>,
    /// While file systems are frozen: the changes not yet written, per pool.
    held: Option<Vec<Option<HeldPool>>>,
}

/// One pool's writes held during a freeze: the records when the hold began and as changed since.
#[derive(Debug)]
struct HeldPool {
    base: Records,
    now: Records,
}

/// What [`PoolStore::release`] wrote.
#[derive(Debug, Default)]
pub struct Released {
    /// Records set or removed in the files.
    pub written: usize,
    /// Changes that could not be written (each message names the file); the others were.
    pub failed: Vec<String>,
}

impl std::fmt::Debug for PoolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolStore").field("dir", &self.dir).finish()
    }
}

/// Held locks on one pool file; dropping releases them.
struct Held<'a>(&'a File);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = hvisd_sys::lock::unlock(self.0);
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

/// Takes `flock` and an OFD record lock of `kind` on `file`, never blocking: non-blocking attempts
/// are retried with a growing pause until `timeout`.
fn lock<'f>(
    file: &'f File,
    kind: LockKind,
    timeout: Duration,
    path: &Path,
) -> Result<Held<'f>, StoreError> {
    let start = Instant::now();
    let flock_op = match kind {
        LockKind::Shared => FlockOperation::NonBlockingLockShared,
        LockKind::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    let mut pause = Duration::from_micros(500);
    loop {
        // flock first, then the record lock: every hvisd process takes them in this order, and
        // cloud-init (flock only) and hv_kvp_daemon (fcntl only) each take one, so no cycle forms.
        match rustix::fs::flock(file, flock_op) {
            Ok(()) => match hvisd_sys::lock::try_lock(file, kind) {
                Ok(true) => return Ok(Held(file)),
                Ok(false) => {
                    let _ = rustix::fs::flock(file, FlockOperation::Unlock);
                }
                Err(e) => {
                    let _ = rustix::fs::flock(file, FlockOperation::Unlock);
                    return Err(rio(path, "taking the fcntl lock")(e));
                }
            },
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(rio(path, "taking the flock")(e)),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(StoreError::Locked {
                path: path.to_path_buf(),
                holder: lock_holders(file),
                waited_ms: waited.as_millis() as u64,
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Who holds locks on `file`, from `/proc/locks` (for the error message only).
fn lock_holders(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let (major, minor) = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let Ok(text) = std::fs::read_to_string("/proc/locks") else {
        return "another process".into();
    };
    let mut holders = Vec::new();
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; OFD locks show pid -1.
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = fields.iter().position(|f| *f == wanted) else {
            continue;
        };
        if i < 2 || fields.get(1) == Some(&"->") {
            continue;
        }
        let (class, mode, pid) = (fields[1], fields[i - 2], fields[i - 1]);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm: String = comm
            .trim()
            .chars()
            .take(16)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        holders.push(if comm.is_empty() {
            format!("pid {pid}, {class} {mode}")
        } else {
            format!("pid {pid} ({comm}), {class} {mode}")
        });
        if holders.len() == 4 {
            break;
        }
    }
    if holders.is_empty() {
        "another process".into()
    } else {
        holders.join("; ")
    }
}

/// Journal entry header: magic, dev, ino, size before, offset, truncate-to, payload length,
/// checksum (FNV-1a over the other fields and the payload), each a little-endian u64.
const JOURNAL_MAGIC: u64 = u64::from_le_bytes(*b"HVKVPJ01");
const JOURNAL_HEADER: usize = 64;
const NO_TRUNCATE: u64 = u64::MAX;

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

struct JournalEntry {
    dev: u64,
    ino: u64,
    size_before: u64,
    offset: u64,
    truncate_to: u64,
    payload: Vec<u8>,
}

impl JournalEntry {
    fn header_fields(&self) -> [u64; 6] {
        [
            self.dev,
            self.ino,
            self.size_before,
            self.offset,
            self.truncate_to,
            self.payload.len() as u64,
        ]
    }

    fn checksum(&self) -> u64 {
        let mut fields = [0u8; 48];
        for (i, v) in self.header_fields().iter().enumerate() {
            fields[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        fnv1a(&[&fields, &self.payload])
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(JOURNAL_HEADER + self.payload.len());
        b.extend_from_slice(&JOURNAL_MAGIC.to_le_bytes());
        for v in self.header_fields() {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.checksum().to_le_bytes());
        b.extend_from_slice(&self.payload);
        b
    }

    /// Reads a pending entry; `None` if there is none or it is incomplete (a write interrupted
    /// before the in-place write began: nothing to replay).
    fn read(journal: &File) -> Option<JournalEntry> {
        let mut h = [0u8; JOURNAL_HEADER];
        journal.read_exact_at(&mut h, 0).ok()?;
        let word = |i: usize| u64::from_le_bytes(h[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
        if word(0) != JOURNAL_MAGIC {
            return None;
        }
        let len = word(6);
        if len > MAX_POOL_FILE {
            return None;
        }
        let mut payload = vec![0u8; len as usize];
        journal
            .read_exact_at(&mut payload, JOURNAL_HEADER as u64)
            .ok()?;
        let entry = JournalEntry {
            dev: word(1),
            ino: word(2),
            size_before: word(3),
            offset: word(4),
            truncate_to: word(5),
            payload,
        };
        (entry.checksum() == word(7)).then_some(entry)
    }
}

/// The file name of `pool` in the pool directory (`.kvp_pool_N`, as `hv_kvp_daemon` names it).
pub fn pool_file_name(pool: Pool) -> String {
    format!(".kvp_pool_{}", pool.number())
}

impl PoolStore {
    /// Opens (creating as the C daemon does: directory 0755, files 0644) the pools in `dir`. The
    /// directory must belong to this user and be writable by nobody else (pool files are written
    /// by root; a directory others can write would let them swap the files).
    pub fn open(dir: impl Into<PathBuf>, options: StoreOptions) -> Result<PoolStore, StoreError> {
        let dir = dir.into();
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .map_err(io(&dir, "creating the pool directory"))?;
        }
        Self::open_existing(dir, options)
    }

    /// Opens the pools in `dir`, which must exist (the operator's tool never creates it).
    pub fn open_existing(
        dir: impl Into<PathBuf>,
        options: StoreOptions,
    ) -> Result<PoolStore, StoreError> {
        let dir = dir.into();
        let dir_fd = rustix::fs::open(
            &dir,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(rio(&dir, "opening the pool directory"))?;
        let stat = rustix::fs::fstat(&dir_fd).map_err(rio(&dir, "stat of the pool directory"))?;
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me {
            return Err(StoreError::Untrusted {
                path: dir,
                problem: format!(
                    "the directory belongs to uid {}, not to uid {me} that runs hvisd",
                    stat.st_uid
                ),
            });
        }
        if stat.st_mode & 0o022 != 0 {
            return Err(StoreError::Untrusted {
                path: dir,
                problem: format!(
                    "the directory is mode {:o}: others could replace the pool files; chmod 755 it",
                    stat.st_mode & 0o7777
                ),
            });
        }
        let pools = Pool::ALL
            .into_iter()
            .map(|pool| {
                let name = pool_file_name(pool);
                PoolFile {
                    path: dir.join(&name),
                    name,
                    file: None,
                    journal: None,
                    cached: None,
                    reads: 0,
                }
            })
            .collect();
        let mut store = PoolStore {
            dir,
            dir_fd,
            pools,
            options,
            published: Arc::default(),
            held: None,
        };
        let mut created = false;
        for pool in Pool::ALL {
            created |= store.ensure_open(pool)?;
            store.repair(pool);
        }
        if created {
            // Make the new directory entries durable.
            let _ = rustix::fs::fsync(&store.dir_fd);
        }
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `pool`.
    pub fn path(&self, pool: Pool) -> &Path {
        &self.pools[pool as usize].path
    }

    /// The snapshots this store publishes (see [`Published`]).
    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    fn cache(&mut self, pool: Pool, cached: Option<(FileId, Records)>) {
        let st = &mut self.pools[pool as usize];
        self.published.set(
            pool,
            cached.as_ref().map(|(id, records)| {
                Arc::new(Snapshot {
                    id: *id,
                    path: st.path.clone(),
                    records: records.clone(),
                })
            }),
        );
        st.cached = cached;
    }

    /// The options in force.
    pub fn options(&self) -> StoreOptions {
        self.options
    }

    /// How many times `pool`'s file was actually read and parsed (for tests of change detection).
    pub fn parse_count(&self, pool: Pool) -> u64 {
        self.pools[pool as usize].reads
    }

    /// Opens the pool's file if it is not open, or reopens it if the path now names another file
    /// (replaced or deleted by someone else). Returns whether a file was created.
    fn ensure_open(&mut self, pool: Pool) -> Result<bool, StoreError> {
        let st = &mut self.pools[pool as usize];
        let at_path = rustix::fs::statat(&self.dir_fd, st.name.as_str(), AtFlags::SYMLINK_NOFOLLOW);
        if let (Some(file), Ok(now)) = (&st.file, &at_path) {
            let held = file.metadata().map_err(io(&st.path, "fstat"))?;
            if held.dev() == now.st_dev && held.ino() == now.st_ino {
                return Ok(false);
            }
        }
        if st.file.is_some() {
            tracing::info!(pool = %pool, "KVP: the pool file was replaced or removed by another program; following it");
        }
        st.file = None;
        st.cached = None;
        self.published.set(pool, None);
        let created = matches!(at_path, Err(rustix::io::Errno::NOENT));
        let fd = rustix::fs::openat(
            &self.dir_fd,
            st.name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(rio(&st.path, "opening (a symlink is refused)"))?;
        let stat = rustix::fs::fstat(&fd).map_err(rio(&st.path, "fstat"))?;
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() {
            return Err(StoreError::Untrusted {
                path: st.path.clone(),
                problem: "is not a regular file".into(),
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me {
            return Err(StoreError::Untrusted {
                path: st.path.clone(),
                problem: format!(
                    "belongs to uid {}, not to uid {me} that runs hvisd; chown it",
                    stat.st_uid
                ),
            });
        }
        st.file = Some(File::from(fd));
        Ok(created)
    }

    /// Replays a write a killed process left in `pool`'s journal, if the lock can be had now.
    fn repair(&mut self, pool: Pool) {
        if self.journal(pool).is_err() {
            return;
        }
        let st = &self.pools[pool as usize];
        let (Some(file), Some(journal)) = (&st.file, &st.journal) else {
            return;
        };
        if let Ok(_held) = lock(file, LockKind::Exclusive, Duration::ZERO, &st.path)
            && let Err(e) = replay_journal(file, journal, &st.path)
        {
            tracing::warn!("KVP: {e}");
        }
    }

    fn journal(&mut self, pool: Pool) -> Result<&File, StoreError> {
        let st = &mut self.pools[pool as usize];
        if st.journal.is_none() {
            let name = format!("{}.journal", st.name);
            let fd = rustix::fs::openat(
                &self.dir_fd,
                name.as_str(),
                OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(rio(&st.path, "opening the journal"))?;
            st.journal = Some(File::from(fd));
        }
        Ok(st
            .journal
            .as_ref()
            .unwrap_or_else(|| unreachable!("opened above")))
    }

    /// Runs `f` on the current records of `pool`: from memory when the file is unchanged since it
    /// was last read, else re-read under shared locks.
    pub fn read<R>(&mut self, pool: Pool, f: impl FnOnce(&Records) -> R) -> Result<R, StoreError> {
        if let Some(Some(held)) = self.held.as_ref().map(|h| &h[pool as usize]) {
            return Ok(f(&held.now));
        }
        self.ensure_open(pool)?;
        let timeout = self.options.lock_timeout;
        let st = &mut self.pools[pool as usize];
        let file = st
            .file
            .as_ref()
            .unwrap_or_else(|| unreachable!("opened above"));
        let id = FileId::of(&file.metadata().map_err(io(&st.path, "fstat"))?);
        if !matches!(&st.cached, Some((cached, _)) if *cached == id) {
            let held = lock(file, LockKind::Shared, timeout, &st.path)?;
            let fresh = read_all(held.0, &st.path)?;
            drop(held);
            st.reads += 1;
            self.cache(pool, Some(fresh));
        }
        let st = &self.pools[pool as usize];
        Ok(f(st
            .cached
            .as_ref()
            .map(|(_, r)| r)
            .unwrap_or(&Records::default())))
    }

    /// Runs `f` on the records of `pool` under both exclusive locks and writes what it says
    /// changed (see [`Change`]). A new record past [`StoreOptions::max_records`] is refused.
    pub fn update<R>(
        &mut self,
        pool: Pool,
        f: impl FnOnce(&mut Records) -> (R, Change),
    ) -> Result<R, StoreError> {
        if self.held.is_some() {
            return self.update_held(pool, f);
        }
        self.ensure_open(pool)?;
        let result = self.update_open(pool, f);
        // Publish what the file now holds (or, after a failure, nothing: the next operation
        // starts from the file).
        let cached = self.pools[pool as usize].cached.take();
        self.cache(pool, if result.is_ok() { cached } else { None });
        result
    }

    fn update_open<R>(
        &mut self,
        pool: Pool,
        f: impl FnOnce(&mut Records) -> (R, Change),
    ) -> Result<R, StoreError> {
        let options = self.options;
        // The journal is opened before the locks so that the borrow of the pool file below is the
        // only one held while writing.
        self.journal(pool)?;
        let st = &mut self.pools[pool as usize];
        let path = st.path.clone();
        let file = st
            .file
            .as_ref()
            .unwrap_or_else(|| unreachable!("opened by update"));
        let journal = st
            .journal
            .as_ref()
            .unwrap_or_else(|| unreachable!("opened above"));
        let held = lock(file, LockKind::Exclusive, options.lock_timeout, &path)?;
        replay_journal(file, journal, &path)?;
        let meta = file.metadata().map_err(io(&path, "fstat"))?;
        let mut id = FileId::of(&meta);
        if !id.size.is_multiple_of(RECORD_SIZE as u64) {
            // A partial trailing record: an append interrupted by a kill. Readers ignore it; cut it
            // off now so that appenders line up again.
            let whole = id.size / RECORD_SIZE as u64 * RECORD_SIZE as u64;
            tracing::warn!(pool = %pool, bytes = id.size - whole, "KVP: removing a partial record at the end of the pool file");
            file.set_len(whole)
                .map_err(io(&path, "cutting a partial record"))?;
            id = FileId::of(&file.metadata().map_err(io(&path, "fstat"))?);
            st.cached = None;
        }
        let mut records = match st.cached.take() {
            Some((cached, records)) if cached == id => records,
            _ => {
                st.reads += 1;
                read_all(file, &path)?.1
            }
        };
        let before = records.len();
        let (result, change) = f(&mut records);
        if change == Change::Appended && records.len() > options.max_records.max(before) {
            return Err(StoreError::PoolFull {
                pool,
                max: options.max_records,
            });
        }
        let rs = RECORD_SIZE as u64;
        let size_before = id.size;
        match change {
            Change::None => {}
            Change::Modified(i) => {
                let r = records.get(i).map(Record::as_bytes).unwrap_or(&[]);
                journaled_write(
                    file,
                    journal,
                    &path,
                    size_before,
                    i as u64 * rs,
                    r,
                    NO_TRUNCATE,
                )?;
            }
            Change::Appended => {
                let i = records.len().saturating_sub(1);
                if let Some(r) = records.get(i) {
                    file.write_all_at(r.as_bytes(), i as u64 * rs)
                        .map_err(io(&path, "appending a record"))?;
                }
            }
            Change::Removed(i) => {
                let tail = records.bytes_from(i);
                let new_len = records.len() as u64 * rs;
                journaled_write(
                    file,
                    journal,
                    &path,
                    size_before,
                    i as u64 * rs,
                    &tail,
                    new_len,
                )?;
            }
            Change::Rewritten => {
                let all = records.bytes_from(0);
                let new_len = all.len() as u64;
                journaled_write(file, journal, &path, size_before, 0, &all, new_len)?;
            }
        }
        if change != Change::None {
            if options.sync {
                file.sync_data().map_err(io(&path, "fdatasync"))?;
            }
            let after = FileId::of(&file.metadata().map_err(io(&path, "fstat"))?);
            if after.size != records.len() as u64 * rs {
                // Someone changed the size without a lock (cloud-init's boot-time truncation) while
                // we wrote: our write may sit past a hole. Keep what is real and drop the hole.
                tracing::warn!(pool = %pool, size = after.size, "KVP: the pool file changed size under our lock (an unlocked truncation); re-reading it");
                let (_, mut now) = read_all(file, &path)?;
                let had = now.len();
                now.retain(|r| !r.is_all_zero());
                if now.len() != had {
                    let all: Vec<u8> = now
                        .iter()
                        .flat_map(|r| r.as_bytes().iter().copied())
                        .collect();
                    journaled_write(file, journal, &path, after.size, 0, &all, all.len() as u64)?;
                }
                st.cached = None;
                drop(held);
                return Ok(result);
            }
            id = after;
        }
        st.cached = Some((id, records));
        drop(held);
        Ok(result)
    }

    /// Holds every write from now on (the file systems are about to be frozen): changes are
    /// made to records in memory, reads see them, and nothing is written to the files until
    /// [`PoolStore::release`]. Reading the files stays allowed (a frozen file system can be
    /// read). Idempotent.
    pub fn hold(&mut self) {
        if self.held.is_none() {
            self.held = Some((0..Pool::ALL.len()).map(|_| None).collect());
            self.published
                .held
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether writes are held.
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Ends a hold: writes what changed during it, key by key, onto the files as they are now
    /// (a key set during the hold is set, one removed is removed; keys nobody touched, and
    /// whatever other programs wrote meanwhile, stay as the files have them).
    pub fn release(&mut self) -> Released {
        let Some(held) = self.held.take() else {
            return Released::default();
        };
        self.published
            .held
            .store(false, std::sync::atomic::Ordering::Release);
        let mut out = Released::default();
        for (pool, held) in Pool::ALL.into_iter().zip(held) {
            let Some(HeldPool { base, now }) = held else {
                continue;
            };
            for record in now.iter() {
                let unchanged = base
                    .iter()
                    .any(|b| b.key() == record.key() && b.value() == record.value());
                if unchanged {
                    continue;
                }
                let new = record.clone();
                match self.update(pool, move |records| {
                    match records.position(|r| r.key() == new.key()) {
                        Some(i) => {
                            records[i] = new;
                            ((), Change::Modified(i))
                        }
                        None => {
                            records.push(new);
                            ((), Change::Appended)
                        }
                    }
                }) {
                    Ok(()) => out.written += 1,
                    Err(e) => out.failed.push(e.to_string()),
                }
            }
            for gone in base
                .iter()
                .filter(|b| !now.iter().any(|r| r.key() == b.key()))
            {
                let key = gone.key().to_vec();
                match self.update(pool, move |records| {
                    match records.position(|r| r.key() == key.as_slice()) {
                        Some(i) => {
                            records.remove(i);
                            (true, Change::Removed(i))
                        }
                        None => (false, Change::None),
                    }
                }) {
                    Ok(true) => out.written += 1,
                    Ok(false) => {}
                    Err(e) => out.failed.push(e.to_string()),
                }
            }
        }
        out
    }

    /// [`PoolStore::update`] while writes are held: on the held records, nothing written.
    fn update_held<R>(
        &mut self,
        pool: Pool,
        f: impl FnOnce(&mut Records) -> (R, Change),
    ) -> Result<R, StoreError> {
        let needs_base = self
            .held
            .as_ref()
            .is_some_and(|h| h[pool as usize].is_none());
        if needs_base {
            // The first change of this pool during the hold: start from the file (read under a
            // shared lock, which a frozen file system allows).
            let held = self.held.take();
            let base = self.read(pool, Records::clone);
            self.held = held;
            let base = base?;
            if let Some(h) = self.held.as_mut() {
                h[pool as usize] = Some(HeldPool {
                    now: base.clone(),
                    base,
                });
            }
        }
        let max = self.options.max_records;
        let Some(Some(held)) = self.held.as_mut().map(|h| &mut h[pool as usize]) else {
            unreachable!("made above");
        };
        let before = held.now.len();
        let mut records = held.now.clone();
        let (result, change) = f(&mut records);
        if change == Change::Appended && records.len() > max.max(before) {
            return Err(StoreError::PoolFull { pool, max });
        }
        held.now = records;
        Ok(result)
    }

    /// The value of the first record whose key is `key` (text API for the CLI and plugins).
    pub fn get(&mut self, pool: Pool, key: &str) -> Result<Option<String>, StoreError> {
        self.read(pool, |records| {
            records
                .iter()
                .find(|r| r.key() == key.as_bytes())
                .map(|r| r.value_lossy())
        })
    }

    /// All `(key, value)` pairs in file order.
    pub fn list(&mut self, pool: Pool) -> Result<Vec<(String, String)>, StoreError> {
        self.read(pool, |records| {
            records
                .iter()
                .map(|r| (r.key_lossy(), r.value_lossy()))
                .collect()
        })
    }

    /// Sets `key` to `value` (first matching record replaced whole, else appended), so no stale
    /// bytes of a longer old value remain.
    pub fn set(&mut self, pool: Pool, key: &str, value: &str) -> Result<(), StoreError> {
        let new = Record::new(key.as_bytes(), value.as_bytes());
        self.update(pool, |records| {
            match records.position(|r| r.key() == new.key()) {
                Some(i) => {
                    records[i] = new;
                    ((), Change::Modified(i))
                }
                None => {
                    records.push(new);
                    ((), Change::Appended)
                }
            }
        })
    }

    /// Removes the first record whose key is `key`, keeping the order of the others; `false` if
    /// there was none.
    pub fn delete(&mut self, pool: Pool, key: &str) -> Result<bool, StoreError> {
        self.update(pool, |records| {
            match records.position(|r| r.key() == key.as_bytes()) {
                Some(i) => {
                    records.remove(i);
                    (true, Change::Removed(i))
                }
                None => (false, Change::None),
            }
        })
    }
}

/// Writes `bytes` at `offset` (then truncates to `truncate_to` unless it is [`NO_TRUNCATE`]),
/// journaling the new bytes first so a kill in the middle is repaired by the next writer.
fn journaled_write(
    file: &File,
    journal: &File,
    path: &Path,
    size_before: u64,
    offset: u64,
    bytes: &[u8],
    truncate_to: u64,
) -> Result<(), StoreError> {
    let meta = file.metadata().map_err(io(path, "fstat"))?;
    let entry = JournalEntry {
        dev: meta.dev(),
        ino: meta.ino(),
        size_before,
        offset,
        truncate_to,
        payload: bytes.to_vec(),
    };
    journal
        .write_all_at(&entry.to_bytes(), 0)
        .map_err(io(path, "writing the journal"))?;
    apply_entry(file, &entry, path)?;
    clear_journal(journal, path)
}

fn apply_entry(file: &File, entry: &JournalEntry, path: &Path) -> Result<(), StoreError> {
    file.write_all_at(&entry.payload, entry.offset)
        .map_err(io(path, "writing records"))?;
    if entry.truncate_to != NO_TRUNCATE {
        file.set_len(entry.truncate_to)
            .map_err(io(path, "truncating after a delete"))?;
    }
    Ok(())
}

fn clear_journal(journal: &File, path: &Path) -> Result<(), StoreError> {
    journal
        .write_all_at(&[0u8; 8], 0)
        .map_err(io(path, "clearing the journal"))
}

/// Replays an entry a killed writer left (we hold the exclusive lock). The entry is applied only
/// to the same file and only if nobody changed the file's size since, so it can never write
/// stale records over someone else's.
fn replay_journal(file: &File, journal: &File, path: &Path) -> Result<(), StoreError> {
    let Some(entry) = JournalEntry::read(journal) else {
        return Ok(());
    };
    let meta = file.metadata().map_err(io(path, "fstat"))?;
    let same_file = meta.dev() == entry.dev && meta.ino() == entry.ino;
    let end = entry.offset.saturating_add(entry.payload.len() as u64);
    let applicable = if entry.truncate_to == NO_TRUNCATE {
        // An overwrite in place: positions before the end never move, appends after are fine.
        meta.size() >= end && entry.size_before >= end
    } else {
        meta.size() == entry.size_before || meta.size() == entry.truncate_to
    };
    if same_file && applicable {
        tracing::warn!(path = %path.display(), "KVP: repairing a pool write interrupted by a killed process");
        apply_entry(file, &entry, path)?;
    } else {
        tracing::warn!(path = %path.display(), "KVP: discarding an interrupted write: the pool file changed since");
    }
    clear_journal(journal, path)
}

fn read_all(file: &File, path: &Path) -> Result<(FileId, Records), StoreError> {
    let meta = file.metadata().map_err(io(path, "fstat"))?;
    if meta.len() > MAX_POOL_FILE {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mut bytes = vec![0u8; meta.len() as usize];
    let mut got = 0;
    while got < bytes.len() {
        match file.read_at(&mut bytes[got..], got as u64) {
            Ok(0) => break, // shrank under us (an unlocked truncation): keep what was there
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(path, "reading")(e)),
        }
    }
    bytes.truncate(got);
    // Like fread of whole records in the C daemon: a partial trailing record is ignored.
    let records = bytes
        .chunks_exact(RECORD_SIZE)
        .map(Record::from_bytes)
        .collect();
    Ok((FileId::of(&meta), records))
}

impl AsFd for PoolStore {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir_fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn store(dir: &Path) -> PoolStore {
        PoolStore::open(
            dir,
            StoreOptions {
                lock_timeout: Duration::from_millis(200),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn ino(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn held_writes_are_answered_from_memory_and_written_key_by_key_on_release() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        s.set(Pool::Guest, "keep", "k").unwrap();
        s.set(Pool::Guest, "change", "old").unwrap();
        s.set(Pool::Guest, "remove", "r").unwrap();
        let file = s.path(Pool::Guest).to_owned();
        let before = std::fs::read(&file).unwrap();

        s.hold();
        assert!(s.is_held());
        s.set(Pool::Guest, "change", "new").unwrap();
        s.set(Pool::Guest, "added", "a").unwrap();
        assert!(s.delete(Pool::Guest, "remove").unwrap());
        // Reads see the held changes; the file has not been touched.
        assert_eq!(
            s.get(Pool::Guest, "change").unwrap().as_deref(),
            Some("new")
        );
        assert_eq!(s.get(Pool::Guest, "remove").unwrap(), None);
        assert_eq!(std::fs::read(&file).unwrap(), before);
        // Another program appends a record meanwhile (cloud-init, under flock).
        {
            let mut other = PoolStore::open(d.path(), StoreOptions::default()).unwrap();
            other.set(Pool::Guest, "cloud-init", "c").unwrap();
        }

        let released = s.release();
        assert!(released.failed.is_empty(), "{:?}", released.failed);
        assert_eq!(released.written, 3);
        assert!(!s.is_held());
        let mut fresh = PoolStore::open(d.path(), StoreOptions::default()).unwrap();
        let mut all = fresh.list(Pool::Guest).unwrap();
        all.sort();
        assert_eq!(
            all,
            [
                ("added".to_owned(), "a".to_owned()),
                ("change".to_owned(), "new".to_owned()),
                ("cloud-init".to_owned(), "c".to_owned()),
                ("keep".to_owned(), "k".to_owned()),
            ]
        );
        // A release without a hold writes nothing.
        assert_eq!(s.release().written, 0);
    }

    #[test]
    fn held_writes_respect_the_record_cap() {
        let d = tempfile::tempdir().unwrap();
        let mut s = PoolStore::open(
            d.path(),
            StoreOptions {
                max_records: 2,
                ..Default::default()
            },
        )
        .unwrap();
        s.hold();
        s.set(Pool::Guest, "a", "1").unwrap();
        s.set(Pool::Guest, "b", "2").unwrap();
        assert!(matches!(
            s.set(Pool::Guest, "c", "3"),
            Err(StoreError::PoolFull { .. })
        ));
        assert_eq!(s.release().written, 2);
    }

    #[test]
    fn open_creates_five_empty_pool_files() {
        let d = tempfile::tempdir().unwrap();
        let _s = store(d.path());
        for n in 0..5 {
            let m = std::fs::metadata(d.path().join(format!(".kvp_pool_{n}"))).unwrap();
            assert_eq!(m.len(), 0);
            assert_eq!(m.mode() & 0o777, 0o644);
        }
    }

    #[test]
    fn set_get_delete_round_trip_in_place_with_2560_byte_records() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let inode = ino(s.path(Pool::Guest));
        s.set(Pool::Guest, "a", "1").unwrap();
        s.set(Pool::Guest, "b", "2").unwrap();
        s.set(Pool::Guest, "a", "3").unwrap();
        assert_eq!(
            std::fs::metadata(s.path(Pool::Guest)).unwrap().len(),
            2 * 2560
        );
        assert_eq!(
            s.list(Pool::Guest).unwrap(),
            vec![("a".into(), "3".into()), ("b".into(), "2".into())]
        );
        assert!(s.delete(Pool::Guest, "a").unwrap());
        assert!(!s.delete(Pool::Guest, "a").unwrap());
        assert_eq!(s.get(Pool::Guest, "b").unwrap().as_deref(), Some("2"));
        assert_eq!(std::fs::metadata(s.path(Pool::Guest)).unwrap().len(), 2560);
        assert_eq!(
            ino(s.path(Pool::Guest)),
            inode,
            "the file is never replaced"
        );
    }

    #[test]
    fn unchanged_file_is_not_reparsed_and_an_outside_append_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        s.set(Pool::Guest, "a", "1").unwrap();
        s.list(Pool::Guest).unwrap();
        let before = s.parse_count(Pool::Guest);
        s.list(Pool::Guest).unwrap();
        assert_eq!(s.parse_count(Pool::Guest), before);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path(Pool::Guest))
            .unwrap();
        f.write_all(Record::new(b"x", b"y").as_bytes()).unwrap();
        assert_eq!(s.list(Pool::Guest).unwrap().len(), 2);
        assert_eq!(s.parse_count(Pool::Guest), before + 1);
    }

    #[test]
    fn an_unlocked_truncation_is_followed_and_stale_records_never_come_back() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        for k in ["a", "b", "c"] {
            s.set(Pool::Guest, k, "old").unwrap();
        }
        // cloud-init at boot: truncate without a lock, then append its own record.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(s.path(Pool::Guest))
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path(Pool::Guest))
            .unwrap();
        f.write_all(Record::new(b"boot", b"1").as_bytes()).unwrap();
        s.set(Pool::Guest, "b", "new").unwrap();
        assert_eq!(
            s.list(Pool::Guest).unwrap(),
            vec![("boot".into(), "1".into()), ("b".into(), "new".into())]
        );
    }

    #[test]
    fn a_partial_trailing_record_is_ignored_then_cut_by_the_next_writer() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut bytes = Record::new(b"k", b"v").as_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(s.path(Pool::External), bytes).unwrap();
        assert_eq!(s.list(Pool::External).unwrap().len(), 1);
        s.set(Pool::External, "k2", "v2").unwrap();
        assert_eq!(
            std::fs::metadata(s.path(Pool::External)).unwrap().len(),
            2 * 2560
        );
        assert_eq!(s.list(Pool::External).unwrap().len(), 2);
    }

    #[test]
    fn a_lock_held_by_another_process_times_out_with_its_holder_named() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let other = File::open(s.path(Pool::Guest)).unwrap();
        rustix::fs::flock(&other, FlockOperation::LockExclusive).unwrap();
        let start = Instant::now();
        let err = s.set(Pool::Guest, "k", "v").unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("FLOCK"), "{err}");
        rustix::fs::flock(&other, FlockOperation::Unlock).unwrap();
        s.set(Pool::Guest, "k", "v").unwrap();
        assert_eq!(s.get(Pool::Guest, "k").unwrap().as_deref(), Some("v"));
    }

    #[test]
    fn new_keys_past_the_cap_are_refused_and_existing_ones_still_change() {
        let d = tempfile::tempdir().unwrap();
        let mut s = PoolStore::open(
            d.path(),
            StoreOptions {
                max_records: 3,
                ..Default::default()
            },
        )
        .unwrap();
        for k in ["a", "b", "c"] {
            s.set(Pool::Guest, k, "1").unwrap();
        }
        let err = s.set(Pool::Guest, "d", "1").unwrap_err();
        assert!(matches!(err, StoreError::PoolFull { max: 3, .. }), "{err}");
        s.set(Pool::Guest, "a", "2").unwrap();
        assert_eq!(s.list(Pool::Guest).unwrap().len(), 3);
        assert_eq!(
            std::fs::metadata(s.path(Pool::Guest)).unwrap().len(),
            3 * 2560
        );
    }

    #[test]
    fn an_interrupted_overwrite_is_replayed_by_the_next_writer() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        s.set(Pool::Guest, "a", "old").unwrap();
        s.set(Pool::Guest, "b", "keep").unwrap();
        // What a kill between the journal write and the in-place write leaves behind.
        let path = s.path(Pool::Guest).to_path_buf();
        let meta = std::fs::metadata(&path).unwrap();
        let entry = JournalEntry {
            dev: meta.dev(),
            ino: meta.ino(),
            size_before: meta.len(),
            offset: 0,
            truncate_to: NO_TRUNCATE,
            payload: Record::new(b"a", b"new").as_bytes().to_vec(),
        };
        let journal = d.path().join(".kvp_pool_1.journal");
        std::fs::write(&journal, entry.to_bytes()).unwrap();
        // Tear the record: half new bytes.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&Record::new(b"a", b"new").as_bytes()[..1000], 0)
            .unwrap();
        let mut fresh = store(d.path());
        fresh.set(Pool::Guest, "c", "1").unwrap();
        assert_eq!(
            fresh.list(Pool::Guest).unwrap(),
            vec![
                ("a".into(), "new".into()),
                ("b".into(), "keep".into()),
                ("c".into(), "1".into())
            ]
        );
        // A journal whose checksum fails is ignored.
        let mut bad = entry.to_bytes();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&journal, bad).unwrap();
        fresh.set(Pool::Guest, "a", "newer").unwrap();
        assert_eq!(
            fresh.get(Pool::Guest, "a").unwrap().as_deref(),
            Some("newer")
        );
    }

    #[test]
    fn a_symlinked_pool_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let pools = d.path().join("pools");
        std::fs::create_dir(&pools).unwrap();
        std::os::unix::fs::symlink(&victim, pools.join(".kvp_pool_0")).unwrap();
        let err = PoolStore::open(&pools, StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
