//! Plugin-provided KVP keys end to end: real WebAssembly components (built from `plugins/`), loaded
//! by `hvisd run` from its config, answering the host simulator's ENUMERATE and GET of the Guest
//! pool over the shm transport. A well-behaved provider's keys reach the host; a provider that spins
//! past the KVP deadline or traps never fails or stalls the host's request.

use hvisd_e2e::{GuestProcess, run_host_script, transcript};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);
/// The KVP service waits at most this long for plugin values per host request.
const KVP_DEADLINE_MS: u64 = 200;

fn config(dir: &Path) -> std::path::PathBuf {
    let built = build_plugins(&plugins_workspace(), "release").expect("building the plugins");
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("VERSION"), "4.2.0\n").unwrap();
    std::fs::write(app.join("health"), "ok\n").unwrap();
    let config = dir.join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kvp]
pool_dir = '{pools}'
plugin_key_deadline_ms = {KVP_DEADLINE_MS}
plugin_key_cache_ms = 1

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

# Spins (or sleeps) for up to 1 s per call: far past the KVP deadline, so only the KVP deadline
# can keep the host's request short. Its worker runs one call at a time: while it spins, its other
# keys wait too (its own problem; the neighbour's worker is not affected).
[[plugin]]
name = "misbehave"
path = '{bad_wasm}'
worlds = ["kvp-provider"]
[plugin.limits]
call_deadline_ms = 1000
max_consecutive_traps = 1000
[[plugin.kvp]]
pool = "guest"
keys = ["ok", "spin", "trap", "sleep"]
"#,
            pools = dir.join("pools").display(),
            cache = dir.join("cache").display(),
            app_wasm = built["app-version"].display(),
            bad_wasm = built["misbehave"].display(),
            app = app.display(),
        ),
    )
    .unwrap();
    config
}

fn records(entry: &Value) -> Vec<(String, String)> {
    entry["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn plugin_keys_reach_the_host_and_bad_providers_never_stall_it() {
    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let config = config(data.path());
    let guest = GuestProcess::start_shm_with_config(root.path(), &config);
    guest
        .process
        .wait_for_log("plugin loaded", Duration::from_secs(60));
    let script = json!([
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_set", "pool": "guest", "key": "from-host", "value": "file record"},
        {"action": "kvp_enumerate", "pool": "guest"},
        {"action": "kvp_get", "pool": "guest", "key": "app.version"},
        {"action": "kvp_get", "pool": "guest", "key": "spin"},
        {"action": "kvp_enumerate", "pool": "guest"},
        {"action": "kvp_get", "pool": "guest", "key": "sleep"},
        {"action": "sleep", "ms": 1500},
        {"action": "kvp_get", "pool": "guest", "key": "ok"}
    ]);
    let out = run_host_script(root.path(), &script.to_string(), TIMEOUT);
    let entries = transcript(&out);
    for e in &entries {
        assert_eq!(
            e["ok"],
            true,
            "action failed: {e}\n{}",
            guest.process.stderr()
        );
    }

    for step in [2, 5] {
        let listed = records(&entries[step]);
        assert!(
            listed.contains(&("from-host".into(), "file record".into())),
            "{listed:?}"
        );
        assert!(
            listed.contains(&("app.version".into(), "4.2.0".into())),
            "{listed:?}"
        );
        assert!(
            listed.contains(&("app.health".into(), "ok".into())),
            "{listed:?}"
        );
        // No good value ever came from these: they are left out, not failed.
        assert!(
            !listed.iter().any(|(k, _)| k == "spin" || k == "trap"),
            "{listed:?}"
        );
        // The whole enumeration (one request per record) took a few KVP deadlines at most, not the
        // spinning plugin's 5 s call deadline.
        let elapsed_ms = entries[step]["elapsed_us"].as_u64().unwrap() / 1000;
        assert!(elapsed_ms < 2_500, "enumeration took {elapsed_ms} ms");
    }
    assert_eq!(entries[3]["received"]["value"], "4.2.0");
    // A GET of a key whose provider spins: answered (as missing), within the deadline.
    assert_eq!(entries[4]["status"], "HV_S_CONT", "{}", entries[4]);
    assert!(entries[4]["elapsed_us"].as_u64().unwrap() < 2_500_000);
    // A GET of a key whose provider parks in a WASI sleep: the same.
    assert_eq!(entries[6]["status"], "HV_S_CONT", "{}", entries[6]);
    assert!(entries[6]["elapsed_us"].as_u64().unwrap() < 2_500_000);
    // Once its calls have run out their deadline, the bad provider's worker was replaced and its
    // good key answers again.
    assert_eq!(entries[8]["received"]["value"], "fine", "{}", entries[8]);

    let log = guest.process.stderr();
    assert!(
        log.contains("misbehave"),
        "the bad provider is named in the log:\n{log}"
    );
}
