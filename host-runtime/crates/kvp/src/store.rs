//! The pool store's single owner: one thread holds the [`PoolStore`] and runs every pool
//! operation of the daemon, in order, from a bounded queue. KVP requests on every transport and
//! the plugins' `kvp-store` import go through a [`PoolHandle`]; the `hvisd kvp` command (another
//! process) uses [`PoolStore`] directly, with the same locks and timeouts.
//!
//! Why a thread: pool operations wait on locks other processes can hold (bounded by the lock
//! timeout, but still up to a second) and on disk I/O. On that thread they never occupy one of the
//! runtime's async workers, so heartbeat and every other channel keep answering whatever a local
//! user does to the pool files. The queue is bounded, so a stalled store makes its callers wait
//! (asynchronously) instead of growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hvisd_protocol::kvp::Pool;
use tokio::sync::{mpsc, oneshot};

use crate::pool::{Change, PoolStore, Published, Records, StoreError};

type Job = Box<dyn FnOnce(&mut PoolStore) + Send>;

/// How many operations may wait for the store.
pub const QUEUE_DEPTH: usize = 256;

/// A cheap, cloneable handle on the pool-store thread.
#[derive(Clone)]
pub struct PoolHandle {
    jobs: mpsc::Sender<Job>,
    stopped: Arc<AtomicBool>,
    published: Arc<Published>,
}

impl std::fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolHandle").finish_non_exhaustive()
    }
}

impl PoolHandle {
    /// Moves `store` onto its own thread (`hvisd-pools`). The thread ends when every handle is
    /// dropped.
    pub fn spawn(store: PoolStore) -> std::io::Result<PoolHandle> {
        let published = store.published();
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE_DEPTH);
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        std::thread::Builder::new()
            .name("hvisd-pools".into())
            .spawn(move || {
                let mut store = store;
                while let Some(job) = queue.blocking_recv() {
                    job(&mut store);
                }
                flag.store(true, Ordering::Release);
            })?;
        Ok(PoolHandle {
            jobs,
            stopped,
            published,
        })
    }

    /// Runs `f` on the store's thread and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut PoolStore) -> Result<R, StoreError> + Send + 'static,
    {
        if self.stopped.load(Ordering::Acquire) {
            return Err(StoreError::Stopped);
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// [`PoolStore::read`]: answered here from the published snapshot when the file is unchanged
    /// since (one `stat`), else on the store's thread.
    pub async fn read<R, F>(&self, pool: Pool, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Records) -> R + Send + 'static,
    {
        if let Some(snap) = self.published.fresh(pool) {
            return Ok(f(&snap.records));
        }
        self.run(move |s| s.read(pool, f)).await
    }

    /// [`PoolStore::update`] on the store's thread.
    pub async fn update<R, F>(&self, pool: Pool, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Records) -> (R, Change) + Send + 'static,
    {
        self.run(move |s| s.update(pool, f)).await
    }

    /// [`PoolStore::get`].
    pub async fn get(&self, pool: Pool, key: String) -> Result<Option<String>, StoreError> {
        self.read(pool, move |records| {
            records
                .iter()
                .find(|r| r.key() == key.as_bytes())
                .map(|r| r.value_lossy())
        })
        .await
    }

    /// [`PoolStore::list`].
    pub async fn list(&self, pool: Pool) -> Result<Vec<(String, String)>, StoreError> {
        self.read(pool, |records| {
            records
                .iter()
                .map(|r| (r.key_lossy(), r.value_lossy()))
                .collect()
        })
        .await
    }

    /// [`PoolStore::set`].
    pub async fn set(&self, pool: Pool, key: String, value: String) -> Result<(), StoreError> {
        self.run(move |s| s.set(pool, &key, &value)).await
    }

    /// [`PoolStore::hold`]: from now on writes are answered at once and kept in memory.
    pub async fn hold(&self) -> Result<(), StoreError> {
        self.run(|s| {
            s.hold();
            Ok(())
        })
        .await
    }

    /// [`PoolStore::release`]: writes what was held.
    pub async fn release(&self) -> Result<crate::pool::Released, StoreError> {
        self.run(|s| Ok(s.release())).await
    }

    /// [`PoolStore::delete`].
    pub async fn delete(&self, pool: Pool, key: String) -> Result<bool, StoreError> {
        self.run(move |s| s.delete(pool, &key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::StoreOptions;
    use rustix::fs::FlockOperation;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "current_thread")]
    async fn a_locked_pool_never_blocks_the_async_thread() {
        let d = tempfile::tempdir().unwrap();
        let store = PoolStore::open(
            d.path(),
            StoreOptions {
                lock_timeout: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .unwrap();
        let path = store.path(Pool::Guest).to_path_buf();
        let handle = PoolHandle::spawn(store).unwrap();
        let other = std::fs::File::open(&path).unwrap();
        rustix::fs::flock(&other, FlockOperation::LockExclusive).unwrap();
        // On a single-threaded runtime, a timer keeps ticking while the SET waits for the lock.
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        let start = Instant::now();
        let err = handle
            .set(Pool::Guest, "k".into(), "v".into())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(
            ticks.load(Ordering::Relaxed) >= 10,
            "the runtime was blocked"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        ticker.abort();
        rustix::fs::flock(&other, FlockOperation::Unlock).unwrap();
        handle
            .set(Pool::Guest, "k".into(), "v".into())
            .await
            .unwrap();
        assert_eq!(
            handle
                .get(Pool::Guest, "k".into())
                .await
                .unwrap()
                .as_deref(),
            Some("v")
        );
    }
}
