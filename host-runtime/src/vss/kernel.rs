//! VSS on the kernel's `/dev/vmbus/hv_vss`: hvisd as a drop-in `hv_vss_daemon` (the kernel's
//! `hv_snapshot.c` speaks VMBus; hvisd answers its daemon protocol). As for KVP, a
//! `SOCK_SEQPACKET` socket path stands in for the device in tests.
//!
//! Protocol (`hvisd_protocol::vss::daemon`): write a 12-byte REGISTER1 message; read the kernel's
//! 4-byte version; then read 12-byte requests and answer each with the same bytes, the status
//! written over the first four. A read or write of another size, or a reply the kernel refuses
//! (`EINVAL`, as after its fabricated pre-hibernation THAW), reopens the device, as the C daemon
//! does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hvisd_kvp::kernel::{KernelTransportError, SessionEnd, open_device, read_msg, write_msg};
use hvisd_protocol::ic::status::HV_E_FAIL;
use hvisd_protocol::vss::VSS_MSG_SIZE;
use hvisd_protocol::vss::daemon::{self, VERSION_REPLY_SIZE};

use super::VssCore;

/// Runs the daemon protocol on `path` until the peer closes a socket or `stop` turns true.
pub async fn run_kernel_transport(
    core: Arc<VssCore>,
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

/// Serves one open, non-blocking descriptor until the peer closes, `stop`, or a reason to
/// reopen. A request already read is answered first.
pub async fn serve_fd_until(
    core: Arc<VssCore>,
    fd: std::os::fd::OwnedFd,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<SessionEnd, KernelTransportError> {
    let fd = hvisd_sys::async_fd::register_rw(fd).map_err(|source| KernelTransportError::Io {
        what: "registering the descriptor",
        source,
    })?;
    if write_msg(&fd, &daemon::build_register1()).await? != VSS_MSG_SIZE {
        tracing::error!("VSS kernel transport: registration write was short; reopening");
        return Ok(SessionEnd::Reopen);
    }
    let mut buf = [0u8; VSS_MSG_SIZE];
    let n = tokio::select! {
        n = read_msg(&fd, &mut buf) => n?,
        _ = stop.wait_for(|stop| *stop) => return Ok(SessionEnd::Stopped),
    };
    if n == 0 {
        return Ok(SessionEnd::PeerClosed);
    }
    match daemon::parse_version_reply(&buf[..n]) {
        Ok(version) => tracing::info!(version, "VSS kernel transport: registered"),
        Err(e) => {
            tracing::error!(bytes = n, "VSS kernel transport: {e}; reopening");
            return Ok(SessionEnd::Reopen);
        }
    }
    debug_assert_eq!(VERSION_REPLY_SIZE, 4);
    loop {
        let n = tokio::select! {
            n = read_msg(&fd, &mut buf) => n?,
            _ = stop.wait_for(|stop| *stop) => return Ok(SessionEnd::Stopped),
        };
        if n == 0 {
            tracing::info!("VSS kernel transport: peer closed");
            return Ok(SessionEnd::PeerClosed);
        }
        let request = match daemon::parse_request(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(bytes = n, "VSS kernel transport: {e}; reopening");
                return Ok(SessionEnd::Reopen);
            }
        };
        let status = core.handle(request.operation).await;
        let reply = daemon::build_reply(&buf, status)
            .or_else(|_| daemon::build_reply(&buf, HV_E_FAIL))
            .unwrap_or(buf);
        match write_msg(&fd, &reply).await {
            Ok(VSS_MSG_SIZE) => {}
            Ok(_) => {
                tracing::error!("VSS kernel transport: short write; reopening");
                return Ok(SessionEnd::Reopen);
            }
            Err(KernelTransportError::Io { source, .. })
                if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                // The kernel no longer waits for this answer (its timeout, or the THAW it makes
                // up before hibernating): start over, as hv_vss_daemon does.
                tracing::warn!("VSS kernel transport: the kernel refused the reply; reopening");
                return Ok(SessionEnd::Reopen);
            }
            Err(e) => return Err(e),
        }
    }
}
