//! The writing end of a ring.

use std::sync::atomic::{Ordering, fence};

use crate::packet::{DESCRIPTOR_LEN, Descriptor, MAX_PACKET_LEN8, TRAILER_LEN, trailer};
use crate::{
    FEATURE_PENDING_SEND_SIZE, PacketHeader, RingError, RingMem, check_data_len, check_index,
    control, packet_len, used_bytes, write_wrapping,
};

/// Why a packet was not written. Neither leaves anything half-written that could be
/// published: the batch stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Not enough free space now. The packet fits once the ring has MORE than `needed`
    /// free bytes; see [`RingWriter`] for how to wait for that without a lost wakeup.
    #[error(
        "{ring}: packet needs {needed} bytes of ring space, {free} free (a ring never fills completely)"
    )]
    Full {
        /// Which ring.
        ring: &'static str,
        /// Ring bytes the packet takes ([`packet_len`]).
        needed: usize,
        /// Free bytes as of this batch's load of `read_index`.
        free: usize,
    },
    /// The payload can never fit this ring (or a descriptor's 16-bit `len8`).
    #[error("{ring}: payload is {len} bytes, limit {max}")]
    TooLarge {
        /// Which ring.
        ring: &'static str,
        /// Payload bytes asked for.
        len: usize,
        /// [`RingWriter::max_payload_len`].
        max: usize,
    },
}

/// Writes packets into one ring.
///
/// Owns `write_index`: it is read from the control page once, in [`RingWriter::new`], and
/// from then on the local copy is authoritative (a peer scribbling on it cannot move where
/// we write).
///
/// # Waiting for space without a lost wakeup
/// When [`WriteBatch::write`] returns [`WriteError::Full`] `{ needed, .. }`:
/// 1. commit what the batch holds (and signal if told to);
/// 2. [`RingWriter::set_pending_send_size`]`(needed)`; this includes a full fence;
/// 3. re-check [`RingWriter::free_space`]: if it is now `> needed`, clear the pending size
///    and retry at once; otherwise wait for the reader's signal and retry (keeping the
///    pending size set until the write succeeds, then set it to 0).
///
/// The reader publishes `read_index`, fences, then reads `pending_send_sz`; the writer
/// stores `pending_send_sz`, fences, then reads `read_index`. With both fences, at least
/// one side sees the other's store: either the re-check sees the space, or the reader sees
/// the request and signals.
pub struct RingWriter<M: RingMem> {
    mem: M,
    data_len: usize,
    write_index: usize,
    ring: &'static str,
}

impl<M: RingMem> RingWriter<M> {
    /// Takes over the writing end of `mem`. Validates the data area size and reads the
    /// current `write_index` once (a fresh ring has 0; a reopened one continues).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let ring = mem.label();
        let data_len = mem.data_len();
        check_data_len(ring, data_len)?;
        // Relaxed: our own index; nobody else's data is ordered by it.
        let value = mem.control()[control::WRITE_INDEX].load(Ordering::Relaxed);
        let write_index = check_index(ring, "write_index", value, data_len)?;
        Ok(Self {
            mem,
            data_len,
            write_index,
            ring,
        })
    }

    /// Sets `feature_bits` to [`FEATURE_PENDING_SEND_SIZE`] (the guest does this on both
    /// rings before connecting to the doorbell).
    pub fn set_feature_bits(&self) {
        self.mem.control()[control::FEATURE_BITS]
            .store(FEATURE_PENDING_SEND_SIZE, Ordering::Relaxed);
    }

    /// Starts a batch: loads `read_index` once and validates it. All packets of the batch
    /// are checked against that one value.
    pub fn begin(&mut self) -> Result<WriteBatch<'_, M>, RingError> {
        // Acquire pairs with the reader's Release store in `ReadBatch::commit`: the reader
        // finished reading the bytes it released before we overwrite them.
        let value = self.mem.control()[control::READ_INDEX].load(Ordering::Acquire);
        let read_index = check_index(self.ring, "read_index", value, self.data_len)?;
        if self.mem.is_broken() {
            return Err(RingError::Broken { ring: self.ring });
        }
        let start = self.write_index;
        Ok(WriteBatch {
            writer: self,
            read_index,
            start,
            write_index: start,
        })
    }

    /// Stores `pending_send_sz` (0 clears it), then a full fence so that a following
    /// [`RingWriter::free_space`] cannot be ordered before the store (see the type docs).
    pub fn set_pending_send_size(&self, bytes: u32) {
        self.mem.control()[control::PENDING_SEND_SZ].store(bytes, Ordering::Relaxed);
        // virt_mb(): store pending_send_sz, then load read_index. Pairs with the fence in
        // `ReadBatch::commit` (store read_index, then load pending_send_sz).
        fence(Ordering::SeqCst);
    }

    /// Free bytes right now (loads and validates `read_index`). A packet of
    /// [`packet_len`]`(n)` bytes fits iff this is strictly greater.
    pub fn free_space(&self) -> Result<usize, RingError> {
        let value = self.mem.control()[control::READ_INDEX].load(Ordering::Acquire);
        let read_index = check_index(self.ring, "read_index", value, self.data_len)?;
        if self.mem.is_broken() {
            return Err(RingError::Broken { ring: self.ring });
        }
        Ok(self.data_len - used_bytes(self.write_index, read_index, self.data_len))
    }

    /// The largest payload one packet can carry on this ring: an empty ring must keep 8
    /// bytes free after it, and `len8` is 16 bits.
    pub fn max_payload_len(&self) -> usize {
        (self.data_len - DESCRIPTOR_LEN - TRAILER_LEN - 8).min(MAX_PACKET_LEN8 * 8 - DESCRIPTOR_LEN)
    }

    /// The local `write_index` (where the next packet will start).
    pub fn write_index(&self) -> usize {
        self.write_index
    }

    /// Length of the data area.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// The memory this writer runs over.
    pub fn mem(&self) -> &M {
        &self.mem
    }
}

/// Packets written but not yet published. Dropping the batch without
/// [`WriteBatch::commit`] discards them (they sat in free space the reader never sees).
pub struct WriteBatch<'a, M: RingMem> {
    writer: &'a mut RingWriter<M>,
    read_index: usize,
    start: usize,
    write_index: usize,
}

impl<M: RingMem> WriteBatch<'_, M> {
    /// Appends one packet: descriptor (`offset8` = 2, right after it), the payload gathered
    /// from `payload`, zero padding to 8 bytes, and the trailer.
    pub fn write(&mut self, header: PacketHeader, payload: &[&[u8]]) -> Result<(), WriteError> {
        let ring = self.writer.ring;
        let data_len = self.writer.data_len;
        let max = self.writer.max_payload_len();
        let len = payload
            .iter()
            .try_fold(0usize, |acc, p| acc.checked_add(p.len()))
            .unwrap_or(usize::MAX);
        if len > max {
            return Err(WriteError::TooLarge { ring, len, max });
        }
        let needed = packet_len(len);
        let free = data_len - used_bytes(self.write_index, self.read_index, data_len);
        if needed >= free {
            return Err(WriteError::Full { ring, needed, free });
        }

        let padded = len.next_multiple_of(8);
        // Cannot truncate: `len <= max_payload_len()` keeps `len8 <= u16::MAX`.
        let len8 = ((DESCRIPTOR_LEN + padded) / 8) as u16;
        let descriptor = Descriptor {
            packet_type: header.packet_type,
            offset8: (DESCRIPTOR_LEN / 8) as u16,
            len8,
            flags: header.flags,
            transaction_id: header.transaction_id,
        };
        let mem = &self.writer.mem;
        let start = self.write_index;
        // Whole 8-aligned words never wrap (the data area is a multiple of 8).
        let wrap = |i: usize| if i >= data_len { i - data_len } else { i };
        let [w0, w1] = descriptor.to_words();
        mem.store_u64(start, w0);
        mem.store_u64(wrap(start + 8), w1);
        let mut at = wrap(start + DESCRIPTOR_LEN);
        for part in payload.iter().filter(|p| !p.is_empty()) {
            at = write_wrapping(mem, at, part);
        }
        // Zero padding up to the next word, then the trailer.
        let pad = padded - len;
        if pad != 0 {
            at = write_wrapping(mem, at, &[0u8; 8][..pad]);
        }
        mem.store_u64(at, trailer(start));
        at = wrap(at + TRAILER_LEN);
        self.write_index = at;
        Ok(())
    }

    /// Free bytes left in this batch (as of its load of `read_index`).
    pub fn free(&self) -> usize {
        self.writer.data_len - used_bytes(self.write_index, self.read_index, self.writer.data_len)
    }

    /// Publishes the batch with one `write_index` store. Returns true iff the reader must
    /// be signalled: its `interrupt_mask` is 0 and the ring was empty before this batch.
    /// An empty batch publishes nothing and returns false.
    pub fn commit(self) -> bool {
        if self.write_index == self.start {
            return false;
        }
        let control = self.writer.mem.control();
        // Release: every byte of the batch is written before a reader that Acquire-loads
        // this index can see it.
        control[control::WRITE_INDEX].store(self.write_index as u32, Ordering::Release);
        self.writer.write_index = self.write_index;
        // virt_mb(): the write_index store must be visible before we look at
        // interrupt_mask. Pairs with the reader's fence in `unmask_and_check` (store mask 0,
        // then load write_index): either it sees our packets or we see it unmasked.
        fence(Ordering::SeqCst);
        if control[control::INTERRUPT_MASK].load(Ordering::Relaxed) != 0 {
            return false;
        }
        // A second read of read_index, allowed for this decision only (Linux
        // hv_need_to_signal). The value from `begin` is stale: the reader may have drained
        // the ring since, unmasked, found it empty and gone to sleep, and then only a signal
        // wakes it. The value is compared for equality and never used to address memory;
        // a peer that lies here can only cause itself a spurious or a missing interrupt.
        let read_now = control[control::READ_INDEX].load(Ordering::Relaxed) as usize;
        read_now == self.start
    }
}
