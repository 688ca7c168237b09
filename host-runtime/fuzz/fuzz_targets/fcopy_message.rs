//! Host-controlled VMBus fcopy bodies: the request parser and the guest-path checks must never
//! panic, a fragment must lie inside the body and within DATA_FRAGMENT, and what parses must
//! build back into a body that parses to the same request.
#![no_main]

use hvisd_protocol::fcopy::{
    DATA_FRAGMENT, DO_FCOPY_DATA_OFFSET, FcopyRequest, GuestDir, NAME_MAX, check_file_name,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = FcopyRequest::parse(data) else {
        return;
    };
    match &request {
        FcopyRequest::Write { offset, data: fragment } => {
            assert!(fragment.len() <= DATA_FRAGMENT);
            assert!(DO_FCOPY_DATA_OFFSET + fragment.len() <= data.len());
            assert!(offset.checked_add(fragment.len() as u64).is_some());
        }
        FcopyRequest::Start(start) => {
            if let Ok(dir) = GuestDir::parse(&start.path_name) {
                for c in dir.components() {
                    assert!(!c.is_empty() && *c != "." && *c != ".." && !c.contains('/'));
                    assert!(c.len() <= NAME_MAX);
                }
            }
            if check_file_name(&start.file_name).is_ok() {
                assert!(!start.file_name.contains('/') && !start.file_name.contains('\0'));
            }
        }
        _ => {}
    }
    let rebuilt = request.build().expect("a parsed request builds");
    assert_eq!(FcopyRequest::parse(&rebuilt).expect("rebuilt parses"), request);
});
