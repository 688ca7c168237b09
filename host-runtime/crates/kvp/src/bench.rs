//! `hvisd bench kvp`: per-request latency (p50/p99) and requests/s of enumerating a Guest pool of
//! N records, with and without plugin-provided keys, over
//! * `kernel`: the daemon protocol through a real `SOCK_SEQPACKET` socketpair (the benchmark plays
//!   the kernel on one end, the KVP core serves the other), and
//! * `vmbus-codec`: the VMBus codec called in-process (UTF-16 parse, core, UTF-16 reply) without a
//!   ring; the lead's shm benchmark adds the ring and doorbell on top.
//!
//! The plugin keys come from an in-process provider that answers at once (what is measured is the
//! service's cache and merge, not a plugin's own run time) unless the caller passes providers.

/// The LD_PRELOAD shim that lets Debian's `hv_kvp_daemon` run without Hyper-V (its device becomes
/// a socket, its pool directory a chosen one); the differential test uses the same file.
pub const C_DAEMON_SHIM: &str = include_str!("../testdata/hv_kvp_daemon_shim.c");

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisd_protocol::ic::status::HV_S_CONT;
use hvisd_protocol::kvp::{KvpRequest, Pool};
use hvisd_protocol::kvp_daemon::{self as dm, DAEMON_MSG_SIZE};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::core::{KvpConfig, KvpCore};
use crate::guest_keys::{GuestKeyOptions, GuestKeyProvider, GuestKeys, ValueFuture};
use crate::pool::StoreOptions;
use crate::vmbus::KvpService;

/// What to measure.
#[derive(Clone)]
pub struct KvpBenchOptions {
    /// Records in the Guest pool file.
    pub pool_keys: usize,
    /// Plugin-key counts to measure (each is one case per path), e.g. `[0, 10]`.
    pub plugin_key_counts: Vec<usize>,
    /// Full enumerations per case (each is `pool_keys + plugin keys + 1` requests).
    pub rounds: usize,
    /// Providers to use instead of the built-in immediate one (their keys are used as is).
    pub providers: Option<Vec<Arc<dyn GuestKeyProvider>>>,
}

impl Default for KvpBenchOptions {
    fn default() -> Self {
        KvpBenchOptions {
            pool_keys: 100,
            plugin_key_counts: vec![0, 10],
            rounds: 50,
            providers: None,
        }
    }
}

/// One measured case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KvpBenchCase {
    /// `kernel` or `vmbus-codec`.
    pub path: &'static str,
    /// Records in the pool file.
    pub pool_keys: usize,
    /// Plugin-provided keys.
    pub plugin_keys: usize,
    /// Requests measured.
    pub requests: u64,
    /// Median latency of one request, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Requests per second over the whole run.
    pub requests_per_sec: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the pool or socket failed.
    #[error("KVP bench setup: {0}")]
    Setup(String),
}

struct Immediate(Vec<String>);

impl GuestKeyProvider for Immediate {
    fn name(&self) -> &str {
        "bench"
    }
    fn keys(&self) -> Vec<String> {
        self.0.clone()
    }
    fn value(&self, key: &str) -> ValueFuture {
        let v = format!("value of {key}");
        Box::pin(async move { Ok(v) })
    }
}

/// A KVP core over `dir` with `opts.pool_keys` Guest-pool records and `plugin_keys` provider keys
/// (from `opts.providers`, or an immediate in-process provider).
pub fn setup(
    dir: &std::path::Path,
    opts: &KvpBenchOptions,
    plugin_keys: usize,
) -> Result<KvpCore, BenchError> {
    let config = KvpConfig {
        pool_dir: dir.to_path_buf(),
        ..KvpConfig::default()
    };
    {
        let mut store = crate::pool::PoolStore::open(dir, StoreOptions::default())
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        if store
            .list(Pool::Guest)
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .len()
            != opts.pool_keys
        {
            for i in 0..opts.pool_keys {
                store
                    .set(
                        Pool::Guest,
                        &format!("BenchKey{i:04}"),
                        &format!("benchmark value number {i}"),
                    )
                    .map_err(|e| BenchError::Setup(e.to_string()))?;
            }
        }
    }
    let core = KvpCore::new(config).map_err(|e| BenchError::Setup(e.to_string()))?;
    if plugin_keys > 0 {
        let providers = opts.providers.clone().unwrap_or_else(|| {
            vec![Arc::new(Immediate(
                (0..plugin_keys).map(|i| format!("PluginKey{i}")).collect(),
            )) as Arc<dyn GuestKeyProvider>]
        });
        let keys = GuestKeys::new(providers, GuestKeyOptions::default());
        core.set_guest_keys(keys);
    }
    Ok(core)
}

/// Turns per-request latencies and the run's wall time into a case.
pub fn summarize(
    path: &'static str,
    opts: &KvpBenchOptions,
    plugin_keys: usize,
    mut lat: Vec<Duration>,
    total: Duration,
) -> KvpBenchCase {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(0.0)
    };
    KvpBenchCase {
        path,
        pool_keys: opts.pool_keys,
        plugin_keys,
        requests: lat.len() as u64,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        requests_per_sec: lat.len() as f64 / total.as_secs_f64().max(1e-9),
    }
}

/// Runs every case. Needs a multi-threaded tokio runtime (the kernel side blocks a thread).
pub async fn run_kvp_bench(opts: &KvpBenchOptions) -> Result<Vec<KvpBenchCase>, BenchError> {
    let mut cases = Vec::new();
    for &plugin_keys in &opts.plugin_key_counts {
        let dir = std::env::temp_dir().join(format!(
            "hvisd-kvp-bench-{}-{plugin_keys}",
            std::process::id()
        ));
        let result = async {
            let core = Arc::new(setup(&dir, opts, plugin_keys)?);
            cases.push(bench_kernel(core.clone(), opts, plugin_keys).await?);
            cases.push(bench_vmbus(core, opts, plugin_keys).await);
            Ok::<(), BenchError>(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    Ok(cases)
}

async fn bench_kernel(
    core: Arc<KvpCore>,
    opts: &KvpBenchOptions,
    plugin_keys: usize,
) -> Result<KvpBenchCase, BenchError> {
    let (ours, kernel): (OwnedFd, OwnedFd) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| BenchError::Setup(format!("socketpair: {e}")))?;
    rustix::io::ioctl_fionbio(&ours, true)
        .map_err(|e| BenchError::Setup(format!("non-blocking: {e}")))?;
    let server = tokio::spawn(crate::kernel::serve_fd(core, ours));
    let rounds = opts.rounds;
    let driver =
        tokio::task::spawn_blocking(move || -> Result<(Vec<Duration>, Duration), String> {
            let mut buf = [0u8; DAEMON_MSG_SIZE];
            let n = rustix::io::read(&kernel, &mut buf).map_err(|e| e.to_string())?;
            if n != DAEMON_MSG_SIZE {
                return Err(format!("registration was {n} bytes"));
            }
            rustix::io::write(&kernel, &dm::build_register_reply("3.1")[..])
                .map_err(|e| e.to_string())?;
            let mut lat = Vec::new();
            let start = Instant::now();
            for _ in 0..rounds {
                for index in 0u32.. {
                    let t = Instant::now();
                    rustix::io::write(&kernel, &dm::build_enumerate(Pool::Guest as u8, index)[..])
                        .map_err(|e| e.to_string())?;
                    rustix::io::read(&kernel, &mut buf).map_err(|e| e.to_string())?;
                    lat.push(t.elapsed());
                    if dm::error(&buf) == HV_S_CONT {
                        break;
                    }
                }
            }
            Ok((lat, start.elapsed()))
        });
    let (lat, total) = driver
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?
        .map_err(BenchError::Setup)?;
    server.abort();
    Ok(summarize("kernel", opts, plugin_keys, lat, total))
}

async fn bench_vmbus(
    core: Arc<KvpCore>,
    opts: &KvpBenchOptions,
    plugin_keys: usize,
) -> KvpBenchCase {
    let service = KvpService::new(core).await;
    let mut lat = Vec::new();
    let start = Instant::now();
    for _ in 0..opts.rounds {
        for index in 0u32.. {
            let mut body = KvpRequest::Enumerate {
                pool: Pool::Guest as u8,
                index,
            }
            .build();
            let t = Instant::now();
            let status = service.handle_body(&mut body).await;
            lat.push(t.elapsed());
            if status != 0 {
                break;
            }
        }
    }
    summarize("vmbus-codec", opts, plugin_keys, lat, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_enumerates_every_key_on_both_paths() {
        let opts = KvpBenchOptions {
            pool_keys: 5,
            plugin_key_counts: vec![0, 3],
            rounds: 2,
            providers: None,
        };
        let cases = run_kvp_bench(&opts).await.unwrap();
        assert_eq!(cases.len(), 4);
        for c in &cases {
            // Each round enumerates every key plus the final HV_S_CONT request.
            assert_eq!(c.requests, 2 * (5 + c.plugin_keys as u64 + 1), "{c:?}");
            assert!(c.p50_us > 0.0 && c.p99_us >= c.p50_us);
        }
    }
}
