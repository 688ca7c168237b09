//! Which service answers which offer, and the loop that drives an IC service over any channel.

use crate::channel::{Channel, ChannelError, OwnedPacket};
use crate::config::Config;
use crate::fcopy::vmbus::FcopyService;
use crate::hvsock::Hvsock;
pub use crate::service_kind::ServiceKind;
use crate::vss::VssCore;
use crate::vss::vmbus::VssService;
use hvisd_ic::IcGuest;
use hvisd_ic::service::IcService;
use hvisd_kvp::{KvpCore, KvpService};
use hvisd_protocol::guid::Guid;
use hvisd_ring::{PACKET_TYPE_DATA_INBAND, PacketHeader};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// The services this runtime has enabled, with their configuration and shared state. Cheap to
/// clone into tasks.
#[derive(Clone)]
pub struct Services {
    config: Arc<Config>,
    /// One KVP core for every KVP channel and transport: the pools are one set of files.
    kvp: Option<Arc<KvpCore>>,
    /// One VSS core: one set of frozen file systems, whatever carried the FREEZE.
    vss: Option<Arc<VssCore>>,
    /// hvsock: where host-initiated connections go, how guest-initiated ones are made.
    hvsock: Hvsock,
    /// The IC channels being served, for `hvisd status`.
    channels: Channels,
    /// fcopy: where the host may write files (one policy; each channel has its own copy).
    fcopy: Option<Arc<crate::fcopy::FcopyPolicy>>,
}

/// The IC channels being served and their state (negotiated versions, counts), for `hvisd
/// status` and the metrics. Cheap to clone.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<std::sync::Mutex<ChannelTable>>,
}

#[derive(Default)]
struct ChannelTable {
    next: u64,
    open: std::collections::BTreeMap<u64, ChannelEntry>,
}

/// One served channel in [`Channels::snapshot`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelEntry {
    /// The channel's label (transport, instance).
    pub label: String,
    /// Its IC state.
    pub ic: hvisd_ic::IcGuestStatus,
    /// Seconds since it was opened.
    pub open_s: u64,
    #[serde(skip)]
    opened: std::time::Instant,
}

impl Channels {
    fn table(&self) -> std::sync::MutexGuard<'_, ChannelTable> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, label: String, ic: hvisd_ic::IcGuestStatus) -> u64 {
        let mut t = self.table();
        t.next += 1;
        let id = t.next;
        t.open.insert(
            id,
            ChannelEntry {
                label,
                ic,
                open_s: 0,
                opened: std::time::Instant::now(),
            },
        );
        id
    }

    fn update(&self, id: u64, ic: &hvisd_ic::IcGuestStatus) {
        if let Some(e) = self.table().open.get_mut(&id) {
            e.ic.clone_from(ic);
        }
    }

    fn remove(&self, id: u64) {
        self.table().open.remove(&id);
    }

    /// The channels being served now.
    pub fn snapshot(&self) -> Vec<ChannelEntry> {
        self.table()
            .open
            .values()
            .map(|e| ChannelEntry {
                open_s: e.opened.elapsed().as_secs(),
                ..e.clone()
            })
            .collect()
    }
}

/// Removes a channel from the table when its service ends, however it ends.
struct Registered<'a>(&'a Channels, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// Why the services could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The KVP pools could not be opened or created.
    #[error("KVP pools in {dir}: {source}")]
    KvpPools {
        /// The pool directory.
        dir: String,
        /// What failed.
        source: hvisd_kvp::StoreError,
    },
    /// The VSS service could not start.
    #[error(transparent)]
    Vss(#[from] crate::vss::VssSetupError),
    /// VSS needs the async runtime (its watchdog reports into it).
    #[error("the VSS service must be set up inside the async runtime")]
    NoRuntime,
    /// The `[fcopy]` policy could not be built.
    #[error(transparent)]
    Fcopy(#[from] crate::fcopy::FcopySetupError),
}

impl Services {
    /// Services as the config enables them. Opens (and if needed creates) the KVP pools.
    pub fn new(config: Config) -> Result<Self, ServicesError> {
        let kvp = if config.services.kvp {
            let core = KvpCore::new(config.kvp.to_kvp_config()).map_err(|source| {
                ServicesError::KvpPools {
                    dir: config.kvp.pool_dir.display().to_string(),
                    source,
                }
            })?;
            Some(Arc::new(core))
        } else {
            None
        };
        let vss = if config.services.vss {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(ServicesError::NoRuntime);
            }
            Some(VssCore::new(
                &config.vss,
                kvp.as_ref().map(|core| core.store()),
            )?)
        } else {
            None
        };
        let fcopy = if config.service_enabled(ServiceKind::Fcopy) {
            Some(Arc::new(config.fcopy.policy()?))
        } else {
            None
        };
        let hvsock = Hvsock::new(None, config.hvsock.options());
        Ok(Self {
            config: Arc::new(config),
            kvp,
            vss,
            hvsock,
            channels: Channels::default(),
            fcopy,
        })
    }

    /// The VSS core, if VSS is enabled.
    pub fn vss_core(&self) -> Option<&Arc<VssCore>> {
        self.vss.as_ref()
    }

    /// Services around an existing KVP core (benchmarks, embedders that set up the core themselves).
    pub fn with_kvp_core(config: Config, core: Arc<KvpCore>) -> Self {
        let hvsock = Hvsock::new(None, config.hvsock.options());
        Self {
            config: Arc::new(config),
            kvp: Some(core),
            vss: None,
            hvsock,
            channels: Channels::default(),
            fcopy: None,
        }
    }

    /// These services with `hvsock` serving pipe offers (an acceptor for host-initiated
    /// connections, and guest-initiated connects).
    pub fn with_hvsock(mut self, hvsock: Hvsock) -> Self {
        self.hvsock = hvsock;
        self
    }

    /// The hvsock layer: its acceptor, connector and connects in progress.
    pub fn hvsock(&self) -> &Hvsock {
        &self.hvsock
    }

    /// The IC channels being served.
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// The shared KVP core, if KVP is enabled.
    pub fn kvp_core(&self) -> Option<&Arc<KvpCore>> {
        self.kvp.as_ref()
    }

    /// The runtime's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The service that answers `class_id`, if it is enabled.
    pub fn kind_for(&self, class_id: &Guid) -> Option<ServiceKind> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.class_id() == *class_id && self.config.service_enabled(*k))
    }

    /// Starts serving `channel` with the service `kind`.
    pub fn spawn(
        &self,
        kind: ServiceKind,
        channel: Channel,
    ) -> JoinHandle<Result<(), ChannelError>> {
        let services = self.clone();
        tokio::spawn(async move { services.serve(kind, channel).await })
    }

    /// Serves `channel` with the service `kind` until the channel ends.
    pub async fn serve(&self, kind: ServiceKind, channel: Channel) -> Result<(), ChannelError> {
        match kind {
            ServiceKind::Heartbeat => {
                self.serve_ic(channel, hvisd_ic::heartbeat::HeartbeatService::new())
                    .await
            }
            ServiceKind::Shutdown => {
                self.serve_ic(
                    channel,
                    hvisd_ic::shutdown::ShutdownService::new(self.config.shutdown_action()),
                )
                .await
            }
            ServiceKind::TimeSync => {
                self.serve_ic(channel, hvisd_ic::timesync::TimesyncService::new())
                    .await
            }
            ServiceKind::Kvp => match &self.kvp {
                Some(core) => {
                    self.serve_ic(channel, KvpService::new(core.clone()).await)
                        .await
                }
                // kind_for never picks a disabled service; answer as if the host had gone.
                None => Err(ChannelError::Closed {
                    channel: channel.label().to_owned(),
                }),
            },
            ServiceKind::Vss => match &self.vss {
                Some(core) => self.serve_ic(channel, VssService::new(core.clone())).await,
                None => Err(ChannelError::Closed {
                    channel: channel.label().to_owned(),
                }),
            },
            ServiceKind::Fcopy => match &self.fcopy {
                Some(policy) => {
                    self.serve_ic(channel, FcopyService::new(policy.clone()))
                        .await
                }
                None => Err(ChannelError::Closed {
                    channel: channel.label().to_owned(),
                }),
            },
        }
    }
}

impl Services {
    /// [`serve_ic`], with the channel in [`Services::channels`] while it is served.
    async fn serve_ic<S: IcService>(
        &self,
        channel: Channel,
        service: S,
    ) -> Result<(), ChannelError> {
        let guest = IcGuest::new(service);
        let id = self
            .channels
            .add(channel.label().to_owned(), guest.status().clone());
        let _registered = Registered(&self.channels, id);
        serve_ic_guest(channel, guest, |status| self.channels.update(id, status)).await
    }
}

/// How many packets one receive takes from the ring before they are answered.
const IC_BATCH: usize = 16;

/// Drives one IC service: every in-band packet goes through the IC framework (negotiation, headers)
/// and its reply goes back with the request's transaction id, as Linux's `hv_util.c` does.
pub async fn serve_ic<S: IcService>(channel: Channel, service: S) -> Result<(), ChannelError> {
    serve_ic_guest(channel, IcGuest::new(service), |_| {}).await
}

async fn serve_ic_guest<S: IcService>(
    mut channel: Channel,
    mut guest: IcGuest<S>,
    observe: impl Fn(&hvisd_ic::IcGuestStatus),
) -> Result<(), ChannelError> {
    let mut packets: Vec<OwnedPacket> = Vec::with_capacity(IC_BATCH);
    loop {
        channel.recv_batch(&mut packets, IC_BATCH).await?;
        for packet in packets.drain(..) {
            if packet.packet_type != PACKET_TYPE_DATA_INBAND {
                hvisd_protocol::throttled!(
                    warn,
                    channel = %channel.label(),
                    packet_type = packet.packet_type,
                    "ignoring a non-inband packet on an IC channel"
                );
                continue;
            }
            match guest.on_packet(&packet.payload).await {
                Ok(Some(reply)) => {
                    channel
                        .send(PacketHeader::inband(packet.transaction_id), &[&reply])
                        .await?
                }
                Ok(None) => {}
                Err(e) => {
                    hvisd_protocol::throttled!(warn, channel = %channel.label(), "IC message refused: {e}")
                }
            }
        }
        observe(guest.status());
    }
}
