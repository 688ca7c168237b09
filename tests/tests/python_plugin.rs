//! A KVP provider written in Python (`plugins/python-kvp`, built with componentize-py) loaded by
//! `hvisd run` like any component: its keys reach the host simulator's GET and ENUMERATE of the
//! Guest pool over the shm transport.
//!
//! Needs componentize-py (`$HVISD_COMPONENTIZE_PY`, else on PATH); `.ci/run` installs it and
//! sets `HVISD_E2E_REQUIRE_PYTHON_PLUGIN=1`, so the test cannot skip in CI.

use hvisd_e2e::{ChildGuard, run_host_script, transcript, workspace_root};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// componentize-py, if this machine has it.
fn componentize_py() -> Option<PathBuf> {
    let candidate = std::env::var_os("HVISD_COMPONENTIZE_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| "componentize-py".into());
    Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(candidate)
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Builds `plugins/python-kvp` with its build script unless the component is newer than its
/// sources (a build takes about 20 s).
fn build_python_plugin(componentize_py: &Path) -> PathBuf {
    let root = workspace_root();
    let out = root.join("plugins/target/python/python_kvp.wasm");
    let sources = [
        "plugins/python-kvp/app.py",
        "plugins/python-kvp/build.sh",
        "wit/hvisd.wit",
    ];
    let built = modified(&out);
    if out.exists() && sources.iter().all(|s| modified(&root.join(s)) < built) {
        return out;
    }
    let status = Command::new(root.join("plugins/python-kvp/build.sh"))
        .arg(&out)
        .env("COMPONENTIZE_PY", componentize_py)
        .status()
        .expect("running plugins/python-kvp/build.sh");
    assert!(status.success(), "building the Python plugin failed");
    out
}

#[test]
fn a_python_kvp_provider_answers_the_hosts_get_and_enumerate() {
    let Some(componentize_py) = componentize_py() else {
        assert!(
            std::env::var_os("HVISD_E2E_REQUIRE_PYTHON_PLUGIN").is_none(),
            "HVISD_E2E_REQUIRE_PYTHON_PLUGIN is set but componentize-py is missing"
        );
        println!(
            "SKIP: needs componentize-py (pip install componentize-py==0.25.1) to build plugins/python-kvp"
        );
        return;
    };
    let wasm = build_python_plugin(&componentize_py);

    // The manifest's checks first: the component implements the world and imports nothing the
    // worker does not link (no wasi:sockets, see plugins/python-kvp/build.sh).
    let check = Command::new(hvisd_e2e::hvisd_bin())
        .args(["plugin", "check"])
        .arg(&wasm)
        .output()
        .expect("hvisd plugin check");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(report.contains("implements: kvp-provider"), "{report}");
    assert!(!report.contains("wasi:sockets"), "{report}");

    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let config = data.path().join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kvp]
pool_dir = '{pools}'
# The first call reaches a fresh worker; a host request waits this long for its value.
plugin_key_deadline_ms = 5000

[plugins]
cache_dir = '{cache}'

[[plugin]]
name = "python-kvp"
path = '{wasm}'
worlds = ["kvp-provider"]
[plugin.limits]
memory-mib = 64
call-deadline-ms = 2000
[[plugin.kvp]]
pool = "guest"
keys = ["python.*"]
"#,
            pools = data.path().join("pools").display(),
            cache = data.path().join("cache").display(),
            wasm = wasm.display(),
        ),
    )
    .unwrap();

    let transport = format!("shm:{}", root.path().display());
    let guest = ChildGuard::spawn_hvisd(&[
        "run",
        "--transport",
        &transport,
        "--config",
        config.to_str().unwrap(),
    ]);
    // Compiling an 18 MB component (CPython) takes a while the first time; a refusal ends the
    // wait at once.
    let start = Instant::now();
    loop {
        let log = guest.stderr();
        assert!(!log.contains("plugin refused"), "{log}");
        if log.contains("plugin loaded") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no \"plugin loaded\" within 600 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    guest.wait_for_log("watching shm root", Duration::from_secs(30));

    let script = json!([
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_get", "pool": "guest", "key": "python.greeting"},
        {"action": "kvp_get", "pool": "guest", "key": "python.version"},
        {"action": "kvp_enumerate", "pool": "guest"}
    ]);
    let out = run_host_script(root.path(), &script.to_string(), Duration::from_secs(60));
    let entries = transcript(&out);
    for e in &entries {
        assert_eq!(e["ok"], true, "action failed: {e}\n{}", guest.stderr());
    }
    assert_eq!(
        entries[1]["received"]["value"],
        "hello from Python",
        "{}\n{}",
        entries[1],
        guest.stderr()
    );
    let version = entries[2]["received"]["value"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "python.version = {version:?}");
    let listed: Vec<(String, String)> = entries[3]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        listed.contains(&("python.greeting".into(), "hello from Python".into())),
        "{listed:?}"
    );
    // The plugin's own log line reached the daemon's log, attributed to it.
    assert!(
        guest.stderr().contains("python-kvp on Python 3."),
        "{}",
        guest.stderr()
    );
}
