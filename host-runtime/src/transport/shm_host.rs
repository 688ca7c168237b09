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
