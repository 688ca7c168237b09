//! Registering owned descriptors with tokio's reactor.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers a non-blocking `fd` with the current tokio reactor for `interest`.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: tokio requires that the descriptor stays open and names the same open file
    // description for as long as the AsyncFd lives. The AsyncFd takes ownership of the OwnedFd,
    // which is closed only when dropped, so it cannot be closed or replaced behind the reactor's
    // back, and OwnedFd::as_raw_fd always returns the same number.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// Registers `fd` for reads and writes.
pub fn register_rw(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    register(fd, Interest::READABLE | Interest::WRITABLE)
}
