//! The control socket between the core and a worker, seen from either end: length-prefixed
//! frames ([`hvisd_protocol::worker`]) over a non-blocking Unix stream socket.
//!
//! Made for a short round trip, since every provider call crosses it twice: the socket is
//! registered with the reactor for reads only (a stream registered for writes too wakes its
//! task each time the peer drains it: one spurious wake-up per message), frames are read through
//! a buffer (one `read` per frame, or one for several), and writes go straight to the socket,
//! waiting for room only in the rare case the peer has let its receive buffer fill.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use hvisd_protocol::worker::{FRAME_HEADER, MAX_FRAME, frame_len};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Bytes read from the socket at once (frames are usually far smaller).
const READ_CHUNK: usize = 64 * 1024;

/// The reading end: whole frames, each checked against [`MAX_FRAME`] before its bytes are
/// buffered.
pub struct FrameReader {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing end: whole frames, one writer at a time.
pub struct FrameWriter {
    fd: OwnedFd,
    lock: tokio::sync::Mutex<()>,
}

/// Splits a connected stream socket into its two ends (the socket is made non-blocking).
/// Must be called inside a tokio runtime.
pub fn split(socket: OwnedFd) -> io::Result<(FrameReader, FrameWriter)> {
    rustix::io::ioctl_fionbio(&socket, true)?;
    let writer = rustix::io::fcntl_dupfd_cloexec(&socket, 0)?;
    let fd = hvisd_sys::async_fd::register(socket, Interest::READABLE)?;
    Ok((
        FrameReader {
            fd,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        },
        FrameWriter {
            fd: writer,
            lock: tokio::sync::Mutex::new(()),
        },
    ))
}

impl FrameReader {
    /// The next frame's payload; `None` at a clean end of stream (between frames). A frame
    /// announcing more than [`MAX_FRAME`], or a stream ending inside a frame, is an error.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(payload) = self.take()? {
                return Ok(Some(payload));
            }
            if !self.fill().await? {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside a frame",
                    ))
                };
            }
        }
    }

    /// A whole frame from the buffer, if there is one; makes room for the rest otherwise.
    fn take(&mut self) -> io::Result<Option<Vec<u8>>> {
        let have = self.end - self.start;
        if have < FRAME_HEADER {
            self.make_room(FRAME_HEADER);
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER];
        header.copy_from_slice(&self.buf[self.start..self.start + FRAME_HEADER]);
        let len = frame_len(header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let whole = FRAME_HEADER + len;
        if have < whole {
            self.make_room(whole);
            return Ok(None);
        }
        let payload = self.buf[self.start + FRAME_HEADER..self.start + whole].to_vec();
        self.start += whole;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // A buffer grown for one large frame goes back to its usual size once empty.
            if self.buf.len() > READ_CHUNK {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
        Ok(Some(payload))
    }

    /// Ensures `whole` bytes from `start` fit in the buffer (at most a header and [`MAX_FRAME`]).
    fn make_room(&mut self, whole: usize) {
        if self.start + whole <= self.buf.len() {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if whole > self.buf.len() {
            debug_assert!(whole <= FRAME_HEADER + MAX_FRAME);
            self.buf.resize(whole, 0);
        }
    }

    /// Reads what the socket has; `false` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        loop {
            let mut ready = self.fd.readable().await?;
            let room = &mut self.buf[self.end..];
            let asked = room.len();
            match rustix::io::read(ready.get_inner(), room) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    // Fewer bytes than asked for: the socket is drained, so the next read would
                    // only say EAGAIN. (Readiness set by a newer event is kept.)
                    if n < asked {
                        ready.clear_ready();
                    }
                    return Ok(true);
                }
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl FrameWriter {
    /// Writes `frame` (header included) whole; frames of concurrent callers never interleave.
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        let _turn = self.lock.lock().await;
        let mut rest = frame;
        let mut waiter: Option<AsyncFd<OwnedFd>> = None;
        while !rest.is_empty() {
            match rustix::net::send(
                &self.fd,
                rest,
                rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
            ) {
                Ok(n) => rest = &rest[n..],
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    // The peer's buffer is full: wait for room on a registration of our own,
                    // made only now and dropped with this frame.
                    if waiter.is_none() {
                        let dup = rustix::io::fcntl_dupfd_cloexec(self.fd.as_fd(), 0)?;
                        waiter = Some(hvisd_sys::async_fd::register(dup, Interest::WRITABLE)?);
                    }
                    if let Some(w) = &waiter {
                        w.writable().await?.clear_ready();
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_protocol::worker::{ToCore, decode_to_core, encode_to_core};

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn frames_cross_whole_in_order_small_and_large() {
        let (a, b) = pair();
        let (_ra, wa) = split(a).unwrap();
        let (mut rb, _wb) = split(b).unwrap();
        let big = "x".repeat(3 << 20);
        let messages: Vec<ToCore> = (0..50)
            .map(|i| ToCore::InitFailed {
                reason: if i % 10 == 3 {
                    big.clone()
                } else {
                    format!("m{i}")
                },
            })
            .collect();
        let sent = messages.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                wa.send(&encode_to_core(m)).await.unwrap();
            }
            wa
        });
        for m in &messages {
            let payload = rb.next().await.unwrap().unwrap();
            assert_eq!(&decode_to_core(&payload).unwrap(), m);
        }
        drop(writer.await.unwrap());
        drop(_ra);
        assert!(rb.next().await.unwrap().is_none(), "clean end of stream");
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_and_a_cut_frame_is_an_error() {
        let (a, b) = pair();
        let (_ra, wa) = split(a).unwrap();
        let (mut rb, _wb) = split(b).unwrap();
        wa.send(&((MAX_FRAME + 1) as u32).to_le_bytes())
            .await
            .unwrap();
        assert_eq!(
            rb.next().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let (a, b) = pair();
        let (ra, wa) = split(a).unwrap();
        let (mut rb, _wb) = split(b).unwrap();
        wa.send(&[10, 0, 0, 0, 1, 2]).await.unwrap();
        drop((ra, wa));
        assert_eq!(
            rb.next().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
