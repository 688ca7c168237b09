//! The plugin benchmark without the `hvisd` binary:
//!
//! ```text
//! cargo run --release -p hvisd-plugin-host --example plugin-bench [-- --json]
//! ```
//!
//! Builds the example plugins with cargo (wasm32-wasip2), then prints the
//! figures of issue 3: ns per KVP-provider call, instantiate time from the
//! cache, load time of three cached plugins, RSS after load.

use hvisd_plugin_host::bench::{BenchConfig, run_plugin_bench};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let built = build_plugins(&plugins_workspace(), "release")?;
    let pick = |n: &str| {
        built
            .get(n)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("plugin `{n}` was not built"))
    };
    let cache = tempfile::tempdir()?;
    let cfg = BenchConfig {
        provider_wasm: pick("app-version")?,
        hook_wasm: pick("flush-hold")?,
        hvsock_wasm: pick("status-echo")?,
        cache_dir: cache.path().join("cache"),
        provider_calls: 200_000,
        instantiations: 200,
    };
    let report = run_plugin_bench(&cfg).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_human();
    }
    Ok(())
}
