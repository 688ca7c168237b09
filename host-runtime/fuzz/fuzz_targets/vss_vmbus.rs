//! Host-controlled VMBus VSS bodies: the request parser and the in-place answer must never panic,
//! must keep every byte they do not own, and must refuse what Linux would not read.
#![no_main]

use hvisd_protocol::vss::{
    FLAGS_OFFSET, FlagsAnswer, LinuxAnswer, MAX_BODY_SIZE, VSS_MSG_SIZE, VssRequest,
    apply_flags_answer, build_message, linux_guest_answer,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = VssRequest::parse(data);
    assert_eq!(
        parsed.is_ok(),
        (VSS_MSG_SIZE..=MAX_BODY_SIZE).contains(&data.len())
    );
    let Ok(req) = parsed else { return };
    let rebuilt = build_message(req.operation, req.flags);
    assert_eq!(rebuilt[0], data[0]);
    assert_eq!(rebuilt[FLAGS_OFFSET..], data[FLAGS_OFFSET..VSS_MSG_SIZE]);

    let flags = match linux_guest_answer(req.operation) {
        LinuxAnswer::Kernel { flags, .. } | LinuxAnswer::Daemon { flags, .. } => flags,
    };
    let mut body = data.to_vec();
    apply_flags_answer(&mut body, flags).expect("a parsed body takes its answer");
    // Only the flags word may change.
    assert_eq!(body[..FLAGS_OFFSET], data[..FLAGS_OFFSET]);
    assert_eq!(body[VSS_MSG_SIZE..], data[VSS_MSG_SIZE..]);
    if flags == FlagsAnswer::Unchanged {
        assert_eq!(body, data);
    }
});
