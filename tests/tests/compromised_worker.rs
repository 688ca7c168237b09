//! A compromised plugin worker. `hvisd run` (a debug build) starts, beside its real plugins, a
//! worker of `misbehave` that, once confined, runs native code trying what a plugin that escaped
//! wasmtime would try: read `/etc/shadow`, the pool files and a ring file, write outside its
//! grants, open sockets, FIFREEZE its grant (on an ext4 image this test made), ptrace or kill the
//! daemon, exec a shell, fork, become root. Every attempt must fail, the daemon must carry on, and
//! the host simulator's requests must still be answered by the well-behaved plugin.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvisd_e2e::{GuestProcess, HostProcess, LoopMount, transcript};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use serde_json::{Value, json};

fn find_ring(root: &Path, timeout: Duration) -> PathBuf {
    let start = Instant::now();
    while start.elapsed() < timeout {
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let ring = entry.path().join("ring");
            if ring.exists() {
                return ring;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the host made no ring under {}", root.display());
}

#[test]
fn every_escape_from_a_compromised_worker_fails_and_the_daemon_carries_on() {
    let built = build_plugins(&plugins_workspace(), "release").expect("building the plugins");
    let data = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir = data.path();

    // The host offers KVP first, so that a real ring file exists when the worker tries it.
    let script = json!({
        "timeout_ms": 120000,
        "actions": [
            {"action": "offer", "service": "kvp"},
            {"action": "kvp_get", "pool": "guest", "key": "app.version"},
            {"action": "kvp_get", "pool": "guest", "key": "ok"}
        ]
    });
    let host = HostProcess::start(root.path(), &script.to_string());
    let ring = find_ring(root.path(), Duration::from_secs(30));

    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("VERSION"), "4.2.0\n").unwrap();
    // The misbehaving plugin's grant: on an ext4 image of this test's own when possible, so
    // that a FIFREEZE which got through would really freeze something (only that image).
    let image = LoopMount::ext4(16);
    let granted = match &image {
        Some(m) => m.path().join("data"),
        None => dir.join("data"),
    };
    std::fs::create_dir_all(&granted).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&granted, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(granted.join("hello.txt"), "hello\n").unwrap();
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(outside.join("core.sock")).expect("unix socket");
    let pools = dir.join("pools");
    let report = dir.join("report.json");

    let mut attempts = vec![
        // A positive control: the grant itself is reachable, so a denial below is the
        // confinement's doing, not a broken test.
        "open:/proc/self/fd/5/hello.txt".to_owned(),
        "open:/etc/shadow".into(),
        "open:/etc/passwd".into(),
        format!("open:{}", pools.join(".kvp_pool_0").display()),
        format!("write:{}", pools.join(".kvp_pool_3").display()),
        format!("open:{}", ring.display()),
        format!("write:{}", ring.display()),
        format!("write:{}", outside.join("pwned").display()),
        format!("open:{}", app.join("VERSION").display()),
        "socket:inet".into(),
        format!("socket:unix:{}", outside.join("core.sock").display()),
        "ptrace:{core}".into(),
        "kill:{core}".into(),
        "exec:/bin/sh".into(),
        "fork".into(),
        "setuid:0".into(),
    ];
    if image.is_some() {
        attempts.push("fifreeze:/proc/self/fd/5".into());
    }
    let config = dir.join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kvp]
pool_dir = '{pools}'

[plugins]
cache_dir = '{cache}'

[plugins.escape_test]
plugin = "misbehave"
attempts = {attempts}
report = '{report}'

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

[[plugin]]
name = "misbehave"
path = '{bad_wasm}'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["ok"]
[[plugin.dirs]]
host = '{granted}'
guest = "/data"
access = "read-write"
"#,
            pools = pools.display(),
            cache = dir.join("cache").display(),
            attempts = serde_json::to_string(&attempts).unwrap(),
            report = report.display(),
            app_wasm = built["app-version"].display(),
            bad_wasm = built["misbehave"].display(),
            app = app.display(),
            granted = granted.display(),
        ),
    )
    .unwrap();

    let mut guest = GuestProcess::start_shm_with_config(root.path(), &config);
    guest
        .process
        .wait_for_log("escape test done", Duration::from_secs(90));
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["core_pid"], guest.process.pid());
    let results: Vec<(String, String)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(results.len(), attempts.len(), "{results:?}");
    let log = guest.process.stderr();
    for (attempt, verdict) in &results {
        if attempt.starts_with("open:/proc/self/fd/5/") {
            assert_eq!(
                verdict, "ALLOWED",
                "the positive control failed: {results:?}\n{log}"
            );
        } else {
            assert!(
                verdict.starts_with("denied"),
                "{attempt}: {verdict}\n{results:?}\n{log}"
            );
        }
    }
    eprintln!("escape report: {results:#?}");
    // Nothing was written where the worker tried.
    assert!(!outside.join("pwned").exists());
    drop(listener);

    // The daemon carries on: alive, and the host's requests answered by the good plugin (and by
    // the bad one's regular worker, which was never compromised).
    assert!(guest.process.is_running(), "{log}");
    let out = host.finish(Duration::from_secs(120));
    let entries = transcript(&out);
    for e in &entries {
        assert_eq!(e["ok"], true, "{e}\n{}", guest.process.stderr());
    }
    assert_eq!(entries[1]["received"]["value"], "4.2.0", "{}", entries[1]);
    assert_eq!(entries[2]["received"]["value"], "fine", "{}", entries[2]);
    assert!(guest.process.is_running());
    // The daemon and its workers go before the image they have open.
    drop(guest);
    drop(image);
}
