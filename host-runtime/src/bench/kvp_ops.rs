//! KVP SET, GET and ENUMERATE against Debian's `hv_kvp_daemon`, through the same harness.
//!
//! Both daemons run as processes and speak the kernel device protocol over a `SOCK_SEQPACKET`
//! socket that this harness plays the kernel on (the C daemon through the LD_PRELOAD shim of the
//! differential test, hvisd through `hvisd run --transport kernel:SOCKET`). Each starts on a
//! copy of the same Guest pool of `pool_keys` records. The harness thread pins itself to one CPU
//! before it starts a daemon, which inherits the affinity, so harness and daemon (all its
//! threads) share that CPU: the figures measure work, not cross-core wake-ups, and the two
//! daemons are measured under the same placement in the same run.
//!
//! Every request gets its reply before the next is sent (the kernel driver has one request in
//! flight per device too). SETs rewrite existing keys round-robin (the pool keeps its size),
//! GETs read them round-robin, ENUMERATE walks the pool from index 0 to the end.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hvisd_protocol::kvp::Pool;
use hvisd_protocol::kvp_daemon::{self as dm, DAEMON_MSG_SIZE, DaemonMessage};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct OpsOptions {
    /// Records in the Guest pool.
    pub pool_keys: usize,
    /// Requests per SET and GET case.
    pub requests: usize,
    /// Full enumerations per ENUMERATE case.
    pub enumerate_rounds: usize,
    /// The C daemon binary (see [`find_c_daemon`]).
    pub c_daemon: Option<PathBuf>,
}

/// One operation on one daemon.
#[derive(Debug, Clone, Serialize)]
pub struct OpsCase {
    /// `hvisd` or `hv_kvp_daemon`.
    pub daemon: &'static str,
    /// `set`, `get` or `enumerate`.
    pub op: &'static str,
    /// Requests measured.
    pub requests: usize,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Requests per second over the case.
    pub requests_per_sec: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct OpsReport {
    /// The CPU the harness and both daemons ran on.
    pub cpu: Option<usize>,
    /// Records in the Guest pool.
    pub pool_keys: usize,
    /// The C daemon measured, or why none was.
    pub c_daemon: Result<PathBuf, String>,
    /// Every case.
    pub cases: Vec<OpsCase>,
    /// hvisd requests/s divided by hv_kvp_daemon's, per operation.
    pub ratio_hvisd_to_c: Vec<(&'static str, f64)>,
}

impl OpsReport {
    /// Prints a table for people.
    pub fn print_human(&self) {
        println!(
            "KVP operations on the kernel protocol, {} Guest-pool records, harness and daemons on CPU {}",
            self.pool_keys,
            self.cpu.map_or("(not pinned)".into(), |c| c.to_string())
        );
        if let Err(why) = &self.c_daemon {
            println!("hv_kvp_daemon not measured: {why}");
        }
        println!(
            "{:<14} {:<10} {:>9} {:>10} {:>10} {:>12}",
            "daemon", "op", "requests", "p50 us", "p99 us", "requests/s"
        );
        for c in &self.cases {
            println!(
                "{:<14} {:<10} {:>9} {:>10.1} {:>10.1} {:>12.0}",
                c.daemon, c.op, c.requests, c.p50_us, c.p99_us, c.requests_per_sec
            );
        }
        for (op, r) in &self.ratio_hvisd_to_c {
            println!("hvisd / hv_kvp_daemon, {op}: {r:.2}x");
        }
    }
}

/// `$HVISD_C_KVP_DAEMON`, else `target/c-daemons/usr/sbin/hv_kvp_daemon` (where `.ci/run`
/// unpacks Debian's package) under the current directory.
pub fn find_c_daemon(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidate = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HVISD_C_KVP_DAEMON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/c-daemons/usr/sbin/hv_kvp_daemon"));
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "{} not found; unpack Debian's hyperv-daemons there (.ci/run shows how) or pass --c-daemon",
            candidate.display()
        ))
    }
}

/// Runs every case.
pub fn run(opts: &OpsOptions) -> Result<OpsReport> {
    let work = tempfile::tempdir()?;
    let cpu = pin_to_one_cpu();
    let mut cases = Vec::new();
    let c_daemon = find_c_daemon(opts.c_daemon.as_deref());
    if let Ok(binary) = &c_daemon {
        let dir = work.path().join("c");
        let pools = dir.join("pools");
        fill_pool(&pools, opts.pool_keys)?;
        let shim = build_shim(&dir)?;
        let daemon = Daemon::start(&dir, |sock| {
            let mut cmd = Command::new(binary);
            cmd.arg("-n")
                .env("LD_PRELOAD", &shim)
                .env("HVISD_SHIM_SOCKET", sock)
                .env("HVISD_SHIM_POOL_DIR", &pools);
            cmd
        })?;
        cases.extend(measure("hv_kvp_daemon", &daemon.conn, opts)?);
    }
    {
        let dir = work.path().join("hvisd");
        let pools = dir.join("pools");
        fill_pool(&pools, opts.pool_keys)?;
        let config = dir.join("hvisd.toml");
        std::fs::write(
            &config,
            format!("[kvp]\npool_dir = {:?}\n", pools.display().to_string()),
        )?;
        let exe = std::env::current_exe().context("finding the hvisd binary")?;
        let daemon = Daemon::start(&dir, |sock| {
            let mut cmd = Command::new(&exe);
            cmd.arg("run")
                .arg("--transport")
                .arg(format!("kernel:{}", sock.display()))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn");
            cmd
        })?;
        cases.extend(measure("hvisd", &daemon.conn, opts)?);
    }
    let rate = |daemon: &str, op: &str| {
        cases
            .iter()
            .find(|c| c.daemon == daemon && c.op == op)
            .map(|c| c.requests_per_sec)
    };
    let ratio_hvisd_to_c = ["set", "get", "enumerate"]
        .into_iter()
        .filter_map(|op| Some((op, rate("hvisd", op)? / rate("hv_kvp_daemon", op)?)))
        .collect();
    Ok(OpsReport {
        cpu,
        pool_keys: opts.pool_keys,
        c_daemon: c_daemon.map_err(|e| e.to_string()),
        cases,
        ratio_hvisd_to_c,
    })
}

/// Pins this thread to the last CPU it may use (children started from it inherit the mask).
fn pin_to_one_cpu() -> Option<usize> {
    let allowed = rustix::thread::sched_getaffinity(None).ok()?;
    let cpu = (0..rustix::thread::CpuSet::MAX_CPU)
        .rev()
        .find(|&c| allowed.is_set(c))?;
    let mut one = rustix::thread::CpuSet::new();
    one.set(cpu);
    rustix::thread::sched_setaffinity(None, &one).ok()?;
    Some(cpu)
}

fn fill_pool(dir: &Path, keys: usize) -> Result<()> {
    let mut store = hvisd_kvp::PoolStore::open(dir, hvisd_kvp::StoreOptions::default())?;
    for i in 0..keys {
        store.set(
            Pool::Guest,
            &format!("BenchKey{i:04}"),
            &format!("benchmark value number {i}"),
        )?;
    }
    Ok(())
}

fn build_shim(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("shim.c");
    let lib = dir.join("shim.so");
    std::fs::write(&src, hvisd_kvp::bench::C_DAEMON_SHIM)?;
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .context("running cc for the C daemon's LD_PRELOAD shim (a C compiler is needed)")?;
    if !status.success() {
        bail!("building the LD_PRELOAD shim failed");
    }
    Ok(lib)
}

/// A daemon process and the harness's end of its device socket; killed (by its PID) on drop.
struct Daemon {
    child: Child,
    conn: OwnedFd,
}

impl Daemon {
    fn start(dir: &Path, command: impl FnOnce(&Path) -> Command) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("kvp.sock");
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&listener, &SocketAddrUnix::new(&sock)?)?;
        rustix::net::listen(&listener, 1)?;
        let mut cmd = command(&sock);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon")?;
        let mut daemon = Daemon {
            child,
            conn: accept_within(&listener, Duration::from_secs(20))?,
        };
        // The daemon registers; the harness answers as the kernel does.
        let mut msg = dm::zeroed();
        read_msg(&daemon.conn, &mut msg)?;
        write_msg(&daemon.conn, &dm::build_register_reply("3.1"))?;
        // One request answered proves it is serving.
        let mut probe = dm::build_enumerate(1, 0);
        exchange(&daemon.conn, &mut probe)?;
        let _ = &mut daemon;
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn accept_within(listener: &OwnedFd, timeout: Duration) -> Result<OwnedFd> {
    let start = Instant::now();
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::AGAIN) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => bail!("the daemon did not connect to its device socket: {e}"),
        }
    }
}

fn read_msg(fd: &OwnedFd, msg: &mut DaemonMessage) -> Result<()> {
    let n = rustix::io::read(fd, &mut msg[..])?;
    if n != DAEMON_MSG_SIZE {
        bail!("the daemon sent {n} bytes, messages are {DAEMON_MSG_SIZE}");
    }
    Ok(())
}

fn write_msg(fd: &OwnedFd, msg: &DaemonMessage) -> Result<()> {
    rustix::io::write(fd, &msg[..])?;
    Ok(())
}

fn exchange(fd: &OwnedFd, msg: &mut DaemonMessage) -> Result<u32> {
    write_msg(fd, msg)?;
    read_msg(fd, msg)?;
    Ok(dm::error(&msg[..]))
}

fn measure(daemon: &'static str, conn: &OwnedFd, opts: &OpsOptions) -> Result<Vec<OpsCase>> {
    let keys = opts.pool_keys.max(1);
    let key = |i: usize| format!("BenchKey{:04}", i % keys);
    let mut cases = Vec::new();
    // Warm-up: page cache, the daemon's first-touch costs.
    for i in 0..200 {
        let mut m = dm::build_get(1, key(i).as_bytes());
        exchange(conn, &mut m)?;
    }
    let mut run = |op: &'static str,
                   n: usize,
                   build: &dyn Fn(usize) -> Box<DaemonMessage>,
                   ok: &dyn Fn(usize, u32) -> bool|
     -> Result<()> {
        let mut lat = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let mut m = build(i);
            let t = Instant::now();
            let status = exchange(conn, &mut m)?;
            lat.push(t.elapsed());
            if !ok(i, status) {
                bail!("{daemon}: {op} #{i} answered {status:#x}");
            }
        }
        cases.push(summarize(daemon, op, lat, start.elapsed()));
        Ok(())
    };
    run(
        "set",
        opts.requests,
        &|i| {
            dm::build_set(
                1,
                key(i).as_bytes(),
                format!("value {i} of the run").as_bytes(),
            )
        },
        &|_, s| s == 0,
    )?;
    run(
        "get",
        opts.requests,
        &|i| dm::build_get(1, key(i).as_bytes()),
        &|_, s| s == 0,
    )?;
    let per_round = opts.pool_keys + 1;
    run(
        "enumerate",
        opts.enumerate_rounds * per_round,
        &|i| dm::build_enumerate(1, (i % per_round) as u32),
        &|i, s| (s == 0) == (i % per_round < opts.pool_keys),
    )?;
    Ok(cases)
}

fn summarize(
    daemon: &'static str,
    op: &'static str,
    mut lat: Vec<Duration>,
    total: Duration,
) -> OpsCase {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    OpsCase {
        daemon,
        op,
        requests: lat.len(),
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        requests_per_sec: lat.len() as f64 / total.as_secs_f64().max(1e-9),
    }
}
