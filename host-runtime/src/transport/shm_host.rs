//! The shm transport, host side: what the simulator (or any host written in Rust) does to offer a
//! channel and accept the guest's connection.

use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::{Doorbell, DoorbellKind, SeqpacketListener};
use crate::offer::Offer;
use crate::transport::shm::{ShmError, io_err};
use hvisd_ring::SharedMapping;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An offer the host has published and whose guest has not connected yet.
pub struct PublishedOffer {
    /// `ROOT/<instance-id>`.
    pub dir: PathBuf,
    /// The offer as written.
    pub offer: Offer,
    listener: SeqpacketListener,
    rings: RingPair,
}

/// Creates `ROOT/<instance-id>/` with a zero-filled `ring`, a listening `doorbell`, and `offer`
/// written last by rename, exactly in the spec's order.
pub fn publish_offer(root: &Path, offer: &Offer) -> Result<PublishedOffer, ShmError> {
    let dir = root.join(offer.instance_id.to_string());
    std::fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
    let ring_path = dir.join("ring");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&ring_path)
        .map_err(io_err("creating", &ring_path))?;
    file.set_len(offer.ring_file_len())
        .map_err(io_err("sizing", &ring_path))?;
    let ring_size = offer.ring_size as usize;
    let ring_err = |source| ShmError::Ring {
        dir: dir.clone(),
        source,
    };
    let map = SharedMapping::map_file(&file, 2 * ring_size).map_err(|e| ring_err(e.into()))?;
    let rings = RingPair::new(map, ring_size, Role::Host).map_err(ring_err)?;
    let doorbell_path = dir.join("doorbell");
    let listener =
        SeqpacketListener::bind(&doorbell_path).map_err(io_err("binding", &doorbell_path))?;
    let tmp = dir.join(".offer.tmp");
    std::fs::write(&tmp, offer.to_text()).map_err(io_err("writing", &tmp))?;
    let offer_path = dir.join("offer");
    std::fs::rename(&tmp, &offer_path).map_err(io_err("publishing", &offer_path))?;
    Ok(PublishedOffer {
        dir,
        offer: offer.clone(),
        listener,
        rings,
    })
}

impl PublishedOffer {
    /// Waits up to `timeout` for the guest to connect and returns the host's end of the channel.
    pub async fn accept(self, timeout: Duration, label: &str) -> Result<Channel, ShmError> {
        let doorbell_path = self.dir.join("doorbell");
        let fd = tokio::time::timeout(timeout, self.listener.accept())
            .await
            .map_err(|_| ShmError::Io {
                what: "waiting for the guest to connect to",
                path: doorbell_path.clone(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ),
            })?
            .map_err(io_err("accepting on", &doorbell_path))?;
        let doorbell = Doorbell::new(fd, DoorbellKind::Seqpacket)
            .map_err(io_err("registering", &doorbell_path))?;
        Ok(Channel::new(self.rings, doorbell, label))
    }
}

/// Rescinds an offer: removes its directory. The guest sees the doorbell close.
pub fn rescind(dir: &Path) -> Result<(), ShmError> {
    std::fs::remove_dir_all(dir).map_err(io_err("removing", dir))
}

/// The host's `ROOT/control` socket, where guests ask for hvsock connections to host services.
pub struct ControlListener {
    listener: SeqpacketListener,
    path: PathBuf,
}

/// One guest's connection to `ROOT/control`: requests in, replies out, one datagram each.
pub struct ControlConnection {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl ControlListener {
    /// Binds `ROOT/control` (replacing the stale socket a crashed host left behind).
    pub fn bind(root: &Path) -> Result<Self, ShmError> {
        let path = root.join("control");
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(&path).map_err(io_err("removing the stale", &path))?;
        }
        let listener = SeqpacketListener::bind(&path).map_err(io_err("binding", &path))?;
        Ok(Self { listener, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one guest connection.
    pub async fn accept(&self) -> io::Result<ControlConnection> {
        let fd = self.listener.accept().await?;
        Ok(ControlConnection {
            fd: hvisd_sys::async_fd::register_rw(fd)?,
        })
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlConnection {
    /// The next request; `None` once the guest closed the connection. A datagram of the wrong
    /// size is returned as the parse error.
    pub async fn recv_request(
        &self,
    ) -> io::Result<
        Option<
            Result<
                hvisd_protocol::hvsock::ConnectRequest,
                hvisd_protocol::hvsock::HvsockParseError,
            >,
        >,
    > {
        let mut buf = [0u8; 2 * hvisd_protocol::hvsock::CONNECT_REQUEST_SIZE];
        loop {
            let mut guard = self.fd.readable().await?;
            match rustix::net::recv(
                self.fd.get_ref(),
                &mut buf[..],
                rustix::net::RecvFlags::DONTWAIT,
            ) {
                Ok((_, 0)) => return Ok(None),
                Ok((_, n)) => {
                    return Ok(Some(hvisd_protocol::hvsock::ConnectRequest::parse(
                        &buf[..n.min(buf.len())],
                    )));
                }
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::CONNRESET) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a reply.
    pub async fn send_reply(&self, reply: &hvisd_protocol::hvsock::ConnectReply) -> io::Result<()> {
        let bytes = reply.to_bytes();
        loop {
            let mut guard = self.fd.writable().await?;
            match rustix::net::send(
                self.fd.get_ref(),
                &bytes,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
