//! The sysfs attributes of a device bound to uio_hv_generic (class_id, map0 size, channel and uio
//! entry names): parsed or refused, never a panic, and an accepted size is a valid ring size.
#![no_main]

use hvisd_protocol::uio_sysfs::{parse_class_id, parse_map0_ring_size, primary_relid, uio_device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    let mut fields = text.split('\0');
    let class = fields.next().unwrap_or("");
    let size = fields.next().unwrap_or("");
    let names: Vec<&str> = fields.collect();
    let _ = parse_class_id(class);
    if let Ok(ring_size) = parse_map0_ring_size(size) {
        assert!(hvisd_ring::check_ring_size(ring_size).is_ok());
    }
    if let Some(relid) = primary_relid(names.iter().copied()) {
        assert!(names.iter().any(|n| n.parse::<u32>() == Ok(relid)));
    }
    if let Some((n, name)) = uio_device(names.iter().copied()) {
        assert_eq!(name.strip_prefix("uio").and_then(|d| d.parse().ok()), Some(n));
    }
});
