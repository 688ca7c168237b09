//! `hvisd bench freeze`: a backup's frozen window and FREEZE request time through hvisd, against
//! raw `FIFREEZE`/`FITHAW` on the same file systems in the same run.
//!
//! Needs root. The benchmark moves itself into a private mount namespace first, makes
//! `--mounts` small ext4 images and loop-mounts them there: nothing it mounts or freezes is
//! visible outside, the images are the only file systems the policy allows (`allow_only`), and
//! a guard thaws and unmounts them on every way out (the namespace dies with the process
//! anyway). Every thread runs on one CPU (pinned before any is created), so the host simulator,
//! the runtime and the worker of the no-op hook share it, and so does the raw baseline.
//!
//! - **raw**: open the mount points, `FIFREEZE` each in order, `FITHAW` each in reverse: the
//!   window is from the first freeze to the last thaw, the freeze time the four freezes.
//! - **hvisd**: the host simulator runs backups (HOT_BACKUP, FREEZE, THAW at once, BU_COMPLETE)
//!   over a real shm channel against the runtime with one no-op freeze hook
//!   (`plugins/test-plugins/noop-hook`, in its worker): the window is hvisd's own report (first
//!   `FIFREEZE` to last `FITHAW`, so it includes the host's THAW round trip), the FREEZE request
//!   time is from the host sending FREEZE to the answer (plan, hook, hold, freeze).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::config::Config;
use crate::plugins::Plugins;
use crate::services::Services;
use crate::transport::shm::ShmRoot;

/// Median and spread of a series, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Fastest.
    pub min_ms: f64,
}

fn series(mut v: Vec<f64>) -> Series {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Series {
        n: v.len(),
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        min_ms: v.first().copied().unwrap_or(0.0),
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeBenchReport {
    /// File systems frozen per backup.
    pub mounts: usize,
    /// How the threads were placed.
    pub pinning: String,
    /// Raw: first FIFREEZE to last FITHAW.
    pub raw_window: Series,
    /// Raw: the FIFREEZEs.
    pub raw_freeze: Series,
    /// hvisd: first FIFREEZE to last FITHAW (its backup report).
    pub hvisd_window: Series,
    /// hvisd: the host's FREEZE request, sent to answered.
    pub hvisd_freeze_request: Series,
    /// hvisd: the FREEZE as the guest timed it (arrival to answer).
    pub hvisd_freeze_in_guest: Series,
    /// hvisd: the FREEZE's phases in the guest (its backup reports): plan, pre-freeze hooks,
    /// holding logs and KVP writes, opening/journaling/`FIFREEZE`.
    pub hvisd_phases: Phases,
    /// Target for the window: hvisd p50 <= 1.2 x raw p50 + 1 ms.
    pub window_target_ms: f64,
    /// Target for the FREEZE request: hvisd p50 <= 1.2 x raw freeze p50 + 1 ms.
    pub freeze_target_ms: f64,
    /// Whether each target is met.
    pub window_ok: bool,
    /// See `freeze_target_ms`.
    pub freeze_ok: bool,
}

/// The FREEZE's phases in the guest.
#[derive(Debug, Clone, Serialize)]
pub struct Phases {
    /// Mount table, policy, policy plugin.
    pub plan: Series,
    /// The pre-freeze hook round.
    pub pre_freeze: Series,
    /// Holding log output and KVP writes.
    pub hold: Series,
    /// Opening and checking mount points, journaling, `FIFREEZE`.
    pub fifreeze: Series,
}

impl FreezeBenchReport {
    /// Prints the figures for a person.
    pub fn print_human(&self) {
        let row = |name: &str, s: &Series| {
            println!(
                "{name:<34} p50 {:>8.3} ms   p90 {:>8.3} ms   min {:>8.3} ms   ({} runs)",
                s.p50_ms, s.p90_ms, s.min_ms, s.n
            )
        };
        println!(
            "{} loop-mounted ext4 file systems; {}",
            self.mounts, self.pinning
        );
        row("raw FIFREEZE..FITHAW window", &self.raw_window);
        row("hvisd frozen window", &self.hvisd_window);
        row("raw FIFREEZE x n", &self.raw_freeze);
        row("hvisd FREEZE request (host)", &self.hvisd_freeze_request);
        row("hvisd FREEZE (in the guest)", &self.hvisd_freeze_in_guest);
        row("  of which: plan", &self.hvisd_phases.plan);
        row(
            "  of which: pre-freeze hooks",
            &self.hvisd_phases.pre_freeze,
        );
        row("  of which: hold logs and KVP", &self.hvisd_phases.hold);
        row(
            "  of which: journal + FIFREEZE",
            &self.hvisd_phases.fifreeze,
        );
        println!(
            "window:  {:.3} ms vs target {:.3} ms (1.2 x raw + 1 ms): {}",
            self.hvisd_window.p50_ms,
            self.window_target_ms,
            if self.window_ok { "ok" } else { "OVER TARGET" }
        );
        println!(
            "FREEZE:  {:.3} ms vs target {:.3} ms (1.2 x raw + 1 ms): {}",
            self.hvisd_freeze_request.p50_ms,
            self.freeze_target_ms,
            if self.freeze_ok { "ok" } else { "OVER TARGET" }
        );
    }
}

/// The images: mounted in this process's private namespace; thawed and unmounted on drop.
struct Images {
    mounts: Vec<PathBuf>,
}

impl Drop for Images {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            if let Ok(fd) = std::fs::File::open(m) {
                let _ = hvisd_sys::freeze::thaw(&fd);
            }
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn make_images(dir: &Path, n: usize) -> Result<Images> {
    let mut images = Images { mounts: Vec::new() };
    for i in 0..n {
        let image = dir.join(format!("fs{i}.img"));
        let mnt = dir.join(format!("mnt{i}"));
        std::fs::create_dir(&mnt)?;
        std::fs::File::create(&image)?.set_len(32 << 20)?;
        // Inode tables and journal initialised now, not by a background thread during the runs.
        quiet(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&image),
        )
        .context("mkfs.ext4 (e2fsprogs)")?;
        quiet(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt),
        )?;
        images.mounts.push(mnt);
    }
    Ok(images)
}

/// Runs the benchmark. Call it before any thread is started (it changes mount namespace and
/// CPU affinity for the whole process).
pub fn run(json: bool, rounds: usize, mounts: usize) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "bench freeze needs root: it loop-mounts images in a private mount namespace and freezes them"
        );
    }
    if rounds == 0 || mounts == 0 {
        bail!("--rounds and --mounts must be at least 1");
    }
    hvisd_sys::process::unshare_mount_namespace().context("a private mount namespace")?;
    let cpu = rustix::thread::sched_getaffinity(None)
        .ok()
        .and_then(|set| (0..rustix::thread::CpuSet::MAX_CPU).find(|&c| set.is_set(c)))
        .context("no CPU in the affinity mask")?;
    let mut one = rustix::thread::CpuSet::new();
    one.set(cpu);
    rustix::thread::sched_setaffinity(None, &one)?;

    let built = hvisd_plugin_host::build::build_plugins(
        &hvisd_plugin_host::build::plugins_workspace(),
        "release",
    )?;
    let hook = built
        .get("noop-hook")
        .context("plugin `noop-hook` was not built")?
        .clone();
    // Image files in memory (a tmpfs), so the figures measure freezing rather than this
    // machine's disk; the ext4 file systems on them are still real, and really frozen.
    let tmp = tempfile::Builder::new()
        .prefix("hvisd-bench-freeze")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())?;
    let images = make_images(tmp.path(), mounts)?;

    // Raw baseline: half of its rounds before the hvisd runs, half after, so both see the
    // same disk on a machine whose I/O drifts.
    let mut raw_window = Vec::new();
    let mut raw_freeze = Vec::new();
    let mut raw = |n: usize| -> Result<()> {
        for _ in 0..n {
            let fds: Vec<std::fs::File> = images
                .mounts
                .iter()
                .map(std::fs::File::open)
                .collect::<std::io::Result<_>>()?;
            let t0 = Instant::now();
            for fd in &fds {
                hvisd_sys::freeze::freeze(fd).context("FIFREEZE")?;
            }
            let frozen = t0.elapsed();
            for fd in fds.iter().rev() {
                hvisd_sys::freeze::thaw(fd).context("FITHAW")?;
            }
            raw_window.push(t0.elapsed().as_secs_f64() * 1e3);
            raw_freeze.push(frozen.as_secs_f64() * 1e3);
        }
        Ok(())
    };
    raw(rounds / 2)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (windows, in_guest, requests, phases) =
        runtime.block_on(through_hvisd(tmp.path(), &images.mounts, &hook, rounds))?;
    drop(runtime);
    raw(rounds - rounds / 2)?;
    drop(images);

    let raw_window = series(raw_window);
    let raw_freeze = series(raw_freeze);
    let hvisd_window = series(windows);
    let hvisd_freeze_request = series(requests);
    let window_target_ms = 1.2 * raw_window.p50_ms + 1.0;
    let freeze_target_ms = 1.2 * raw_freeze.p50_ms + 1.0;
    let report = FreezeBenchReport {
        mounts,
        pinning: format!(
            "every thread (host simulator, runtime, hook worker, baseline) on CPU {cpu}"
        ),
        window_ok: hvisd_window.p50_ms <= window_target_ms,
        freeze_ok: hvisd_freeze_request.p50_ms <= freeze_target_ms,
        raw_window,
        raw_freeze,
        hvisd_window,
        hvisd_freeze_request,
        hvisd_freeze_in_guest: series(in_guest),
        hvisd_phases: phases,
        window_target_ms,
        freeze_target_ms,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_human();
    }
    Ok(())
}

/// Backups through the runtime: (windows, FREEZE in the guest, FREEZE request at the host).
async fn through_hvisd(
    dir: &Path,
    mounts: &[PathBuf],
    hook: &Path,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, Phases)> {
    let names: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
    let text = format!(
        r#"
[kvp]
pool_dir = '{pools}'
[plugins]
cache_dir = '{cache}'
[vss]
dry_run = false
journal = '{journal}'
[vss.policy]
allow_only = {names}
[vss.policy.include]
mount_points = {names}

[[plugin]]
name = "noop-hook"
path = '{hook}'
worlds = ["freeze-hook"]
"#,
        pools = dir.join("pools").display(),
        cache = dir.join("cache").display(),
        journal = dir.join("run/vss-journal.json").display(),
        names = serde_json::to_string(&names)?,
        hook = hook.display(),
    );
    let config = Config::parse(&text, "bench freeze")?;
    std::fs::create_dir_all(dir.join("pools"))?;
    let root = dir.join("shm");
    std::fs::create_dir_all(&root)?;
    let services = Services::new(config.clone())?;
    let plugins = Plugins::start(&config, &services)
        .await?
        .context("no plugins")?;
    let vss = services.vss_core().context("VSS is off")?.clone();
    vss.set_plugins(plugins.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runtime = tokio::spawn(crate::runtime::run_shm(
        ShmRoot::new(&root),
        services,
        stop_rx,
    ));

    // One warm-up backup, then the measured ones.
    let mut actions = vec![serde_json::json!({"action": "offer", "service": "vss"})];
    for _ in 0..=rounds {
        actions.push(serde_json::json!({"action": "backup", "pause_ms": 0}));
    }
    let script = crate::sim::Script::parse(
        &serde_json::json!({"timeout_ms": 60000, "actions": actions}).to_string(),
        "bench freeze",
    )?;
    let mut host = crate::sim::HostSimulator::new(&root);
    let transcript = host.run(&script).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), runtime).await;
    if !transcript.ok() {
        bail!(
            "backups failed: {}",
            serde_json::to_string(transcript.entries())?
        );
    }
    vss.idle().await;
    plugins.shutdown().await;
    let requests: Vec<f64> = transcript
        .entries()
        .iter()
        .skip(2)
        .filter_map(|e| e["freeze"]["us"].as_u64())
        .map(|us| us as f64 / 1e3)
        .collect();
    let history = vss.history();
    let measured = history.iter().skip(1);
    let windows: Vec<f64> = measured
        .clone()
        .filter_map(|r| r.frozen_window_ms)
        .collect();
    let in_guest: Vec<f64> = measured.clone().map(|r| r.freeze_request_ms).collect();
    if windows.len() != rounds {
        bail!("{} backup reports for {rounds} backups", windows.len());
    }
    let phase = |f: fn(&crate::vss::BackupReport) -> f64| series(measured.clone().map(f).collect());
    let phases = Phases {
        plan: phase(|r| r.plan_ms),
        pre_freeze: phase(|r| r.pre_freeze_ms),
        hold: phase(|r| r.hold_ms),
        fifreeze: phase(|r| r.fifreeze_ms),
    };
    Ok((windows, in_guest, requests, phases))
}
