//! The daemon an operator runs: `hvisd status` over the control socket (human, JSON, Prometheus
//! metrics; root-only permissions), and a SIGHUP reload while the host is busy with KVP requests
//! (no request fails). `hvisd run` on the shm transport with a config, as its own process.

use hvisd_e2e::{GuestProcess, HostProcess, hvisd_bin, run_host_script, transcript};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn config(dir: &Path, socket: &Path, with_plugin: bool) -> String {
    let built = build_plugins(&plugins_workspace(), "release").expect("building the plugins");
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(app.join("VERSION"), "7.1\n").unwrap();
    std::fs::create_dir_all(dir.join("pools")).unwrap();
    let plugin = if with_plugin {
        format!(
            r#"
[[plugin]]
name = "app-version"
path = '{}'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["app.*"]
[[plugin.dirs]]
host = '{}'
guest = "/app"
"#,
            built["app-version"].display(),
            app.display()
        )
    } else {
        String::new()
    };
    format!(
        "[kvp]\npool_dir = '{}'\n[plugins]\ncache_dir = '{}'\n[control]\nsocket = '{}'\n{plugin}",
        dir.join("pools").display(),
        dir.join("cache").display(),
        socket.display()
    )
}

fn start(dir: &Path, with_plugin: bool) -> (PathBuf, PathBuf, PathBuf, GuestProcess) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let socket = dir.join("run/control.sock");
    let path = dir.join("hvisd.toml");
    std::fs::write(&path, config(dir, &socket, with_plugin)).unwrap();
    let guest = GuestProcess::start_shm_with_config(&root, &path);
    guest
        .process
        .wait_for_log("control socket", Duration::from_secs(30));
    (root, socket, path, guest)
}

fn status(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(hvisd_bin())
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_reports_channels_plugins_and_pools_and_only_to_root_or_the_daemons_user() {
    let dir = tempfile::tempdir().unwrap();
    let (root, socket, _, guest) = start(dir.path(), true);
    let script = r#"[
        {"action": "offer", "service": "heartbeat"},
        {"action": "offer", "service": "kvp"},
        {"action": "heartbeat", "count": 2},
        {"action": "kvp_set", "pool": "external", "key": "k", "value": "v"},
        {"action": "kvp_enumerate", "pool": "guest"},
        {"action": "sleep", "ms": 3000}
    ]"#;
    let host = HostProcess::start(
        &root,
        &format!(r#"{{"timeout_ms": 20000, "actions": {script}}}"#),
    );
    guest
        .process
        .wait_for_log("IC versions negotiated", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(800));

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");

    let out = status(&socket, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["pid"], guest.process.pid());
    let services: Vec<&str> = s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ic"]["service"].as_str().unwrap())
        .collect();
    assert!(
        services.contains(&"heartbeat") && services.contains(&"kvp"),
        "{s:#}"
    );
    let kvp = s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ic"]["service"] == "kvp")
        .unwrap();
    assert!(kvp["ic"]["negotiated"]["framework"].is_string(), "{kvp:#}");
    assert!(kvp["ic"]["messages"].as_u64().unwrap() >= 2, "{kvp:#}");
    let plugin = &s["plugins"][0];
    assert_eq!(plugin["name"], "app-version");
    assert_eq!(plugin["state"], "running");
    assert!(plugin["pid"].as_u64().is_some());
    assert!(plugin["calls"].as_u64().unwrap() >= 1, "{plugin:#}");
    let external = s["kvp_pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == 0)
        .unwrap();
    assert_eq!(external["records"], 1);

    let human = String::from_utf8(status(&socket, &[]).stdout).unwrap();
    assert!(
        human.contains("channels (") && human.contains("app-version"),
        "{human}"
    );
    assert!(human.contains("framework"), "{human}");

    let metrics = String::from_utf8(status(&socket, &["--metrics"]).stdout).unwrap();
    assert!(
        metrics.contains("# TYPE hvisd_up gauge\nhvisd_up 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hvisd_plugin_calls_total{plugin=\"app-version\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hvisd_kvp_pool_records{pool=\"0\"} 1"),
        "{metrics}"
    );

    // Another user cannot reach it (as root: run the client as nobody).
    if rustix::process::geteuid().is_root() && Path::new("/usr/bin/setpriv").exists() {
        let out = Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(hvisd_bin())
            .arg("status")
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody read the status");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach hvisd's control socket"), "{err}");
    }
    let _ = host.finish(Duration::from_secs(20));
}

#[test]
fn sighup_reloads_plugins_while_the_host_is_busy_and_no_request_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (root, socket, config_path, guest) = start(dir.path(), false);
    // 400 KVP requests while the config gains a plugin and is reloaded twice.
    let mut actions = vec![serde_json::json!({"action": "offer", "service": "kvp"})];
    for i in 0..200 {
        actions.push(serde_json::json!({"action": "kvp_set", "pool": "external", "key": format!("k{}", i % 10), "value": "v"}));
        actions.push(serde_json::json!({"action": "kvp_enumerate", "pool": "guest"}));
        if i % 20 == 0 {
            actions.push(serde_json::json!({"action": "sleep", "ms": 20}));
        }
    }
    let script = serde_json::json!({"timeout_ms": 20000, "actions": actions}).to_string();
    let host = HostProcess::start(&root, &script);
    guest
        .process
        .wait_for_log("IC versions negotiated", Duration::from_secs(20));
    std::fs::write(&config_path, config(dir.path(), &socket, true)).unwrap();
    guest.process.signal(rustix::process::Signal::HUP);
    guest
        .process
        .wait_for_log("plugin loaded", Duration::from_secs(60));
    guest.process.signal(rustix::process::Signal::HUP);
    let entries = transcript(&host.finish(Duration::from_secs(120)));
    let failed: Vec<&Value> = entries.iter().filter(|e| e["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:#?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // The plugin's key is served after the reload.
    let after = transcript(&run_host_script(
        &root,
        r#"[{"action": "offer", "service": "kvp", "name": "kvp2"}, {"action": "kvp_enumerate", "name": "kvp2", "pool": "guest"}]"#,
        Duration::from_secs(30),
    ));
    let keys: Vec<&str> = after[1]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"app.version"), "{keys:?}");
}

fn run_expecting_failure(args: &[&str]) -> String {
    let out = Command::new(hvisd_bin())
        .arg("run")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "hvisd run {args:?} started: {stderr}"
    );
    stderr
}

#[test]
fn startup_says_what_is_wrong_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let missing_root = dir.path().join("no-such-root");
    let err = run_expecting_failure(&["--transport", &format!("shm:{}", missing_root.display())]);
    assert!(err.contains("does not exist"), "{err}");
    let err = run_expecting_failure(&["--transport", "kernel:/nonexistent/hv_kvp"]);
    assert!(
        err.contains("does not exist") && err.contains("hv_utils"),
        "{err}"
    );

    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let shm = format!("shm:{}", root.display());

    let off = write("off.toml", "[services]\nkvp = false\nvss = false\n");
    let err = run_expecting_failure(&["--transport", "kernel", "--config", &off]);
    assert!(err.contains("nothing to serve"), "{err}");

    let typo = write("typo.toml", "[kvp]\npool_dirr = \"/tmp\"\n");
    let err = run_expecting_failure(&["--transport", &shm, "--config", &typo]);
    assert!(err.contains("`kvp.pool_dirr`"), "{err}");

    let missing = write(
        "missing.toml",
        &format!(
            "[kvp]\npool_dir = '{}'\n[[plugin]]\nname = \"gone\"\npath = \"/nonexistent/gone.wasm\"\nworlds = [\"kvp-provider\"]\n[[plugin.kvp]]\npool = \"guest\"\nkeys = [\"x\"]\n",
            dir.path().join("pools").display()
        ),
    );
    let err = run_expecting_failure(&["--transport", &shm, "--config", &missing]);
    assert!(
        err.contains("plugin `gone`") && err.contains("does not exist"),
        "{err}"
    );

    // Two providers claiming the same key.
    let base = config(dir.path(), &dir.path().join("run/ctl.sock"), true);
    let app = dir.path().join("app").display().to_string();
    let app2 = dir.path().join("app2");
    std::fs::create_dir_all(&app2).unwrap();
    std::fs::set_permissions(&app2, std::fs::Permissions::from_mode(0o755)).unwrap();
    let twice = base.clone()
        + &base[base.find("[[plugin]]").unwrap()..]
            .replace("name = \"app-version\"", "name = \"app-version-2\"")
            .replace(&app, &app2.display().to_string());
    let twice = write("twice.toml", &twice);
    let err = run_expecting_failure(&["--transport", &shm, "--config", &twice]);
    assert!(err.contains("both claim key `app.version`"), "{err}");
}

#[test]
fn the_example_config_serves_the_simulator() {
    // The shipped example, with only the machine's own paths moved into the test's directory.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let example = std::fs::read_to_string(
        hvisd_e2e::workspace_root().join("host-runtime/examples/hvisd.toml"),
    )
    .unwrap()
    .replace("\"/var/lib/hyperv\"", &format!("'{d}/pools'"))
    .replace("\"/run/hvisd/vss-frozen.json\"", &format!("'{d}/vss.json'"))
    .replace("\"/var/cache/hvisd/plugins\"", &format!("'{d}/cache'"));
    std::fs::create_dir_all(dir.path().join("pools")).unwrap();
    let config = dir.path().join("hvisd.toml");
    std::fs::write(&config, example).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let guest = GuestProcess::start_shm_with_config(&root, &config);
    let entries = transcript(&run_host_script(
        &root,
        r#"[
            {"action": "offer", "service": "heartbeat"},
            {"action": "offer", "service": "kvp"},
            {"action": "offer", "service": "vss"},
            {"action": "heartbeat", "count": 2},
            {"action": "kvp_enumerate", "pool": "auto"},
            {"action": "backup", "pause_ms": 10}
        ]"#,
        Duration::from_secs(60),
    ));
    for e in &entries {
        assert_eq!(e["ok"], true, "{e:#}\n{}", guest.process.stderr());
    }
    assert!(entries[4]["count"].as_u64().unwrap() >= 5);
    assert!(
        guest.process.stderr().contains("freezes nothing"),
        "shm: the dry-run freezer"
    );
}
