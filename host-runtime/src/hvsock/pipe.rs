//! The hvsock byte pipe over one VMBus channel, as Linux's `hv_sock` (`net/vmw_vsock/hyperv_transport.c`)
//! frames it: every in-band packet carries a `vmpipe_proto_header {pkt_type = 1, data_size}` and
//! `data_size` stream bytes; `data_size` 0 shuts the sender's direction down (FIN).
//!
//! Both ends use this code: the guest runtime for every pipe offer, and the host simulator. The
//! wire format lives in `hvisd_protocol::hvsock`; this module only moves bytes.
//!
//! # Reading
//! A read copies packets straight out of the ring into the caller's buffer. A packet with more
//! data than the buffer has room for leaves its remainder in a per-connection stash (at most
//! [`HVS_MTU_SIZE`] bytes, the largest packet a host may send), served first by the next read; the
//! packet's ring space is returned at once. Packets are validated as Linux does (header inside
//! the packet, `data_size` at most the MTU and inside the packet) and more strictly: `pkt_type`
//! must be 1 and the VMBus packet in-band. Anything else closes the connection with an
//! [`HvsockError`], never a panic.
//!
//! # Writing and flow control
//! A write puts as many packets as fit now into the ring in one batch (one `write_index` store,
//! at most one interrupt), each with up to [`PipeWriteHalf::chunk`] data bytes, and reports how
//! many bytes it took; nothing is buffered on our side. When not even a useful packet fits, the
//! writer sets `pending_send_sz` to the ring bytes of its next packet and sleeps until the
//! reader's signal: a reader that stops reading stalls the writer, and the bytes in flight are
//! bounded by the two rings.
//!
//! # Memory per connection
//! Heap: the read stash (0 to [`HVS_MTU_SIZE`] bytes, allocated when first needed) and a few
//! hundred bytes of state. Besides, the channel's `ring` file is mapped (`2 * ring_size`, the
//! host's memory, bounded by the project's one ring-size limit).

use crate::channel::{Channel, ChannelError, Flow, PacketRef, RecvHalf, SendHalf};
use crate::doorbell::SharedDoorbell;
use hvisd_protocol::hvsock::{
    HVS_MTU_SIZE, HvsockParseError, PipeFrame, VMPIPE_HEADER_SIZE, parse_pipe_header, pipe_header,
};
use hvisd_ring::{PACKET_TYPE_DATA_INBAND, PacketHeader, WriteError, packet_len};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use zerocopy::IntoBytes;

/// How long a closed connection that sent its FIN waits for the peer to close the channel:
/// Linux's `HVS_CLOSE_TIMEOUT` (8 s).
pub const HVS_CLOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// A write shorter than the whole buffer is made only if it carries at least this many bytes
/// (or all that is left): below it the writer waits for room rather than filling the ring's
/// tail with tiny packets.
const MIN_PARTIAL_WRITE: usize = 1024;

/// Ring bytes a packet with `data` stream bytes takes (descriptor, header, data, padding,
/// trailer): Linux's `HVS_PKT_LEN`.
pub fn pipe_packet_len(data: usize) -> usize {
    packet_len(VMPIPE_HEADER_SIZE + data)
}

/// The most data bytes the writer puts in one packet on a ring whose data area is `data_len`
/// bytes: a quarter of the ring (so that the host can drain one packet while we write the
/// next; Linux sends 4 KiB packets on its default 20 KiB rings for the same reason), at most
/// the MTU, at least 8.
pub fn send_chunk(data_len: usize) -> usize {
    let quarter = (data_len / 4).saturating_sub(pipe_packet_len(0)) / 8 * 8;
    quarter.clamp(8, HVS_MTU_SIZE)
}

/// Why an hvsock connection stopped. A read or write returns it inside an [`io::Error`] (as an
/// `Arc<HvsockError>`, so that every later call can report the same cause).
#[derive(Debug, thiserror::Error)]
pub enum HvsockError {
    /// The channel failed: the peer closed it, broke the ring, or the ring file went away.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A packet's `vmpipe_proto_header` is malformed.
    #[error("{channel}: hvsock packet refused: {source}")]
    Protocol {
        /// The connection's label.
        channel: String,
        /// What was wrong.
        source: HvsockParseError,
    },
    /// A VMBus packet other than in-band data arrived on the pipe.
    #[error(
        "{channel}: VMBus packet of type {packet_type} on an hvsock pipe; only in-band data (6) is allowed"
    )]
    NotInband {
        /// The connection's label.
        channel: String,
        /// The descriptor's type.
        packet_type: u16,
    },
    /// The runtime closed the connection (the host rescinded the offer, or the runtime stops).
    #[error("{channel}: connection closed by the runtime (offer rescinded or runtime stopping)")]
    Aborted {
        /// The connection's label.
        channel: String,
    },
    /// A write after [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown).
    #[error("{channel}: write after shutdown (FIN already sent)")]
    WriteAfterShutdown {
        /// The connection's label.
        channel: String,
    },
}

impl HvsockError {
    /// The `io::ErrorKind` a reader or writer sees.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            HvsockError::Channel(ChannelError::Closed { .. }) => io::ErrorKind::ConnectionReset,
            HvsockError::Channel(ChannelError::Doorbell { source, .. }) => source.kind(),
            HvsockError::Channel(_)
            | HvsockError::Protocol { .. }
            | HvsockError::NotInband { .. } => io::ErrorKind::InvalidData,
            HvsockError::Aborted { .. } => io::ErrorKind::ConnectionAborted,
            HvsockError::WriteAfterShutdown { .. } => io::ErrorKind::BrokenPipe,
        }
    }

    /// Whether the peer simply went away (closed the channel) rather than broke the protocol.
    pub fn is_peer_closed(&self) -> bool {
        matches!(self, HvsockError::Channel(ChannelError::Closed { .. }))
    }
}

fn io_error(e: &Arc<HvsockError>) -> io::Error {
    io::Error::new(e.kind(), e.clone())
}

/// State both halves and the [`PipeMonitor`] see.
#[derive(Debug)]
struct PipeShared {
    label: String,
    bell: Arc<SharedDoorbell>,
    aborted: AtomicBool,
    fin_sent: AtomicBool,
    fin_received: AtomicBool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The first error either half met, for the monitor's summary.
    first_error: Mutex<Option<Arc<HvsockError>>>,
}

impl PipeShared {
    fn record(&self, e: HvsockError) -> Arc<HvsockError> {
        let e = Arc::new(e);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e.clone());
        }
        e
    }

    fn aborted_error(&self) -> Option<Arc<HvsockError>> {
        self.aborted.load(Ordering::SeqCst).then(|| {
            self.record(HvsockError::Aborted {
                channel: self.label.clone(),
            })
        })
    }
}

/// One hvsock connection over a VMBus pipe channel: a duplex byte stream.
pub struct PipeStream {
    read: PipeReadHalf,
    write: PipeWriteHalf,
}

/// The reading half of a [`PipeStream`].
pub struct PipeReadHalf {
    rx: RecvHalf,
    shared: Arc<PipeShared>,
    /// The rest of a packet the caller's buffer had no room for; `stash[stash_at..]` is unread.
    stash: Vec<u8>,
    stash_at: usize,
    /// The peer's FIN has been read: every later read returns 0 bytes.
    eof: bool,
    /// The connection failed; reported after any bytes delivered before the failure.
    failed: Option<Arc<HvsockError>>,
    /// Keeps the monitor's channel open while this half lives.
    _alive: mpsc::Sender<()>,
}

/// The writing half of a [`PipeStream`].
pub struct PipeWriteHalf {
    tx: SendHalf,
    shared: Arc<PipeShared>,
    chunk: usize,
    fin_sent: bool,
    failed: Option<Arc<HvsockError>>,
    _alive: mpsc::Sender<()>,
}

/// How a connection ended, as the [`PipeMonitor`] saw it.
#[derive(Debug, Clone)]
pub struct PipeSummary {
    /// The connection's label.
    pub label: String,
    /// Stream bytes received.
    pub bytes_in: u64,
    /// Stream bytes sent.
    pub bytes_out: u64,
    /// Whether the peer shut its direction down (FIN) before the end.
    pub fin_received: bool,
    /// Whether we sent our FIN.
    pub fin_sent: bool,
    /// The first error either half met, if any.
    pub error: Option<Arc<HvsockError>>,
}

/// Watches a [`PipeStream`] from the owner of its channel (the runtime's channel task): learns
/// when both halves are gone, and closes the connection when dropped or aborted (an offer
/// rescinded, the runtime stopping).
pub struct PipeMonitor {
    shared: Arc<PipeShared>,
    halves: mpsc::Receiver<()>,
}

impl PipeStream {
    /// Wraps an open pipe channel (either role) and returns the stream with its monitor. Keep
    /// the monitor for as long as the stream is in use: dropping it closes the connection.
    pub fn new(channel: Channel) -> (Self, PipeMonitor) {
        let label = channel.label().to_owned();
        let (rx, tx) = channel.into_split();
        let shared = Arc::new(PipeShared {
            label,
            bell: rx.doorbell().clone(),
            aborted: AtomicBool::new(false),
            fin_sent: AtomicBool::new(false),
            fin_received: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            first_error: Mutex::new(None),
        });
        let (alive, halves) = mpsc::channel(1);
        let chunk = send_chunk(tx.ring_data_len()).min(
            tx.max_payload_len()
                .saturating_sub(VMPIPE_HEADER_SIZE)
                .max(8),
        );
        let stream = PipeStream {
            read: PipeReadHalf {
                rx,
                shared: shared.clone(),
                stash: Vec::new(),
                stash_at: 0,
                eof: false,
                failed: None,
                _alive: alive.clone(),
            },
            write: PipeWriteHalf {
                tx,
                shared: shared.clone(),
                chunk,
                fin_sent: false,
                failed: None,
                _alive: alive,
            },
        };
        (stream, PipeMonitor { shared, halves })
    }

    /// The connection's label (service and endpoint).
    pub fn label(&self) -> &str {
        &self.read.shared.label
    }

    /// Splits the stream into halves that can be used concurrently from different tasks.
    pub fn into_split(self) -> (PipeReadHalf, PipeWriteHalf) {
        (self.read, self.write)
    }
}

impl PipeReadHalf {
    /// Bytes held in the read stash right now (the unread rest of one packet; at most
    /// [`HVS_MTU_SIZE`]).
    pub fn buffered(&self) -> usize {
        self.stash.len() - self.stash_at
    }

    fn fail(&mut self, e: HvsockError) -> Arc<HvsockError> {
        let e = self.shared.record(e);
        self.failed = Some(e.clone());
        e
    }

    fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.stash_at < self.stash.len() {
            let n = buf.remaining().min(self.stash.len() - self.stash_at);
            buf.put_slice(&self.stash[self.stash_at..self.stash_at + n]);
            self.stash_at += n;
            if self.stash_at == self.stash.len() {
                self.stash.clear();
                self.stash_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &self.failed {
            return Poll::Ready(Err(io_error(e)));
        }
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = self.shared.aborted_error() {
            self.failed = Some(e.clone());
            return Poll::Ready(Err(io_error(&e)));
        }
        let before = buf.filled().len();
        let label = &self.shared.label;
        let (stash, eof) = (&mut self.stash, &mut self.eof);
        let result = ready!(self.rx.poll_recv(cx, |packet: PacketRef<'_, '_>| {
            deliver(packet, label, buf, stash, eof)
        }));
        let delivered = buf.filled().len() - before + self.stash.len();
        self.shared
            .bytes_in
            .fetch_add(delivered as u64, Ordering::Relaxed);
        if self.eof {
            self.shared.fin_received.store(true, Ordering::SeqCst);
        }
        match result {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let e = self.fail(e);
                // Bytes copied before the failure are the caller's; the error comes next time.
                if buf.filled().len() > before || self.stash_at < self.stash.len() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io_error(&e)))
                }
            }
        }
    }
}

/// Hands one packet's data to the reader: into `buf` as far as it has room, the rest into the
/// stash. The header is copied out and parsed once; the data is copied out once.
fn deliver(
    packet: PacketRef<'_, '_>,
    label: &str,
    buf: &mut ReadBuf<'_>,
    stash: &mut Vec<u8>,
    eof: &mut bool,
) -> Result<Flow, HvsockError> {
    let meta = packet.meta();
    if meta.packet_type != PACKET_TYPE_DATA_INBAND {
        return Err(HvsockError::NotInband {
            channel: label.to_owned(),
            packet_type: meta.packet_type,
        });
    }
    let mut head = [0u8; VMPIPE_HEADER_SIZE];
    let head_len = meta.payload_len.min(VMPIPE_HEADER_SIZE);
    packet.copy_payload(0, &mut head[..head_len])?;
    let frame = parse_pipe_header(&head[..head_len], meta.payload_len).map_err(|source| {
        HvsockError::Protocol {
            channel: label.to_owned(),
            source,
        }
    })?;
    let len = match frame {
        PipeFrame::Shutdown => {
            *eof = true;
            return Ok(Flow::Stop);
        }
        PipeFrame::Data { len } => len,
    };
    let direct = len.min(buf.remaining());
    packet.copy_payload(VMPIPE_HEADER_SIZE, buf.initialize_unfilled_to(direct))?;
    buf.advance(direct);
    if direct < len {
        // `len - direct <= HVS_MTU_SIZE`: the stash never holds more than one packet's data.
        stash.resize(len - direct, 0);
        packet.copy_payload(VMPIPE_HEADER_SIZE + direct, stash)?;
        return Ok(Flow::Stop);
    }
    Ok(if buf.remaining() == 0 {
        Flow::Stop
    } else {
        Flow::Continue
    })
}

impl PipeWriteHalf {
    /// The most data bytes this half puts in one packet.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    fn check(&mut self) -> Result<(), Arc<HvsockError>> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if let Some(e) = self.shared.aborted_error() {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn fail(&mut self, e: ChannelError) -> io::Error {
        let e = self.shared.record(e.into());
        self.failed = Some(e.clone());
        io_error(&e)
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(io_error(&e)));
        }
        if self.fin_sent {
            let e = self.shared.record(HvsockError::WriteAfterShutdown {
                channel: self.shared.label.clone(),
            });
            return Poll::Ready(Err(io_error(&e)));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let chunk = self.chunk;
        let first = data.len().min(chunk);
        let min_packet = data.len().min(MIN_PARTIAL_WRITE).min(chunk);
        let result = ready!(self.tx.poll_send(cx, pipe_packet_len(first), |batch| {
            let mut written = 0usize;
            while written < data.len() {
                // A packet of n data bytes fits iff pipe_packet_len(n) < free, i.e. (free being
                // a multiple of 8) n <= free - pipe_packet_len(0) - 8.
                let room = batch.free().saturating_sub(pipe_packet_len(0) + 8);
                let left = data.len() - written;
                let n = left.min(chunk).min(room);
                if n == 0 || n < left.min(min_packet) {
                    break;
                }
                let Ok(header) = pipe_header(n) else { break };
                match batch.write(
                    PacketHeader::inband(0),
                    &[header.as_bytes(), &data[written..written + n]],
                ) {
                    Ok(()) => written += n,
                    Err(WriteError::Full { .. } | WriteError::TooLarge { .. }) => break,
                }
            }
            (written > 0).then_some(written)
        }));
        match result {
            Ok(n) => {
                self.shared.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(self.fail(e))),
        }
    }

    fn poll_shutdown_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = self.check() {
            return Poll::Ready(Err(io_error(&e)));
        }
        let result = ready!(self.tx.poll_send(cx, pipe_packet_len(0), write_fin));
        match result {
            Ok(()) => {
                self.fin_sent = true;
                self.shared.fin_sent.store(true, Ordering::SeqCst);
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(self.fail(e))),
        }
    }
}

fn write_fin(batch: &mut hvisd_ring::WriteBatch<'_, hvisd_ring::MappedRing>) -> Option<()> {
    let header = pipe_header(0).ok()?;
    batch
        .write(PacketHeader::inband(0), &[header.as_bytes()])
        .ok()
}

impl Drop for PipeWriteHalf {
    /// Like Linux's `close()`, a writer dropped without a shutdown sends its FIN if the ring has
    /// room for it right now (never waiting); the monitor then lingers for the peer.
    fn drop(&mut self) {
        if self.fin_sent || self.failed.is_some() || self.shared.aborted.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(Some(())) = self.tx.try_send(write_fin) {
            self.shared.fin_sent.store(true, Ordering::SeqCst);
        }
    }
}

impl PipeMonitor {
    /// Closes the connection from our side: both halves fail with [`HvsockError::Aborted`] from
    /// now on (a task parked in a read or write is woken).
    pub fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.bell.wake_all();
    }

    /// Resolves once both halves of the stream are dropped; if we sent our FIN and the peer has
    /// not closed the channel yet, lingers up to [`HVS_CLOSE_TIMEOUT`] for it (as Linux's
    /// `hvs_close_lock_held` does), so the peer can read what we wrote before the channel goes.
    pub async fn closed(&mut self) -> PipeSummary {
        while self.halves.recv().await.is_some() {}
        let shared = &self.shared;
        if shared.fin_sent.load(Ordering::SeqCst)
            && !shared.aborted.load(Ordering::SeqCst)
            && !shared.bell.is_closed()
        {
            let bell = shared.bell.clone();
            let _ = tokio::time::timeout(HVS_CLOSE_TIMEOUT, async move {
                loop {
                    let seen = bell.epoch();
                    let r = std::future::poll_fn(|cx| {
                        bell.poll_interrupt(cx, crate::doorbell::Half::Reader, seen)
                    })
                    .await;
                    if r.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        self.summary()
    }

    /// What the connection did so far.
    pub fn summary(&self) -> PipeSummary {
        let shared = &self.shared;
        PipeSummary {
            label: shared.label.clone(),
            bytes_in: shared.bytes_in.load(Ordering::Relaxed),
            bytes_out: shared.bytes_out.load(Ordering::Relaxed),
            fin_received: shared.fin_received.load(Ordering::SeqCst),
            fin_sent: shared.fin_sent.load(Ordering::SeqCst),
            error: shared
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Drop for PipeMonitor {
    fn drop(&mut self) {
        self.abort();
    }
}

impl AsyncRead for PipeReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_inner(cx, buf)
    }
}

impl AsyncWrite for PipeWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_inner(cx, buf)
    }

    /// Nothing to flush: a write returns once its bytes are in the ring.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends the FIN (a packet with `data_size` 0), waiting for ring space if needed.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_inner(cx)
    }
}

impl AsyncRead for PipeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for PipeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}
