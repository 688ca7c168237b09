//! systemd's readiness protocol (`sd_notify(3)`): under `Type=notify` the service manager counts
//! the daemon as started only once it sends `READY=1` to the datagram socket named by
//! `$NOTIFY_SOCKET`, and `STOPPING=1` tells it a stop is under way.
//!
//! A few lines over the standard library's `UnixDatagram` instead of a crate: the protocol is one
//! datagram of text to a path or an abstract address, and this keeps the privileged daemon's
//! dependency tree as it is. Without `$NOTIFY_SOCKET` (not started by systemd, or another
//! `Type=`) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Start-up finished: the config is valid, plugins are loaded, the transports start.
pub const READY: &str = "READY=1";
/// A stop signal arrived; the daemon is shutting down.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` to the service manager if it asked for notifications; returns whether it did.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to `socket`: an absolute path, or `@name` for an abstract
/// address (what `$NOTIFY_SOCKET` holds).
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = match socket.as_bytes().split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        Some((b'/', _)) => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET={} is neither an absolute path nor an abstract socket (@name)",
                    socket.to_string_lossy()
                ),
            ));
        }
    };
    let sent = UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes of {state:?}",
            state.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn states_arrive_as_one_datagram_each_on_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), READY).unwrap();
        notify_to(path.as_os_str(), STOPPING).unwrap();
        assert_eq!(received(&listener), "READY=1");
        assert_eq!(received(&listener), "STOPPING=1");
    }

    #[test]
    fn an_abstract_socket_is_named_with_a_leading_at() {
        let name = format!("hvisd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), READY).unwrap();
        assert_eq!(received(&listener), "READY=1");
    }

    #[test]
    fn a_relative_or_empty_socket_name_is_refused() {
        for bad in ["", "notify.sock", "vsock:2:1234"] {
            let err = notify_to(OsStr::new(bad), READY).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
