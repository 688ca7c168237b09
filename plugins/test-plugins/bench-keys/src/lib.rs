//! A KVP provider owning ten Guest-pool keys, `bench.0` .. `bench.9`, each answered with a short
//! computed string: what `hvisd bench kvp` measures as "10 plugin-provided keys".
//!
//! ```toml
//! [[plugin]]
//! name = "bench-keys"
//! path = "plugins/target/wasm32-wasip2/release/bench_keys.wasm"
//! worlds = ["kvp-provider"]
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["bench.*"]
//! ```

use hvisd_sdk::{Error, KvpProvider, Pool, ProviderInfo, Value};

struct BenchKeys;

const KEYS: [&str; 10] = [
    "bench.0", "bench.1", "bench.2", "bench.3", "bench.4", "bench.5", "bench.6", "bench.7",
    "bench.8", "bench.9",
];

impl KvpProvider for BenchKeys {
    fn describe() -> ProviderInfo {
        ProviderInfo::owning(KEYS.iter().map(|k| (Pool::Guest, *k)))
    }

    fn get(pool: Pool, key: &str) -> Result<Value, Error> {
        match (pool, KEYS.iter().position(|k| *k == key)) {
            (Pool::Guest, Some(i)) => Ok(Value::Text(format!("plugin value {i}"))),
            _ => Err(Error::NotFound(format!("bench-keys does not own {key}"))),
        }
    }
}

hvisd_sdk::export_kvp_provider!(BenchKeys);
