//! The guest runtime against a host written independently from the shm-transport spec.
//!
//! `tests/independent_host/hvhost.py` was written from `shared/specs/shm-transport.md` and the public
//! Linux/OpenVMM headers without reading the hvisd sources. It offers heartbeat, shutdown and
//! timesync, speaks first as Hyper-V does, checks every byte the guest writes, and prints a JSON
//! summary. If `hvisd run` passes here, it interoperates with a host it was not co-written with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvisd_e2e::{GuestProcess, workspace_root};

/// What one run of the Python host ended with.
struct HostRun {
    exit_code: Option<i32>,
    summary: serde_json::Value,
    stdout: String,
    stderr: String,
}

/// Returns the Python interpreter, or `None` (after saying why) when the machine has none.
fn python3() -> Option<PathBuf> {
    match Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => Some(PathBuf::from("python3")),
        _ => {
            eprintln!(
                "SKIPPED: python3 is not installed; the independent host is a Python program"
            );
            None
        }
    }
}

/// Runs `hvhost.py --root ROOT ARGS`, killing it (by its own PID) if it outlives `limit`.
fn run_host(python: &Path, root: &Path, args: &[&str], limit: Duration) -> HostRun {
    let script = workspace_root().join("tests/independent_host/hvhost.py");
    let out_dir = tempfile::tempdir().expect("temp dir for the host's output");
    let stdout_path = out_dir.path().join("stdout.json");
    let stderr_path = out_dir.path().join("stderr.txt");
    let mut child = Command::new(python)
        .arg(&script)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("host stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("host stderr file"))
        .spawn()
        .expect("spawning the Python host");
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("waiting for the Python host") {
            Some(status) => break Some(status),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let summary = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    HostRun {
        exit_code: status.and_then(|s| s.code()),
        summary,
        stdout,
        stderr,
    }
}

/// Everything a person needs to see when an assertion about a run fails.
fn report(run: &HostRun, guest: &GuestProcess) -> String {
    format!(
        "host exit code {:?}\nhost stdout:\n{}\nhost stderr:\n{}\nguest stderr:\n{}",
        run.exit_code,
        run.stdout,
        run.stderr,
        guest.process.stderr()
    )
}

fn channel<'a>(run: &'a HostRun, name: &str) -> &'a serde_json::Value {
    &run.summary["channels"][name]
}

/// Asserts a normal run passed every check of the host and that all three ICs settled versions.
fn assert_clean_run(run: &HostRun, guest: &GuestProcess) {
    let ctx = report(run, guest);
    assert_eq!(run.exit_code, Some(0), "{ctx}");
    assert_eq!(run.summary["ok"], true, "{ctx}");
    for name in ["heartbeat", "shutdown", "timesync"] {
        let ch = channel(run, name);
        assert_eq!(ch["negotiation"], "ok", "{name}: {ctx}");
        assert!(ch["negotiated"]["framework"].is_string(), "{name}: {ctx}");
        assert!(ch["negotiated"]["message"].is_string(), "{name}: {ctx}");
        assert_eq!(ch["feature_bits"]["guest_to_host"], 1, "{name}: {ctx}");
        assert_eq!(ch["feature_bits"]["host_to_guest"], 1, "{name}: {ctx}");
        assert_eq!(ch["violations"], serde_json::json!([]), "{name}: {ctx}");
    }
}

const HOST_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn independent_host_negotiates_heartbeat_shutdown_timesync_and_gets_every_heartbeat_answered() {
    let Some(python) = python3() else { return };
    let root = tempfile::tempdir().expect("shm root");
    let guest = GuestProcess::start_shm(root.path());

    let run = run_host(&python, root.path(), &["--heartbeats", "10"], HOST_LIMIT);

    assert_clean_run(&run, &guest);
    let beats = &channel(&run, "heartbeat")["heartbeats"];
    assert_eq!(beats["sent"], 10, "{}", report(&run, &guest));
    assert_eq!(beats["ok"], 10, "{}", report(&run, &guest));
    eprintln!(
        "negotiated: heartbeat {}, shutdown {}, timesync {}",
        channel(&run, "heartbeat")["negotiated"],
        channel(&run, "shutdown")["negotiated"],
        channel(&run, "timesync")["negotiated"]
    );
}

#[test]
fn independent_host_wraps_both_rings_repeatedly_and_fills_each_ring_to_the_limit() {
    let Some(python) = python3() else { return };
    let root = tempfile::tempdir().expect("shm root");
    let guest = GuestProcess::start_shm(root.path());

    let run = run_host(
        &python,
        root.path(),
        &["--wrap", "--ring-size", "8192"],
        HOST_LIMIT,
    );

    assert_clean_run(&run, &guest);
    let hb = channel(&run, "heartbeat");
    let stats = &hb["stats"];
    for key in [
        "sent_across_ring_end",
        "received_across_ring_end",
        "tx_wraps",
        "rx_wraps",
    ] {
        let n = stats[key].as_u64().unwrap_or(0);
        assert!(
            n >= 3,
            "{key} = {n}, the run did not wrap enough\n{}",
            report(&run, &guest)
        );
    }
    let wrap = &hb["wrap_heartbeats"];
    assert_eq!(wrap["ok"], wrap["sent"], "{}", report(&run, &guest));
    let burst = &hb["burst"];
    assert_eq!(burst["ok"], burst["sent"], "{}", report(&run, &guest));
    // Deterministic: the host fills the ring to the never-full limit with one write_index store.
    assert!(
        burst["ring_filled_to_the_limit"].as_u64().unwrap_or(0) > 0,
        "the burst never filled the host-to-guest ring\n{}",
        report(&run, &guest)
    );
    // The other direction: the host stops reading until the guest's replies fill its ring; the
    // guest must stop short of full, announce pending_send_sz, and resume when the host drains.
    let full = &hb["guest_ring_full"];
    assert_eq!(full["ok"], full["sent"], "{}", report(&run, &guest));
    assert!(
        full["guest_pending_send_sz"].as_u64().unwrap_or(0) > 0,
        "{}",
        report(&run, &guest)
    );
    // Usually also true, but it depends on the guest being slower than the host's next write.
    eprintln!(
        "host waited on pending_send_sz {} times",
        burst["host_waited_for_space"]
    );
}

#[test]
fn guest_survives_a_host_dying_mid_packet_and_serves_the_next_host_on_the_same_root() {
    let Some(python) = python3() else { return };
    let root = tempfile::tempdir().expect("shm root");
    let mut guest = GuestProcess::start_shm(root.path());

    let dead = run_host(&python, root.path(), &["--die-mid-packet"], HOST_LIMIT);
    assert_eq!(dead.exit_code, Some(3), "{}", report(&dead, &guest));
    let beats = &channel(&dead, "heartbeat")["heartbeats"];
    assert_eq!(
        beats["ok"],
        beats["sent"],
        "before dying: {}",
        report(&dead, &guest)
    );

    // Give the guest time to see the doorbell close and to trip over the half-written packet.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        guest.process.is_running(),
        "the guest exited after the host died mid-packet\n{}",
        report(&dead, &guest)
    );

    let next = run_host(&python, root.path(), &[], HOST_LIMIT);
    assert_clean_run(&next, &guest);
    assert!(
        guest.process.is_running(),
        "the guest exited after serving the second host\n{}",
        report(&next, &guest)
    );
}

#[test]
fn guest_answers_openvmm_shaped_host_packets_with_stale_padding_wrong_trailers_and_short_heartbeats()
 {
    let Some(python) = python3() else { return };
    let root = tempfile::tempdir().expect("shm root");
    let guest = GuestProcess::start_shm(root.path());

    // The spec lets a host leave stale padding and any trailer (OpenVMM's writer does), put the
    // payload further than right after the descriptor (offset8 > 2), ask for completions, and
    // send OpenVMM's 16-byte heartbeat body instead of Linux's 40-byte one.
    let args = [
        "--sloppy-writer",
        "--desc-offset8",
        "3",
        "--packet-flags",
        "1",
        "--heartbeat-size",
        "16",
        "--wrap",
    ];
    let run = run_host(&python, root.path(), &args, HOST_LIMIT);

    assert_clean_run(&run, &guest);
    let hb = channel(&run, "heartbeat");
    assert_eq!(
        hb["heartbeats"]["ok"],
        hb["heartbeats"]["sent"],
        "{}",
        report(&run, &guest)
    );
    assert_eq!(
        hb["wrap_heartbeats"]["ok"],
        hb["wrap_heartbeats"]["sent"],
        "{}",
        report(&run, &guest)
    );
    assert_eq!(
        hb["burst"]["ok"],
        hb["burst"]["sent"],
        "{}",
        report(&run, &guest)
    );
}
