//! The pool files `<dir>/.kvp_pool_0..4`: 2560-byte records (512-byte key, 2048-byte value, both
//! NUL-padded UTF-8), shared with other programs.
//!
//! # Who else touches these files
//! * cloud-init's Hyper-V reporting handler (and azure-init, WALinuxAgent) *append* records to
//!   `.kvp_pool_1`: `open(O_APPEND)`, `flock(LOCK_EX)`, `write`, unlock. They never re-check that
//!   the path still names the file they opened.
//! * `hv_kvp_daemon` (which hvisd replaces) locks with `fcntl(F_SETLKW)` and rewrites in place.
//!
//! # How hvisd writes
//! Every write takes **both** `flock(LOCK_EX)` and an `fcntl` write lock on the current file, so
//! neither kind of writer can interleave with it. The new content is written to a temporary file in
//! the same directory, `fsync`ed and `rename`d over the pool: the path always names a complete pool,
//! whatever moment the process is killed at (a leftover temporary file is removed on the next open).
//!
//! Rename has one hazard: an appender that opened the *old* file before the rename and gets its
//! `flock` after we release ours writes into the replaced (unlinked) inode, where nobody would read
//! it. hvisd therefore keeps the replaced file open as an *orphan* for a grace period and harvests
//! records appended to orphans into the current pool: on every operation while the orphan is
//! young (20 ms, the window in which such an appender writes, right after our unlock), then at
//! intervals of a quarter of its age (at most 1 s) until the grace period ends (default 10 s, at
//! most 256 orphans per pool; see [`StoreOptions`]), with a last look before it is closed. A
//! short-lived writer such as `hvisd kvp set` lingers in [`PoolStore::settle`] before exiting for
//! the same reason. Why not rewrite in place instead: the C daemon does (`fopen("w")`), and a crash
//! between its truncate and its write leaves an empty or torn pool, which the issue rules out.
//!
//! # Reading
//! A read `stat`s the path and re-reads only if device, inode, size, mtime or ctime changed, so an
//! unchanged pool is never re-parsed and an append by another program is seen by the next request.

use rustix::fs::{FlockOperation, Mode, OFlags};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvisd_protocol::kvp::{MAX_KEY_SIZE, MAX_VALUE_SIZE, Pool};
use hvisd_protocol::kvp_daemon::cstr;

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
    /// A zero-padded record. Keys are cut to 511 bytes, values to 2047 (room for the NUL).
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
}

/// Why a pool operation failed. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on a pool file failed.
    #[error("KVP pool {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What hvisd was doing, e.g. "taking the flock".
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

/// Tuning for the orphan harvest (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How long a replaced pool file is watched for late appends.
    pub orphan_grace: Duration,
    /// At most this many replaced files are kept open per pool (oldest are harvested and closed).
    pub max_orphans: usize,
    /// `fsync` the new file before the rename (durability across power loss; the rename alone is
    /// enough for a killed process).
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            orphan_grace: Duration::from_secs(10),
            max_orphans: 256,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
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

struct Orphan {
    file: File,
    known_len: u64,
    replaced_at: Instant,
    next_check: Instant,
}

/// Orphans younger than this are checked on every operation: the window in which an appender
/// that opened the old file writes is right after our unlock.
const ORPHAN_HOT: Duration = Duration::from_millis(20);
/// Later checks back off to a quarter of the orphan's age, at most this far apart, so a burst of
/// rewrites does not make every later read pay one `fstat` per replaced file.
const ORPHAN_MAX_INTERVAL: Duration = Duration::from_secs(1);

struct PoolState {
    path: PathBuf,
    cached: Option<(FileId, Vec<Record>)>,
    orphans: VecDeque<Orphan>,
    reads: u64,
}

/// The five pool files of one directory.
pub struct PoolStore {
    dir: PathBuf,
    pools: Vec<PoolState>,
    options: StoreOptions,
    tmp_counter: u64,
}

impl std::fmt::Debug for PoolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolStore").field("dir", &self.dir).finish()
    }
}

const TMP_MARK: &str = ".hvisd-tmp.";

impl PoolStore {
    /// Opens (creating as the C daemon does: directory 0755, files 0644) the pools in `dir`.
    pub fn open(dir: impl Into<PathBuf>, options: StoreOptions) -> Result<PoolStore, StoreError> {
        let dir = dir.into();
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the pool directory"))?;
            let _ = rustix::fs::chmod(&dir, Mode::from_raw_mode(0o755));
        }
        let mut pools = Vec::with_capacity(5);
        for pool in Pool::ALL {
            let path = dir.join(format!(".kvp_pool_{}", pool.number()));
            rustix::fs::open(
                &path,
                OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .map_err(rio(&path, "creating the pool file"))?;
            pools.push(PoolState {
                path,
                cached: None,
                orphans: VecDeque::new(),
                reads: 0,
            });
        }
        remove_stale_temporaries(&dir);
        Ok(PoolStore {
            dir,
            pools,
            options,
            tmp_counter: 0,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `pool`.
    pub fn path(&self, pool: Pool) -> &Path {
        &self.pools[pool as usize].path
    }

    /// How many times `pool`'s file was actually read and parsed (for tests of change detection).
    pub fn parse_count(&self, pool: Pool) -> u64 {
        self.pools[pool as usize].reads
    }

    /// The current records of `pool`: from the cache when the file is unchanged, else re-read
    /// under shared locks.
    pub fn records(&mut self, pool: Pool) -> Result<&[Record], StoreError> {
        self.harvest(pool)?;
        let st = &mut self.pools[pool as usize];
        let meta = std::fs::metadata(&st.path).map_err(io(&st.path, "stat"))?;
        let id = FileId::of(&meta);
        if !matches!(&st.cached, Some((cached, _)) if *cached == id) {
            let (id, records) = read_locked(&st.path)?;
            st.reads += 1;
            st.cached = Some((id, records));
        }
        Ok(st.cached.as_ref().map(|(_, r)| r.as_slice()).unwrap_or(&[]))
    }

    /// Runs `f` on the records of `pool` under both exclusive locks; if `f` returns `true` for
    /// "changed", the result is written atomically (temporary file + rename).
    pub fn update<R>(
        &mut self,
        pool: Pool,
        f: impl FnOnce(&mut Vec<Record>) -> (R, bool),
    ) -> Result<R, StoreError> {
        self.harvest(pool)?;
        self.update_unharvested(pool, f)
    }

    fn update_unharvested<R>(
        &mut self,
        pool: Pool,
        f: impl FnOnce(&mut Vec<Record>) -> (R, bool),
    ) -> Result<R, StoreError> {
        let path = self.pools[pool as usize].path.clone();
        let file = open_locked(&path, true)?;
        let (_, mut records) = read_all(&file, &path)?;
        let old_len = file.metadata().map_err(io(&path, "fstat"))?.len();
        let (result, changed) = f(&mut records);
        if changed {
            self.tmp_counter += 1;
            let tmp = self.dir.join(format!(
                ".kvp_pool_{}{TMP_MARK}{}.{}",
                pool.number(),
                std::process::id(),
                self.tmp_counter
            ));
            let new_id = match write_replacement(&path, &tmp, &file, &records, self.options.fsync) {
                Ok(id) => id,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    unlock(&file);
                    return Err(e);
                }
            };
            unlock(&file);
            let st = &mut self.pools[pool as usize];
            let now = Instant::now();
            st.orphans.push_back(Orphan {
                file,
                known_len: old_len,
                replaced_at: now,
                next_check: now,
            });
            st.cached = Some((new_id, records));
        } else {
            unlock(&file);
        }
        Ok(result)
    }

    /// Collects records appended to replaced files since we last looked and appends them to the
    /// current pool; closes orphans past the grace period or over the count limit.
    fn harvest(&mut self, pool: Pool) -> Result<(), StoreError> {
        let options = self.options;
        let st = &mut self.pools[pool as usize];
        if st.orphans.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let keep_from = st.orphans.len().saturating_sub(options.max_orphans);
        let mut found = Vec::new();
        for (i, orphan) in st.orphans.iter_mut().enumerate() {
            let age = now.duration_since(orphan.replaced_at);
            let last_look = i < keep_from || age >= options.orphan_grace;
            if !(last_look || age < ORPHAN_HOT || now >= orphan.next_check) {
                continue;
            }
            orphan.next_check = now + (age / 4).min(ORPHAN_MAX_INTERVAL);
            let size = orphan.file.metadata().map(|m| m.len()).unwrap_or(0);
            if size <= orphan.known_len {
                continue;
            }
            orphan.next_check = now;
            lock(&orphan.file, true, &st.path)?;
            let bytes = read_range(&orphan.file, orphan.known_len, &st.path);
            unlock(&orphan.file);
            let bytes = bytes?;
            let whole = bytes.len() / RECORD_SIZE * RECORD_SIZE;
            if whole < bytes.len() {
                tracing::warn!(
                    pool = %pool,
                    bytes = bytes.len() - whole,
                    "KVP: a late append to a replaced pool file ends in a partial record; it is left for the next look"
                );
            }
            found.extend(
                bytes[..whole]
                    .chunks_exact(RECORD_SIZE)
                    .map(Record::from_bytes),
            );
            orphan.known_len += whole as u64;
        }
        let mut i = 0;
        st.orphans.retain(|o| {
            let keep = i >= keep_from && now.duration_since(o.replaced_at) < options.orphan_grace;
            i += 1;
            keep
        });
        if !found.is_empty() {
            tracing::info!(pool = %pool, records = found.len(), "KVP: moved records appended to a replaced pool file into the current one");
            self.update_unharvested(pool, move |records| {
                records.extend(found);
                ((), true)
            })?;
        }
        Ok(())
    }

    /// Waits for appenders that may still hold a file this process replaced, harvesting their
    /// records: call before a short-lived process exits. Returns when no orphan is left or after
    /// `max_wait`.
    pub fn settle(&mut self, max_wait: Duration) -> Result<(), StoreError> {
        let start = Instant::now();
        loop {
            for pool in Pool::ALL {
                self.harvest(pool)?;
            }
            if self.pools.iter().all(|p| p.orphans.is_empty()) || start.elapsed() >= max_wait {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of the first record whose key is `key` (text API for the CLI and plugins).
    pub fn get(&mut self, pool: Pool, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .records(pool)?
            .iter()
            .find(|r| r.key() == key.as_bytes())
            .map(|r| r.value_lossy()))
    }

    /// All `(key, value)` pairs in file order.
    pub fn list(&mut self, pool: Pool) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .records(pool)?
            .iter()
            .map(|r| (r.key_lossy(), r.value_lossy()))
            .collect())
    }

    /// Sets `key` to `value` the way the daemon does for a host SET (first matching record
    /// updated, else appended), with the whole fields written so no stale bytes remain.
    pub fn set(&mut self, pool: Pool, key: &str, value: &str) -> Result<(), StoreError> {
        let new = Record::new(key.as_bytes(), value.as_bytes());
        self.update(pool, |records| {
            match records.iter_mut().find(|r| r.key() == new.key()) {
                Some(r) => *r = new,
                None => records.push(new),
            }
            ((), true)
        })
    }

    /// Removes the first record whose key is `key`; `false` if there was none.
    pub fn delete(&mut self, pool: Pool, key: &str) -> Result<bool, StoreError> {
        self.update(pool, |records| {
            match records.iter().position(|r| r.key() == key.as_bytes()) {
                Some(i) => {
                    records.remove(i);
                    (true, true)
                }
                None => (false, false),
            }
        })
    }
}

impl Drop for PoolStore {
    fn drop(&mut self) {
        for pool in Pool::ALL {
            if let Err(e) = self.harvest(pool) {
                tracing::warn!(error = %e, "KVP: last harvest of replaced pool files failed");
            }
        }
    }
}

fn lock(file: &File, exclusive: bool, path: &Path) -> Result<(), StoreError> {
    let (fl, fc) = if exclusive {
        (FlockOperation::LockExclusive, FlockOperation::LockExclusive)
    } else {
        (FlockOperation::LockShared, FlockOperation::LockShared)
    };
    // Always flock first, then fcntl: two hvisd processes take them in the same order, and
    // cloud-init (flock only) and hv_kvp_daemon (fcntl only) each take one, so no cycle can form.
    rustix::fs::flock(file, fl).map_err(rio(path, "taking the flock"))?;
    if let Err(e) = rustix::fs::fcntl_lock(file, fc) {
        let _ = rustix::fs::flock(file, FlockOperation::Unlock);
        return Err(rio(path, "taking the fcntl lock")(e));
    }
    Ok(())
}

fn unlock(file: &File) {
    let _ = rustix::fs::fcntl_lock(file, FlockOperation::Unlock);
    let _ = rustix::fs::flock(file, FlockOperation::Unlock);
}

/// Opens the path and locks it; retries if the path was replaced while we waited for the lock
/// (we would otherwise hold a lock on a file nobody reads).
fn open_locked(path: &Path, exclusive: bool) -> Result<File, StoreError> {
    for _ in 0..1000 {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(exclusive)
            .create(exclusive)
            .open(path)
            .map_err(io(path, "opening"))?;
        lock(&file, exclusive, path)?;
        let held = file.metadata().map_err(io(path, "fstat"))?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(file),
            _ => unlock(&file),
        }
    }
    Err(StoreError::Io {
        path: path.to_path_buf(),
        what: "locking (the file kept being replaced)",
        source: std::io::Error::other("gave up after 1000 attempts"),
    })
}

fn read_locked(path: &Path) -> Result<(FileId, Vec<Record>), StoreError> {
    let file = open_locked(path, false)?;
    let r = read_all(&file, path);
    unlock(&file);
    r
}

fn read_all(file: &File, path: &Path) -> Result<(FileId, Vec<Record>), StoreError> {
    let meta = file.metadata().map_err(io(path, "fstat"))?;
    if meta.len() > MAX_POOL_FILE {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let bytes = read_range(file, 0, path)?;
    // Like fread of whole records in the C daemon: a partial trailing record is ignored.
    let records = bytes
        .chunks_exact(RECORD_SIZE)
        .map(Record::from_bytes)
        .collect();
    Ok((FileId::of(&meta), records))
}

fn read_range(file: &File, from: u64, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut f = file;
    let mut buf = Vec::new();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(from))
        .map_err(io(path, "seeking"))?;
    f.take(MAX_POOL_FILE)
        .read_to_end(&mut buf)
        .map_err(io(path, "reading"))?;
    Ok(buf)
}

fn write_replacement(
    path: &Path,
    tmp: &Path,
    old: &File,
    records: &[Record],
    fsync: bool,
) -> Result<FileId, StoreError> {
    let mode = old.metadata().map(|m| m.mode() & 0o7777).unwrap_or(0o644);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io(tmp, "creating the temporary pool file"))?;
    let _ = rustix::fs::fchmod(&f, Mode::from_raw_mode(mode));
    let mut bytes = Vec::with_capacity(records.len() * RECORD_SIZE);
    for r in records {
        bytes.extend_from_slice(r.as_bytes());
    }
    f.write_all(&bytes)
        .map_err(io(tmp, "writing the temporary pool file"))?;
    if fsync {
        f.sync_all()
            .map_err(io(tmp, "fsync of the temporary pool file"))?;
    }
    std::fs::rename(tmp, path).map_err(io(path, "renaming the new pool file into place"))?;
    // The rename changes the new file's ctime; identify it afterwards.
    let meta = f.metadata().map_err(io(path, "fstat"))?;
    Ok(FileId::of(&meta))
}

/// Removes `.kvp_pool_N.hvisd-tmp.<pid>.<n>` files whose writer process is gone (killed mid-write).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, rest)) = name.split_once(TMP_MARK) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> PoolStore {
        PoolStore::open(
            dir,
            StoreOptions {
                fsync: false,
                ..Default::default()
            },
        )
        .unwrap()
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
    fn set_get_delete_round_trip_with_2560_byte_records() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
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
    }

    #[test]
    fn unchanged_file_is_not_reparsed_and_an_outside_append_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        s.set(Pool::Guest, "a", "1").unwrap();
        s.records(Pool::Guest).unwrap();
        s.records(Pool::Guest).unwrap();
        let before = s.parse_count(Pool::Guest);
        s.records(Pool::Guest).unwrap();
        assert_eq!(s.parse_count(Pool::Guest), before);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path(Pool::Guest))
            .unwrap();
        f.write_all(Record::new(b"x", b"y").as_bytes()).unwrap();
        assert_eq!(s.records(Pool::Guest).unwrap().len(), 2);
        assert_eq!(s.parse_count(Pool::Guest), before + 1);
    }

    #[test]
    fn an_append_to_a_replaced_file_is_harvested() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        s.set(Pool::Guest, "a", "1").unwrap();
        // An appender that opened the file before our next rewrite...
        let mut late = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path(Pool::Guest))
            .unwrap();
        s.set(Pool::Guest, "b", "2").unwrap();
        // ...writes into the replaced inode.
        rustix::fs::flock(&late, FlockOperation::LockExclusive).unwrap();
        late.write_all(Record::new(b"late", b"v").as_bytes())
            .unwrap();
        rustix::fs::flock(&late, FlockOperation::Unlock).unwrap();
        let keys: Vec<String> = s
            .records(Pool::Guest)
            .unwrap()
            .iter()
            .map(|r| r.key_lossy())
            .collect();
        assert_eq!(keys, ["a", "b", "late"]);
    }

    #[test]
    fn partial_trailing_record_is_ignored_like_fread() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut bytes = Record::new(b"k", b"v").as_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(s.path(Pool::External), bytes).unwrap();
        assert_eq!(s.records(Pool::External).unwrap().len(), 1);
    }

    #[test]
    fn stale_temporary_of_a_dead_process_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let stale = d.path().join(".kvp_pool_1.hvisd-tmp.999999999.1");
        std::fs::write(&stale, b"junk").unwrap();
        let _s = store(d.path());
        assert!(!stale.exists());
    }
}
