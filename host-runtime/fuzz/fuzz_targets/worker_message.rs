//! A frame from a plugin worker (hostile: the worker runs plugin code): the header and the payload
//! are checked and decoded, never a panic; what decodes encodes back to the same bytes.
#![no_main]

use hvisd_protocol::worker::{FRAME_HEADER, decode_to_core, decode_to_worker, encode_to_core, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Some(header) = input.get(..FRAME_HEADER) {
        let header: [u8; FRAME_HEADER] = header.try_into().unwrap_or_default();
        let _ = frame_len(header);
    }
    if let Ok(message) = decode_to_core(input) {
        let frame = encode_to_core(&message);
        assert_eq!(decode_to_core(&frame[FRAME_HEADER..]).as_ref(), Ok(&message));
    }
    // The worker's side of the same socket parses the core's frames with the same decoder.
    let _ = decode_to_worker(input);
});
