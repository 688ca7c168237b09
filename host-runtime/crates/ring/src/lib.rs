//! VMBus ring buffers, exact to the byte (see `shared/specs/shm-transport.md`).
//!
//! One ring is one direction of a channel: a 4096-byte control page (`write_index`,
//! `read_index`, `interrupt_mask`, `pending_send_sz`, `feature_bits`) followed by a data area
//! holding packets. [`RingWriter`] and [`RingReader`] implement the two ends; both run over
//! any [`RingMem`], which in production is a [`MappedRing`] over a [`SharedMapping`] (the
//! shm transport's `ring` file or `/dev/uioN` map 0).
//!
//! The peer can write the ring at any moment, so its memory is only ever copied, never lent
//! out: packets are handed to callers as metadata plus copies of their payload (or of any
//! part of it, for hvsock's partial reads), as OpenVMM's `vmbus_ring` does. This crate has no
//! `unsafe`; the mapping and the copies live in `hvisd-sys`.
//!
//! The peer owns half of every control page and may be hostile: every index it writes is
//! read once per operation and validated at that read, every descriptor is checked against
//! the bytes actually available, and a malformed ring yields a [`RingError`] (the channel
//! layer then closes the channel) -- never a panic, an out-of-bounds access or an
//! unbounded loop.
//!
//! Work is batched: [`RingWriter::begin`] loads the reader's index once, any number of
//! packets are written, and [`WriteBatch::commit`] publishes them with one store;
//! [`RingReader::begin`] and [`ReadBatch::commit`] mirror that. The commit calls return
//! whether the peer must be interrupted, following the VMBus (Linux `ring_buffer.c`)
//! rules.
//!
//! ```
//! use hvisd_ring::{PacketHeader, RingReader, RingWriter, SharedMapping, ring_pair};
//!
//! let ring_size = 4 * 4096;
//! let map = SharedMapping::anonymous(2 * ring_size)?; // or map_file(ring file / uio map 0)
//! let (guest_to_host, host_to_guest) = ring_pair(map, ring_size)?;
//! let mut writer = RingWriter::new(guest_to_host.clone())?;
//! writer.set_feature_bits();
//! let mut batch = writer.begin()?;
//! batch.write(PacketHeader::inband(7), &[b"icmsg ", b"bytes"])?;
//! let signal_reader = batch.commit(); // true: the ring was empty and the reader unmasked
//! assert!(signal_reader);
//!
//! let mut reader = RingReader::new(guest_to_host)?;
//! let mut batch = reader.begin()?;
//! let mut payload = Vec::new();
//! while let Some(packet) = batch.next_into(&mut payload)? {
//!     assert_eq!(packet.transaction_id, 7);
//!     assert_eq!(&payload[..11], b"icmsg bytes"); // then zero padding to 8
//! }
//! let signal_writer = batch.commit(); // true only if pending_send_sz was crossed
//! assert!(!signal_writer);
//! # drop(host_to_guest);
//! # Ok::<(), hvisd_ring::RingError>(())
//! ```

#![forbid(unsafe_code)]

mod packet;
mod reader;
mod writer;

pub mod mapping;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(any(test, feature = "bench"))]
mod doorbell;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU32;

pub use mapping::{MappedRing, SharedMapping, ring_pair};
pub use packet::{
    DESCRIPTOR_LEN, MAX_PACKET_LEN8, PACKET_FLAG_COMPLETION_REQUESTED,
    PACKET_TYPE_ADD_TRANSFER_PAGE_SET, PACKET_TYPE_ADDITIONAL_DATA, PACKET_TYPE_CANCEL_REQUEST,
    PACKET_TYPE_COMPLETION, PACKET_TYPE_DATA_INBAND, PACKET_TYPE_DATA_USING_ADDITIONAL_PACKET,
    PACKET_TYPE_DATA_USING_GPA_DIRECT, PACKET_TYPE_DATA_USING_GPADL,
    PACKET_TYPE_DATA_USING_TRANSFER_PAGES, PACKET_TYPE_ESTABLISH_GPADL, PACKET_TYPE_INVALID,
    PACKET_TYPE_REMOVE_TRANSFER_PAGE_SET, PACKET_TYPE_SYNCH, PACKET_TYPE_TEARDOWN_GPADL,
    PacketHeader, TRAILER_LEN, packet_len,
};
pub use reader::{IncomingPacket, PacketMeta, ReadBatch, RingReader, RingStats};
pub use writer::{RingWriter, WriteBatch, WriteError};

/// Size of a page, of the control page, and the granule of ring sizes.
pub const PAGE_SIZE: usize = 4096;

/// `feature_bits` bit 0: the endpoints use `pending_send_sz` (the reader interrupts a
/// writer waiting for space once enough is free).
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;

/// Smallest ring (control page + one data page) the spec allows.
pub const MIN_RING_SIZE: usize = 2 * PAGE_SIZE;

/// Largest ring (one direction, control page included) hvisd accepts, from an offer, a uio map
/// or a caller: the one ring-size limit of the project. Real VMBus rings are at most a few MiB;
/// a bigger value from a host would only make us map (and trust) an absurd file. Indices are
/// `u32` on the wire, and this bound keeps every sum of an index and a length far from
/// overflowing.
pub const MAX_RING_SIZE: usize = 64 << 20;

/// Word offsets of the control page fields (the page is handled as `[AtomicU32; 1024]`).
pub mod control {
    /// `u32 write_index` at byte 0: where the writer will put its next packet.
    pub const WRITE_INDEX: usize = 0;
    /// `u32 read_index` at byte 4: where the reader will read its next packet.
    pub const READ_INDEX: usize = 1;
    /// `u32 interrupt_mask` at byte 8: set by the reader, non-zero = "do not signal me".
    pub const INTERRUPT_MASK: usize = 2;
    /// `u32 pending_send_sz` at byte 12: set by a writer waiting for that many free bytes.
    pub const PENDING_SEND_SZ: usize = 3;
    /// `u32 feature_bits` at byte 64.
    pub const FEATURE_BITS: usize = 16;
}

/// Memory backing ONE direction of a channel: its control page and its data area.
///
/// Implementations only move bytes; every index and length check lives in the ring code,
/// which never asks for a range outside `[0, data_len)` (it splits wrapping accesses).
pub trait RingMem: Send + Sync {
    /// The control page as 1024 little-endian `u32` words (see [`control`]).
    fn control(&self) -> &[AtomicU32; 1024];

    /// Length in bytes of the data area (ring size minus the control page).
    fn data_len(&self) -> usize;

    /// Copies `dst.len()` bytes from the data area starting at `offset`.
    /// The range never wraps: callers split at `data_len`.
    fn read_at(&self, offset: usize, dst: &mut [u8]);

    /// Copies `src` into the data area starting at `offset`. The range never wraps.
    fn write_at(&self, offset: usize, src: &[u8]);

    /// The little-endian `u64` at the 8-aligned `offset` of the data area, read once
    /// (descriptor words and trailers: packets start 8-aligned and the data area is a
    /// multiple of 8, so such a word never wraps).
    fn load_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Stores `value` little-endian at the 8-aligned `offset` of the data area.
    fn store_u64(&self, offset: usize, value: u64) {
        self.write_at(offset, &value.to_le_bytes());
    }

    /// Whether the memory has become unusable under us (the peer truncated the file we
    /// mapped; see `hvisd_sys::mapping`). Bytes read since then are zeros and mean nothing;
    /// the ring reports [`RingError::Broken`] instead of acting on them.
    fn is_broken(&self) -> bool {
        false
    }

    /// Names the ring in error messages ("host->guest ring").
    fn label(&self) -> &'static str {
        "ring"
    }
}

/// Forwards [`RingMem`] through pointer types, so one ring can be shared as `&M`,
/// `Arc<M>` or `Box<dyn RingMem>`.
macro_rules! forward_ring_mem {
    ($($ptr:ty),*) => {$(
        impl<T: RingMem + ?Sized> RingMem for $ptr {
            fn control(&self) -> &[AtomicU32; 1024] {
                (**self).control()
            }
            fn data_len(&self) -> usize {
                (**self).data_len()
            }
            fn read_at(&self, offset: usize, dst: &mut [u8]) {
                (**self).read_at(offset, dst)
            }
            fn write_at(&self, offset: usize, src: &[u8]) {
                (**self).write_at(offset, src)
            }
            fn load_u64(&self, offset: usize) -> u64 {
                (**self).load_u64(offset)
            }
            fn store_u64(&self, offset: usize, value: u64) {
                (**self).store_u64(offset, value)
            }
            fn is_broken(&self) -> bool {
                (**self).is_broken()
            }
            fn label(&self) -> &'static str {
                (**self).label()
            }
        }
    )*};
}
forward_ring_mem!(&T, std::sync::Arc<T>, Box<T>);

/// What went wrong with a ring, its memory or its mapping. Messages name the ring and the
/// offending value so an operator can tell a hostile or buggy peer from a local mistake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The ring size is not a multiple of 4096, below 8192, or above [`MAX_RING_SIZE`].
    #[error(
        "ring_size {ring_size:#x}: must be a multiple of {PAGE_SIZE:#x}, at least {MIN_RING_SIZE:#x} and at most {MAX_RING_SIZE:#x}"
    )]
    BadRingSize {
        /// The rejected size (control page included).
        ring_size: usize,
    },
    /// The memory handed to the ring has a data area of an unusable size.
    #[error(
        "{ring}: data area is {data_len:#x} bytes; it must be a non-zero multiple of {PAGE_SIZE:#x}, at most {max:#x}",
        max = MAX_RING_SIZE - PAGE_SIZE
    )]
    BadDataLen {
        /// Which ring.
        ring: &'static str,
        /// The rejected data area length.
        data_len: usize,
    },
    /// The mapping is smaller than the rings carved out of it.
    #[error("mapping is {map_len:#x} bytes, but {needed:#x} are needed for {what}")]
    MappingTooSmall {
        /// Length of the mapping.
        map_len: usize,
        /// Bytes required.
        needed: usize,
        /// What needed them.
        what: &'static str,
    },
    /// A ring inside a mapping must start on a page boundary.
    #[error("ring offset {offset:#x} in the mapping is not a multiple of {PAGE_SIZE:#x}")]
    MisalignedRingOffset {
        /// The rejected offset.
        offset: usize,
    },
    /// The memory could not be mapped.
    #[error(transparent)]
    Map(#[from] hvisd_sys::mapping::MapError),
    /// The peer truncated or replaced the memory under the ring (a `SIGBUS` was caught): the
    /// channel cannot continue.
    #[error("{ring}: the ring memory went away under us (the peer truncated the ring file)")]
    Broken {
        /// Which ring.
        ring: &'static str,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// Which call ("mmap of the ring file").
        call: &'static str,
        /// The errno.
        #[source]
        source: rustix::io::Errno,
    },
    /// An index read from the control page lies outside the data area.
    #[error("{ring}: {field} {value:#x} is outside the {data_len:#x}-byte data area")]
    IndexOutOfRange {
        /// Which ring.
        ring: &'static str,
        /// `write_index` or `read_index`.
        field: &'static str,
        /// The value read.
        value: u32,
        /// Data area length.
        data_len: usize,
    },
    /// An index read from the control page is not a multiple of 8.
    #[error("{ring}: {field} {value:#x} not 8-aligned")]
    IndexMisaligned {
        /// Which ring.
        ring: &'static str,
        /// `write_index` or `read_index`.
        field: &'static str,
        /// The value read.
        value: u32,
    },
    /// Fewer bytes are available than the smallest packet (descriptor + trailer).
    #[error(
        "{ring}: packet at read_index {read_index:#x}: only {available} bytes available, a packet takes at least 24"
    )]
    TruncatedPacket {
        /// Which ring.
        ring: &'static str,
        /// Where the packet starts.
        read_index: u32,
        /// Bytes between read and write index.
        available: usize,
    },
    /// A descriptor's `offset8`/`len8` do not fit the packet or the bytes available.
    #[error(
        "{ring}: packet at read_index {read_index:#x} (type {packet_type}): offset8 {offset8} len8 {len8} with {available} bytes available: {reason}"
    )]
    BadDescriptor {
        /// Which ring.
        ring: &'static str,
        /// Where the packet starts.
        read_index: u32,
        /// Descriptor type.
        packet_type: u16,
        /// Descriptor `offset8`.
        offset8: u16,
        /// Descriptor `len8`.
        len8: u16,
        /// Bytes between read and write index.
        available: usize,
        /// Which check failed.
        reason: &'static str,
    },
    /// A caller asked for bytes outside a packet's payload.
    #[error("{ring}: bytes [{from}, +{len}) asked of a {payload_len}-byte payload")]
    PayloadRange {
        /// Which ring.
        ring: &'static str,
        /// First byte asked for.
        from: usize,
        /// Bytes asked for.
        len: usize,
        /// The payload's length.
        payload_len: usize,
    },
    /// A packet could not be written (for callers mixing ring and write errors).
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Validates an index loaded from a control page: inside the data area and 8-aligned.
#[inline]
fn check_index(
    ring: &'static str,
    field: &'static str,
    value: u32,
    data_len: usize,
) -> Result<usize, RingError> {
    let index = value as usize;
    if index >= data_len {
        return Err(RingError::IndexOutOfRange {
            ring,
            field,
            value,
            data_len,
        });
    }
    if !index.is_multiple_of(8) {
        return Err(RingError::IndexMisaligned { ring, field, value });
    }
    Ok(index)
}

/// Checks the data area of a ring handed to a reader or writer.
fn check_data_len(ring: &'static str, data_len: usize) -> Result<(), RingError> {
    if data_len == 0 || !data_len.is_multiple_of(PAGE_SIZE) || data_len > MAX_RING_SIZE - PAGE_SIZE
    {
        return Err(RingError::BadDataLen { ring, data_len });
    }
    Ok(())
}

/// Checks a whole-ring size (control page included) as carried in an offer.
pub fn check_ring_size(ring_size: usize) -> Result<(), RingError> {
    if !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size) || !ring_size.is_multiple_of(PAGE_SIZE)
    {
        return Err(RingError::BadRingSize { ring_size });
    }
    Ok(())
}

/// Bytes in use between `read` and `write` (both already validated `< data_len`).
#[inline]
fn used_bytes(write: usize, read: usize, data_len: usize) -> usize {
    if write >= read {
        write - read
    } else {
        data_len - read + write
    }
}

/// Reads `dst.len()` bytes at `offset` (< data_len), wrapping once at the end.
#[inline(always)]
fn read_wrapping<M: RingMem + ?Sized>(mem: &M, offset: usize, dst: &mut [u8]) {
    let data_len = mem.data_len();
    // The common, non-wrapping case as its own call, so that fixed-size reads (descriptor,
    // trailer) keep a constant length once inlined and compile to plain moves.
    if dst.len() <= data_len - offset {
        mem.read_at(offset, dst);
        return;
    }
    let first = data_len - offset;
    let (head, tail) = dst.split_at_mut(first);
    mem.read_at(offset, head);
    if !tail.is_empty() {
        mem.read_at(0, tail);
    }
}

/// Writes `src` at `offset` (< data_len), wrapping once at the end; returns the index
/// after the last byte.
#[inline(always)]
fn write_wrapping<M: RingMem + ?Sized>(mem: &M, offset: usize, src: &[u8]) -> usize {
    let data_len = mem.data_len();
    let room = data_len - offset;
    if src.len() < room {
        mem.write_at(offset, src);
        return offset + src.len();
    }
    let (head, tail) = src.split_at(room);
    mem.write_at(offset, head);
    mem.write_at(0, tail);
    tail.len()
}
