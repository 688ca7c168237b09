//! Benchmarks that need the whole runtime: KVP over a real shm channel.
//!
//! `hvisd bench kvp` reports, per case, p50/p99 latency of one host request and requests/s while the
//! host enumerates a Guest pool of N records (plus plugin-provided keys) from index 0 until
//! `HV_S_CONT`: over `shm` (ring, doorbell, IC framing, KVP codec, the runtime's supervision and
//! channel task, exactly what `hvisd run` does), over the kernel daemon protocol, and the VMBus codec
//! alone (the last two from `hvisd-kvp`). The plugin-provided keys come from a real WebAssembly
//! plugin (`plugins/test-plugins/bench-keys`), served with the runtime's default cache time.

use crate::config::Config;
use crate::offer::{Offer, PipeMode};
use crate::plugins::Plugins;
use crate::runtime::run_shm;
use crate::services::{ServiceKind, Services};
use crate::transport::shm::ShmRoot;
use crate::transport::shm_host;
use hvisd_ic::NegotiateOutcome;
use hvisd_ic::host::{IcHost, offers};
use hvisd_kvp::GuestKeyProvider;
use hvisd_kvp::bench::{KvpBenchCase, KvpBenchOptions, setup, summarize};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use hvisd_protocol::ic::status::HV_S_CONT;
use hvisd_protocol::kvp::KvpRequest;
use hvisd_ring::PacketHeader;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts the `bench-keys` test plugin (ten Guest-pool keys; built from `plugins/` for
/// wasm32-wasip2) in its worker process, as the runtime does, and returns it as KVP key
/// providers, so the "with plugin keys" cases measure real WebAssembly calls through the worker.
/// The plugins' own KVP core (their `kvp-store` import) lives in `dir`.
pub async fn bench_key_plugin(
    dir: &std::path::Path,
) -> anyhow::Result<(Arc<Plugins>, Vec<Arc<dyn GuestKeyProvider>>)> {
    let built = build_plugins(&plugins_workspace(), "release")?;
    let wasm = built
        .get("bench-keys")
        .ok_or_else(|| anyhow::anyhow!("plugin `bench-keys` was not built"))?;
    let pools = dir.join("pools");
    std::fs::create_dir_all(&pools)?;
    let config: Config = toml::from_str(&format!(
        "[kvp]\npool_dir = '{}'\n[plugins]\ncache_dir = '{}'\n\
         [[plugin]]\nname = \"bench-keys\"\npath = '{}'\nworlds = [\"kvp-provider\"]\n\
         [[plugin.kvp]]\npool = \"guest\"\nkeys = [\"bench.*\"]\n",
        pools.display(),
        dir.join("cache").display(),
        wasm.display()
    ))?;
    let services = Services::new(config.clone())?;
    let plugins = Plugins::start(&config, &services)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no plugin configured"))?;
    let summary = plugins.status().await;
    if let Some(refused) = summary.iter().find(|s| s.reason.is_some()) {
        anyhow::bail!("plugin {} refused: {:?}", refused.name, refused.reason);
    }
    let providers = plugins.guest_key_sources();
    Ok((plugins, providers))
}

/// Every KVP case: shm, kernel protocol and codec, for each plugin-key count. Plugin keys come from
/// `opts.providers` when given, else from the real `bench-keys` plugin (which owns ten keys).
pub async fn run_kvp_bench(opts: &KvpBenchOptions) -> anyhow::Result<Vec<KvpBenchCase>> {
    let cache = tempfile::tempdir()?;
    let mut opts = opts.clone();
    let _host = if opts.providers.is_none() && opts.plugin_key_counts.iter().any(|&n| n > 0) {
        let (host, providers) = bench_key_plugin(cache.path()).await?;
        let owned: usize = providers.iter().map(|p| p.keys().len()).sum();
        opts.plugin_key_counts = opts
            .plugin_key_counts
            .iter()
            .map(|&n| if n > 0 { owned } else { 0 })
            .collect();
        opts.providers = Some(providers);
        Some(host)
    } else {
        None
    };
    let opts = &opts;
    let mut cases = Vec::new();
    for &plugin_keys in &opts.plugin_key_counts {
        cases.push(kvp_shm_case(opts, plugin_keys).await?);
    }
    cases.extend(hvisd_kvp::bench::run_kvp_bench(opts).await?);
    Ok(cases)
}

/// One shm case: a runtime serving a real shm root, a host enumerating over the ring.
pub async fn kvp_shm_case(
    opts: &KvpBenchOptions,
    plugin_keys: usize,
) -> anyhow::Result<KvpBenchCase> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root)?;
    let core = Arc::new(setup(&tmp.path().join("pools"), opts, plugin_keys)?);
    let services = Services::with_kvp_core(Config::default(), core);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runtime = tokio::spawn(run_shm(ShmRoot::new(&root), services, stop_rx));

    let offer = Offer {
        class_id: ServiceKind::Kvp.class_id(),
        instance_id: crate::sim::random_guid(),
        ring_size: 16 * 4096,
        pipe: PipeMode::Message,
        conn_from_host: None,
    };
    let mut channel = shm_host::publish_offer(&root, &offer)?
        .accept(Duration::from_secs(10), "bench host kvp")
        .await?;
    let mut ic = IcHost::new(
        ServiceKind::Kvp.message_type(),
        offers::FRAMEWORK,
        offers::KVP,
    );
    let mut next_id = 1u64;
    let mut packets = Vec::with_capacity(1);
    let mut exchange = async |payload: Vec<u8>| -> anyhow::Result<Vec<u8>> {
        channel
            .send(PacketHeader::inband(next_id), &[&payload])
            .await?;
        next_id += 1;
        packets.clear();
        channel.recv_batch(&mut packets, 1).await?;
        packets
            .pop()
            .map(|p| p.payload)
            .ok_or_else(|| anyhow::anyhow!("no reply"))
    };
    let reply = exchange(ic.negotiate_request()?).await?;
    if !matches!(
        ic.on_negotiate_response(&reply)?,
        NegotiateOutcome::Negotiated(_)
    ) {
        anyhow::bail!("KVP negotiation found no common version");
    }

    let expected = opts.pool_keys + plugin_keys;
    let mut latencies = Vec::with_capacity(opts.rounds * (expected + 1));
    let started = Instant::now();
    // One warm-up round (page cache, plugin value cache), then the measured ones.
    for round in 0..=opts.rounds {
        let mut index = 0u32;
        loop {
            let request = ic.request(&KvpRequest::Enumerate { pool: 1, index }.build())?;
            let t = Instant::now();
            let reply = exchange(request).await?;
            let elapsed = t.elapsed();
            let status = ic.on_reply(&reply)?.status;
            if round > 0 {
                latencies.push(elapsed);
            }
            if status == HV_S_CONT {
                break;
            }
            if status != 0 {
                anyhow::bail!("ENUMERATE {index} answered {status:#x}");
            }
            index += 1;
        }
        if index as usize != expected {
            anyhow::bail!("enumerated {index} records, expected {expected}");
        }
    }
    let total = started.elapsed();
    let _ = stop_tx.send(true);
    let _ = runtime.await;
    Ok(summarize("shm", opts, plugin_keys, latencies, total))
}

/// Prints the enumeration cases as a table.
pub fn print_paths(cases: &[KvpBenchCase]) {
    println!(
        "{:<12} {:>9} {:>11} {:>9} {:>10} {:>10} {:>12}",
        "path", "pool keys", "plugin keys", "requests", "p50 us", "p99 us", "requests/s"
    );
    for c in cases {
        println!(
            "{:<12} {:>9} {:>11} {:>9} {:>10.1} {:>10.1} {:>12.0}",
            c.path, c.pool_keys, c.plugin_keys, c.requests, c.p50_us, c.p99_us, c.requests_per_sec
        );
    }
}
