//! `hvisd bench ...`: benchmarks that print figures (a table, or JSON with `--json`). Built only
//! with the `bench` feature (`cargo run --profile dist -p hvisd --features bench -- bench ...`), so the
//! production binary carries neither the benchmark code nor the plugin build helper.

pub mod freeze;
pub mod hvsock;
pub mod kvp;
pub mod kvp_ops;
pub mod plugin;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ring throughput over a real shared mapping, against a memcpy baseline, with the writer and
    /// reader threads pinned to the same CPU and to two CPUs.
    Ring {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Runs of every case; the fastest is reported.
        #[arg(long, default_value_t = 3)]
        repeats: u32,
        /// Bytes of the ring (one direction, control page included).
        #[arg(long, default_value_t = 128 * 4096)]
        ring_size: usize,
        /// `same-cpu`, `split`, or both (the default).
        #[arg(long)]
        placement: Option<String>,
    },
    /// Plugins through their worker processes: provider call latency (worker pinned to another
    /// CPU and to the core's), worker start from the cache, three cached plugins ready, RSS and
    /// idle CPU of a real daemon and its workers; an in-process call as the baseline (builds the
    /// example plugins for wasm32-wasip2 first).
    Plugin {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Provider calls to time per case.
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
    },
    /// Backups: the frozen window and FREEZE request time through hvisd (one no-op hook, real
    /// shm channel) against raw FIFREEZE/FITHAW on the same loop-mounted ext4 images, in a
    /// private mount namespace (needs root).
    Freeze {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Backups measured (at most 31: the service keeps 32 reports).
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// File systems frozen per backup.
        #[arg(long, default_value_t = 4)]
        mounts: usize,
    },
    /// hvsock streams over the shm transport (the runtime with a Rust echo acceptor against a
    /// host driving pipe channels): echo throughput with 64 KiB writes, 64-byte round trips
    /// (p50, p99), and the raw ring throughput of the same run; guest and host threads pinned
    /// to one CPU and to two.
    Hvsock {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Ring sizes in KiB (one direction, control page included); default 24 and 256, Linux
        /// hv_sock's default and largest.
        #[arg(long, value_delimiter = ',')]
        ring_kib: Option<Vec<usize>>,
        /// `same-cpu`, `split`, or both (the default).
        #[arg(long)]
        placement: Option<String>,
        /// Who echoes: `core` (a Rust echo in the runtime), `plugin` (a WebAssembly plugin in
        /// its worker, through the broker), or both (the default).
        #[arg(long)]
        echo: Option<String>,
        /// MiB echoed per throughput case.
        #[arg(long, default_value_t = 256)]
        echo_mib: usize,
        /// 64-byte round trips per latency case.
        #[arg(long, default_value_t = 20_000)]
        round_trips: usize,
    },
    /// KVP: SET, GET and ENUMERATE on the kernel protocol against Debian's hv_kvp_daemon (both as
    /// processes, pinned to one CPU with the harness), then enumeration latency over shm, the
    /// kernel protocol and the codec, with and without plugin keys.
    Kvp {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Records in the Guest pool.
        #[arg(long, default_value_t = 100)]
        pool_keys: usize,
        /// Full enumerations measured per case.
        #[arg(long, default_value_t = 50)]
        rounds: usize,
        /// Requests per SET and GET case against the daemons.
        #[arg(long, default_value_t = 5000)]
        requests: usize,
        /// The C daemon (default: $HVISD_C_KVP_DAEMON, else target/c-daemons/usr/sbin/hv_kvp_daemon).
        #[arg(long)]
        c_daemon: Option<std::path::PathBuf>,
    },
}

/// Runs one benchmark and prints its figures.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Ring {
            json,
            repeats,
            ring_size,
            placement,
        } => ring(json, repeats, ring_size, placement.as_deref()),
        BenchCommand::Freeze {
            json,
            rounds,
            mounts,
        } => {
            if rounds > 31 {
                bail!("--rounds: at most 31");
            }
            freeze::run(json, rounds, mounts)
        }
        BenchCommand::Hvsock {
            json,
            ring_kib,
            placement,
            echo,
            echo_mib,
            round_trips,
        } => {
            let mut opts = hvsock::HvsockBenchOptions {
                echo_bytes: echo_mib << 20,
                round_trips,
                ..Default::default()
            };
            if let Some(name) = echo.as_deref().filter(|e| *e != "both") {
                opts.echoes = vec![
                    hvsock::Echo::parse(name)
                        .with_context(|| format!("--echo {name:?}: use core, plugin or both"))?,
                ];
            }
            if let Some(kib) = ring_kib {
                opts.ring_sizes = kib.into_iter().map(|k| k * 1024).collect();
            }
            if let Some(name) = placement.as_deref().filter(|p| *p != "both") {
                opts.placements =
                    vec![hvisd_ring::bench::Placement::parse(name).with_context(|| {
                        format!("--placement {name:?}: use same-cpu, split or both")
                    })?];
            }
            let report = hvsock::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print_human();
            }
            Ok(())
        }
        BenchCommand::Plugin { json, calls } => {
            if calls == 0 {
                bail!("--calls must be at least 1");
            }
            // One thread for the core's side, pinned by the benchmark.
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(plugin::run(calls))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print_human();
            }
            Ok(())
        }
        BenchCommand::Kvp {
            json,
            pool_keys,
            rounds,
            requests,
            c_daemon,
        } => {
            if rounds == 0 || requests == 0 {
                bail!("--rounds and --requests must be at least 1");
            }
            let ops = kvp_ops::run(&kvp_ops::OpsOptions {
                pool_keys,
                requests,
                enumerate_rounds: rounds,
                c_daemon,
            })?;
            let opts = hvisd_kvp::bench::KvpBenchOptions {
                pool_keys,
                rounds,
                ..Default::default()
            };
            let paths = runtime()?.block_on(kvp::run_kvp_bench(&opts))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"ops": ops, "paths": paths}))?
                );
            } else {
                ops.print_human();
                kvp::print_paths(&paths);
            }
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn ring(json: bool, repeats: u32, ring_size: usize, placement: Option<&str>) -> Result<()> {
    use hvisd_ring::bench::{Placement, RingBenchOptions, run_ring_bench};
    if repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let placements = match placement {
        None | Some("both") => Placement::ALL.to_vec(),
        Some(name) => vec![
            Placement::parse(name)
                .with_context(|| format!("--placement {name:?}: use same-cpu, split or both"))?,
        ],
    };
    let opts = RingBenchOptions {
        repeats,
        ring_size,
        placements,
        ..Default::default()
    };
    let report = run_ring_bench(&opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_human();
    }
    Ok(())
}
