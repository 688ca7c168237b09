//! The text of the sysfs attributes the uio transport reads for a VMBus device bound to
//! `uio_hv_generic` (`/sys/bus/vmbus/devices/<instance>/...`). Pure parsers, no I/O, fuzzed by
//! `host-runtime/fuzz` (`uio_sysfs`): a device directory's names and files are kernel output, but
//! a test tree (or a confused kernel) must never make the runtime panic or trust a bad size.

use crate::guid::Guid;

/// Why an attribute was refused: what a valid one looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected {0}")]
pub struct SysfsError(pub &'static str);

/// `class_id`: `{guid}` plus a newline.
pub fn parse_class_id(text: &str) -> Result<Guid, SysfsError> {
    let t = text.trim();
    let inner = t
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(t);
    inner.parse().map_err(|_| SysfsError("a GUID in braces"))
}

/// `uio/uioN/maps/map0/size` (both rings, hex like `0x8000` or decimal): the size of ONE ring,
/// which must be a valid ring size (the ring crate's one rule).
pub fn parse_map0_ring_size(text: &str) -> Result<usize, SysfsError> {
    const WHY: &str = "two rings of equal size, each a multiple of 4096 from 8 KiB to 64 MiB";
    let t = text.trim();
    let map_size = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse::<u64>().ok(),
    }
    .ok_or(SysfsError("a size such as 0x8000"))?;
    if !map_size.is_multiple_of(2) {
        return Err(SysfsError(WHY));
    }
    let ring_size = usize::try_from(map_size / 2).map_err(|_| SysfsError(WHY))?;
    hvisd_ring::check_ring_size(ring_size).map_err(|_| SysfsError(WHY))?;
    Ok(ring_size)
}

/// The primary channel among the entries of `channels/` that have a `ring`: the smallest relid.
pub fn primary_relid<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<u32> {
    names
        .into_iter()
        .filter_map(|n| n.parse::<u32>().ok())
        .min()
}

/// The uio device among the entries of `uio/`: the `uioN` with the smallest N.
pub fn uio_device<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<(u32, &'a str)> {
    names
        .into_iter()
        .filter_map(|n| {
            let digits = n.strip_prefix("uio")?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((digits.parse::<u32>().ok()?, n))
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_ids_sizes_and_names_as_the_kernel_prints_them() {
        assert_eq!(
            parse_class_id("{57164f39-9115-4e78-ab55-382f3bd5422d}\n")
                .unwrap()
                .to_string(),
            "57164f39-9115-4e78-ab55-382f3bd5422d"
        );
        assert!(parse_class_id("{not-a-guid}").is_err());
        assert_eq!(parse_map0_ring_size("0x8000\n"), Ok(0x4000));
        assert_eq!(parse_map0_ring_size("32768"), Ok(0x4000));
        for bad in [
            "0x3000",
            "0x10",
            "banana",
            "0x5000",
            "",
            "0x",
            "18446744073709551615",
        ] {
            assert!(parse_map0_ring_size(bad).is_err(), "{bad}");
        }
        assert_eq!(primary_relid(["27", "14", "x"]), Some(14));
        assert_eq!(primary_relid(["x"]), None);
        assert_eq!(
            uio_device(["uio10", "uio2", "uio", "uiox"]),
            Some((2, "uio2"))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_parsed_or_refused_without_panicking(text in ".{0,64}", names in proptest::collection::vec(".{0,12}", 0..8)) {
            let _ = parse_class_id(&text);
            if let Ok(size) = parse_map0_ring_size(&text) {
                proptest::prop_assert!(hvisd_ring::check_ring_size(size).is_ok());
            }
            let _ = primary_relid(names.iter().map(String::as_str));
            let _ = uio_device(names.iter().map(String::as_str));
        }
    }
}
