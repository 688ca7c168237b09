//! Messages read from /dev/vmbus/hv_kvp (or the test socket): the daemon-protocol parser must
//! never panic on any bytes, of any length.
#![no_main]

use hvisd_protocol::kvp_daemon::{DAEMON_MSG_SIZE, DaemonRequest, read_ip_info};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = DaemonRequest::parse(data);
    // Also exercise full-size messages whatever the input length.
    let mut msg = [0u8; DAEMON_MSG_SIZE];
    let n = data.len().min(DAEMON_MSG_SIZE);
    msg[..n].copy_from_slice(&data[..n]);
    let parsed = DaemonRequest::parse(&msg);
    assert!(parsed.is_ok());
    let info = read_ip_info(&msg);
    assert!(info.ip_addr.len() <= 2048 && info.gate_way.len() <= 1024);
});
