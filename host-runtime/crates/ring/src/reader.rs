//! The reading end of a ring.

use std::sync::atomic::{Ordering, fence};

use crate::packet::{DESCRIPTOR_LEN, Descriptor, TRAILER_LEN, trailer};
use crate::{
    FEATURE_PENDING_SEND_SIZE, RingError, RingMem, check_data_len, check_index, control,
    read_wrapping, used_bytes,
};

/// Oddities a reader saw and tolerated, plus throughput counters. The spec forbids
/// rejecting a packet for its trailer (OpenVMM and Linux ignore it), so a wrong trailer is
/// only counted here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Packets returned by [`ReadBatch::next`] in committed batches.
    pub packets: u64,
    /// Payload bytes returned (`len8*8 - offset8*8` summed).
    pub payload_bytes: u64,
    /// Packets whose payload wrapped around the end of the data area (copied in two pieces).
    pub wrapped_packets: u64,
    /// Packets whose trailer was not `start_index << 32`.
    pub bad_trailers: u64,
    /// Packets whose payload did not start right after the descriptor (`offset8 != 2`);
    /// normal for GPA-direct and transfer-page packets, unusual for in-band ones.
    pub extended_descriptors: u64,
}

/// What a packet's descriptor says, read once from the ring and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// `VM_PKT_*` type (unchecked: the channel layer decides what it accepts).
    pub packet_type: u16,
    /// Descriptor flags, as sent.
    pub flags: u16,
    /// Transaction id, to be echoed in a reply.
    pub transaction_id: u64,
    /// Bytes of payload: `[offset8*8, len8*8)` of the packet, so it includes the sender's
    /// padding to 8 bytes (VMBus descriptors carry no exact length; the protocol inside,
    /// icmsg or vmpipe, does).
    pub payload_len: usize,
}

/// A packet of the current batch: its metadata and where its payload lies in the ring. The
/// payload stays in the ring until the batch is committed and is only ever copied out
/// ([`ReadBatch::read_payload`]), never borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingPacket {
    /// The descriptor's fields.
    pub meta: PacketMeta,
    /// Offset of the payload in the data area (validated, `< data_len`).
    payload_at: usize,
}

impl std::ops::Deref for IncomingPacket {
    type Target = PacketMeta;
    fn deref(&self) -> &PacketMeta {
        &self.meta
    }
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
    stats: RingStats,
}

impl<M: RingMem> RingReader<M> {
    /// Takes over the reading end of `mem`: validates the data area size, reads
    /// `read_index` once.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let ring = mem.label();
        let data_len = mem.data_len();
        check_data_len(ring, data_len)?;
        // Relaxed: our own index.
        let value = mem.control()[control::READ_INDEX].load(Ordering::Relaxed);
        let read_index = check_index(ring, "read_index", value, data_len)?;
        Ok(Self {
            mem,
            data_len,
            read_index,
            ring,
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
        if self.mem.is_broken() {
            return Err(RingError::Broken { ring: self.ring });
        }
        let read_index = self.read_index;
        Ok(ReadBatch {
            reader: self,
            write_index,
            read_index,
            consumed: 0,
            stats: RingStats::default(),
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
        if self.mem.is_broken() {
            return Err(RingError::Broken { ring: self.ring });
        }
        Ok(write_index != self.read_index)
    }

    /// Whether the writer has published packets not yet read (loads and validates
    /// `write_index`; leaves `interrupt_mask` alone, for polling while masked).
    pub fn has_packets(&self) -> Result<bool, RingError> {
        let value = self.mem.control()[control::WRITE_INDEX].load(Ordering::Acquire);
        let write_index = check_index(self.ring, "write_index", value, self.data_len)?;
        if self.mem.is_broken() {
            return Err(RingError::Broken { ring: self.ring });
        }
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
    /// Counters of this batch, added to the reader's at commit (an uncommitted batch's
    /// packets are read again, and must not count twice).
    stats: RingStats,
}

impl<M: RingMem> ReadBatch<'_, M> {
    /// The next packet, `None` when the batch has reached the `write_index` it loaded.
    ///
    /// Validates the descriptor against the bytes available: `offset8` must not point into
    /// the descriptor or past `len8`, and the packet plus its trailer must end at or before
    /// `write_index`. On error nothing is consumed, so calling again returns the same error.
    /// The payload stays in the ring: copy it with [`ReadBatch::read_payload`] before
    /// committing, or use [`ReadBatch::next_into`].
    #[allow(clippy::should_implement_trait)] // Fallible, and the items refer to the batch.
    pub fn next(&mut self) -> Result<Option<IncomingPacket>, RingError> {
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
        // `start` is 8-aligned (validated or computed from validated lengths) and the data area
        // is a multiple of 8, so each descriptor word lies whole inside it.
        let second = if start + 8 == data_len { 0 } else { start + 8 };
        let mem = &self.reader.mem;
        let d = Descriptor::from_words([mem.load_u64(start), mem.load_u64(second)]);
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
        let raw_trailer = mem.load_u64(trailer_at);
        // What was read means nothing if the memory went away under us.
        if self.reader.mem.is_broken() {
            return Err(RingError::Broken { ring });
        }

        let stats = &mut self.stats;
        stats.packets += 1;
        stats.payload_bytes += payload_len as u64;
        if raw_trailer != trailer(start) {
            stats.bad_trailers += 1;
        }
        if offset != DESCRIPTOR_LEN {
            stats.extended_descriptors += 1;
        }
        if payload_at + payload_len > data_len {
            stats.wrapped_packets += 1;
        }
        self.read_index = wrap(trailer_at + TRAILER_LEN);
        self.consumed += len + TRAILER_LEN;
        Ok(Some(IncomingPacket {
            meta: PacketMeta {
                packet_type: d.packet_type,
                flags: d.flags,
                transaction_id: d.transaction_id,
                payload_len,
            },
            payload_at,
        }))
    }

    /// Copies `dst.len()` bytes of `packet`'s payload, starting `from` bytes into it, out of
    /// the ring. Asking for bytes past the payload is an error, never a read of another
    /// packet's bytes.
    pub fn read_payload(
        &self,
        packet: &IncomingPacket,
        from: usize,
        dst: &mut [u8],
    ) -> Result<(), RingError> {
        let ring = self.reader.ring;
        let data_len = self.reader.data_len;
        if from > packet.payload_len || dst.len() > packet.payload_len - from {
            return Err(RingError::PayloadRange {
                ring,
                from,
                len: dst.len(),
                payload_len: packet.payload_len,
            });
        }
        // `payload_at < data_len` and `from < payload_len < data_len`.
        let at = packet.payload_at + from;
        let at = if at >= data_len { at - data_len } else { at };
        read_wrapping(&self.reader.mem, at, dst);
        if self.reader.mem.is_broken() {
            return Err(RingError::Broken { ring });
        }
        Ok(())
    }

    /// The next packet with its whole payload copied into `payload` (cleared first).
    pub fn next_into(&mut self, payload: &mut Vec<u8>) -> Result<Option<PacketMeta>, RingError> {
        let Some(packet) = self.next()? else {
            return Ok(None);
        };
        payload.clear();
        payload.resize(packet.payload_len, 0);
        self.read_payload(&packet, 0, payload)?;
        Ok(Some(packet.meta))
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
        let total = &mut self.reader.stats;
        total.packets += self.stats.packets;
        total.payload_bytes += self.stats.payload_bytes;
        total.wrapped_packets += self.stats.wrapped_packets;
        total.bad_trailers += self.stats.bad_trailers;
        total.extended_descriptors += self.stats.extended_descriptors;
        let data_len = self.reader.data_len;
        let control = self.reader.mem.control();
        // Release: our copies of the released packets complete before a writer that
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
