//! /proc/self/mountinfo text, which unprivileged users shape (FUSE mount points, sources and
//! subtypes): the parser must never panic, must name a line that exists, and what it accepts
//! must be written back by `to_line` into a line that parses to the same entry.
#![no_main]

use hvisd_protocol::mountinfo::{MountInfo, entries, unescape};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
    for entry in entries(data) {
        match entry {
            Ok(info) => {
                let again = MountInfo::parse_line(&info.to_line()).expect("to_line parses");
                assert_eq!(again, info);
            }
            Err(e) => assert!((1..=lines).contains(&e.line)),
        }
    }
    if let Ok(bytes) = unescape(data) {
        assert!(bytes.len() <= data.len());
        assert!(!bytes.contains(&0) || data.contains(&0));
    }
});
