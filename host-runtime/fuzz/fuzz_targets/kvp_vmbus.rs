//! Host-controlled VMBus KVP bodies: the request parser, the reply viewer and the Linux-faithful
//! UTF-16/UTF-8 converters must never panic and must stay within their limits.
#![no_main]

use hvisd_protocol::kvp::{
    KvpOperation, KvpReplyView, KvpRequest, utf8_to_utf16_linux, utf16_to_utf8_linux,
    units_until_nul,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = KvpRequest::parse(data) {
        // What parses must build back into a body that parses again (strings may be cut to
        // leave room for a terminator, so equality is not expected at the field limits).
        let rebuilt = req.build();
        assert!(KvpRequest::parse(&rebuilt).is_ok());
    }
    if let Some(&op) = data.first() {
        let _ = KvpReplyView::parse(KvpOperation(op), data);
    }
    let units = units_until_nul(data);
    let utf8 = utf16_to_utf8_linux(&units, 511);
    assert!(utf8.len() <= 511);
    assert!(std::str::from_utf8(&utf8).is_ok());
    if let Ok(back) = utf8_to_utf16_linux(data, 1022) {
        assert!(back.len() <= 1022);
    }
});
