//! [`MappedRing`]: one ring over a [`SharedMapping`] (the shm transport's `ring` file,
//! `/dev/uioN` map 0, or an anonymous mapping in tests and benchmarks).
//!
//! The mapping itself, and every access to memory the peer writes, live in `hvisd-sys`: this
//! crate only ever copies bytes in and out and touches the control page as atomics.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

pub use hvisd_sys::mapping::SharedMapping;

use crate::{PAGE_SIZE, RingError, RingMem, check_ring_size};

/// One ring (control page + data area) inside a [`SharedMapping`]. Cheap to clone: a clone is
/// another handle on the same bytes.
#[derive(Debug, Clone)]
pub struct MappedRing {
    map: Arc<SharedMapping>,
    offset: usize,
    data_len: usize,
    label: &'static str,
}

impl MappedRing {
    /// The ring occupying `[offset, offset + ring_size)` of `map`. `offset` must be page-aligned
    /// and `ring_size` a valid ring size.
    pub fn new(
        map: Arc<SharedMapping>,
        offset: usize,
        ring_size: usize,
        label: &'static str,
    ) -> Result<Self, RingError> {
        check_ring_size(ring_size)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(RingError::MisalignedRingOffset { offset });
        }
        let needed = offset
            .checked_add(ring_size)
            .ok_or(RingError::BadRingSize { ring_size })?;
        if map.len() < needed {
            return Err(RingError::MappingTooSmall {
                map_len: map.len(),
                needed,
                what: label,
            });
        }
        Ok(Self {
            map,
            offset,
            data_len: ring_size - PAGE_SIZE,
            label,
        })
    }

    /// The mapping this ring lives in.
    pub fn mapping(&self) -> &Arc<SharedMapping> {
        &self.map
    }
}

impl RingMem for MappedRing {
    #[inline]
    fn control(&self) -> &[AtomicU32; 1024] {
        self.map.control_page(self.offset)
    }

    #[inline]
    fn data_len(&self) -> usize {
        self.data_len
    }

    #[inline]
    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        debug_assert!(offset <= self.data_len && dst.len() <= self.data_len - offset);
        self.map.read(self.offset + PAGE_SIZE + offset, dst);
    }

    #[inline]
    fn write_at(&self, offset: usize, src: &[u8]) {
        debug_assert!(offset <= self.data_len && src.len() <= self.data_len - offset);
        self.map.write(self.offset + PAGE_SIZE + offset, src);
    }

    #[inline]
    fn load_u64(&self, offset: usize) -> u64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.data_len);
        self.map.load_u64(self.offset + PAGE_SIZE + offset)
    }

    #[inline]
    fn store_u64(&self, offset: usize, value: u64) {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.data_len);
        self.map.store_u64(self.offset + PAGE_SIZE + offset, value)
    }

    #[inline]
    fn is_broken(&self) -> bool {
        self.map.is_broken()
    }

    fn label(&self) -> &'static str {
        self.label
    }
}

/// Splits a mapping of `2 * ring_size` bytes (the `ring` file, `uio_hv_generic` map 0) into
/// `(first, second)`: first = `[0, ring_size)`, the guest->host ring; second =
/// `[ring_size, 2 * ring_size)`, the host->guest ring. Validates `ring_size` and that the
/// mapping is long enough.
pub fn ring_pair(
    map: Arc<SharedMapping>,
    ring_size: usize,
) -> Result<(MappedRing, MappedRing), RingError> {
    check_ring_size(ring_size)?;
    if map.len() / 2 < ring_size {
        return Err(RingError::MappingTooSmall {
            map_len: map.len(),
            needed: 2 * ring_size,
            what: "a guest->host and a host->guest ring",
        });
    }
    let first = MappedRing::new(map.clone(), 0, ring_size, "guest->host ring")?;
    let second = MappedRing::new(map, ring_size, ring_size, "host->guest ring")?;
    Ok((first, second))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    #[test]
    fn file_mapping_is_shared_with_the_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 4 * PAGE_SIZE]).unwrap();
        let map = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap();
        let (g2h, h2g) = ring_pair(map, 2 * PAGE_SIZE).unwrap();
        g2h.control()[0].store(0x1122_3344, Ordering::SeqCst);
        h2g.write_at(0, b"hello");
        let again = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap();
        let (g2h2, h2g2) = ring_pair(again, 2 * PAGE_SIZE).unwrap();
        assert_eq!(g2h2.control()[0].load(Ordering::SeqCst), 0x1122_3344);
        let mut buf = [0u8; 5];
        h2g2.read_at(0, &mut buf);
        assert_eq!(&buf, b"hello");
        assert_eq!(h2g2.label(), "host->guest ring");
    }

    #[test]
    fn ring_pair_rejects_bad_sizes() {
        let map = SharedMapping::anonymous(4 * PAGE_SIZE).unwrap();
        assert!(matches!(
            ring_pair(map.clone(), PAGE_SIZE),
            Err(RingError::BadRingSize { .. })
        ));
        assert!(matches!(
            ring_pair(map.clone(), 2 * PAGE_SIZE + 8),
            Err(RingError::BadRingSize { .. })
        ));
        assert!(matches!(
            ring_pair(map, 3 * PAGE_SIZE),
            Err(RingError::MappingTooSmall { .. })
        ));
    }

    #[test]
    fn a_truncated_ring_file_reads_as_broken() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 4 * PAGE_SIZE]).unwrap();
        let map = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap();
        let (_, h2g) = ring_pair(map, 2 * PAGE_SIZE).unwrap();
        assert!(!h2g.is_broken());
        file.set_len(0).unwrap();
        let mut buf = [0u8; 8];
        h2g.read_at(64, &mut buf);
        assert!(h2g.is_broken());
    }
}
