//! Example KVP provider: publishes an application's version and health as
//! guest-pool keys the Hyper-V host can read.
//!
//! - `app.version`: first line of `/app/VERSION` (read once per instance), or `unknown`;
//! - `app.health`: `ok` if `/app/health` contains `ok`, its first line otherwise,
//!   `down` if the file is missing (read on every call, so it is current);
//! - when the host sets an `app.*` key in the External pool (`Set-VMKeyValuePair`), the plugin
//!   records `KEY=VALUE` as `app.last-host-set` in the Guest pool, for the host to read back
//!   (needs `access = "read-write"` on the Guest grant; without it the plugin only logs).
//!
//! Manifest:
//!
//! ```toml
//! [[plugin]]
//! name = "app-version"
//! path = "/usr/lib/hvisd/plugins/app_version.wasm"
//! worlds = ["kvp-provider"]
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["app.*"]
//! access = "read-write"
//! [[plugin.kvp]]
//! pool = "external"
//! keys = ["app.*"]
//! [[plugin.dirs]]
//! host = "/var/lib/myapp"
//! guest = "/app"
//! ```

use std::sync::OnceLock;

use hvisd_sdk::{Error, KvpProvider, Pool, ProviderInfo, Value, kvp, log};

struct AppVersion;

fn first_line(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| first_line("/app/VERSION").unwrap_or_else(|| "unknown".into()))
}

impl KvpProvider for AppVersion {
    fn describe() -> ProviderInfo {
        let mut info =
            ProviderInfo::owning([(Pool::Guest, "app.version"), (Pool::Guest, "app.health")]);
        // Hear about host-pushed settings for the application.
        info.subscribe.push(Pool::External);
        info
    }

    fn get(pool: Pool, key: &str) -> Result<Value, Error> {
        match (pool, key) {
            (Pool::Guest, "app.version") => Ok(Value::Text(version().to_owned())),
            (Pool::Guest, "app.health") => Ok(Value::Text(match first_line("/app/health") {
                Some(h) if h == "ok" => "ok".into(),
                Some(h) => h,
                None => "down".into(),
            })),
            _ => Err(Error::NotFound(format!("app-version does not own {key}"))),
        }
    }

    fn on_host_set(_pool: Pool, key: &str, value: Value) {
        if !key.starts_with("app.") {
            return;
        }
        let text = match &value {
            Value::Text(t) => t.clone(),
            Value::U32(n) => n.to_string(),
            Value::U64(n) => n.to_string(),
        };
        log::info(&format!("host set {key} = {text:?}"));
        let record = Value::Text(format!("{key}={text}"));
        if let Err(e) = kvp::set(Pool::Guest, "app.last-host-set", &record) {
            log::warn(&format!("cannot record app.last-host-set: {e:?}"));
        }
    }
}

hvisd_sdk::export_kvp_provider!(AppVersion);
