//! Host-controlled negotiate bodies: the parser and the Linux-faithful responder must never panic,
//! must bound what they allocate, and must only ever choose versions the host offered.
#![no_main]

use hvisd_ic::negotiate::{NegotiateOutcome, respond_in_place};
use hvisd_ic::versions::{
    SHUTDOWN_VERSIONS, TIMESYNC_VERSIONS, UTIL_FRAMEWORK_VERSIONS, VSS_FRAMEWORK_VERSIONS,
    VSS_VERSIONS,
};
use hvisd_protocol::ic::{MAX_NEGOTIATE_VERSION_COUNT, NegotiateMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = NegotiateMessage::parse(data);
    if let Ok(offer) = &parsed {
        let max = MAX_NEGOTIATE_VERSION_COUNT as usize;
        assert!(offer.framework_versions.len() <= max && offer.message_versions.len() <= max);
        assert_eq!(
            NegotiateMessage::parse(&offer.build().unwrap()).as_ref(),
            Ok(offer)
        );
    }
    for (fw, msg) in [
        (UTIL_FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
        (UTIL_FRAMEWORK_VERSIONS, TIMESYNC_VERSIONS),
        (VSS_FRAMEWORK_VERSIONS, VSS_VERSIONS),
    ] {
        let mut body = data.to_vec();
        match respond_in_place(&mut body, fw, msg) {
            Ok(NegotiateOutcome::Negotiated(n)) => {
                let offer = parsed.as_ref().expect("a negotiated offer parses");
                assert!(
                    offer.framework_versions.contains(&n.framework) && fw.contains(&n.framework)
                );
                assert!(offer.message_versions.contains(&n.message) && msg.contains(&n.message));
                assert_eq!(&body[..4], &[1, 0, 1, 0]);
            }
            Ok(NegotiateOutcome::NoCommonVersion) => assert_eq!(&body[..4], &[0; 4]),
            Err(_) => {
                assert!(parsed.is_err());
                assert_eq!(body, data, "a rejected body is left untouched");
            }
        }
        assert_eq!(body.len(), data.len());
    }
});
