//! The hvsock broker: host connections to plugin services, plugin connections to host services.
//!
//! The core keeps every connection (its pipe channel and ring, or its Unix or vsock socket).
//! What crosses into a plugin's worker is one end of a `SOCK_STREAM` socketpair per connection
//! (sent over the worker's stream socket, see [`hvisd_plugin_host::worker::streams`]); the core
//! [`pump`]s bytes between the connection and its own end. So:
//!
//! - the bytes buffered per connection are bounded: the pair's socket buffers (the manifest's
//!   `limits.hvsock_buffer_kib`) and one 64 KiB copy buffer each way in the core; a plugin that
//!   stops reading stalls the host's writer through the ring's flow control, and a host that
//!   stops reading stalls the plugin's writes (its `check-write` permits stay at zero);
//! - a plugin that traps, returns, or whose worker dies closes its socket end: the pump sees end
//!   of file and sends the host a clean FIN; the plugin's other connections go on (a trap ends
//!   one instance, and every connection has its own);
//! - the core closes a connection idle for `limits.hvsock_idle_ms` and refuses connections past
//!   `limits.hvsock_connections`.
//!
//! Service names: a manifest's `hvsock.listen` and `hvsock.connect` entries are names from the
//! operator's `[hvsock.services]` table, or a GUID, or a decimal vsock port ([`ServiceMap`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use hvisd_protocol::guid::Guid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hvsock::{Hvsock, HvsockAcceptor, HvsockStream};

/// The copy buffer of each direction of a pump.
const PUMP_BUFFER: usize = 64 << 10;

/// Service names to GUIDs.
#[derive(Debug, Clone, Default)]
pub struct ServiceMap {
    names: HashMap<String, Guid>,
}

impl ServiceMap {
    /// From `[hvsock.services]` (values already checked by the config).
    pub fn new(services: &std::collections::BTreeMap<String, String>) -> Self {
        Self {
            names: services
                .iter()
                .filter_map(|(name, target)| Some((name.clone(), Self::parse_target(target)?)))
                .collect(),
        }
    }

    /// A GUID, or a decimal vsock port's GUID.
    pub fn parse_target(target: &str) -> Option<Guid> {
        crate::hvsock::unix::parse_service(target)
    }

    /// The GUID a manifest's service name stands for: a configured name first, then the name
    /// read as a GUID or port.
    pub fn resolve(&self, name: &str) -> Option<Guid> {
        self.names
            .get(name)
            .copied()
            .or_else(|| Self::parse_target(name))
    }
}

/// What a worker needs to open connections for its plugin.
#[derive(Clone)]
pub struct HvsockImports {
    /// The runtime's hvsock layer (its connector).
    pub hvsock: Hvsock,
    /// Names to GUIDs (replaced when the config is reloaded).
    pub services: Arc<RwLock<ServiceMap>>,
}

impl HvsockImports {
    /// The GUID of a manifest's service name, by the current map.
    pub fn resolve(&self, name: &str) -> Option<Guid> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .resolve(name)
    }
}

/// What became of one connection, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct PumpSummary {
    /// Bytes from the host's side to the plugin.
    pub to_plugin: u64,
    /// Bytes from the plugin to the host's side.
    pub to_host: u64,
    /// Closed for idleness.
    pub idle: bool,
}

/// Moves bytes between `conn` and `core_end` (the core's end of the pair whose other end the
/// plugin has) until both directions have ended or nothing moved for `idle`. The end of one
/// direction is passed on as a shutdown of writing (a FIN to the host, end of file to the
/// plugin).
pub async fn pump(conn: HvsockStream, core_end: OwnedFd, idle: Duration) -> PumpSummary {
    let core = match hvisd_plugin_host::worker::streams::tokio_stream(core_end) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(connection = %conn.info().label, "hvsock: the plugin's stream: {e}");
            return PumpSummary::default();
        }
    };
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut core_r, mut core_w) = core.into_split();
    let (mut host_r, mut host_w) = conn.into_split();
    let up = async {
        let mut buf = vec![0u8; PUMP_BUFFER];
        let mut n_total = 0u64;
        loop {
            let n = match host_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            touch();
            if core_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
            n_total += n as u64;
            touch();
        }
        let _ = core_w.shutdown().await;
        n_total
    };
    let down = async {
        let mut buf = vec![0u8; PUMP_BUFFER];
        let mut n_total = 0u64;
        loop {
            let n = match core_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            touch();
            if host_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
            n_total += n as u64;
            touch();
        }
        let _ = host_w.shutdown().await;
        n_total
    };
    let watch = async {
        loop {
            let quiet = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        (to_plugin, to_host) = async { tokio::join!(up, down) } => PumpSummary { to_plugin, to_host, idle: false },
        () = watch => PumpSummary { idle: true, ..Default::default() },
    }
}

/// Host-initiated connections to the plugins listening on their service.
#[derive(Default)]
pub struct PluginBroker {
    plugins: RwLock<Option<Weak<super::Plugins>>>,
}

impl PluginBroker {
    /// A broker with no plugins yet: connections are closed until [`PluginBroker::set_plugins`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The plugins connections go to.
    pub fn set_plugins(&self, plugins: &Arc<super::Plugins>) {
        *self.plugins.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(plugins));
    }
}

impl HvsockAcceptor for PluginBroker {
    fn accept(&self, service_id: Guid, stream: HvsockStream) {
        let plugins = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        let Some(plugins) = plugins else {
            hvisd_protocol::throttled!(
                warn,
                connection = %stream.info().label,
                "hvsock connection closed: no plugins are loaded"
            );
            return;
        };
        tokio::spawn(async move { plugins.serve_hvsock(service_id, stream).await });
    }
}
