//! `hvisd bench plugin`: plugins as the daemon runs them, in worker processes.
//!
//! - A KVP provider call (`app-version`'s `app.version`, answered from the instance's memory)
//!   through the worker, timed one call at a time: p50 and p99. The core side runs on a
//!   current-thread runtime pinned to one CPU; the worker is pinned (every thread of it) to the
//!   other CPU (`split`) and to the same CPU (`same-cpu`). Beside it, the same call on an
//!   in-process plugin host on the core's CPU: the baseline measured in the same run, which the
//!   daemon never uses (its core runs no WebAssembly).
//! - A worker started from the cache, spawn to Ready (confinement and component load included).
//! - Three cached plugins (the examples `app-version`, `flush-hold`, `status-echo`) started and
//!   ready, keys described, as `Plugins::start` does at boot.
//! - Resident memory and idle CPU of a real `hvisd run` daemon with those three plugins, and of
//!   each of its workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use hvisd_plugin_host::{ComponentCache, HostServices, MemoryKvpStore, PluginHost};
use hvisd_protocol::kvp::Pool;
use serde::Serialize;

use crate::config::Config;
use crate::plugins::Plugins;
use crate::plugins::worker::{Worker, WorkerSpec, cpu_time_of, rss_of};
use crate::services::Services;

/// Per-call latency.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Calls timed.
    pub calls: u32,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Mean, microseconds.
    pub mean_us: f64,
}

/// Milliseconds over several runs.
#[derive(Clone, Debug, Serialize)]
pub struct Millis {
    /// Runs.
    pub runs: u32,
    /// Median.
    pub p50_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// A running daemon's footprint.
#[derive(Clone, Debug, Serialize)]
pub struct Footprint {
    /// Resident memory of the core process.
    pub core_rss_bytes: u64,
    /// Resident memory of each worker, by plugin.
    pub worker_rss_bytes: BTreeMap<String, u64>,
    /// CPU the core used while idle, over `idle_window_ms`.
    pub core_idle_cpu_ms: u64,
    /// CPU all workers together used while idle, over the same window.
    pub workers_idle_cpu_ms: u64,
    /// The idle window.
    pub idle_window_ms: u64,
}

/// The targets of the plugin-worker issue.
#[derive(Clone, Debug, Serialize)]
pub struct Targets {
    /// Worker call p50 <= 20 us, core and worker on one CPU (across CPUs this VM's own floor,
    /// `socket_round_trip_split`, is above the target: see `overhead_over_floor_us`).
    pub call_p50_same_cpu: bool,
    /// Worker call p99 <= 100 us, core and worker on one CPU.
    pub call_p99_same_cpu: bool,
    /// Worker start from cache <= 20 ms (median).
    pub worker_start: bool,
    /// Three cached plugins ready <= 100 ms (median).
    pub three_ready: bool,
    /// Core RSS <= 15 MB.
    pub core_rss: bool,
    /// Every worker's RSS <= 15 MB.
    pub worker_rss: bool,
}

/// Every figure.
#[derive(Clone, Debug, Serialize)]
pub struct PluginBenchReport {
    /// How the threads and processes were placed.
    pub pinning: String,
    /// Provider call through the worker, worker on another CPU than the core.
    pub worker_call_split: Option<Latency>,
    /// Provider call through the worker, worker on the core's CPU.
    pub worker_call_same_cpu: Latency,
    /// Provider call through the worker, neither side pinned (as the daemon runs).
    pub worker_call_unpinned: Latency,
    /// The same call on an in-process plugin host (baseline; not a path the daemon uses).
    pub in_process_call: Latency,
    /// The floor of any cross-process round trip here: 17 bytes each way over a socket pair,
    /// blocking reads, between this thread and an echo thread on another CPU.
    pub socket_round_trip_split: Option<Latency>,
    /// The same floor with the echo thread on this thread's CPU.
    pub socket_round_trip_same_cpu: Latency,
    /// `worker_call_same_cpu.p50 / in_process_call.p50`.
    pub ratio_worker_to_in_process_p50: f64,
    /// What the worker protocol adds to the bare socket round trip, p50 microseconds, per
    /// placement (`split` is absent with one CPU).
    pub overhead_over_floor_us: BTreeMap<String, f64>,
    /// Spawn to Ready, component from the cache.
    pub worker_start_from_cache: Millis,
    /// Three cached plugins started and ready.
    pub three_plugins_ready: Millis,
    /// A real daemon with the three plugins.
    pub daemon: Footprint,
    /// Whether each target is met.
    pub targets: Targets,
}

impl PluginBenchReport {
    /// Prints the figures for a person.
    pub fn print_human(&self) {
        let lat = |name: &str, l: &Latency| {
            println!(
                "{name:<34} p50 {:>8.1} us   p99 {:>8.1} us   mean {:>8.1} us   ({} calls)",
                l.p50_us, l.p99_us, l.mean_us, l.calls
            )
        };
        println!("pinning: {}", self.pinning);
        if let Some(l) = &self.worker_call_split {
            lat("provider call, worker (split)", l);
        }
        lat(
            "provider call, worker (same cpu)",
            &self.worker_call_same_cpu,
        );
        lat(
            "provider call, worker (unpinned)",
            &self.worker_call_unpinned,
        );
        lat("provider call, in-process baseline", &self.in_process_call);
        if let Some(l) = &self.socket_round_trip_split {
            lat("socket round trip floor (split)", l);
        }
        lat(
            "socket round trip floor (same cpu)",
            &self.socket_round_trip_same_cpu,
        );
        println!(
            "ratio worker (same cpu) / in-process (p50)  {:.2}",
            self.ratio_worker_to_in_process_p50
        );
        for (placement, us) in &self.overhead_over_floor_us {
            println!("worker over the socket floor, {placement:<9} p50 {us:>8.1} us");
        }
        let ms = |name: &str, m: &Millis| {
            println!(
                "{name:<34} p50 {:>8.2} ms   max {:>8.2} ms   ({} runs)",
                m.p50_ms, m.max_ms, m.runs
            )
        };
        ms("worker start from cache", &self.worker_start_from_cache);
        ms("three cached plugins ready", &self.three_plugins_ready);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "daemon core RSS                    {:>8.1} MiB",
            mib(self.daemon.core_rss_bytes)
        );
        for (plugin, rss) in &self.daemon.worker_rss_bytes {
            println!("worker RSS {plugin:<23} {:>8.1} MiB", mib(*rss));
        }
        println!(
            "idle CPU over {} ms: core {} ms, workers {} ms",
            self.daemon.idle_window_ms,
            self.daemon.core_idle_cpu_ms,
            self.daemon.workers_idle_cpu_ms
        );
        println!("targets: {:?}", self.targets);
    }
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = samples.len().max(1);
    let at = |q: f64| us(samples[((n as f64 * q) as usize).min(n - 1)]);
    Latency {
        calls: samples.len() as u32,
        p50_us: at(0.50),
        p99_us: at(0.99),
        mean_us: samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64,
    }
}

fn millis(mut samples: Vec<Duration>) -> Millis {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Millis {
        runs: samples.len() as u32,
        p50_ms: samples
            .get(samples.len() / 2)
            .map(|d| ms(*d))
            .unwrap_or(0.0),
        max_ms: samples.last().map(|d| ms(*d)).unwrap_or(0.0),
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

fn one_cpu(cpu: usize) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    set
}

/// Pins every thread of process `pid` to `cpu`.
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let set = one_cpu(cpu);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        if let Some(tid) = rustix::thread::Pid::from_raw(tid) {
            rustix::thread::sched_setaffinity(Some(tid), &set)
                .with_context(|| format!("pinning thread {tid:?} of worker {pid}"))?;
        }
    }
    Ok(())
}

/// The three example plugins as a config: pools, cache and grants under `dir`.
fn config(dir: &Path, built: &BTreeMap<String, PathBuf>) -> Result<Config> {
    let pick = |n: &str| {
        built
            .get(n)
            .cloned()
            .with_context(|| format!("plugin `{n}` was not built"))
    };
    let app = dir.join("app");
    // The hook's read-write grant must not lie on a file system backups freeze: a tmpfs.
    let hold = Path::new("/dev/shm").join(format!("hvisd-bench-hold-{}", std::process::id()));
    for d in [&app, &hold] {
        std::fs::create_dir_all(d)?;
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    }
    std::fs::write(app.join("VERSION"), "4.2.0\n")?;
    std::fs::write(app.join("health"), "ok\n")?;
    std::fs::create_dir_all(dir.join("pools"))?;
    let text = format!(
        r#"
[kvp]
pool_dir = '{pools}'
[plugins]
cache_dir = '{cache}'

[[plugin]]
name = "app-version"
path = '{app_wasm}'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["app.*"]
[[plugin.dirs]]
host = '{app}'
guest = "/app"

[[plugin]]
name = "flush-hold"
path = '{hook_wasm}'
worlds = ["freeze-hook"]
[[plugin.dirs]]
host = '{hold}'
guest = "/run/app"
access = "read-write"

[[plugin]]
name = "status-echo"
path = '{echo_wasm}'
worlds = ["hvsock-service"]
[plugin.hvsock]
listen = ["bench"]
"#,
        pools = dir.join("pools").display(),
        cache = dir.join("cache").display(),
        app_wasm = pick("app-version")?.display(),
        hook_wasm = pick("flush-hold")?.display(),
        echo_wasm = pick("status-echo")?.display(),
        app = app.display(),
        hold = hold.display(),
    );
    std::fs::write(dir.join("hvisd.toml"), &text)?;
    Ok(toml::from_str(&text)?)
}

async fn start_plugins(config: &Config) -> Result<(Services, Arc<Plugins>)> {
    let services = Services::new(config.clone())?;
    let plugins = Plugins::start(config, &services)
        .await?
        .context("no plugins configured")?;
    for s in plugins.status().await {
        if s.reason.is_some() {
            bail!("plugin {} refused: {:?}", s.name, s.reason);
        }
    }
    Ok((services, plugins))
}

async fn time_calls(plugins: &Plugins, calls: u32) -> Result<Latency> {
    for _ in 0..1000 {
        plugins
            .provider_get("app-version", Pool::Guest, "app.version")
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let mut samples = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let t = Instant::now();
        let v = plugins
            .provider_get("app-version", Pool::Guest, "app.version")
            .await;
        samples.push(t.elapsed());
        v.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(latency(samples))
}

/// Runs the benchmark on a current-thread runtime of this thread, which it pins.
pub async fn run(calls: u32) -> Result<PluginBenchReport> {
    let cpus = allowed_cpus();
    let Some(&core_cpu) = cpus.first() else {
        bail!("no CPU in this process's affinity mask");
    };
    let other_cpu = cpus.get(1).copied();
    rustix::thread::sched_setaffinity(None, &one_cpu(core_cpu))?;
    let built = build_plugins(&plugins_workspace(), "release")?;
    let tmp = tempfile::tempdir()?;
    let config = config(tmp.path(), &built)?;

    // Compile into the cache (the cold path is not a target), then start from it.
    let (services, plugins) = start_plugins(&config).await?;
    let worker_pid = plugins
        .status()
        .await
        .into_iter()
        .find(|s| s.name == "app-version")
        .and_then(|s| s.pid)
        .context("app-version has no worker")?;

    let worker_call_split = match other_cpu {
        Some(cpu) => {
            pin_process(worker_pid, cpu)?;
            Some(time_calls(&plugins, calls).await?)
        }
        None => None,
    };
    pin_process(worker_pid, core_cpu)?;
    let worker_call_same_cpu = time_calls(&plugins, calls).await?;
    let all = {
        let mut set = rustix::thread::CpuSet::new();
        for &c in &cpus {
            set.set(c);
        }
        set
    };
    for task in std::fs::read_dir(format!("/proc/{worker_pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        if let Some(tid) = rustix::thread::Pid::from_raw(tid) {
            rustix::thread::sched_setaffinity(Some(tid), &all)?;
        }
    }
    rustix::thread::sched_setaffinity(None, &all)?;
    let worker_call_unpinned = time_calls(&plugins, calls).await?;
    rustix::thread::sched_setaffinity(None, &one_cpu(core_cpu))?;
    plugins.shutdown().await;
    let socket_round_trip_split = match other_cpu {
        Some(cpu) => Some(socket_round_trip(cpu, calls)?),
        None => None,
    };
    let socket_round_trip_same_cpu = socket_round_trip(core_cpu, calls)?;
    drop(services);

    // The in-process baseline: the same component and call, on this thread.
    let in_process_call = {
        let manifest = config
            .plugin
            .iter()
            .find(|m| m.name == "app-version")
            .context("app-version manifest")?
            .clone();
        let host = PluginHost::new(
            tmp.path().join("inproc-cache"),
            HostServices {
                kvp: Arc::new(MemoryKvpStore::default()),
                hvsock: None,
            },
        )?;
        let s = host.load(&[manifest]).await?;
        if let Some((n, why)) = s.refused.first() {
            bail!("in-process {n}: {why}");
        }
        for _ in 0..1000 {
            let _ = host
                .provider_get("app-version", Pool::Guest, "app.version")
                .await;
        }
        let mut samples = Vec::with_capacity(calls as usize);
        for _ in 0..calls {
            let t = Instant::now();
            let v = host
                .provider_get("app-version", Pool::Guest, "app.version")
                .await;
            samples.push(t.elapsed());
            v?;
        }
        latency(samples)
    };

    // Worker start from the cache: spawn, confine, load, Ready.
    let worker_start_from_cache = {
        let cache = ComponentCache::new(&config.plugins.cache_dir)?;
        let engine = hvisd_plugin_host::build_engine()?;
        let manifest = config.plugin[0].clone();
        let wasm = std::fs::read(&manifest.path)?;
        let (name, _) = cache.artifact(&engine, &wasm)?;
        let (_, uid, gid) = config
            .plugins
            .worker_user()
            .map_err(|e| anyhow::anyhow!(e))?;
        let kvp: Arc<dyn hvisd_plugin_host::KvpStore> = Arc::new(MemoryKvpStore::default());
        let mut samples = Vec::new();
        for _ in 0..20 {
            let dirs = manifest
                .dirs
                .iter()
                .map(|d| {
                    Ok((
                        crate::plugins::grants::open(&d.host)?,
                        d.guest.clone(),
                        false,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let spec = WorkerSpec {
                manifest: manifest.clone(),
                artifact: cache.open_artifact(&name)?,
                dirs,
                uid,
                gid,
                require_landlock: false,
                escape_test: Vec::new(),
            };
            let t = Instant::now();
            let imports = crate::plugins::worker::WorkerImports {
                kvp: kvp.clone(),
                hvsock: None,
            };
            let (worker, _) = Worker::start(spec, imports).await?;
            samples.push(t.elapsed());
            worker.shutdown(Duration::from_secs(2)).await;
        }
        millis(samples)
    };

    // Three cached plugins ready, as at boot.
    let three_plugins_ready = {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let services = Services::new(config.clone())?;
            let t = Instant::now();
            let plugins = Plugins::start(&config, &services)
                .await?
                .context("no plugins")?;
            samples.push(t.elapsed());
            plugins.shutdown().await;
        }
        millis(samples)
    };

    let daemon = daemon_footprint(tmp.path()).await;
    let _ = std::fs::remove_dir_all(
        Path::new("/dev/shm").join(format!("hvisd-bench-hold-{}", std::process::id())),
    );
    let daemon = daemon?;

    let mut overhead_over_floor_us = BTreeMap::new();
    overhead_over_floor_us.insert(
        "same-cpu".to_owned(),
        worker_call_same_cpu.p50_us - socket_round_trip_same_cpu.p50_us,
    );
    if let (Some(w), Some(f)) = (&worker_call_split, &socket_round_trip_split) {
        overhead_over_floor_us.insert("split".to_owned(), w.p50_us - f.p50_us);
    }
    let mb15 = 15 * 1000 * 1000;
    let targets = Targets {
        call_p50_same_cpu: worker_call_same_cpu.p50_us <= 20.0,
        call_p99_same_cpu: worker_call_same_cpu.p99_us <= 100.0,
        worker_start: worker_start_from_cache.p50_ms <= 20.0,
        three_ready: three_plugins_ready.p50_ms <= 100.0,
        core_rss: daemon.core_rss_bytes <= mb15,
        worker_rss: daemon.worker_rss_bytes.values().all(|&b| b <= mb15),
    };
    Ok(PluginBenchReport {
        pinning: match other_cpu {
            Some(cpu) => format!(
                "core (this benchmark's async thread) on CPU {core_cpu}; worker threads on CPU {cpu} (split), then on CPU {core_cpu} (same-cpu), then neither pinned; in-process baseline and socket floor's caller on CPU {core_cpu}, the floor's echo thread on CPU {cpu} (split) or {core_cpu} (same-cpu)"
            ),
            None => format!("one CPU ({core_cpu}): everything on it"),
        },
        ratio_worker_to_in_process_p50: worker_call_same_cpu.p50_us / in_process_call.p50_us,
        overhead_over_floor_us,
        worker_call_split,
        worker_call_same_cpu,
        worker_call_unpinned,
        in_process_call,
        socket_round_trip_split,
        socket_round_trip_same_cpu,
        worker_start_from_cache,
        three_plugins_ready,
        daemon,
        targets,
    })
}

/// Round trips of 17 bytes between this thread and an echo thread pinned to `cpu`, over a
/// socket pair with blocking reads: what crossing to another process costs at the least.
fn socket_round_trip(cpu: usize, calls: u32) -> Result<Latency> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::{Read, Write};
        let _ = rustix::thread::sched_setaffinity(None, &one_cpu(cpu));
        let mut b = b;
        let mut buf = [0u8; 17];
        loop {
            if b.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            b.write_all(&buf)?;
        }
    });
    let mut samples = Vec::with_capacity(calls as usize);
    {
        use std::io::{Read, Write};
        let mut a = a;
        let mut buf = [7u8; 17];
        for i in 0..calls + 1000 {
            let t = Instant::now();
            a.write_all(&buf)?;
            a.read_exact(&mut buf)?;
            if i >= 1000 {
                samples.push(t.elapsed());
            }
        }
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(latency(samples))
}

/// Starts `hvisd run` (this binary) with the three plugins on an idle shm root, waits until they
/// are loaded, then reads its and its workers' RSS and CPU over an idle window.
async fn daemon_footprint(dir: &Path) -> Result<Footprint> {
    let root = dir.join("shm-root");
    std::fs::create_dir_all(&root)?;
    let log = dir.join("daemon.log");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("run")
        .arg("--transport")
        .arg(format!("shm:{}", root.display()))
        .arg("--config")
        .arg(dir.join("hvisd.toml"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("daemon pid")?;
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("plugin loaded").count() >= 3 {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            bail!("the daemon did not load its plugins:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settle, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let workers = children_of(pid);
    let core_rss_bytes = rss_of(pid).unwrap_or(0);
    let mut worker_rss_bytes = BTreeMap::new();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for w in &workers {
        let plugin = text
            .lines()
            .find(|l| l.contains("plugin worker ready") && l.contains(&format!("pid={w}")))
            .and_then(|l| l.split("plugin=\"").nth(1))
            .and_then(|s| s.split('"').next())
            .unwrap_or("?")
            .to_owned();
        worker_rss_bytes.insert(plugin, rss_of(*w).unwrap_or(0));
    }
    let cpu = |pids: &[u32]| -> Duration { pids.iter().filter_map(|p| cpu_time_of(*p)).sum() };
    let window = Duration::from_secs(5);
    let (core0, workers0) = (cpu(&[pid]), cpu(&workers));
    tokio::time::sleep(window).await;
    let (core1, workers1) = (cpu(&[pid]), cpu(&workers));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).context("pid")?,
        rustix::process::Signal::TERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    Ok(Footprint {
        core_rss_bytes,
        worker_rss_bytes,
        core_idle_cpu_ms: core1.saturating_sub(core0).as_millis() as u64,
        workers_idle_cpu_ms: workers1.saturating_sub(workers0).as_millis() as u64,
        idle_window_ms: window.as_millis() as u64,
    })
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(child);
        }
    }
    v
}
