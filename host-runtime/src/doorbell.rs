//! Doorbells: how one side of a channel interrupts the other.
//!
//! The shm transport uses a connected Unix `SOCK_SEQPACKET` socket, one 4-byte message per interrupt;
//! `uio_hv_generic` uses `/dev/uioN`, where a 4-byte read waits for the host's interrupt and a 4-byte
//! write signals the host. Both are a file descriptor with the same read/write shape, so one type over
//! `AsyncFd` serves both; what differs is only how the descriptor is obtained.

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::unix::AsyncFd;

/// Why a doorbell stopped working.
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    /// The peer closed its end: the channel is gone.
    #[error("the peer closed the doorbell (channel closed)")]
    Closed,
    /// Any other I/O error on the descriptor.
    #[error("doorbell I/O: {0}")]
    Io(#[from] io::Error),
}

/// What kind of descriptor a doorbell sits on; decides how a read and a write look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellKind {
    /// shm: a `SOCK_SEQPACKET` socket. End of file means the peer closed the channel.
    Seqpacket,
    /// uio: `/dev/uioN` (or, in tests, a socket standing in for it). Reads return the interrupt count.
    Uio,
}

/// One side's doorbell.
#[derive(Debug)]
pub struct Doorbell {
    fd: AsyncFd<OwnedFd>,
    kind: DoorbellKind,
}

/// At most this many queued interrupts are consumed by one wait.
const MAX_COALESCED: usize = 64;

/// The 4-byte interrupt message. The value is ignored by the receiver; uio wants a non-zero value,
/// which also re-enables the channel's interrupt in `uio_hv_generic`.
const RING_MESSAGE: [u8; 4] = 1u32.to_le_bytes();

impl Doorbell {
    /// Wraps a non-blocking descriptor. Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd, kind: DoorbellKind) -> io::Result<Self> {
        Ok(Self {
            fd: hvisd_sys::async_fd::register_rw(fd)?,
            kind,
        })
    }

    /// Connects to a host's `doorbell` socket (shm), one connection per channel open.
    pub fn connect(path: &Path) -> io::Result<Self> {
        Self::new(connect_seqpacket(path)?, DoorbellKind::Seqpacket)
    }

    /// Interrupts the peer. Never blocks: when the socket buffer is full the peer already has
    /// interrupts it has not read, and it re-checks the rings after reading any of them, so dropping
    /// this one loses nothing.
    pub fn signal(&self) -> Result<(), DoorbellError> {
        let fd = self.fd.get_ref();
        let result = match self.kind {
            DoorbellKind::Seqpacket => {
                rustix::net::send(fd, &RING_MESSAGE, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)
            }
            DoorbellKind::Uio => rustix::io::write(fd, &RING_MESSAGE),
        };
        match result {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(
                rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET | rustix::io::Errno::NOTCONN,
            ) => Err(DoorbellError::Closed),
            Err(e) => Err(DoorbellError::Io(e.into())),
        }
    }

    /// Waits for at least one interrupt from the peer and consumes every one already queued.
    /// Spurious wake-ups are possible; callers always re-check the rings.
    pub async fn wait(&self) -> Result<(), DoorbellError> {
        loop {
            let mut guard = self.fd.readable().await?;
            match self.read_one() {
                Ok(()) => {
                    // Coalesce: one look at the rings serves every interrupt already queued.
                    // Bounded, so a peer that signals without pause cannot keep us here.
                    for _ in 0..MAX_COALESCED {
                        if self.read_one().is_err() {
                            break;
                        }
                    }
                    return Ok(());
                }
                Err(DoorbellError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready()
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Poll form of [`Doorbell::wait`]: consumes every interrupt already queued (up to a bound)
    /// and returns ready if there was at least one; pending (with `cx` woken on the next) if none.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(DoorbellError::Io(e))),
                Poll::Pending => return Poll::Pending,
            };
            match self.read_one() {
                Ok(()) => {
                    for _ in 0..MAX_COALESCED {
                        if self.read_one().is_err() {
                            break;
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(DoorbellError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready()
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn read_one(&self) -> Result<(), DoorbellError> {
        let mut buf = [0u8; 16];
        let fd = self.fd.get_ref();
        let read = match self.kind {
            DoorbellKind::Seqpacket => {
                rustix::net::recv(fd, &mut buf[..], RecvFlags::DONTWAIT).map(|(_, n)| n)
            }
            DoorbellKind::Uio => rustix::io::read(fd, &mut buf[..4]),
        };
        match read {
            // A zero-length read is end of file: the peer closed its end.
            Ok(0) => Err(DoorbellError::Closed),
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::CONNRESET) => Err(DoorbellError::Closed),
            Err(e) => Err(DoorbellError::Io(e.into())),
        }
    }
}

/// Which half of a split channel is waiting on a [`SharedDoorbell`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// The half that reads the incoming ring (waits for packets).
    Reader = 0,
    /// The half that writes the outgoing ring (waits for space).
    Writer = 1,
}

/// One doorbell serving the two halves of a split channel, each possibly in its own task.
///
/// An incoming interrupt may mean "packets for the reader" or "space for the writer", and the
/// socket delivers it once: whichever half consumes it must make the other look at its ring too.
/// Every consumed batch of interrupts bumps an `epoch`; a half reads the epoch *before* its last
/// look at the ring, and [`SharedDoorbell::poll_interrupt`] returns at once if the epoch moved
/// since, so an interrupt consumed by the other half between the look and the sleep is never
/// lost. The socket's readiness is registered with a waker that wakes both halves (a
/// descriptor keeps one reader waker; a half-specific one could strand the other half when its
/// task stops polling).
#[derive(Debug)]
pub struct SharedDoorbell {
    bell: Doorbell,
    epoch: AtomicU64,
    closed: AtomicBool,
    fanout: Arc<Fanout>,
}

/// The wakers of the halves waiting on a [`SharedDoorbell`]; itself a waker that wakes them all.
#[derive(Debug, Default)]
struct Fanout {
    waiting: Mutex<[Option<Waker>; 2]>,
}

impl Fanout {
    fn register(&self, half: Half, waker: &Waker) {
        let mut slots = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match &mut slots[half as usize] {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }

    fn wake_waiting(&self, except: Option<Half>) {
        let taken: Vec<Waker> = {
            let mut slots = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| except.is_none_or(|h| h as usize != *i))
                .filter_map(|(_, slot)| slot.take())
                .collect()
        };
        // Woken outside the lock: a waker may run code that registers again.
        taken.into_iter().for_each(Waker::wake);
    }
}

impl Wake for Fanout {
    fn wake(self: Arc<Self>) {
        self.wake_waiting(None);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_waiting(None);
    }
}

impl SharedDoorbell {
    /// Shares `bell` between the two halves of a channel.
    pub fn new(bell: Doorbell) -> Self {
        Self {
            bell,
            epoch: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            fanout: Arc::default(),
        }
    }

    /// Interrupts the peer (see [`Doorbell::signal`]).
    pub fn signal(&self) -> Result<(), DoorbellError> {
        self.bell.signal()
    }

    /// The interrupt epoch: read it before the last look at the ring, pass it to
    /// [`SharedDoorbell::poll_interrupt`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether the peer has closed the doorbell.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Ready once an interrupt has been consumed after `seen` was read (by either half), or
    /// with [`DoorbellError::Closed`] once the peer closed the doorbell. Spurious readiness is
    /// possible: the caller re-checks its ring.
    pub fn poll_interrupt(
        &self,
        cx: &mut Context<'_>,
        half: Half,
        seen: u64,
    ) -> Poll<Result<(), DoorbellError>> {
        if self.epoch() != seen {
            return Poll::Ready(Ok(()));
        }
        if self.is_closed() {
            return Poll::Ready(Err(DoorbellError::Closed));
        }
        self.fanout.register(half, cx.waker());
        // The other half may have consumed an interrupt between the first check and the
        // registration; it bumps the epoch before it wakes the registered wakers, so one of the
        // two sees the other.
        if self.epoch() != seen {
            return Poll::Ready(Ok(()));
        }
        let waker = Waker::from(self.fanout.clone());
        let mut fanout_cx = Context::from_waker(&waker);
        match self.bell.poll_wait(&mut fanout_cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if matches!(result, Err(DoorbellError::Closed)) {
                    self.closed.store(true, Ordering::SeqCst);
                }
                self.epoch.fetch_add(1, Ordering::SeqCst);
                self.fanout.wake_waiting(Some(half));
                Poll::Ready(result)
            }
        }
    }

    /// Wakes both halves (they re-check their rings and any local state, e.g. a close
    /// requested by the runtime).
    pub fn wake_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.fanout.wake_waiting(None);
    }
}

/// A listening `SOCK_SEQPACKET` socket: the host's `doorbell` and `control` endpoints.
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketListener {
    /// Binds and listens on `path` (which must not exist yet).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket_socket()?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        rustix::net::listen(&fd, 16)?;
        Ok(Self {
            fd: hvisd_sys::async_fd::register_rw(fd)?,
        })
    }

    /// Accepts one connection, as a non-blocking descriptor.
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            match rustix::net::accept_with(
                self.fd.get_ref(),
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => return Ok(fd),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A connected pair of non-blocking `SOCK_SEQPACKET` sockets (tests, benchmarks, in-process channels).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Connects a non-blocking `SOCK_SEQPACKET` socket to `path` (a host's `doorbell` or `control`).
/// A connect on a Unix socket completes at once or fails (EAGAIN when the backlog is full,
/// which callers treat as "try again later").
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interrupts_are_delivered_and_coalesced() {
        let (a, b) = seqpacket_pair().unwrap();
        let (a, b) = (
            Doorbell::new(a, DoorbellKind::Seqpacket).unwrap(),
            Doorbell::new(b, DoorbellKind::Seqpacket).unwrap(),
        );
        for _ in 0..5 {
            a.signal().unwrap();
        }
        b.wait().await.unwrap();
        // All five were consumed by one wait: a second wait must block.
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), b.wait()).await;
        assert!(second.is_err(), "queued interrupts were not coalesced");
    }

    #[tokio::test]
    async fn peer_close_is_reported_as_closed() {
        let (a, b) = seqpacket_pair().unwrap();
        let b = Doorbell::new(b, DoorbellKind::Seqpacket).unwrap();
        drop(a);
        assert!(matches!(b.wait().await, Err(DoorbellError::Closed)));
        assert!(matches!(b.signal(), Err(DoorbellError::Closed)));
    }

    #[tokio::test]
    async fn listener_accepts_a_connecting_guest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doorbell");
        let listener = SeqpacketListener::bind(&path).unwrap();
        let guest = Doorbell::connect(&path).unwrap();
        let host =
            Doorbell::new(listener.accept().await.unwrap(), DoorbellKind::Seqpacket).unwrap();
        guest.signal().unwrap();
        host.wait().await.unwrap();
        host.signal().unwrap();
        guest.wait().await.unwrap();
    }

    #[tokio::test]
    async fn an_interrupt_consumed_by_one_half_wakes_the_other() {
        use std::future::poll_fn;
        let (a, b) = seqpacket_pair().unwrap();
        let a = Doorbell::new(a, DoorbellKind::Seqpacket).unwrap();
        let shared = Arc::new(SharedDoorbell::new(
            Doorbell::new(b, DoorbellKind::Seqpacket).unwrap(),
        ));
        let seen = shared.epoch();
        let reader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                poll_fn(|cx| shared.poll_interrupt(cx, Half::Reader, seen)).await
            })
        };
        let writer = {
            let shared = shared.clone();
            tokio::spawn(async move {
                poll_fn(|cx| shared.poll_interrupt(cx, Half::Writer, seen)).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        a.signal().unwrap();
        let timeout = std::time::Duration::from_secs(5);
        tokio::time::timeout(timeout, reader)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(timeout, writer)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_ne!(shared.epoch(), seen);
        drop(a);
        let seen = shared.epoch();
        let closed = poll_fn(|cx| shared.poll_interrupt(cx, Half::Reader, seen)).await;
        assert!(matches!(closed, Err(DoorbellError::Closed)));
        assert!(shared.is_closed());
    }

    #[tokio::test]
    async fn uio_kind_reads_and_writes_four_bytes() {
        // A stream socket stands in for /dev/uioN: 4-byte reads and writes, as uio_hv_generic does.
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let a = Doorbell::new(a, DoorbellKind::Uio).unwrap();
        let b = Doorbell::new(b, DoorbellKind::Uio).unwrap();
        a.signal().unwrap();
        b.wait().await.unwrap();
    }
}
