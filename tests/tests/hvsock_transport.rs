//! hvsock end to end: `hvisd run --transport shm:ROOT` (a debug build, with the test echo
//! acceptor of `[hvsock.test]`) against `hvisd host` scripts, as separate processes.

use hvisd_e2e::{GuestProcess, HostProcess, run_host_script, transcript};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// A guest config: pools inside `dir`, the test echo acceptor, plus `extra` TOML.
fn guest_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let pools = dir.join("pools");
    std::fs::create_dir_all(&pools).unwrap();
    let path = dir.join("guest.toml");
    std::fs::write(
        &path,
        format!("[kvp]\npool_dir = {pools:?}\n\n[hvsock.test]\necho = true\n{extra}"),
    )
    .unwrap();
    path
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

fn wait_for_path(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_hundred_concurrent_host_connections_each_echo_their_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut guest = GuestProcess::start_shm_with_config(&root, &guest_config(dir.path(), ""));
    let script = r#"{"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "heartbeat"},
        {"action": "hvsock_connect", "port": 5000, "size": 65536, "connections": 100},
        {"action": "heartbeat", "count": 3}
    ]}"#;
    let out = run_host_script(&root, script, Duration::from_secs(120));
    let entries = transcript(&out);
    assert_all_ok(&entries);
    let connect = &entries[1];
    assert_eq!(connect["completed"], 100, "{connect:#}");
    assert_eq!(connect["echo_ok"], true);
    assert_eq!(connect["guest_fin"], true);
    assert_eq!(connect["bytes_received"], 100 * 65536);
    guest
        .process
        .wait_for_log("hvsock connection opened", Duration::from_secs(5));
    let start = Instant::now();
    while guest.process.log_count("bytes echoed") < 100 && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(guest.process.log_count("65536 bytes echoed"), 100);
    assert!(guest.process.is_running());
}

#[test]
fn a_reader_that_stops_reading_stalls_the_writer_and_guest_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let guest = GuestProcess::start_shm_with_config(&root, &guest_config(dir.path(), ""));
    // Warm up (first connection, allocator), then measure.
    let warm = r#"[{"action": "hvsock_connect", "port": 5000, "size": 1048576}]"#;
    assert_all_ok(&transcript(&run_host_script(
        &root,
        warm,
        Duration::from_secs(60),
    )));
    let before = rss_kib(guest.process.pid());
    // 64 MiB through 16 KiB rings, the host not reading for the first 2 s: the guest's echo
    // can neither send nor, once its ring is full, read; the host's writes stall.
    let script = r#"{"timeout_ms": 120000, "actions": [
        {"action": "hvsock_connect", "port": 5000, "size": 67108864, "pause_reading_ms": 2000}
    ]}"#;
    let host = HostProcess::start(&root, script);
    let mut peak = before;
    let start = Instant::now();
    let mut host = Some(host);
    while start.elapsed() < Duration::from_secs(120) {
        peak = peak.max(rss_kib(guest.process.pid()));
        if !host.as_mut().unwrap().is_running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = host.take().unwrap().finish(Duration::from_secs(5));
    let entries = transcript(&out);
    assert_all_ok(&entries);
    let e = &entries[0];
    assert_eq!(e["echo_ok"], true, "{e:#}");
    // While the host did not read, the guest took at most what fits in the two rings (12 KiB of
    // data each), the echo's copy buffer (8 KiB) and one packet's stash (16 KiB).
    let stalled = e["sent_before_reading"].as_u64().unwrap();
    assert!(
        stalled < 64 * 1024,
        "{stalled} bytes went in while nobody read: {e:#}"
    );
    let growth = peak.saturating_sub(before);
    eprintln!(
        "stalled writer: {stalled} bytes taken while not reading; guest RSS {before} KiB, peak {peak} KiB"
    );
    assert!(
        growth < 4 * 1024,
        "guest RSS grew {growth} KiB (from {before} KiB) while streaming 64 MiB"
    );
}

#[test]
fn the_host_vanishing_mid_stream_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut guest = GuestProcess::start_shm_with_config(&root, &guest_config(dir.path(), ""));
    // Data without a FIN, its echo read back, then the host dies with the connection open.
    let script = r#"[
        {"action": "offer", "service": "heartbeat"},
        {"action": "hvsock_connect", "name": "c", "port": 5000, "text": "half a conversation",
         "fin": false, "close": false},
        {"action": "crash"}
    ]"#;
    let out = run_host_script(&root, script, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(101),
        "the host did not crash as scripted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    guest
        .process
        .wait_for_log("hvsock connection opened", Duration::from_secs(10));
    guest.process.wait_for_log(
        "the host closed the channel without shutting its direction down",
        Duration::from_secs(10),
    );
    guest
        .process
        .wait_for_log("hvsock echo stopped", Duration::from_secs(10));
    assert!(guest.process.is_running());
    // A host that restarts removes its stale offers, then everything works again.
    for stale in std::fs::read_dir(&root).unwrap() {
        let _ = std::fs::remove_dir_all(stale.unwrap().path());
    }
    let script = r#"[
        {"action": "offer", "service": "heartbeat"},
        {"action": "heartbeat", "count": 2},
        {"action": "hvsock_connect", "port": 5000, "text": "again"}
    ]"#;
    assert_all_ok(&transcript(&run_host_script(
        &root,
        script,
        Duration::from_secs(30),
    )));
}

#[test]
fn a_guest_initiated_connection_reaches_the_host_service_and_refusals_carry_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // The host listens on port 6000 (echo, one connection) and refuses 6001 with -5; nothing
    // listens on 6002 (refused with -111).
    let script = r#"{"timeout_ms": 30000, "actions": [
        {"action": "hvsock_listen", "name": "echo", "port": 6000, "count": 1},
        {"action": "hvsock_listen", "name": "no", "port": 6001, "reply": "refuse", "status": -5},
        {"action": "hvsock_wait", "name": "echo"},
        {"action": "sleep", "ms": 1500}
    ]}"#;
    let host = HostProcess::start(&root, script);
    wait_for_path(&root.join("control"), Duration::from_secs(10));
    let config = guest_config(
        dir.path(),
        r#"
[[hvsock.test.connect]]
service = "6000"
text = "ping "
repeat = 2000

[[hvsock.test.connect]]
service = "6001"
text = "x"

[[hvsock.test.connect]]
service = "00001772-facb-11e6-bd58-64006a7986d3"
text = "x"
"#,
    );
    let guest = GuestProcess::start_shm_with_config(&root, &config);
    guest.process.wait_for_log(
        "hvsock test connect to 00001770-facb-11e6-bd58-64006a7986d3: sent 10000 bytes, received 10000 bytes, echo ok",
        Duration::from_secs(20),
    );
    guest
        .process
        .wait_for_log("refused by the host (status -5)", Duration::from_secs(20));
    guest
        .process
        .wait_for_log("refused by the host (status -111)", Duration::from_secs(20));
    let out = host.finish(Duration::from_secs(30));
    let entries = transcript(&out);
    assert_all_ok(&entries);
    let stats = &entries[2]["stats"];
    assert_eq!(stats["accepted"], 1, "{stats:#}");
    assert_eq!(stats["bytes_in"], 10000);
    assert_eq!(stats["bytes_out"], 10000);
    assert_eq!(
        guest.process.log_count("hvsock connection opened"),
        1,
        "only the accepted connect got a channel"
    );
}

#[test]
fn a_pipe_offer_no_plugin_listens_on_is_closed_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let pools = dir.path().join("pools");
    std::fs::create_dir(&pools).unwrap();
    let config = dir.path().join("plain.toml");
    std::fs::write(&config, format!("[kvp]\npool_dir = {pools:?}\n")).unwrap();
    let guest = GuestProcess::start_shm_with_config(&root, &config);
    let script = r#"{"timeout_ms": 1500, "actions": [
        {"action": "hvsock_connect", "port": 5000, "text": "anyone?"},
        {"action": "offer", "service": "heartbeat"},
        {"action": "heartbeat"}
    ]}"#;
    let entries = transcript(&run_host_script(&root, script, Duration::from_secs(30)));
    // With a config file the plugin broker accepts (a reload may add a listening plugin); with
    // none listening on the service it closes the connection: no echo, and the guest goes on.
    assert_eq!(entries[0]["ok"], false, "nobody answered: {:#}", entries[0]);
    assert_eq!(entries[1]["ok"], true);
    assert_eq!(entries[2]["ok"], true);
    assert_eq!(guest.process.log_count("no plugin listens on it"), 1);
}

#[test]
fn the_unix_stand_in_hands_connections_to_the_same_acceptor() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let socket = dir.path().join("hvsock.sock");
    // A super-table after its sub-table is valid TOML.
    let config = guest_config(
        dir.path(),
        &format!("\n[hvsock]\nunix_listen = {socket:?}\n"),
    );
    let guest = GuestProcess::start_shm_with_config(&root, &config);
    guest
        .process
        .wait_for_log("hvsock Unix stand-in listening", Duration::from_secs(10));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"5000\nhello stand-in").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello stand-in");
    guest.process.wait_for_log(
        "hvsock echo: 14 bytes echoed connection=hvsock 00001388-facb-11e6-bd58-64006a7986d3 (unix)",
        Duration::from_secs(5),
    );
}
