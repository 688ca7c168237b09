//! The reading end of a ring.

use std::sync::atomic::{Ordering, fence};

use crate::packet::{DESCRIPTOR_LEN, Descriptor, MAX_PACKET_LEN8, TRAILER_LEN, trailer};
use crate::{
    FEATURE_PENDING_SEND_SIZE, RingError, RingMem, check_data_len, check_index, control,
    read_wrapping, used_bytes,
};

/// Oddities a reader saw and tolerated, plus throughput counters. The spec forbids
/// rejecting a packet for its trailer (OpenVMM and Linux ignore it), so a wrong trailer is
/// only counted here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Packets returned by [`ReadBatch::next`].
    pub packets: u64,
    /// Payload bytes returned (`len8*8 - offset8*8` summed).
    pub payload_bytes: u64,
    /// Packets whose payload wrapped and was copied into the scratch buffer.
    pub copied_packets: u64,
    /// Packets whose trailer was not `start_index << 32`.
    pub bad_trailers: u64,
    /// Packets whose payload did not start right after the descriptor (`offset8 != 2`);
    /// normal for GPA-direct and transfer-page packets, unusual for in-band ones.
    pub extended_descriptors: u64,
}

/// A packet as read from the ring. `payload` is bytes `[offset8*8, len8*8)` of the packet,
/// so it includes the sender's padding to 8 bytes: VMBus descriptors carry no exact
/// length, the protocol inside (icmsg, vmpipe) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingPacket<'a> {
    /// `VM_PKT_*` type (unchecked: the channel layer decides what it accepts).
    pub packet_type: u16,
    /// Descriptor flags, as sent.
    pub flags: u16,
    /// Transaction id, to be echoed in a reply.
    pub transaction_id: u64,
    /// The payload, padding included.
    pub payload: &'a [u8],
    /// True if `payload` points into the ring itself; false if it wrapped and was copied.
    pub in_place: bool,
}

/// Reads packets from one ring.
///
/// Owns `read_index`: read from the control page once in [`RingReader::new`], then the
/// local copy is authoritative. The peer's `write_index` is loaded once per batch.
pub struct RingReader<M: RingMem> {
    mem: M,
    data_len: usize,
    read_index: usize,
    ring: &'static str,
    /// Holds payloads that wrap around the end of the data area. Sized once, from the
    /// largest packet the ring or a descriptor can describe, never from a peer's value.
    scratch: Box<[u8]>,
    stats: RingStats,
}

impl<M: RingMem> RingReader<M> {
    /// Takes over the reading end of `mem`: validates the data area size, reads
    /// `read_index` once, allocates the scratch buffer (`min(data_len, 512 KiB)`).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let ring = mem.label();
        let data_len = mem.data_len();
        check_data_len(ring, data_len)?;
        // Relaxed: our own index.
        let value = mem.control()[control::READ_INDEX].load(Ordering::Relaxed);
        let read_index = check_index(ring, "read_index", value, data_len)?;
        let scratch = vec![0u8; data_len.min(MAX_PACKET_LEN8 * 8)].into_boxed_slice();
        Ok(Self {
            mem,
            data_len,
            read_index,
            ring,
            scratch,
            stats: RingStats::default(),
        })
    }

    /// Sets `feature_bits` to [`FEATURE_PENDING_SEND_SIZE`] (the guest does this on both
    /// rings before connecting to the doorbell).
    pub fn set_feature_bits(&self) {
        self.mem.control()[control::FEATURE_BITS]
            .store(FEATURE_PENDING_SEND_SIZE, Ordering::Relaxed);
    }

    /// Starts a batch: loads `write_index` once and validates it.
    pub fn begin(&mut self) -> Result<ReadBatch<'_, M>, RingError> {
        // Acquire pairs with the writer's Release store in `WriteBatch::commit`: the packet
        // bytes up to this index are visible before we read them.
        let value = self.mem.control()[control::WRITE_INDEX].load(Ordering::Acquire);
        let write_index = check_index(self.ring, "write_index", value, self.data_len)?;
        let read_index = self.read_index;
        Ok(ReadBatch {
            reader: self,
            write_index,
            read_index,
            consumed: 0,
        })
    }

    /// Sets (`true`: "do not signal me", while the reader is busy polling) or clears
    /// `interrupt_mask`. To clear it before sleeping use [`RingReader::unmask_and_check`],
    /// which closes the race with a writer publishing at the same moment.
    pub fn set_interrupt_mask(&self, masked: bool) {
        // Relaxed: the mask only suppresses signals; a late store costs at most one
        // spurious interrupt (masking) and unmasking before sleep goes through
        // `unmask_and_check` with its fence.
        self.mem.control()[control::INTERRUPT_MASK].store(u32::from(masked), Ordering::Relaxed);
    }

    /// Linux `hv_end_read`: clears `interrupt_mask`, fences, and reports whether packets
    /// are pending. If true, the caller must poll again instead of sleeping (a writer may
    /// have published just before seeing the unmask, and then it did not signal).
    pub fn unmask_and_check(&self) -> Result<bool, RingError> {
        let control = self.mem.control();
        control[control::INTERRUPT_MASK].store(0, Ordering::Relaxed);
        // virt_mb(): store interrupt_mask, then load write_index. Pairs with the writer's
        // fence in `WriteBatch::commit` (store write_index, then load interrupt_mask).
        fence(Ordering::SeqCst);
        let value = control[control::WRITE_INDEX].load(Ordering::Acquire);
        let write_index = check_index(self.ring, "write_index", value, self.data_len)?;
        Ok(write_index != self.read_index)
    }

    /// Whether the writer has published packets not yet read (loads and validates
    /// `write_index`; leaves `interrupt_mask` alone, for polling while masked).
    pub fn has_packets(&self) -> Result<bool, RingError> {
        let value = self.mem.control()[control::WRITE_INDEX].load(Ordering::Acquire);
        let write_index = check_index(self.ring, "write_index", value, self.data_len)?;
        Ok(write_index != self.read_index)
    }

    /// Counters of what this reader has seen.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// The local `read_index` (where the next packet starts).
    pub fn read_index(&self) -> usize {
        self.read_index
    }

    /// Length of the data area.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// The memory this reader runs over.
    pub fn mem(&self) -> &M {
        &self.mem
    }
}

/// Packets being read. [`ReadBatch::commit`] releases their ring space; dropping the batch
/// without committing leaves them in the ring to be read again.
pub struct ReadBatch<'a, M: RingMem> {
    reader: &'a mut RingReader<M>,
    write_index: usize,
    read_index: usize,
    consumed: usize,
}

impl<M: RingMem> ReadBatch<'_, M> {
    /// The next packet, `None` when the batch has reached the `write_index` it loaded.
    ///
    /// Validates the descriptor against the bytes available: `offset8` must not point into
    /// the descriptor or past `len8`, and the packet plus its trailer must end at or before
    /// `write_index`. On error nothing is consumed, so calling again returns the same error.
    #[allow(clippy::should_implement_trait)] // Items borrow the batch: not an Iterator.
    pub fn next(&mut self) -> Result<Option<IncomingPacket<'_>>, RingError> {
        let data_len = self.reader.data_len;
        let ring = self.reader.ring;
        let start = self.read_index;
        let available = used_bytes(self.write_index, start, data_len);
        if available == 0 {
            return Ok(None);
        }
        if available < DESCRIPTOR_LEN + TRAILER_LEN {
            return Err(RingError::TruncatedPacket {
                ring,
                read_index: start as u32,
                available,
            });
        }
        let mut raw = [0u8; DESCRIPTOR_LEN];
        read_wrapping(&self.reader.mem, start, &mut raw);
        let d = Descriptor::from_bytes(&raw);
        let bad = |reason| RingError::BadDescriptor {
            ring,
            read_index: start as u32,
            packet_type: d.packet_type,
            offset8: d.offset8,
            len8: d.len8,
            available,
            reason,
        };
        let offset = usize::from(d.offset8) * 8;
        let len = usize::from(d.len8) * 8;
        if offset < DESCRIPTOR_LEN {
            return Err(bad("offset8 points inside the 16-byte descriptor"));
        }
        if offset > len {
            return Err(bad("offset8 is past len8"));
        }
        if len + TRAILER_LEN > available {
            return Err(bad("packet and trailer run past write_index"));
        }

        // `len + 8 <= available < data_len`, so these sums stay below 2 * data_len.
        let wrap = |i: usize| if i >= data_len { i - data_len } else { i };
        let payload_at = wrap(start + offset);
        let payload_len = len - offset;
        let trailer_at = wrap(start + len);
        let mut raw_trailer = [0u8; TRAILER_LEN];
        read_wrapping(&self.reader.mem, trailer_at, &mut raw_trailer);

        let stats = &mut self.reader.stats;
        stats.packets += 1;
        stats.payload_bytes += payload_len as u64;
        if u64::from_le_bytes(raw_trailer) != trailer(start) {
            stats.bad_trailers += 1;
        }
        if offset != DESCRIPTOR_LEN {
            stats.extended_descriptors += 1;
        }
        self.read_index = wrap(trailer_at + TRAILER_LEN);
        self.consumed += len + TRAILER_LEN;

        let RingReader {
            mem,
            scratch,
            stats,
            ..
        } = &mut *self.reader;
        let in_place = if payload_at + payload_len <= data_len {
            mem.contiguous(payload_at, payload_len)
        } else {
            None
        };
        let (payload, in_place) = match in_place {
            Some(bytes) => (bytes, true),
            None => {
                stats.copied_packets += 1;
                // `payload_len < data_len` and `<= MAX_PACKET_LEN8 * 8`: always fits; the
                // check only keeps a broken invariant from becoming a panic.
                let Some(dst) = scratch.get_mut(..payload_len) else {
                    return Err(bad("payload larger than the scratch buffer"));
                };
                read_wrapping(mem, payload_at, dst);
                (&dst[..], false)
            }
        };
        Ok(Some(IncomingPacket {
            packet_type: d.packet_type,
            flags: d.flags,
            transaction_id: d.transaction_id,
            payload,
            in_place,
        }))
    }

    /// Ring bytes consumed so far in this batch.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Publishes the new `read_index` with one store. Returns true iff the writer must be
    /// signalled: it set `pending_send_sz` and the free space crossed it (was `<=` before
    /// this batch, is `>` now). An empty batch publishes nothing and returns false.
    pub fn commit(self) -> bool {
        if self.consumed == 0 {
            return false;
        }
        let data_len = self.reader.data_len;
        let control = self.reader.mem.control();
        // Release: our reads of the released packets (in-place payloads included; they
        // borrowed the batch, which `commit` consumes) complete before a writer that
        // Acquire-loads this index reuses the space.
        control[control::READ_INDEX].store(self.read_index as u32, Ordering::Release);
        self.reader.read_index = self.read_index;
        // virt_mb(): store read_index, then load pending_send_sz. Pairs with the fence in
        // `RingWriter::set_pending_send_size`.
        fence(Ordering::SeqCst);
        let pending = control[control::PENDING_SEND_SZ].load(Ordering::Relaxed) as usize;
        if pending == 0 {
            return false;
        }
        // A second read of write_index, for this decision only (Linux
        // hv_pkt_iter_close): free space must be measured against what the writer has
        // published up to now, not at `begin`. It never addresses memory. If the peer made
        // it invalid we signal: a spurious interrupt is harmless, a missing one could stall
        // a writer.
        let value = control[control::WRITE_INDEX].load(Ordering::Relaxed) as usize;
        if value >= data_len || !value.is_multiple_of(8) {
            return true;
        }
        let free_now = data_len - used_bytes(value, self.read_index, data_len);
        let free_before = free_now.saturating_sub(self.consumed);
        free_now > pending && free_before <= pending
    }
}
