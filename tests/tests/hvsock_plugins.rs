//! hvsock through plugins, end to end: `hvisd run --transport shm:ROOT` with real WebAssembly
//! components in their workers, against `hvisd host` scripts (separate processes). Host
//! connections reach the services plugins listen on; plugins open the host services their
//! manifest grants and are refused the others; misbehaving streams stay bounded and end cleanly;
//! a dead worker closes its connections and the next connection gets a new worker.

use hvisd_e2e::{GuestProcess, HostProcess, run_host_script, transcript};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The guest config: pools in `dir`, `status-echo` on port 5001 (may connect to `host-time`,
/// port 6000), `hvsock-misbehave` on ports 5000 (`echo`) and 5002 (`misbehave`), plus `extra`
/// TOML inside the misbehave plugin's table (limits).
fn config(dir: &Path, misbehave_limits: &str) -> PathBuf {
    let built = build_plugins(&plugins_workspace(), "release").expect("building the plugins");
    let pools = dir.join("pools");
    std::fs::create_dir_all(&pools).unwrap();
    let path = dir.join("hvisd.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kvp]
pool_dir = '{pools}'
[plugins]
cache_dir = '{cache}'
[hvsock.services]
status = "5001"
echo = "5000"
misbehave = "5002"
host-time = "6000"
forbidden = "6001"

[[plugin]]
name = "status-echo"
path = '{status}'
worlds = ["hvsock-service"]
[plugin.hvsock]
listen = ["status"]
connect = ["host-time"]
[[plugin.kvp]]
pool = "guest"
keys = ["*"]

[[plugin]]
name = "hvsock-misbehave"
path = '{misbehave}'
worlds = ["hvsock-service"]
[plugin.hvsock]
listen = ["echo", "misbehave"]
connect = ["host-time"]
[plugin.limits]
cpu_percent = 100
{misbehave_limits}
"#,
            pools = pools.display(),
            cache = dir.join("cache").display(),
            status = built["status-echo"].display(),
            misbehave = built["hvsock-misbehave"].display(),
        ),
    )
    .unwrap();
    path
}

fn start(dir: &Path, misbehave_limits: &str) -> (PathBuf, GuestProcess) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let guest = GuestProcess::start_shm_with_config(&root, &config(dir, misbehave_limits));
    guest
        .process
        .wait_for_log("plugin worker ready", Duration::from_secs(60));
    (root, guest)
}

fn assert_all_ok(entries: &[Value]) {
    for e in entries {
        assert_eq!(e["ok"], Value::Bool(true), "action failed: {e:#}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The pids of the plugin workers the guest logged as ready, for `plugin`.
fn worker_pids(guest: &GuestProcess, plugin: &str) -> Vec<u32> {
    guest
        .process
        .stderr()
        .lines()
        .filter(|l| l.contains("plugin worker ready") && l.contains(plugin))
        .filter_map(|l| {
            let at = l.find("pid=")? + 4;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// One host connection sending `text` (then FIN), reading to the guest's FIN.
fn ask(root: &Path, port: u32, text: &str) -> Value {
    let script = serde_json::json!({"timeout_ms": 30000, "actions": [
        {"action": "hvsock_connect", "port": port, "text": text, "expect": "none"}
    ]});
    let entries = transcript(&run_host_script(
        root,
        &script.to_string(),
        Duration::from_secs(60),
    ));
    assert_all_ok(&entries);
    entries[0].clone()
}

#[test]
fn a_host_tool_talks_to_a_plugin_service_which_reaches_granted_host_services_only() {
    let dir = tempfile::tempdir().unwrap();
    let (root, guest) = start(dir.path(), "");
    // The host serves `host-time` (port 6000) with a line of text, and `forbidden` (6001) too:
    // only a plugin's manifest keeps it away from the latter.
    let host = HostProcess::start(
        &root,
        r#"{"timeout_ms": 60000, "actions": [
            {"action": "hvsock_listen", "name": "time", "port": 6000, "reply": "text", "text": "12:00\n", "count": 1},
            {"action": "hvsock_listen", "name": "forbidden", "port": 6001, "reply": "text", "text": "secret\n"},
            {"action": "hvsock_connect", "port": 5001, "expect": "none",
             "text": "status\nask host-time what time is it\nask forbidden hello\nhello plugin\nquit\n"},
            {"action": "hvsock_connect", "port": 5002, "expect": "none", "text": "connect forbidden x\n"},
            {"action": "hvsock_wait", "name": "time"}
        ]}"#,
    );
    let out = host.finish(Duration::from_secs(60));
    assert!(
        !out.stdout.is_empty(),
        "the host script did not finish; guest log:\n{}",
        guest.process.stderr()
    );
    let entries = transcript(&out);
    assert_all_ok(&entries);
    let reply = entries[2]["reply_text"].as_str().unwrap().to_owned();
    let lines: Vec<&str> = reply.lines().collect();
    assert_eq!(lines.len(), 4, "{reply:?}");
    assert!(
        lines[0].starts_with("ok ") && lines[0].ends_with(" keys"),
        "{reply:?}"
    );
    assert_eq!(lines[1], "reply 12:00", "{reply:?}");
    assert!(
        lines[2].starts_with("error ") && lines[2].contains("Denied("),
        "{reply:?}"
    );
    assert_eq!(lines[3], "hello plugin");
    assert_eq!(entries[2]["guest_fin"], true);
    // A plugin with `connect` for another service only is denied too.
    let denied = entries[3]["reply_text"].as_str().unwrap();
    assert!(
        denied.starts_with("error ") && denied.contains("Denied("),
        "{denied:?}"
    );
    assert!(denied.contains("hvsock.connect"), "{denied:?}");
    let stats = &entries[4]["stats"];
    assert_eq!(
        stats["accepted"], 1,
        "only the granted connect reached the host: {stats:#}"
    );
    assert_eq!(
        guest
            .process
            .log_count("hvsock: plugin connected to `host-time`"),
        1
    );
}

#[test]
fn a_hundred_concurrent_connections_echo_through_one_plugin_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (root, mut guest) = start(dir.path(), "hvsock_connections = 128");
    let script = r#"{"timeout_ms": 120000, "actions": [
        {"action": "hvsock_connect", "port": 5000, "size": 65536, "connections": 100}
    ]}"#;
    let entries = transcript(&run_host_script(&root, script, Duration::from_secs(180)));
    if entries[0]["ok"] != true {
        let log = guest.process.stderr();
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
            .collect();
        panic!("{:#}\nguest warnings:\n{}", entries[0], problems.join("\n"));
    }
    let e = &entries[0];
    assert_eq!(e["completed"], 100, "{e:#}");
    assert_eq!(e["echo_ok"], true, "{e:#}");
    assert_eq!(e["guest_fin"], true, "{e:#}");
    assert_eq!(e["bytes_received"], 100 * 65536);
    assert_eq!(
        worker_pids(&guest, "hvsock-misbehave").len(),
        1,
        "one worker served them all"
    );
    assert!(guest.process.is_running());
}

#[test]
fn past_the_connection_limit_a_connection_is_closed_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _guest) = start(dir.path(), "hvsock_connections = 2");
    // Two connections stay open (the echo waits for more), the third is over the limit: closed
    // at once, with a FIN and no data.
    let script = r#"{"timeout_ms": 60000, "actions": [
        {"action": "hvsock_connect", "name": "a", "port": 5000, "text": "x", "expect": "none", "fin": false, "close": false},
        {"action": "hvsock_connect", "name": "b", "port": 5000, "text": "y", "expect": "none", "fin": false, "close": false},
        {"action": "sleep", "ms": 500},
        {"action": "hvsock_connect", "port": 5000, "text": "over", "expect": "none"}
    ]}"#;
    let entries = transcript(&run_host_script(&root, script, Duration::from_secs(60)));
    assert_all_ok(&entries);
    let over = &entries[3];
    assert_eq!(over["guest_fin"], true, "{over:#}");
    assert_eq!(over["bytes_received"], 0, "{over:#}");
}

#[test]
fn a_stalled_reader_holds_memory_flat_on_both_sides_of_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (root, guest) = start(dir.path(), "hvsock_buffer_kib = 64");
    let warm = r#"[{"action": "hvsock_connect", "port": 5000, "size": 1048576}]"#;
    assert_all_ok(&transcript(&run_host_script(
        &root,
        warm,
        Duration::from_secs(60),
    )));
    let worker = *worker_pids(&guest, "hvsock-misbehave").last().unwrap();
    let core = guest.process.pid();
    let (core_before, worker_before) = (rss_kib(core), rss_kib(worker));
    // 64 MiB echoed, the host not reading for the first 2 s: the plugin's writes stall, then
    // its reads, then the host's writes.
    let host = HostProcess::start(
        &root,
        r#"{"timeout_ms": 120000, "actions": [
            {"action": "hvsock_connect", "port": 5000, "size": 67108864, "pause_reading_ms": 2000}
        ]}"#,
    );
    let (mut core_peak, mut worker_peak) = (core_before, worker_before);
    let start = Instant::now();
    let mut host = Some(host);
    while start.elapsed() < Duration::from_secs(120) {
        core_peak = core_peak.max(rss_kib(core));
        worker_peak = worker_peak.max(rss_kib(worker));
        if !host.as_mut().unwrap().is_running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let entries = transcript(&host.take().unwrap().finish(Duration::from_secs(5)));
    assert_all_ok(&entries);
    let e = &entries[0];
    assert_eq!(e["echo_ok"], true, "{e:#}");
    // Taken while nobody read: the two rings, the core's copy buffers (64 KiB each way), the
    // socket buffers (about 2 x 64 KiB each way), the plugin's stream buffers (64 KiB in,
    // 64 KiB out) and its own 64 KiB chunk.
    let stalled = e["sent_before_reading"].as_u64().unwrap();
    eprintln!(
        "stalled: {stalled} bytes taken; core RSS {core_before}->{core_peak} KiB, worker {worker_before}->{worker_peak} KiB"
    );
    assert!(
        stalled < 1536 * 1024,
        "{stalled} bytes went in while nobody read"
    );
    assert!(
        core_peak - core_before < 8 * 1024,
        "core RSS grew {} KiB",
        core_peak - core_before
    );
    assert!(
        worker_peak - worker_before < 8 * 1024,
        "worker RSS grew {} KiB",
        worker_peak - worker_before
    );
}

#[test]
fn misbehaving_streams_are_bounded_and_end_cleanly_without_harming_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (root, guest) = start(dir.path(), "connection_deadline_ms = 1500");
    // Writing past the write permit: the host refuses the write (the plugin traps or gets an
    // error); either way the connection ends with a FIN and no megabyte arrives.
    let e = ask(&root, 5002, "ignore-permits\n");
    assert_eq!(e["guest_fin"], true, "{e:#}");
    assert!(e["bytes_received"].as_u64().unwrap() < 4096, "{e:#}");
    // Asking for 2^64-1 bytes gets what is there, at most one 64 KiB chunk.
    let e = ask(&root, 5002, &format!("read-max\n{}", "z".repeat(30_000)));
    let reply = e["reply_text"].as_str().unwrap();
    let got: u64 = reply
        .trim()
        .strip_prefix("got ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reply:?}"));
    assert!((1..=65536).contains(&got), "{reply:?}");
    // A trap: a clean FIN, nothing sent.
    let e = ask(&root, 5002, "trap\n");
    assert_eq!(e["guest_fin"], true, "{e:#}");
    assert_eq!(e["bytes_received"], 0);
    // A plugin that never returns: the connection deadline ends it.
    let started = Instant::now();
    let e = ask(&root, 5002, "stall\n");
    assert_eq!(e["guest_fin"], true, "{e:#}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The worker survived all of it (each connection is its own instance) and still echoes.
    let script = r#"[{"action": "hvsock_connect", "port": 5000, "size": 100000}]"#;
    let entries = transcript(&run_host_script(&root, script, Duration::from_secs(60)));
    assert_all_ok(&entries);
    assert_eq!(entries[0]["echo_ok"], true);
    assert_eq!(worker_pids(&guest, "hvsock-misbehave").len(), 1);
    assert!(
        guest.process.log_count("trapped") >= 1,
        "the trap was reported"
    );
}

#[test]
fn a_killed_worker_closes_its_connections_cleanly_and_the_next_gets_a_new_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (root, guest) = start(dir.path(), "");
    let host = HostProcess::start(
        &root,
        r#"{"timeout_ms": 60000, "actions": [
            {"action": "hvsock_connect", "port": 5002, "text": "stall\n", "expect": "none"}
        ]}"#,
    );
    guest
        .process
        .wait_for_log("hvsock connection to `misbehave`", Duration::from_secs(30));
    let pids = worker_pids(&guest, "hvsock-misbehave");
    let worker = *pids.last().unwrap();
    // The worker is our guest's child: ours to end.
    let ppid = std::fs::read_to_string(format!("/proc/{worker}/stat"))
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert_eq!(ppid, guest.process.pid(), "the worker is the guest's child");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(worker as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let entries = transcript(&host.finish(Duration::from_secs(30)));
    assert_all_ok(&entries);
    assert_eq!(entries[0]["guest_fin"], true, "{:#}", entries[0]);
    // The next connection starts a new worker.
    let script = r#"[{"action": "hvsock_connect", "port": 5000, "size": 4096}]"#;
    let entries = transcript(&run_host_script(&root, script, Duration::from_secs(60)));
    assert_all_ok(&entries);
    assert_eq!(entries[0]["echo_ok"], true);
}
