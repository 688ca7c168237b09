//! `hvisd bench hvsock`: hvsock streams over the real shm transport.
//!
//! A guest thread runs the runtime (`run_shm` on a temporary root, an echo acceptor with a
//! 64 KiB buffer) on a current-thread tokio runtime; a host thread offers pipe channels and
//! drives them through the same stream layer, on its own current-thread runtime. Each thread
//! is pinned (`sched_setaffinity`): both to one CPU (`same-cpu`) or one CPU each (`split`).
//! Per ring size and placement it measures echo throughput with 64 KiB writes (writer and
//! reader of the host side running at once) and the round trip of a 64-byte message (p50,
//! p99), and beside them, in the same run and placement, the raw ring throughput of
//! `hvisd-ring`'s benchmark with packets of the stream's chunk size.
//!
//! Two echoes: `core` (a Rust echo in the runtime's process) and `plugin` (the broker hands each
//! connection to the `hvsock-misbehave` test plugin's `echo` service, a WebAssembly component in
//! its confined worker process; the worker inherits the guest thread's CPU). The plugin case is
//! the figure the product promises: a host tool talking to a sandboxed plugin.

use crate::config::Config;
use crate::hvsock::echo::EchoAcceptor;
use crate::hvsock::pipe::send_chunk;
use crate::hvsock::{Hvsock, HvsockOptions, PipeMonitor, PipeStream};
use crate::offer::{Offer, PipeMode, random_guid};
use crate::services::Services;
use crate::transport::shm::ShmRoot;
use crate::transport::shm_host;
use anyhow::{Context, Result, bail};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::hvsock::VMPIPE_HEADER_SIZE;
use hvisd_ring::bench::{Placement, RingBenchOptions, run_ring_bench};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to measure.
#[derive(Debug, Clone)]
pub struct HvsockBenchOptions {
    /// Ring sizes (one direction, control page included).
    pub ring_sizes: Vec<usize>,
    /// Placements of the two threads.
    pub placements: Vec<Placement>,
    /// Bytes echoed per throughput case.
    pub echo_bytes: usize,
    /// Round trips per latency case.
    pub round_trips: usize,
    /// The echoes to measure.
    pub echoes: Vec<Echo>,
}

/// Who echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Echo {
    /// A Rust echo in the runtime's process.
    Core,
    /// The `hvsock-misbehave` plugin's `echo` service in its worker, through the broker.
    Plugin,
}

impl Echo {
    /// Parses `core` or `plugin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "core" => Some(Echo::Core),
            "plugin" => Some(Echo::Plugin),
            _ => None,
        }
    }
}

impl Default for HvsockBenchOptions {
    fn default() -> Self {
        Self {
            // Linux hv_sock's default ring (6 pages) and its largest (64 pages).
            ring_sizes: vec![6 * 4096, 64 * 4096],
            placements: Placement::ALL.to_vec(),
            echo_bytes: 256 << 20,
            round_trips: 20_000,
            echoes: vec![Echo::Core, Echo::Plugin],
        }
    }
}

/// One ring size and placement.
#[derive(Debug, Clone, Serialize)]
pub struct HvsockBenchCase {
    /// Who echoed.
    pub echo: Echo,
    /// Ring size, control page included.
    pub ring_size: usize,
    /// Where the threads ran.
    pub placement: Placement,
    /// (guest CPU, host CPU).
    pub cpus: (usize, usize),
    /// Most data bytes per packet the stream sends on this ring.
    pub chunk: usize,
    /// Bytes echoed (each crosses both rings).
    pub echo_bytes: usize,
    /// Echoed payload per second, MB (10^6): bytes sent by the host / time until the last echoed
    /// byte came back.
    pub echo_mb_per_sec: f64,
    /// 64-byte round trips measured.
    pub round_trips: usize,
    /// Round trip, median, microseconds.
    pub rtt_p50_us: f64,
    /// Round trip, 99th percentile, microseconds.
    pub rtt_p99_us: f64,
    /// `hvisd-ring`'s two-thread benchmark on the same ring size and placement, packets of
    /// `chunk + 8` bytes in batches of 4: one direction, no stream, no echo (GB/s, 10^9).
    pub raw_ring_gb_per_sec: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct HvsockBenchReport {
    /// How the threads were placed.
    pub pinning: &'static str,
    /// CPUs this process may use.
    pub cpus: Vec<usize>,
    /// 1-minute load average at the end.
    pub load_average_1m: Option<f64>,
    /// The cases.
    pub cases: Vec<HvsockBenchCase>,
    /// Placements not measured, and why.
    pub skipped: Vec<String>,
}

impl HvsockBenchReport {
    /// Prints a table for people.
    pub fn print_human(&self) {
        println!("hvsock over shm: {}", self.pinning);
        println!("CPUs {:?}, load {:?}", self.cpus, self.load_average_1m);
        for s in &self.skipped {
            println!("skipped: {s}");
        }
        println!(
            "{:>7} {:>8} {:>9} {:>7} {:>7} {:>12} {:>10} {:>10} {:>12}",
            "echo",
            "ring",
            "placement",
            "cpus",
            "chunk",
            "echo MB/s",
            "rtt p50",
            "rtt p99",
            "raw ring GB/s"
        );
        for c in &self.cases {
            println!(
                "{:>7} {:>7}K {:>9} {:>3},{:<3} {:>7} {:>12.1} {:>8.1}us {:>8.1}us {:>12.2}",
                match c.echo {
                    Echo::Core => "core",
                    Echo::Plugin => "plugin",
                },
                c.ring_size / 1024,
                c.placement.name(),
                c.cpus.0,
                c.cpus.1,
                c.chunk,
                c.echo_mb_per_sec,
                c.rtt_p50_us,
                c.rtt_p99_us,
                c.raw_ring_gb_per_sec
            );
        }
    }
}

fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).with_context(|| format!("pinning to CPU {cpu}"))
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs every case.
pub fn run(opts: &HvsockBenchOptions) -> Result<HvsockBenchReport> {
    if opts.round_trips == 0 || opts.echo_bytes == 0 {
        bail!("round trips and echo bytes must be at least 1");
    }
    let cpus = allowed_cpus();
    let mut cases = Vec::new();
    let mut skipped = Vec::new();
    let plugin = if opts.echoes.contains(&Echo::Plugin) {
        let built = hvisd_plugin_host::build::build_plugins(
            &hvisd_plugin_host::build::plugins_workspace(),
            "release",
        )?;
        Some(
            built
                .get("hvsock-misbehave")
                .context("plugin `hvsock-misbehave` was not built")?
                .clone(),
        )
    } else {
        None
    };
    for &echo in &opts.echoes {
        for &ring_size in &opts.ring_sizes {
            hvisd_ring::check_ring_size(ring_size)?;
            for &placement in &opts.placements {
                let (guest_cpu, host_cpu) = match (placement, cpus.as_slice()) {
                    (_, []) => bail!("no CPU in this process's affinity mask"),
                    (Placement::SameCpu, [first, ..]) => (*first, *first),
                    (Placement::Split, [first, second, ..]) => (*first, *second),
                    (Placement::Split, _) => {
                        skipped.push(format!("split needs two CPUs, allowed: {cpus:?}"));
                        continue;
                    }
                };
                let wasm = plugin.clone().filter(|_| echo == Echo::Plugin);
                cases.push(run_case(
                    opts, wasm, ring_size, placement, guest_cpu, host_cpu,
                )?);
            }
        }
    }
    Ok(HvsockBenchReport {
        pinning: "guest = the runtime (run_shm + the core's echo, or the broker and the plugin's worker process, which inherits the pin) on a current-thread tokio runtime in one thread pinned to cpus.0; host = one thread with its own current-thread runtime pinned to cpus.1; the raw ring baseline pins its writer to cpus.1 and reader to cpus.0 (split) or both to cpus.0 (same-cpu)",
        cpus,
        load_average_1m: load_average(),
        cases,
        skipped,
    })
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn run_case(
    opts: &HvsockBenchOptions,
    plugin: Option<std::path::PathBuf>,
    ring_size: usize,
    placement: Placement,
    guest_cpu: usize,
    host_cpu: usize,
) -> Result<HvsockBenchCase> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    // The plugin's KVP pools and compile cache, beside the shm root.
    let state = dir.path().join("state");
    let plugin_case = plugin.is_some();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let guest_root = root.clone();
    let guest = std::thread::spawn(move || -> Result<()> {
        pin(guest_cpu)?;
        current_thread_runtime()?.block_on(async move {
            let Some(wasm) = plugin else {
                let mut config = Config::default();
                // No KVP: the benchmark must not touch the machine's pools.
                config.services.kvp = false;
                let hvsock = Hvsock::new(
                    Some(Arc::new(EchoAcceptor::with_buffer(64 << 10))),
                    HvsockOptions::default(),
                );
                let services = Services::new(config)?.with_hvsock(hvsock);
                crate::runtime::run_shm(ShmRoot::new(guest_root), services, stop_rx).await?;
                return Ok(());
            };
            std::fs::create_dir_all(state.join("pools"))?;
            let config = Config::parse(
                &format!(
                    r#"
[kvp]
pool_dir = '{pools}'
[plugins]
cache_dir = '{cache}'
[hvsock.services]
echo = "5000"
[[plugin]]
name = "hvsock-misbehave"
path = '{wasm}'
worlds = ["hvsock-service"]
[plugin.hvsock]
listen = ["echo"]
[plugin.limits]
cpu_percent = 100
"#,
                    pools = state.join("pools").display(),
                    cache = state.join("cache").display(),
                    wasm = wasm.display(),
                ),
                "bench hvsock",
            )?;
            let broker = crate::plugins::broker::PluginBroker::new();
            let hvsock = Hvsock::new(Some(broker.clone()), HvsockOptions::default());
            let services = Services::new(config.clone())?.with_hvsock(hvsock);
            let plugins = crate::plugins::Plugins::start(&config, &services)
                .await?
                .context("no plugins")?;
            broker.set_plugins(&plugins);
            let served = crate::runtime::run_shm(ShmRoot::new(guest_root), services, stop_rx).await;
            plugins.shutdown().await;
            served?;
            Ok(())
        })
    });
    let (echo_bytes, round_trips) = (opts.echo_bytes, opts.round_trips);
    let host_root = root.clone();
    let host = std::thread::spawn(move || -> Result<(f64, Vec<Duration>, usize)> {
        pin(host_cpu)?;
        current_thread_runtime()?.block_on(async move {
            let service = Guid::for_vsock_port(5000);
            // Latency: 64-byte messages, one at a time.
            let (latency, _monitor, chunk) = open(&host_root, service, ring_size).await?;
            let (mut rx, mut tx) = latency.into_split();
            let msg = [0x5au8; 64];
            let mut back = [0u8; 64];
            let mut rtts = Vec::with_capacity(round_trips);
            for i in 0..round_trips + 1000 {
                let t = Instant::now();
                tx.write_all(&msg).await?;
                rx.read_exact(&mut back).await?;
                if i >= 1000 {
                    rtts.push(t.elapsed());
                }
            }
            tx.shutdown().await?;
            drop((rx, tx));
            // Throughput: 64 KiB writes while the echo comes back.
            let (stream, _monitor, _) = open(&host_root, service, ring_size).await?;
            let (mut rx, mut tx) = stream.into_split();
            let block = vec![0xa5u8; 64 << 10];
            let started = Instant::now();
            let writer = async {
                let mut left = echo_bytes;
                while left > 0 {
                    let n = left.min(block.len());
                    tx.write_all(&block[..n]).await?;
                    left -= n;
                }
                tx.shutdown().await
            };
            let reader = async {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0usize;
                loop {
                    let n = rx.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                Ok::<_, std::io::Error>(got)
            };
            let (w, r) = tokio::join!(writer, reader);
            w?;
            let got = r?;
            let secs = started.elapsed().as_secs_f64();
            if got != echo_bytes {
                bail!("echoed {got} bytes of {echo_bytes}");
            }
            Ok((echo_bytes as f64 / secs / 1e6, rtts, chunk))
        })
    });
    let host_result = host
        .join()
        .map_err(|_| anyhow::anyhow!("host thread panicked"));
    let _ = stop_tx.send(true);
    let guest_result = guest
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?;
    let (echo_mb_per_sec, mut rtts, chunk) = host_result??;
    guest_result?;
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let raw_ring_gb_per_sec = raw_ring(ring_size, placement, chunk)?;
    Ok(HvsockBenchCase {
        echo: if plugin_case {
            Echo::Plugin
        } else {
            Echo::Core
        },
        ring_size,
        placement,
        cpus: (guest_cpu, host_cpu),
        chunk,
        echo_bytes,
        echo_mb_per_sec,
        round_trips: rtts.len(),
        rtt_p50_us: at(0.5),
        rtt_p99_us: at(0.99),
        raw_ring_gb_per_sec,
    })
}

/// Offers one host-initiated pipe and returns the host's stream once the guest opened it, its
/// monitor (dropping it would close the stream) and the chunk size the stream sends.
async fn open(
    root: &Path,
    service: Guid,
    ring_size: usize,
) -> Result<(PipeStream, PipeMonitor, usize)> {
    let offer = Offer {
        class_id: service,
        instance_id: random_guid(),
        ring_size: u32::try_from(ring_size)?,
        pipe: PipeMode::Byte,
        conn_from_host: Some(true),
    };
    let published = shm_host::publish_offer(root, &offer)?;
    let channel = published
        .accept(Duration::from_secs(10), "bench host pipe")
        .await?;
    let (stream, monitor) = PipeStream::new(channel);
    Ok((stream, monitor, send_chunk(ring_size - 4096)))
}

/// The ring benchmark's batched two-thread case for packets of a stream chunk.
fn raw_ring(ring_size: usize, placement: Placement, chunk: usize) -> Result<f64> {
    let opts = RingBenchOptions {
        ring_size,
        payload_sizes: vec![chunk + VMPIPE_HEADER_SIZE],
        batch: 4,
        bytes_per_case: 512 << 20,
        min_packets: 10_000,
        max_packets: 1_000_000,
        repeats: 1,
        placements: vec![placement],
    };
    // On its own thread: the ring benchmark pins the calling thread.
    let report = std::thread::spawn(move || run_ring_bench(&opts))
        .join()
        .map_err(|_| anyhow::anyhow!("ring benchmark panicked"))??;
    report
        .cases
        .iter()
        .filter(|c| c.batch == 4)
        .map(|c| c.payload_gb_per_sec)
        .next()
        .context("the ring benchmark measured no batched case")
}
