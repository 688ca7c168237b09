//! Shared memory mappings and the [`RingMem`] over them. The only module with `unsafe`.
//!
//! Memory shared with the peer can change under us at any time. Data is therefore moved
//! with raw-pointer copies (never through references held across the peer's writes), the
//! control page is accessed only as atomics, and the one place that hands out a `&[u8]`
//! into the ring ([`RingMem::contiguous`]) covers bytes the protocol gives to the reader
//! alone until it publishes `read_index` (see the SAFETY note there).
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use rustix::mm::{MapFlags, ProtFlags};

use crate::{PAGE_SIZE, RingError, RingMem, check_ring_size};

/// A `MAP_SHARED` read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value for its whole life; all access
// goes through atomics or raw-pointer copies whose concurrent use is the ring protocol's
// business (see the module docs), not tied to a thread.
unsafe impl Send for SharedMapping {}
// SAFETY: as above; `&SharedMapping` only exposes the address and length.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `[0, len)` of `fd` shared and read-write: the shm transport's `ring` file, or
    /// map 0 of `/dev/uioN`. A regular file shorter than `len` is refused (touching pages
    /// past its end would raise SIGBUS).
    pub fn map_file(fd: impl AsFd, len: usize) -> Result<Arc<Self>, RingError> {
        if len == 0 {
            return Err(RingError::MappingTooSmall {
                map_len: 0,
                needed: 1,
                what: "a file mapping",
            });
        }
        let stat = rustix::fs::fstat(&fd).map_err(|source| RingError::Os {
            call: "fstat of the file to map",
            source,
        })?;
        let is_regular = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file();
        if is_regular && (stat.st_size as u64) < len as u64 {
            return Err(RingError::FileTooShort {
                file_len: stat.st_size as u64,
                len,
            });
        }
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust
        // object. Its lifetime is tied to the returned value, which unmaps it on drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|source| RingError::Os {
            call: "mmap of the ring file",
            source,
        })?;
        Self::from_raw(ptr, len)
    }

    /// A zero-filled `MAP_SHARED | MAP_ANONYMOUS` mapping (tests, benchmarks; shared with
    /// threads, or with children after fork).
    pub fn anonymous(len: usize) -> Result<Arc<Self>, RingError> {
        if len == 0 {
            return Err(RingError::MappingTooSmall {
                map_len: 0,
                needed: 1,
                what: "an anonymous mapping",
            });
        }
        // SAFETY: as in `map_file`: new memory, owned by the returned value.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )
        }
        .map_err(|source| RingError::Os {
            call: "anonymous mmap",
            source,
        })?;
        Self::from_raw(ptr, len)
    }

    fn from_raw(ptr: *mut c_void, len: usize) -> Result<Arc<Self>, RingError> {
        // Without MAP_FIXED the kernel never places a mapping at address 0; should it ever,
        // refusing (and leaking that mapping) beats building a null NonNull.
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(RingError::Os {
            call: "mmap (returned address 0)",
            source: rustix::io::Errno::FAULT,
        })?;
        Ok(Arc::new(Self { ptr, len }))
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused at creation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address (for diagnostics and for [`MappedRing`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else unmaps them;
        // every borrow of the memory (MappedRing holds an Arc) has ended.
        let result = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        // munmap of our own valid mapping cannot fail; if it somehow did, leaking the
        // mapping is the only safe outcome.
        let _ = result;
    }
}

/// One ring (control page + data area) inside a [`SharedMapping`]. Cheap to clone: a
/// clone is another handle on the same bytes.
#[derive(Debug, Clone)]
pub struct MappedRing {
    map: Arc<SharedMapping>,
    offset: usize,
    data_len: usize,
    label: &'static str,
}

impl MappedRing {
    /// The ring occupying `[offset, offset + ring_size)` of `map`. `offset` must be
    /// page-aligned and `ring_size` a valid ring size.
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

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: `offset + PAGE_SIZE + data_len <= map.len()` was checked in `new`, so
        // this stays inside the mapping.
        unsafe { self.map.as_ptr().add(self.offset + PAGE_SIZE) }
    }

    /// Panics on a range outside the data area: the ring code never asks for one, so this
    /// is a bug in this crate, never something a peer can cause.
    fn check_range(&self, offset: usize, len: usize) {
        assert!(
            offset <= self.data_len && len <= self.data_len - offset,
            "{}: access [{offset:#x}, +{len:#x}) outside the {:#x}-byte data area",
            self.label,
            self.data_len
        );
    }
}

impl RingMem for MappedRing {
    fn control(&self) -> &[AtomicU32; 1024] {
        // SAFETY: the control page is the page at `offset` (page-aligned, inside the
        // mapping, checked in `new`), so it is 4096 bytes aligned for u32. AtomicU32 has
        // the size and alignment of u32, and any bit pattern is valid. The peer touches it
        // only with atomic (or aligned word) accesses, and we only through these atomics.
        // The borrow is tied to `self`, which keeps the mapping alive through its Arc.
        unsafe {
            &*self
                .map
                .as_ptr()
                .add(self.offset)
                .cast::<[AtomicU32; 1024]>()
        }
    }

    fn data_len(&self) -> usize {
        self.data_len
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        // SAFETY: the source range is inside the data area (checked above) and cannot
        // overlap `dst`, a Rust buffer outside the mapping. A raw copy, no reference to
        // shared memory is formed; bytes the peer changes concurrently are just bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data_ptr().add(offset), dst.as_mut_ptr(), dst.len())
        }
    }

    fn write_at(&self, offset: usize, src: &[u8]) {
        self.check_range(offset, src.len());
        // SAFETY: the destination range is inside the data area (checked above); `src` is
        // a Rust buffer, which the ring code never takes from this mapping's data area.
        // No reference to the destination exists: the reader only borrows bytes between
        // its read_index and our published write_index, which a writer never touches.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data_ptr().add(offset), src.len())
        }
    }

    fn contiguous(&self, offset: usize, len: usize) -> Option<&[u8]> {
        if offset > self.data_len || len > self.data_len - offset {
            return None;
        }
        // SAFETY: the range is inside the mapping, which lives as long as `self`. The ring
        // reader only asks for bytes between its read_index and the write_index it loaded
        // with Acquire, and keeps the borrow only until it publishes read_index; the
        // protocol forbids the writer to touch those bytes until then. A peer that breaks
        // the protocol can change the bytes under the borrow: the consumer sees different
        // untrusted bytes (it must not assume two reads agree) but memory safety of this
        // process is unaffected, the same contract as Linux hv_pkt_iter_first's in-place
        // pointer.
        Some(unsafe { std::slice::from_raw_parts(self.data_ptr().add(offset), len) })
    }

    fn label(&self) -> &'static str {
        self.label
    }
}

/// Splits a mapping of `2 * ring_size` bytes (the `ring` file, `uio_hv_generic` map 0)
/// into `(first, second)`: first = `[0, ring_size)`, the guest->host ring; second =
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
        assert_eq!(h2g2.contiguous(0, 5), Some(&b"hello"[..]));
        assert_eq!(h2g2.label(), "host->guest ring");
    }

    #[test]
    fn short_file_is_refused_before_mapping() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 100]).unwrap();
        let err = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap_err();
        assert!(
            matches!(err, RingError::FileTooShort { file_len: 100, .. }),
            "{err}"
        );
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
    fn contiguous_refuses_ranges_outside_the_data_area() {
        let map = SharedMapping::anonymous(2 * PAGE_SIZE).unwrap();
        let ring = MappedRing::new(map, 0, 2 * PAGE_SIZE, "test ring").unwrap();
        assert!(ring.contiguous(PAGE_SIZE - 8, 8).is_some());
        assert!(ring.contiguous(PAGE_SIZE - 8, 9).is_none());
        assert!(ring.contiguous(PAGE_SIZE + 1, 0).is_none());
        assert!(ring.contiguous(usize::MAX, 2).is_none());
    }
}
