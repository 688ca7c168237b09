//! The guest runtime: watches a transport for offers, opens the channels it has a service for, serves
//! them, and notices when the host rescinds them or goes away.
//!
//! One supervision loop serves every transport; a transport only says what offers exist now
//! ([`OfferSource`]) and how to open one.

use crate::channel::{Channel, ChannelError};
use crate::services::{ServiceKind, Services};
use crate::transport::shm::{FoundOffer, ShmError, ShmRoot};
use crate::transport::uio::UioDevice;
use hvisd_protocol::guid::Guid;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often a transport is scanned for offers. The brief asks for new offers to be noticed within
/// 100 ms.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(50);

/// How many distinct problems the loop remembers having logged.
const MAX_REPORTED: usize = 1024;

/// Why an offer could not be opened.
#[derive(Debug)]
pub enum OpenFailure {
    /// Not now (e.g. the host is not accepting yet): try again on the next scan.
    Retry(String),
    /// This offer is unusable: do not try it again until the host replaces it.
    Fatal(String),
}

/// One offer a transport found.
pub trait Candidate {
    /// What identifies this offer: a replaced offer must get a new identity.
    fn identity(&self) -> String;
    /// The interface type offered.
    fn class_id(&self) -> Guid;
    /// The channel instance.
    fn instance_id(&self) -> Guid;
    /// Opens the guest's end of the channel.
    fn open(&self, label: &str) -> Result<Channel, OpenFailure>;
}

/// Something that lists the offers present now.
pub trait OfferSource {
    /// The offer type.
    type Offer: Candidate;
    /// Where the offers come from, for logs.
    fn describe(&self) -> String;
    /// Lists offers; malformed ones come back as error messages (logged once each).
    fn scan(&self) -> std::io::Result<Vec<Result<Self::Offer, String>>>;
}

/// An shm root with the channel opener.
#[derive(Debug, Clone)]
pub struct ShmSource(pub ShmRoot);

/// An shm offer, opened through its root.
#[derive(Debug, Clone)]
pub struct ShmCandidate {
    root: ShmRoot,
    found: FoundOffer,
}

impl OfferSource for ShmSource {
    type Offer = ShmCandidate;
    fn describe(&self) -> String {
        format!("shm root {}", self.0.path().display())
    }
    fn scan(&self) -> std::io::Result<Vec<Result<ShmCandidate, String>>> {
        Ok(self
            .0
            .scan()?
            .into_iter()
            .map(|r| {
                r.map(|found| ShmCandidate {
                    root: self.0.clone(),
                    found,
                })
                .map_err(|e| e.to_string())
            })
            .collect())
    }
}

impl Candidate for ShmCandidate {
    fn identity(&self) -> String {
        let (dev, ino) = self.found.identity;
        format!("{}@{dev}:{ino}", self.found.dir.display())
    }
    fn class_id(&self) -> Guid {
        self.found.offer.class_id
    }
    fn instance_id(&self) -> Guid {
        self.found.offer.instance_id
    }
    fn open(&self, label: &str) -> Result<Channel, OpenFailure> {
        match self.root.open(&self.found, label) {
            Ok(channel) => Ok(channel),
            // The host binds the doorbell before it publishes `offer`, but a host that died leaves a
            // stale socket that refuses connections until it is replaced: retry quietly.
            Err(ShmError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Err(OpenFailure::Retry(format!(
                    "host not accepting on its doorbell: {source}"
                )))
            }
            Err(e) => Err(OpenFailure::Fatal(e.to_string())),
        }
    }
}

/// The uio devices under a sysfs directory.
#[derive(Debug, Clone)]
pub struct UioSource {
    /// `/sys/bus/vmbus/devices` or a test tree.
    pub devices: PathBuf,
    /// `/dev` or a test directory.
    pub dev_dir: PathBuf,
}

impl OfferSource for UioSource {
    type Offer = UioDevice;
    fn describe(&self) -> String {
        format!("uio devices under {}", self.devices.display())
    }
    fn scan(&self) -> std::io::Result<Vec<Result<UioDevice, String>>> {
        Ok(
            crate::transport::uio::discover(&self.devices, &self.dev_dir)?
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
        )
    }
}

impl Candidate for UioDevice {
    fn identity(&self) -> String {
        format!("{}/{}", self.instance_id, self.uio_name)
    }
    fn class_id(&self) -> Guid {
        self.class_id
    }
    fn instance_id(&self) -> Guid {
        self.instance_id
    }
    fn open(&self, label: &str) -> Result<Channel, OpenFailure> {
        UioDevice::open(self, label).map_err(|e| OpenFailure::Fatal(e.to_string()))
    }
}

struct OpenChannel {
    label: String,
    task: JoinHandle<Result<(), ChannelError>>,
}

/// Serves every offer under an shm root until `stop` turns true.
pub async fn run_shm(
    root: ShmRoot,
    services: Services,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    supervise(ShmSource(root), services, stop).await
}

/// Serves every device bound to `uio_hv_generic` until `stop` turns true.
pub async fn run_uio(
    devices: &Path,
    dev_dir: &Path,
    services: Services,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let source = UioSource {
        devices: devices.to_owned(),
        dev_dir: dev_dir.to_owned(),
    };
    supervise(source, services, stop).await
}

/// The supervision loop shared by every transport.
///
/// An offer is opened once per identity: when its channel ends (the host closed it, or broke the ring
/// protocol) the runtime waits for the host to publish a new offer rather than hammering the old one.
/// An offer that disappears is rescinded: its channel task is stopped.
pub async fn supervise<S: OfferSource>(
    source: S,
    services: Services,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut open: HashMap<String, OpenChannel> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    // Problems are logged once each so a broken host cannot flood the log.
    let mut reported: HashSet<String> = HashSet::new();
    tracing::info!("watching {} for offers", source.describe());
    while !*stop.borrow() {
        let mut present = HashSet::new();
        // Without a successful scan we do not know what was rescinded: keep every channel.
        let mut scanned = false;
        match source.scan() {
            Ok(offers) => {
                scanned = true;
                reported.remove("scan");
                for offer in offers {
                    match offer {
                        Ok(offer) => {
                            let id = offer.identity();
                            present.insert(id.clone());
                            if open.contains_key(&id) || finished.contains(&id) {
                                continue;
                            }
                            match try_open(&offer, &services, &mut reported) {
                                Ok(Some(channel)) => {
                                    open.insert(id, channel);
                                }
                                Ok(None) => {}
                                Err(()) => {
                                    finished.insert(id);
                                }
                            }
                        }
                        Err(e) => {
                            if reported.insert(e.clone()) {
                                tracing::warn!("ignoring offer: {e}");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if reported.insert("scan".into()) {
                    tracing::warn!("cannot scan {}: {e}", source.describe());
                }
            }
        }

        // Reap channels that ended and stop those whose offer was rescinded.
        let ids: Vec<String> = open.keys().cloned().collect();
        for id in ids {
            let ended = open.get(&id).is_some_and(|c| c.task.is_finished());
            let rescinded = scanned && !present.contains(&id);
            if !ended && !rescinded {
                continue;
            }
            let Some(channel) = open.remove(&id) else {
                continue;
            };
            if ended {
                log_channel_end(&channel.label, channel.task.await);
            } else {
                channel.task.abort();
                tracing::info!(channel = %channel.label, "offer rescinded; channel closed");
            }
            finished.insert(id);
        }
        // Forget offers that are gone, so memory stays bounded by what exists.
        if scanned {
            finished.retain(|id| present.contains(id));
        }
        reported.retain(|msg| match msg.strip_prefix("open ") {
            Some(rest) => present.iter().any(|id| rest.starts_with(id.as_str())),
            None => true,
        });
        // A host that keeps inventing distinct broken offers must not grow this set without bound;
        // forgetting means a problem is logged again, which is harmless.
        if reported.len() > MAX_REPORTED {
            reported.clear();
        }

        tokio::select! {
            _ = tokio::time::sleep(SCAN_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
    for (_, channel) in open {
        channel.task.abort();
    }
    Ok(())
}

/// `Ok(Some)`: opened. `Ok(None)`: not ours or not yet. `Err`: unusable, do not retry.
fn try_open<C: Candidate>(
    offer: &C,
    services: &Services,
    reported: &mut HashSet<String>,
) -> Result<Option<OpenChannel>, ()> {
    let Some(kind) = services.kind_for(&offer.class_id()) else {
        if reported.insert(format!("open {} unknown", offer.identity())) {
            tracing::info!(
                class_id = %offer.class_id(),
                instance_id = %offer.instance_id(),
                "no enabled service for this offer's class; leaving it alone"
            );
        }
        return Ok(None);
    };
    let label = channel_label(kind, &offer.instance_id());
    match offer.open(&label) {
        Ok(channel) => {
            tracing::info!(channel = %label, "channel opened");
            Ok(Some(OpenChannel {
                task: services.spawn(kind, channel),
                label,
            }))
        }
        Err(OpenFailure::Retry(why)) => {
            if reported.insert(format!("open {} retry", offer.identity())) {
                tracing::info!(channel = %label, "cannot open yet, will retry: {why}");
            }
            Ok(None)
        }
        Err(OpenFailure::Fatal(why)) => {
            tracing::error!(channel = %label, "cannot open channel: {why}");
            Err(())
        }
    }
}

/// The name a channel goes by in logs: service and instance.
pub fn channel_label(kind: ServiceKind, instance_id: &Guid) -> String {
    format!("{} {}", kind.name(), instance_id)
}

fn log_channel_end(label: &str, result: Result<Result<(), ChannelError>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(())) => tracing::info!(channel = %label, "channel finished"),
        Ok(Err(ChannelError::Closed { .. })) => {
            tracing::info!(channel = %label, "host closed the channel")
        }
        Ok(Err(e)) => tracing::error!(channel = %label, "channel closed: {e}"),
        Err(e) if e.is_cancelled() => {}
        Err(e) => tracing::error!(channel = %label, "channel task failed: {e}"),
    }
}
