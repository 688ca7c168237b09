//! The guest runtime (`hvisd run --transport shm:ROOT`) and the host simulator (`hvisd host`) as two
//! processes on a temporary root: real ring files, real doorbell sockets, real IC messages.

use hvisd_e2e::{GuestProcess, run_host_script, transcript};
use serde_json::Value;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn entry(entries: &[Value], step: usize) -> &Value {
    &entries[step - 1]
}

fn assert_all_ok(entries: &[Value]) {
    for e in entries {
        assert_eq!(e["ok"], Value::Bool(true), "action failed: {e}");
    }
}

#[test]
fn host_and_runtime_negotiate_every_ic_and_exchange_heartbeats() {
    let root = tempfile::tempdir().unwrap();
    let guest = GuestProcess::start_shm(root.path());
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat"},
            {"action": "offer", "service": "shutdown"},
            {"action": "offer", "service": "timesync"},
            {"action": "heartbeat", "count": 5, "sequence": 41},
            {"action": "timesync"},
            {"action": "shutdown", "message": "test: log only"}
        ]"#,
        TIMEOUT,
    );
    let entries = transcript(&out);
    assert_all_ok(&entries);
    assert!(out.status.success());
    // The versions a Linux guest picks against what Hyper-V offers (hv_util.c tables).
    assert_eq!(entry(&entries, 1)["negotiated"]["framework"], "3.0");
    assert_eq!(entry(&entries, 1)["negotiated"]["message"], "3.0");
    assert_eq!(entry(&entries, 2)["negotiated"]["message"], "3.2");
    assert_eq!(entry(&entries, 3)["negotiated"]["message"], "4.0");
    let rounds = entry(&entries, 4)["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 5);
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["sent"], 41 + i as u64);
        assert_eq!(round["received"], 42 + i as u64);
    }
    assert_eq!(entry(&entries, 6)["status"], "HV_S_OK");
    // The shutdown request was logged and nothing else: the guest is still running.
    let mut guest = guest;
    guest
        .process
        .wait_for_log("shutdown", Duration::from_secs(5));
    assert!(
        guest.process.is_running(),
        "the guest exited on a shutdown request"
    );
}

#[test]
fn a_host_offering_no_common_version_is_answered_with_zero_counts() {
    let root = tempfile::tempdir().unwrap();
    let _guest = GuestProcess::start_shm(root.path());
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat", "framework_versions": ["2.0"], "message_versions": ["9.9"]},
            {"action": "negotiate", "name": "heartbeat"},
            {"action": "heartbeat", "count": 1, "sequence": 1}
        ]"#,
        TIMEOUT,
    );
    let entries = transcript(&out);
    assert_all_ok(&entries);
    assert_eq!(entry(&entries, 1)["no_common_version"], true);
    assert_eq!(entry(&entries, 2)["negotiated"]["message"], "3.0");
}

#[test]
fn the_guest_survives_a_host_dying_mid_packet_and_serves_the_next_host() {
    let root = tempfile::tempdir().unwrap();
    let guest = GuestProcess::start_shm(root.path());
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat"},
            {"action": "heartbeat", "count": 2},
            {"action": "partial_packet", "name": "heartbeat"},
            {"action": "crash"}
        ]"#,
        TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(101),
        "the host did not crash as scripted"
    );
    guest
        .process
        .wait_for_log("host closed the channel", Duration::from_secs(10));

    // A new host on the same root, with a new offer: the guest opens it and answers.
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat"},
            {"action": "heartbeat", "count": 3, "sequence": 1000}
        ]"#,
        TIMEOUT,
    );
    assert_all_ok(&transcript(&out));
    let mut guest = guest;
    assert!(guest.process.is_running());
}

#[test]
fn a_corrupt_ring_closes_only_its_channel() {
    let root = tempfile::tempdir().unwrap();
    let guest = GuestProcess::start_shm(root.path());
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat", "name": "bad"},
            {"action": "offer", "service": "heartbeat", "name": "good"},
            {"action": "corrupt_ring", "name": "bad", "field": "write_index", "value": 3},
            {"action": "expect_closed", "name": "bad"},
            {"action": "heartbeat", "name": "good", "count": 2},
            {"action": "offer", "service": "heartbeat", "name": "bad2"},
            {"action": "corrupt_ring", "name": "bad2", "field": "packet", "value": 65535},
            {"action": "expect_closed", "name": "bad2"},
            {"action": "heartbeat", "name": "good", "count": 2, "sequence": 10}
        ]"#,
        TIMEOUT,
    );
    let entries = transcript(&out);
    assert_all_ok(&entries);
    let log = guest.process.stderr();
    assert!(
        log.contains("malformed ring"),
        "no malformed-ring report in:\n{log}"
    );
}

#[test]
fn a_rescinded_offer_is_closed_and_a_new_offer_is_opened() {
    let root = tempfile::tempdir().unwrap();
    let guest = GuestProcess::start_shm(root.path());
    let out = run_host_script(
        root.path(),
        r#"[
            {"action": "offer", "service": "heartbeat"},
            {"action": "heartbeat"},
            {"action": "rescind", "name": "heartbeat"},
            {"action": "offer", "service": "heartbeat"},
            {"action": "heartbeat", "sequence": 5}
        ]"#,
        TIMEOUT,
    );
    assert_all_ok(&transcript(&out));
    assert!(guest.process.log_count("channel opened") >= 2);
}
