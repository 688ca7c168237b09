//! The stream socket between the core and a worker: how hvsock connections cross into the worker.
//!
//! The core keeps every hvsock connection (its ring, its channel); what the plugin reads and
//! writes is a `SOCK_STREAM` Unix socketpair per connection, whose far end the core sends to the
//! worker over a dedicated `SOCK_SEQPACKET` socket with `SCM_RIGHTS`, each descriptor in a
//! message of its own carrying the connection's id ([`wire::StreamTag`]). The core pumps bytes
//! between the connection and its end of the pair, so the worker holds nothing but a socket
//! end: no channel, no ring, no file. Control frames stay on the control socket; a call or an
//! import reply names the connection id, whose descriptor was sent before it.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvisd_protocol::worker as wire;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Descriptors received and not yet claimed, at most; past it a new one is closed at once (the
/// core never has more connections in flight than the plugin's limit).
const MAX_UNCLAIMED: usize = 1024;

/// A `SOCK_SEQPACKET` socketpair for a worker's streams: (core end, worker end), both
/// close-on-exec (the worker's end is handed to the child explicitly).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// A connected `SOCK_STREAM` pair for one connection: (core end, worker end), non-blocking,
/// each end's send buffer set to `buffer / 2` bytes (so the bytes in flight between core and
/// worker are bounded by about `buffer` either way; the kernel rounds and doubles the figure).
pub fn connection_pair(buffer: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )?;
    for fd in [&a, &b] {
        rustix::net::sockopt::set_socket_send_buffer_size(fd, (buffer / 2).max(4096))?;
    }
    Ok((a, b))
}

/// The core's end: sends each connection's descriptor.
pub struct StreamSender {
    socket: AsyncFd<OwnedFd>,
}

impl StreamSender {
    /// Wraps the core's end (registered with the current tokio runtime).
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&socket, true)?;
        Ok(Self {
            socket: hvisd_sys::async_fd::register(socket, tokio::io::Interest::WRITABLE)?,
        })
    }

    /// Sends `fd` tagged `conn`. Fails if the worker's end is closed.
    pub async fn send(&self, conn: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        let tag = wire::stream_tag(conn);
        loop {
            let mut guard = self.socket.writable().await?;
            let sent = guard.try_io(|s| {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [fd];
                control.push(SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(
                    s.get_ref(),
                    &[io::IoSlice::new(&tag)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The worker's end: receives descriptors and hands each to the call or import naming its id.
pub struct StreamInbox {
    waiting: Mutex<HashMap<u64, OwnedFd>>,
    arrived: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl StreamInbox {
    /// Starts receiving on the worker's end (a task on the current tokio runtime).
    pub fn start(socket: OwnedFd) -> io::Result<Arc<Self>> {
        rustix::io::ioctl_fionbio(&socket, true)?;
        let socket = hvisd_sys::async_fd::register(socket, tokio::io::Interest::READABLE)?;
        let inbox = Arc::new(Self {
            waiting: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let me = inbox.clone();
        tokio::spawn(async move {
            let _ = me.receive(socket).await;
            me.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            me.arrived.notify_waiters();
        });
        Ok(inbox)
    }

    async fn receive(&self, socket: AsyncFd<OwnedFd>) -> io::Result<()> {
        loop {
            let mut guard = socket.readable().await?;
            let got = guard.try_io(|s| {
                let mut tag: wire::StreamTag = [0; 8];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    s.get_ref(),
                    &mut [io::IoSliceMut::new(&mut tag)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds: Vec<OwnedFd> = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = m {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, tag, fds))
            });
            let (bytes, tag, mut fds) = match got {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if bytes == 0 && fds.is_empty() {
                return Ok(()); // the core closed its end
            }
            // Exactly one descriptor with an 8-byte tag; anything else is closed unread.
            if bytes != 8 || fds.len() != 1 {
                continue;
            }
            let Some(fd) = fds.pop() else { continue };
            let conn = u64::from_le_bytes(tag);
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if waiting.len() < MAX_UNCLAIMED {
                waiting.insert(conn, fd);
            }
            drop(waiting);
            self.arrived.notify_waiters();
        }
    }

    /// The descriptor tagged `conn`, waiting at most `timeout` for it.
    pub async fn take(&self, conn: u64, timeout: Duration) -> Option<OwnedFd> {
        let wait = async {
            loop {
                let notified = self.arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(fd) = self
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&conn)
                {
                    return Some(fd);
                }
                if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

/// A connection's socket end as a tokio stream.
pub fn tokio_stream(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
}

/// Whether `fd` is a socket of this process's (a helper for tests).
pub fn is_socket(fd: &impl AsFd) -> bool {
    rustix::fs::fstat(fd)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn descriptors_arrive_under_their_tags_in_any_order() {
        let (core, worker) = socketpair().unwrap();
        let sender = StreamSender::new(core).unwrap();
        let inbox = StreamInbox::start(worker).unwrap();
        let (a_core, a_worker) = connection_pair(64 << 10).unwrap();
        let (b_core, b_worker) = connection_pair(64 << 10).unwrap();
        sender.send(7, a_worker.as_fd()).await.unwrap();
        sender.send(9, b_worker.as_fd()).await.unwrap();
        drop((a_worker, b_worker));
        let b = inbox.take(9, Duration::from_secs(5)).await.unwrap();
        let a = inbox.take(7, Duration::from_secs(5)).await.unwrap();
        assert!(is_socket(&a) && is_socket(&b));
        assert!(inbox.take(8, Duration::from_millis(50)).await.is_none());
        // Each received end talks to its own core end.
        let mut a = tokio_stream(a).unwrap();
        let mut a_core = tokio_stream(a_core).unwrap();
        let _b_core = b_core;
        a.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        a_core.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        drop(b);
    }

    #[tokio::test]
    async fn a_closed_core_end_ends_the_waits() {
        let (core, worker) = socketpair().unwrap();
        let inbox = StreamInbox::start(worker).unwrap();
        drop(core);
        let started = std::time::Instant::now();
        assert!(inbox.take(1, Duration::from_secs(5)).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn the_send_buffer_bounds_what_a_stalled_reader_lets_in() {
        let (core, _worker) = connection_pair(64 << 10).unwrap();
        let mut core = tokio_stream(core).unwrap();
        let chunk = vec![0u8; 4096];
        let mut written = 0usize;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), core.write(&chunk)).await
        {
            written += n;
            assert!(written < 4 << 20, "a stalled reader let in {written} bytes");
        }
        assert!(written > 0);
    }
}
