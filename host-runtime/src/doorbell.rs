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
        let fd = seqpacket_socket()?;
        let addr = SocketAddrUnix::new(path)?;
        // A connect on a Unix socket completes at once or fails (EAGAIN when the backlog is full,
        // which the caller treats as "try the offer again later").
        rustix::net::connect(&fd, &addr)?;
        Self::new(fd, DoorbellKind::Seqpacket)
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
