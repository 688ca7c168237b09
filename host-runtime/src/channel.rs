//! A VMBus channel: the two rings of one offer and its doorbell, moving whole packets.
//!
//! Transports (`shm`, `uio`, the simulator's host side) only map memory and obtain a doorbell; every
//! service then talks to a [`Channel`]. The ring code itself (layout, validation, signalling rules)
//! lives in `hvisd-ring`; this layer adds waiting: blocking on the doorbell when the incoming ring is
//! empty or the outgoing ring is full, with the re-check that closes the race against the peer.

use crate::doorbell::{Doorbell, DoorbellError};
use hvisd_ring::{
    MappedRing, PacketHeader, RingError, RingReader, RingWriter, SharedMapping, WriteError,
};
use std::sync::Arc;

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
        match e {
            DoorbellError::Closed => ChannelError::Closed {
                channel: self.label.clone(),
            },
            DoorbellError::Io(source) => ChannelError::Doorbell {
                channel: self.label.clone(),
                source,
            },
        }
    }

    fn signal(&mut self) -> Result<(), ChannelError> {
        self.stats.signals_out += 1;
        self.doorbell.signal().map_err(|e| self.doorbell_err(e))
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
