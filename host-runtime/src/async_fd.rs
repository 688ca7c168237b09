//! Registering owned descriptors with tokio's reactor: the runtime's one `unsafe` block.

use std::io;
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;

/// Registers `fd` (non-blocking) with the current tokio reactor.
#[allow(unsafe_code)]
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: tokio requires that the descriptor stays open and refers to the same open file
    // description for as long as the AsyncFd lives. An OwnedFd is closed only when dropped, and the
    // AsyncFd owns it, so it cannot be closed or replaced behind the reactor's back; OwnedFd's
    // as_raw_fd always returns the same number.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
