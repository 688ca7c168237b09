//! Plugins as an operator runs them: `hvisd plugin check` on built components, `hvisd run` reloading
//! its plugins on SIGHUP, and host-set keys reaching a subscribed plugin.

use hvisd_e2e::{GuestProcess, hvisd_bin, run_host_script, transcript};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn built() -> BTreeMap<String, PathBuf> {
    build_plugins(&plugins_workspace(), "release").expect("building the plugins")
}

fn app_version_entry(wasm: &Path) -> String {
    format!(
        r#"
[[plugin]]
name = "app-version"
path = '{}'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["app.*"]
[[plugin.kvp]]
pool = "external"
keys = ["app.*"]
"#,
        wasm.display()
    )
}

fn bench_keys_entry(wasm: &Path) -> String {
    format!(
        r#"
[[plugin]]
name = "bench-keys"
path = '{}'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["bench.*"]
"#,
        wasm.display()
    )
}

fn guest_keys(root: &Path) -> Vec<String> {
    let script = json!([
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_enumerate", "pool": "guest"}
    ]);
    let entries = transcript(&run_host_script(root, &script.to_string(), TIMEOUT));
    for e in &entries {
        assert_eq!(e["ok"], true, "{e}");
    }
    entries[1]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sighup_reloads_the_plugins_of_the_config_file() {
    let built = built();
    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let head = format!(
        "[kvp]\npool_dir = '{}'\nplugin_key_cache_ms = 1\n[plugins]\ncache_dir = '{}'\n",
        data.path().join("pools").display(),
        data.path().join("cache").display()
    );
    let config = data.path().join("hvisd.toml");
    std::fs::write(
        &config,
        format!("{head}{}", app_version_entry(&built["app-version"])),
    )
    .unwrap();
    let guest = GuestProcess::start_shm_with_config(root.path(), &config);
    guest.process.wait_for_log("plugin loaded", TIMEOUT);
    let before = guest_keys(root.path());
    assert!(before.iter().any(|k| k == "app.version"), "{before:?}");
    assert!(
        !before.iter().any(|k| k.starts_with("bench.")),
        "{before:?}"
    );

    // The operator adds a plugin and signals the running daemon (our own child, by its PID).
    std::fs::write(
        &config,
        format!(
            "{head}{}{}",
            app_version_entry(&built["app-version"]),
            bench_keys_entry(&built["bench-keys"])
        ),
    )
    .unwrap();
    let pid = rustix::process::Pid::from_raw(guest.process.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    guest
        .process
        .wait_for_log("SIGHUP: reloading plugins", TIMEOUT);
    let start = std::time::Instant::now();
    while guest.process.log_count("plugin loaded") < 2 && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = guest_keys(root.path());
    assert!(after.iter().any(|k| k == "app.version"), "{after:?}");
    assert_eq!(
        after.iter().filter(|k| k.starts_with("bench.")).count(),
        10,
        "{after:?}"
    );

    // A config that no longer parses leaves the running plugins in place.
    std::fs::write(&config, "[[plugin]]\nname = 3\n").unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    guest
        .process
        .wait_for_log("keeping the running plugins", TIMEOUT);
    assert_eq!(
        guest_keys(root.path())
            .iter()
            .filter(|k| k.starts_with("bench."))
            .count(),
        10
    );
}

#[test]
fn a_host_set_key_reaches_the_subscribed_plugin() {
    let built = built();
    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let config = data.path().join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            "[kvp]\npool_dir = '{}'\n[plugins]\ncache_dir = '{}'\n{}",
            data.path().join("pools").display(),
            data.path().join("cache").display(),
            app_version_entry(&built["app-version"])
        ),
    )
    .unwrap();
    let guest = GuestProcess::start_shm_with_config(root.path(), &config);
    guest.process.wait_for_log("plugin loaded", TIMEOUT);
    let script = json!([
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_set", "pool": "external", "key": "app.mode", "value": "maintenance"}
    ]);
    let entries = transcript(&run_host_script(root.path(), &script.to_string(), TIMEOUT));
    assert_eq!(entries[1]["status"], "HV_S_OK", "{}", entries[1]);
    // app-version logs what the host set through the logging import, tagged with its name.
    guest.process.wait_for_log("host set app.mode", TIMEOUT);
}

#[test]
fn plugin_check_reports_worlds_and_refuses_a_component_that_imports_sockets() {
    let built = built();
    let out = std::process::Command::new(hvisd_bin())
        .args(["plugin", "check", "--json"])
        .arg(&built["app-version"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.to_string().contains("kvp-provider"), "{report}");

    let out = std::process::Command::new(hvisd_bin())
        .args(["plugin", "check"])
        .arg(&built["uses-sockets"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wasi:sockets") && text.contains("NOT satisfiable"),
        "{text}"
    );
}

/// Thread names of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes whose parent is `pid`, with their command lines.
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
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
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            v.push((child, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    v
}

#[test]
fn sighup_adds_plugins_to_a_daemon_started_with_none_and_they_run_in_workers() {
    let built = built();
    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let head = format!(
        "[kvp]\npool_dir = '{}'\nplugin_key_cache_ms = 1\n[plugins]\ncache_dir = '{}'\n",
        data.path().join("pools").display(),
        data.path().join("cache").display()
    );
    let config = data.path().join("hvisd.toml");
    std::fs::write(&config, &head).unwrap();
    let guest = GuestProcess::start_shm_with_config(root.path(), &config);
    assert!(
        !guest_keys(root.path())
            .iter()
            .any(|k| k.starts_with("bench.")),
        "no plugin yet"
    );
    assert!(children(guest.process.pid()).is_empty());

    std::fs::write(
        &config,
        format!("{head}{}", bench_keys_entry(&built["bench-keys"])),
    )
    .unwrap();
    let pid = rustix::process::Pid::from_raw(guest.process.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    guest.process.wait_for_log("plugin loaded", TIMEOUT);
    let keys = guest_keys(root.path());
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("bench.")).count(),
        10,
        "{keys:?}"
    );

    // The plugin runs in a worker process of its own; the daemon runs no WebAssembly (it has no
    // epoch ticker thread, which every process that runs plugin code has).
    let workers: Vec<(u32, String)> = children(guest.process.pid())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("plugin-worker"))
        .collect();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(
        thread_names(workers[0].0)
            .iter()
            .any(|n| n == "hvisd-epoch"),
        "{:?}",
        thread_names(workers[0].0)
    );
    assert!(
        !thread_names(guest.process.pid())
            .iter()
            .any(|n| n == "hvisd-epoch"),
        "{:?}",
        thread_names(guest.process.pid())
    );
}
