//! A host's `offer` file and the directory it sits in: parsed, refused, never a panic; what parses
//! round-trips through the host's own writer.
#![no_main]

use hvisd_protocol::shm_offer::Offer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first line is the directory name, the rest the file (both as a host could make them).
    let text = String::from_utf8_lossy(input);
    let (dir, body) = text.split_once('\n').unwrap_or(("", &text));
    if let Ok(offer) = Offer::parse_in_dir(body, dir) {
        assert!(hvisd_ring::check_ring_size(offer.ring_size as usize).is_ok());
        assert_eq!(Offer::parse(&offer.to_text()).as_ref(), Ok(&offer));
    }
    let _ = Offer::parse(body);
});
