//! Messages read from /dev/vmbus/hv_vss (or a test socket), from either end: the daemon-protocol
//! readers must never panic on any bytes, of any length, and replies must read back as built.
#![no_main]

use hvisd_protocol::vss::VSS_MSG_SIZE;
use hvisd_protocol::vss::daemon::{
    DaemonWrite, build_reply, parse_daemon_write, parse_request, parse_version_reply,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_version_reply(data);
    let _ = parse_daemon_write(data);
    let Ok(req) = parse_request(data) else {
        assert_ne!(data.len(), VSS_MSG_SIZE);
        return;
    };
    let msg: [u8; VSS_MSG_SIZE] = data.try_into().expect("parsed requests are whole messages");
    assert_eq!(req.operation.0, msg[0]);
    // Use the request's own flags as a reply error: any u32 must be refused or read back.
    if let Ok(reply) = build_reply(&msg, req.flags) {
        assert_eq!(reply[4..], msg[4..]);
        match parse_daemon_write(&reply) {
            Ok(DaemonWrite::Reply { error, .. }) => assert_eq!(error, req.flags),
            other => panic!("reply read back as {other:?}"),
        }
    }
});
