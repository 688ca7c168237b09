//! The kernel transport: hvisd as a drop-in `hv_kvp_daemon` on `/dev/vmbus/hv_kvp`.
//!
//! The device path comes from configuration. If the path is a Unix socket, hvisd connects a
//! `SOCK_SEQPACKET` socket to it instead of opening it: one message per read and write, exactly the
//! char device's framing, so tests and the simulator can play the kernel without Hyper-V.
//!
//! Protocol, as the C daemon runs it: write a 7432-byte message with operation `REGISTER1`; then
//! for every message read: while still in the handshake, a `REGISTER1` message carries the kernel's
//! version string (kept as `IntegrationServicesVersion`) and is not answered; anything else is
//! answered by one 7432-byte write. A read of another size makes the C daemon reopen the device;
//! hvisd does the same (after a short pause). End of file on a socket ends the session.
//!
//! [`open_device`], [`read_msg`] and [`write_msg`] are the `hv_utils_transport` device plumbing
//! the VSS transport uses too.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hvisd_protocol::kvp::{KvpOperation, MAX_KEY_SIZE};
use hvisd_protocol::kvp_daemon::{self as dm, DAEMON_MSG_SIZE, layout};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;

use crate::core::KvpCore;

/// Why the kernel transport stopped.
#[derive(Debug, thiserror::Error)]
pub enum KernelTransportError {
    /// The device or socket could not be opened.
    #[error("kernel transport: cannot open {path}: {source}")]
    Open {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("kernel transport: {what} failed: {source}")]
    Io {
        /// "read" or "write".
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the device, or connects a `SOCK_SEQPACKET` socket if `path` is a socket. Non-blocking.
pub fn open_device(path: &Path) -> Result<OwnedFd, KernelTransportError> {
    let err = |source: std::io::Error| KernelTransportError::Open {
        path: path.to_path_buf(),
        source,
    };
    let st = rustix::fs::stat(path).map_err(|e| err(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Socket {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| err(e.into()))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return Err(err(e.into())),
        }
        Ok(fd)
    } else {
        rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| err(e.into()))
    }
}

/// Runs the daemon protocol on `path` until the peer closes a socket (`Ok`), `stop` turns true
/// (`Ok`, after the request in progress is answered), or a fatal error. Reopens the device after a
/// wrong-sized read, as `hv_kvp_daemon` does.
pub async fn run_kernel_transport(
    core: Arc<KvpCore>,
    path: &Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), KernelTransportError> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let fd = open_device(path)?;
        match serve_fd_until(core.clone(), fd, &mut stop).await? {
            SessionEnd::PeerClosed | SessionEnd::Stopped => return Ok(()),
            SessionEnd::Reopen => tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
            },
        }
    }
}

/// How a session on one open descriptor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// End of file: the peer closed (socket) or the device went away.
    PeerClosed,
    /// A wrong-sized read or write: reopen, as the C daemon does.
    Reopen,
    /// The runtime is stopping (no request was in progress).
    Stopped,
}

/// Serves one already-open descriptor (device, connected socket, or one end of a socketpair):
/// registers, then answers requests. The descriptor must be non-blocking.
pub async fn serve_fd(core: Arc<KvpCore>, fd: OwnedFd) -> Result<SessionEnd, KernelTransportError> {
    let (_keep, mut never) = tokio::sync::watch::channel(false);
    serve_fd_until(core, fd, &mut never).await
}

/// [`serve_fd`] until `stop` turns true; a request already read is answered first.
pub async fn serve_fd_until(
    core: Arc<KvpCore>,
    fd: OwnedFd,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<SessionEnd, KernelTransportError> {
    let fd = hvisd_sys::async_fd::register_rw(fd).map_err(|source| KernelTransportError::Io {
        what: "registering the descriptor",
        source,
    })?;
    let register = dm::build_register1();
    if write_msg(&fd, &register[..]).await? != DAEMON_MSG_SIZE {
        tracing::error!("KVP kernel transport: registration write was short");
        return Ok(SessionEnd::Reopen);
    }
    let mut in_handshake = true;
    let mut msg = dm::zeroed();
    loop {
        let n = tokio::select! {
            n = read_msg(&fd, &mut msg[..]) => n?,
            _ = stop.wait_for(|stop| *stop) => return Ok(SessionEnd::Stopped),
        };
        if n == 0 {
            tracing::info!("KVP kernel transport: peer closed");
            return Ok(SessionEnd::PeerClosed);
        }
        if n != DAEMON_MSG_SIZE {
            tracing::error!(
                bytes = n,
                "KVP kernel transport: read of {n} bytes, messages are {DAEMON_MSG_SIZE}; reopening"
            );
            return Ok(SessionEnd::Reopen);
        }
        if in_handshake && msg[layout::OPERATION] == KvpOperation::REGISTER1.0 {
            in_handshake = false;
            let version =
                dm::cstr(&msg[layout::REGISTER_VERSION..layout::REGISTER_VERSION + MAX_KEY_SIZE])
                    .to_vec();
            tracing::info!(version = %String::from_utf8_lossy(&version), "KVP LIC version");
            core.set_integration_services_version(&version);
            continue;
        }
        core.execute(&mut msg).await;
        if write_msg(&fd, &msg[..]).await? != DAEMON_MSG_SIZE {
            tracing::error!("KVP kernel transport: short write; reopening");
            return Ok(SessionEnd::Reopen);
        }
    }
}

/// Reads one message from the device (or seqpacket socket); 0 at end of file or reset. Shared
/// with the VSS transport (the same `hv_utils_transport` device plumbing).
pub async fn read_msg(
    fd: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
) -> Result<usize, KernelTransportError> {
    loop {
        let mut guard = fd
            .readable()
            .await
            .map_err(|source| KernelTransportError::Io {
                what: "read",
                source,
            })?;
        match guard.try_io(|inner| {
            rustix::io::read(inner.get_ref(), &mut *buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::CONNRESET.raw_os_error()) => {
                return Ok(0);
            }
            Ok(Err(source)) => {
                return Err(KernelTransportError::Io {
                    what: "read",
                    source,
                });
            }
            Err(_would_block) => continue,
        }
    }
}

/// Writes one message whole; returns the bytes the device took.
pub async fn write_msg(fd: &AsyncFd<OwnedFd>, buf: &[u8]) -> Result<usize, KernelTransportError> {
    loop {
        let mut guard = fd
            .writable()
            .await
            .map_err(|source| KernelTransportError::Io {
                what: "write",
                source,
            })?;
        match guard
            .try_io(|inner| rustix::io::write(inner.get_ref(), buf).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(source)) => {
                return Err(KernelTransportError::Io {
                    what: "write",
                    source,
                });
            }
            Err(_would_block) => continue,
        }
    }
}
