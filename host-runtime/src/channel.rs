//! A VMBus channel: the two rings of one offer and its doorbell, moving whole packets.
//!
//! Transports (`shm`, `uio`, the simulator's host side) only map memory and obtain a doorbell; every
//! service then talks to a [`Channel`]. The ring code itself (layout, validation, signalling rules)
//! lives in `hvisd-ring`; this layer adds waiting: blocking on the doorbell when the incoming ring is
//! empty or the outgoing ring is full, with the re-check that closes the race against the peer.

use crate::doorbell::{Doorbell, DoorbellError, Half, SharedDoorbell};
use hvisd_ring::{
    IncomingPacket, MappedRing, PacketHeader, PacketMeta, ReadBatch, RingError, RingReader,
    RingWriter, SharedMapping, WriteBatch, WriteError,
};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Which end of the channel this process plays. It decides which half of the ring file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The guest writes the first ring (guest-to-host) and reads the second.
    Guest,
    /// The host writes the second ring (host-to-guest) and reads the first.
    Host,
}

/// Why a channel stopped. Every variant closes the channel; none is a panic.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer broke the ring protocol (bad index, bad descriptor...). Says exactly what.
    #[error("{channel}: malformed ring: {source}")]
    Ring {
        /// The channel's label.
        channel: String,
        /// What was wrong.
        source: RingError,
    },
    /// The ring memory went away under us (the peer truncated the ring file; a `SIGBUS` was
    /// caught): this channel is over, nothing else is affected.
    #[error("{channel}: the ring file was truncated under the mapping ({source})")]
    RingGone {
        /// The channel's label.
        channel: String,
        /// Which ring noticed.
        source: RingError,
    },
    /// The peer closed the doorbell: the host rescinded the channel or went away.
    #[error("{channel}: closed by the peer")]
    Closed {
        /// The channel's label.
        channel: String,
    },
    /// An I/O error on the doorbell.
    #[error("{channel}: doorbell: {source}")]
    Doorbell {
        /// The channel's label.
        channel: String,
        /// The error.
        source: std::io::Error,
    },
    /// A packet we were asked to send can never fit in this ring.
    #[error(
        "{channel}: a {len}-byte packet can never fit this ring (at most {max} bytes of payload)"
    )]
    TooLarge {
        /// The channel's label.
        channel: String,
        /// Payload bytes asked for.
        len: usize,
        /// The ring's payload limit.
        max: usize,
    },
}

/// One received packet, copied out of the ring so the ring space can be returned at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPacket {
    /// VMBus packet type (`VM_PKT_*`).
    pub packet_type: u16,
    /// Descriptor flags.
    pub flags: u16,
    /// Transaction id, echoed in replies.
    pub transaction_id: u64,
    /// Bytes after the descriptor, ring padding included (as Linux's `vmbus_recvpacket` returns them),
    /// copied out of the ring.
    pub payload: Vec<u8>,
}

/// Counters a person looks at when a channel misbehaves.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ChannelStats {
    /// Packets received.
    pub packets_in: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Interrupts sent to the peer.
    pub signals_out: u64,
    /// Times we waited for the peer's interrupt.
    pub waits: u64,
}

/// The two rings of a channel, mapped and split by role.
pub struct RingPair {
    /// The ring this side writes.
    pub writer: RingWriter<MappedRing>,
    /// The ring this side reads.
    pub reader: RingReader<MappedRing>,
}

impl RingPair {
    /// Splits a mapping of `2 * ring_size` bytes (shm `ring` file, uio map 0) by role.
    pub fn new(map: Arc<SharedMapping>, ring_size: usize, role: Role) -> Result<Self, RingError> {
        let (guest_to_host, host_to_guest) = hvisd_ring::ring_pair(map, ring_size)?;
        let (out, inc) = match role {
            Role::Guest => (guest_to_host, host_to_guest),
            Role::Host => (host_to_guest, guest_to_host),
        };
        Ok(Self {
            writer: RingWriter::new(out)?,
            reader: RingReader::new(inc)?,
        })
    }

    /// Advertises pending-send-size support in both control pages (the guest does this before it
    /// connects the doorbell, per the spec).
    pub fn set_feature_bits(&self) {
        self.writer.set_feature_bits();
        self.reader.set_feature_bits();
    }
}

/// An open channel.
pub struct Channel {
    rings: RingPair,
    doorbell: Doorbell,
    label: String,
    stats: ChannelStats,
}

impl Channel {
    /// Assembles a channel from its rings and a connected doorbell. `label` names it in errors and
    /// logs (e.g. `"heartbeat 57164f39-…"`).
    pub fn new(rings: RingPair, doorbell: Doorbell, label: impl Into<String>) -> Self {
        Self {
            rings,
            doorbell,
            label: label.into(),
            stats: ChannelStats::default(),
        }
    }

    /// The channel's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Counters so far.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// The largest payload one packet can carry in the outgoing ring.
    pub fn max_payload_len(&self) -> usize {
        self.rings.writer.max_payload_len()
    }

    fn ring_err(&self, source: RingError) -> ChannelError {
        ring_error(&self.label, source)
    }

    fn doorbell_err(&self, e: DoorbellError) -> ChannelError {
        doorbell_error(&self.label, e)
    }

    fn signal(&mut self) -> Result<(), ChannelError> {
        self.stats.signals_out += 1;
        self.doorbell.signal().map_err(|e| self.doorbell_err(e))
    }

    /// Splits the channel into a receiving and a sending half that can be used at the same time
    /// from different tasks (hvsock streams). Each half owns its ring end, so the ring code's
    /// invariants hold as before (one owner per index, every index read once per batch); they
    /// share the doorbell through a [`SharedDoorbell`], which makes sure an interrupt consumed
    /// by one half is seen by the other.
    pub fn into_split(self) -> (RecvHalf, SendHalf) {
        let bell = Arc::new(SharedDoorbell::new(self.doorbell));
        let label: Arc<str> = self.label.into();
        (
            RecvHalf {
                reader: self.rings.reader,
                bell: bell.clone(),
                label: label.clone(),
                peer_closed: false,
            },
            SendHalf {
                writer: self.rings.writer,
                bell,
                label,
                pending: false,
            },
        )
    }

    /// Interrupts the peer without sending anything (it re-checks the rings). Used by hosts that
    /// poke the control page directly.
    pub fn notify_peer(&mut self) -> Result<(), ChannelError> {
        self.signal()
    }

    async fn wait(&mut self) -> Result<(), ChannelError> {
        self.stats.waits += 1;
        self.doorbell.wait().await.map_err(|e| self.doorbell_err(e))
    }

    /// Receives up to `max` packets (at least one, whatever `max` says), waiting for the peer when
    /// the ring is empty. Each payload is copied out of the ring; the batch is returned to the ring
    /// with one `read_index` update.
    pub async fn recv_batch(
        &mut self,
        out: &mut Vec<OwnedPacket>,
        max: usize,
    ) -> Result<(), ChannelError> {
        let max = max.max(1);
        loop {
            // Masked while we drain: the peer need not interrupt us for packets we are about to see.
            self.rings.reader.set_interrupt_mask(true);
            let signal_writer = {
                let mut batch = match self.rings.reader.begin() {
                    Ok(batch) => batch,
                    Err(source) => return Err(ring_error(&self.label, source)),
                };
                while out.len() < max {
                    let mut payload = Vec::new();
                    match batch.next_into(&mut payload) {
                        Ok(Some(meta)) => out.push(OwnedPacket {
                            packet_type: meta.packet_type,
                            flags: meta.flags,
                            transaction_id: meta.transaction_id,
                            payload,
                        }),
                        Ok(None) => break,
                        Err(source) => return Err(ring_error(&self.label, source)),
                    }
                }
                batch.commit()
            };
            self.stats.packets_in += out.len() as u64;
            if signal_writer {
                self.signal()?;
            }
            if !out.is_empty() {
                return Ok(());
            }
            // Empty: unmask, then look once more, because the peer may have written between our last
            // look and the unmask and, seeing the mask set, not signalled.
            if self
                .rings
                .reader
                .unmask_and_check()
                .map_err(|e| self.ring_err(e))?
            {
                continue;
            }
            self.wait().await?;
        }
    }

    /// Sends one packet, waiting for the peer to free space when the ring is full.
    pub async fn send(
        &mut self,
        header: PacketHeader,
        payload: &[&[u8]],
    ) -> Result<(), ChannelError> {
        let mut pending = false;
        loop {
            let result = {
                let mut batch = match self.rings.writer.begin() {
                    Ok(batch) => batch,
                    Err(source) => return Err(ring_error(&self.label, source)),
                };
                match batch.write(header, payload) {
                    Ok(()) => Ok(batch.commit()),
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok(signal_reader) => {
                    if pending {
                        self.rings.writer.set_pending_send_size(0);
                    }
                    self.stats.packets_out += 1;
                    if signal_reader {
                        self.signal()?;
                    }
                    return Ok(());
                }
                Err(WriteError::Full { needed, .. }) => {
                    // Ask the reader to signal once `needed` bytes are free, then re-check: it may
                    // have freed them before it could see the request (hvisd-ring documents why
                    // this pairing of fences cannot lose the wake-up).
                    let needed_u32 = u32::try_from(needed).unwrap_or(u32::MAX);
                    self.rings.writer.set_pending_send_size(needed_u32);
                    pending = true;
                    let free = self
                        .rings
                        .writer
                        .free_space()
                        .map_err(|e| self.ring_err(e))?;
                    if free <= needed {
                        self.wait().await?;
                    }
                }
                Err(WriteError::TooLarge { len, max, .. }) => {
                    if pending {
                        self.rings.writer.set_pending_send_size(0);
                    }
                    return Err(ChannelError::TooLarge {
                        channel: self.label.clone(),
                        len,
                        max,
                    });
                }
            }
        }
    }
}

fn ring_error(label: &str, source: RingError) -> ChannelError {
    let channel = label.to_owned();
    match source {
        RingError::Broken { .. } => ChannelError::RingGone { channel, source },
        source => ChannelError::Ring { channel, source },
    }
}

fn doorbell_error(label: &str, e: DoorbellError) -> ChannelError {
    match e {
        DoorbellError::Closed => ChannelError::Closed {
            channel: label.to_owned(),
        },
        DoorbellError::Io(source) => ChannelError::Doorbell {
            channel: label.to_owned(),
            source,
        },
    }
}

/// What a packet handler wants next from [`RecvHalf::poll_recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Hand over the next packet of the batch, if any.
    Continue,
    /// Stop after this packet (it is consumed) and return.
    Stop,
}

/// A packet of the current receive batch: its descriptor fields, and its payload still in the
/// ring, to be copied out (whole or in parts) with [`PacketRef::copy_payload`].
pub struct PacketRef<'b, 'r> {
    batch: &'b ReadBatch<'r, MappedRing>,
    packet: &'b IncomingPacket,
    label: &'b str,
}

impl PacketRef<'_, '_> {
    /// The descriptor's fields, read once and validated by the ring.
    pub fn meta(&self) -> PacketMeta {
        self.packet.meta
    }

    /// Copies `dst.len()` payload bytes starting `from` bytes into the payload out of the ring.
    pub fn copy_payload(&self, from: usize, dst: &mut [u8]) -> Result<(), ChannelError> {
        self.batch
            .read_payload(self.packet, from, dst)
            .map_err(|e| ring_error(self.label, e))
    }
}

/// The receiving half of a split [`Channel`]: reads the incoming ring, waits on the shared
/// doorbell, signals the writer when its `pending_send_sz` is crossed.
pub struct RecvHalf {
    reader: RingReader<MappedRing>,
    bell: Arc<SharedDoorbell>,
    label: Arc<str>,
    /// The peer closed the doorbell: what it published before is still delivered, then
    /// [`ChannelError::Closed`].
    peer_closed: bool,
}

impl RecvHalf {
    /// The channel's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The doorbell this half shares with its [`SendHalf`].
    pub fn doorbell(&self) -> &Arc<SharedDoorbell> {
        &self.bell
    }

    /// Hands packets to `on_packet` in ring order until it says [`Flow::Stop`] or the packets
    /// published so far are used up, then returns the consumed space to the ring with one
    /// `read_index` store (and signals the writer if that crossed its `pending_send_sz`).
    ///
    /// Ready once at least one packet was handed over; when the ring is empty, waits: unmask,
    /// look once more, then sleep on the doorbell (Linux `hv_end_read`). An error from
    /// `on_packet` is returned at once and the batch is not committed. Once the peer has closed
    /// the doorbell and everything it published has been handed over, the result is
    /// [`ChannelError::Closed`].
    pub fn poll_recv<E: From<ChannelError>>(
        &mut self,
        cx: &mut Context<'_>,
        mut on_packet: impl FnMut(PacketRef<'_, '_>) -> Result<Flow, E>,
    ) -> Poll<Result<(), E>> {
        loop {
            // Masked while we drain: the peer need not interrupt us for packets we are about
            // to see anyway.
            self.reader.set_interrupt_mask(true);
            let label = &*self.label;
            let mut handed = 0usize;
            let signal_writer = {
                let mut batch = match self.reader.begin() {
                    Ok(batch) => batch,
                    Err(e) => return Poll::Ready(Err(ring_error(label, e).into())),
                };
                loop {
                    let packet = match batch.next() {
                        Ok(Some(packet)) => packet,
                        Ok(None) => break,
                        Err(e) => return Poll::Ready(Err(ring_error(label, e).into())),
                    };
                    handed += 1;
                    let flow = on_packet(PacketRef {
                        batch: &batch,
                        packet: &packet,
                        label,
                    });
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stop) => break,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                batch.commit()
            };
            if signal_writer {
                match self.bell.signal() {
                    Ok(()) => {}
                    // Still deliver what the peer published before it went.
                    Err(DoorbellError::Closed) => self.peer_closed = true,
                    Err(e) => return Poll::Ready(Err(doorbell_error(label, e).into())),
                }
            }
            if handed > 0 {
                return Poll::Ready(Ok(()));
            }
            if self.peer_closed {
                return Poll::Ready(Err(ChannelError::Closed {
                    channel: label.to_owned(),
                }
                .into()));
            }
            // Empty: read the epoch, unmask, look once more (the peer may have published between
            // our look and the unmask and, seeing the mask, not signalled), then sleep.
            let seen = self.bell.epoch();
            match self.reader.unmask_and_check() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(ring_error(label, e).into())),
            }
            match self.bell.poll_interrupt(cx, Half::Reader, seen) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                // One last look at the ring before reporting the close.
                Poll::Ready(Err(DoorbellError::Closed)) => self.peer_closed = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(doorbell_error(label, e).into())),
            }
        }
    }
}

/// The sending half of a split [`Channel`]: writes the outgoing ring, waits for space with
/// `pending_send_sz` exactly as the spec says.
pub struct SendHalf {
    writer: RingWriter<MappedRing>,
    bell: Arc<SharedDoorbell>,
    label: Arc<str>,
    /// `pending_send_sz` is set and must be cleared once we have written.
    pending: bool,
}

impl SendHalf {
    /// The channel's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The largest payload one packet can carry in the outgoing ring.
    pub fn max_payload_len(&self) -> usize {
        self.writer.max_payload_len()
    }

    /// Bytes of the outgoing ring's data area.
    pub fn ring_data_len(&self) -> usize {
        self.writer.data_len()
    }

    /// The doorbell this half shares with its [`RecvHalf`].
    pub fn doorbell(&self) -> &Arc<SharedDoorbell> {
        &self.bell
    }

    /// One attempt of [`SendHalf::poll_send`] that never waits: `Ok(None)` if `fill` found no
    /// room. Leaves `pending_send_sz` alone.
    pub fn try_send<R>(
        &mut self,
        mut fill: impl FnMut(&mut WriteBatch<'_, MappedRing>) -> Option<R>,
    ) -> Result<Option<R>, ChannelError> {
        let label = &*self.label;
        let (written, signal_reader) = {
            let mut batch = self.writer.begin().map_err(|e| ring_error(label, e))?;
            let written = fill(&mut batch);
            (written, batch.commit())
        };
        if signal_reader {
            self.bell.signal().map_err(|e| doorbell_error(label, e))?;
        }
        Ok(written)
    }

    /// Writes packets with `fill`, which gets a batch and returns `Some` once it wrote what it
    /// could, or `None` if not even its smallest acceptable packet fits. The batch is published
    /// with one `write_index` store and the reader signalled if the ring was empty and unmasked.
    ///
    /// When `fill` returns `None`, waits for space as the spec prescribes: sets `pending_send_sz`
    /// to `wanted` (the ring bytes, `8 * len8 + 8`, of the packet it wants to write next; `fill`
    /// must succeed whenever more than `wanted` bytes are free), re-checks the free space, and
    /// sleeps on the doorbell only if it is still short; `pending_send_sz` is cleared once
    /// `fill` has written.
    pub fn poll_send<R>(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
        mut fill: impl FnMut(&mut WriteBatch<'_, MappedRing>) -> Option<R>,
    ) -> Poll<Result<R, ChannelError>> {
        loop {
            if let Some(written) = self.try_send(&mut fill)? {
                if self.pending {
                    self.writer.set_pending_send_size(0);
                    self.pending = false;
                }
                return Poll::Ready(Ok(written));
            }
            let label = &*self.label;
            if self.bell.is_closed() {
                return Poll::Ready(Err(ChannelError::Closed {
                    channel: label.to_owned(),
                }));
            }
            // Read the epoch first: an interrupt consumed after this (by either half) makes the
            // wait below return at once.
            let seen = self.bell.epoch();
            // `wanted` is at most a packet of this ring (64 MiB): fits u32.
            self.writer
                .set_pending_send_size(u32::try_from(wanted).unwrap_or(u32::MAX));
            self.pending = true;
            match self.writer.free_space() {
                Ok(free) if free > wanted => continue,
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(ring_error(label, e))),
            }
            match self.bell.poll_interrupt(cx, Half::Writer, seen) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(doorbell_error(label, e))),
            }
        }
    }
}
