//! A doorbell as the shm transport defines it: a `SOCK_SEQPACKET` Unix socket carrying one
//! 4-byte little-endian message per interrupt. Used by the two-thread test and the
//! benchmark, where both ends live in this process (`socketpair`).

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// One end of a doorbell.
pub(crate) struct Doorbell {
    fd: OwnedFd,
    /// Interrupts sent (including ones folded into an already queued message).
    pub sent: u64,
    /// Messages received.
    pub received: u64,
}

/// Two connected doorbell ends.
pub(crate) fn doorbell_pair() -> rustix::io::Result<(Doorbell, Doorbell)> {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let wrap = |fd| Doorbell {
        fd,
        sent: 0,
        received: 0,
    };
    Ok((wrap(a), wrap(b)))
}

impl Doorbell {
    /// Interrupts the peer. Never blocks: if the socket buffer is full, messages are
    /// already queued and the peer will wake anyway (interrupts are level-like, spurious
    /// ones harmless), so EAGAIN is success.
    pub fn ring(&mut self) -> rustix::io::Result<()> {
        self.sent += 1;
        match rustix::net::send(&self.fd, &1u32.to_le_bytes(), SendFlags::DONTWAIT) {
            Ok(_) | Err(Errno::AGAIN) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Blocks until the peer rings (consumes one message). A closed peer is an error, as
    /// is the receive timeout expiring (`EAGAIN`), which tests use to turn a lost wakeup
    /// into a failure instead of a hang.
    pub fn wait(&mut self) -> rustix::io::Result<()> {
        let mut buf = [0u8; 4];
        loop {
            match rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty()) {
                Ok((_, 0)) => return Err(Errno::CONNRESET),
                Ok(_) => {
                    self.received += 1;
                    return Ok(());
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes [`Doorbell::wait`] fail with `EAGAIN` after `timeout`.
    pub fn set_wait_timeout(&self, timeout: Duration) -> rustix::io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(
            &self.fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )
    }
}

use crate::{
    IncomingPacket, PacketHeader, ReadBatch, RingError, RingMem, RingReader, RingWriter, WriteError,
};

fn os(call: &'static str) -> impl FnOnce(Errno) -> RingError {
    move |source| RingError::Os { call, source }
}

/// Writes `packets` with one commit per call when they fit, otherwise in as many commits as
/// space allows, waiting for the reader exactly as the shm transport prescribes: set
/// `pending_send_sz`, re-check the free space, and sleep on the doorbell only if it is
/// still short. Signals the reader after each commit that asks for it.
///
/// The pending size asks for a quarter of the ring (or the next packet, if larger), not just
/// the next packet: waking for one packet's worth of space would cost a signal and a sleep
/// per packet once a fast writer has filled the ring.
pub(crate) fn send_blocking<M: RingMem>(
    writer: &mut RingWriter<M>,
    bell: &mut Doorbell,
    packets: &[(PacketHeader, &[u8])],
    waits: &mut u64,
) -> Result<(), RingError> {
    let mut done = 0;
    let mut pending = false;
    while done < packets.len() {
        let mut batch = writer.begin()?;
        let mut full = None;
        for (header, payload) in &packets[done..] {
            match batch.write(*header, &[payload]) {
                Ok(()) => done += 1,
                Err(WriteError::Full { needed, .. }) => {
                    full = Some(needed);
                    break;
                }
                Err(e @ WriteError::TooLarge { .. }) => return Err(e.into()),
            }
        }
        if batch.commit() {
            bell.ring().map_err(os("doorbell send"))?;
        }
        let Some(needed) = full else { break };
        // The spec: exactly the bytes the next packet needs (`8 * len8 + 8`).
        let wanted = needed;
        // `wanted` is below the ring size (at most 64 MiB): fits u32.
        writer.set_pending_send_size(wanted as u32);
        pending = true;
        if writer.free_space()? > wanted {
            continue;
        }
        *waits += 1;
        bell.wait()
            .map_err(os("doorbell recv (writer waiting for space)"))?;
    }
    if pending {
        writer.set_pending_send_size(0);
    }
    Ok(())
}

/// Reads packets until `on_packet` returns false, following the reader's rules: stay
/// masked while packets keep coming, and before sleeping unmask and re-check (`unmask_and_check`); signal the writer when a
/// commit crosses its `pending_send_sz`.
pub(crate) fn receive_until<M: RingMem>(
    reader: &mut RingReader<M>,
    bell: &mut Doorbell,
    waits: &mut u64,
    mut on_packet: impl FnMut(&ReadBatch<'_, M>, &IncomingPacket) -> Result<bool, RingError>,
) -> Result<(), RingError> {
    reader.set_interrupt_mask(true);
    // Hand space back to the writer every quarter ring, so that it refills while we copy
    // instead of waiting for a whole ring to be drained.
    let commit_every = reader.data_len() / 4;
    loop {
        let mut batch = reader.begin()?;
        let mut got = 0usize;
        let mut more = true;
        while more
            && batch.consumed() < commit_every
            && let Some(packet) = batch.next()?
        {
            got += 1;
            more = on_packet(&batch, &packet)?;
        }
        if batch.commit() {
            bell.ring().map_err(os("doorbell send"))?;
        }
        if !more {
            return Ok(());
        }
        if got == 0 {
            if !reader.unmask_and_check()? {
                *waits += 1;
                bell.wait()
                    .map_err(os("doorbell recv (reader waiting for packets)"))?;
            }
            reader.set_interrupt_mask(true);
        }
    }
}
