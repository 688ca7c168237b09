//! The guest's side of the shm transport's `ROOT/control` socket: one connect request, one reply.
//!
//! The message layouts live in `hvisd_protocol::hvsock` ([`ConnectRequest`], [`ConnectReply`]);
//! this module only moves them. One control connection is made per request, so concurrent
//! connects never have to match replies to requests on a shared socket.

use super::ConnectError;
use hvisd_protocol::hvsock::{CONNECT_REPLY_SIZE, ConnectReply, ConnectRequest};
use rustix::net::{RecvFlags, SendFlags};
use std::io;
use std::path::Path;

/// Sends `request` on the host's control socket at `path` and returns its checked reply (which
/// may refuse the connection: see [`ConnectReply::accepted`]). The socket is pinned and checked
/// like a doorbell: a `control` entry that is a symlink or not a socket is refused.
pub async fn request(path: &Path, request: &ConnectRequest) -> Result<ConnectReply, ConnectError> {
    let service_id = request.service_id;
    let socket_err = |what: &'static str| {
        move |source: io::Error| ConnectError::Socket {
            service_id,
            what,
            path: path.to_owned(),
            source,
        }
    };
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(socket_err("locating")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a socket path",
            )));
        }
    };
    let pin =
        |e: crate::transport::shm::ShmError| socket_err("opening")(io::Error::other(e.to_string()));
    let dir_fd = crate::transport::shm::open_dir_nofollow(dir).map_err(pin)?;
    let (_pinned_fd, pinned) =
        crate::transport::shm::pin_socket(&dir_fd, dir, name).map_err(pin)?;
    let fd = crate::doorbell::connect_seqpacket(&pinned).map_err(socket_err("connecting to"))?;
    let fd = hvisd_sys::async_fd::register_rw(fd).map_err(socket_err("registering"))?;

    let bytes = request.to_bytes();
    loop {
        let mut guard = fd.writable().await.map_err(socket_err("sending to"))?;
        match rustix::net::send(
            fd.get_ref(),
            &bytes,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        ) {
            Ok(_) => break,
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(socket_err("sending to")(e.into())),
        }
    }
    // A larger buffer than the reply: a datagram of another size is refused, not cut to fit.
    let mut buf = [0u8; 2 * CONNECT_REPLY_SIZE];
    let len = loop {
        let mut guard = fd.readable().await.map_err(socket_err("reading from"))?;
        match rustix::net::recv(fd.get_ref(), &mut buf[..], RecvFlags::DONTWAIT) {
            Ok((_, 0)) => {
                return Err(ConnectError::BadReply {
                    service_id,
                    reason: "the host closed the control connection without a reply".into(),
                });
            }
            Ok((_, n)) => break n,
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(socket_err("reading from")(e.into())),
        }
    };
    let reply =
        ConnectReply::parse(&buf[..len.min(buf.len())]).map_err(|e| ConnectError::BadReply {
            service_id,
            reason: e.to_string(),
        })?;
    if !reply.answers(request) {
        return Err(ConnectError::BadReply {
            service_id,
            reason: format!(
                "the reply is for endpoint {} service {}, not our {} {}",
                reply.endpoint_id, reply.service_id, request.endpoint_id, request.service_id
            ),
        });
    }
    Ok(reply)
}
