//! The host simulator: plays Hyper-V on an shm root.
//!
//! It offers channels exactly as the spec says, negotiates IC versions as the Hyper-V host does (the
//! host speaks first), runs a script of host actions, and records a transcript: one JSON object per
//! action with what was sent, what came back, statuses and timings.

mod channel_actions;
mod fcopy_actions;
mod hostile_actions;
mod hvsock_actions;
mod ic_actions;
mod kvp_actions;
mod script;
pub mod tour;
mod vss_actions;

pub use script::{Action, Script, ScriptError};

use crate::channel::{Channel, ChannelError, OwnedPacket};
use crate::config::Config;
use crate::offer::{Offer, PipeMode};
use crate::services::{ServiceKind, Services};
use crate::transport::shm::ShmRoot;
use crate::transport::shm_host;
use hvisd_ic::NegotiateOutcome;
use hvisd_ic::host::{self as ic_host, IcHost};
use hvisd_protocol::ic::IcVersion;
use hvisd_protocol::ic::{heartbeat, shutdown, timesync};
use hvisd_protocol::kvp::{self, IpInfoUtf16, KvpOperation, KvpReplyView, KvpRequest, KvpValue};
use hvisd_ring::{MappedRing, PACKET_TYPE_DATA_INBAND, PacketHeader, RingMem, SharedMapping};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The transcript of one script run.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Transcript {
    entries: Vec<Value>,
}

impl Transcript {
    /// Whether every action succeeded.
    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    /// How many actions failed.
    pub fn failures(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e["ok"] != json!(true))
            .count()
    }

    /// How many actions ran.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no action ran.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, one per action.
    pub fn entries(&self) -> &[Value] {
        &self.entries
    }
}

/// Why one host action failed; becomes the entry's `error`.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The action names a channel the script never offered.
    #[error("no channel named {0:?} (offer it first)")]
    NoChannel(String),
    /// The action's arguments are wrong.
    #[error("{0}")]
    BadArgument(String),
    /// The guest did not answer in time.
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
    /// The guest's answer broke the protocol.
    #[error("bad reply from the guest: {0}")]
    BadReply(String),
    /// The channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Creating or removing an offer failed.
    #[error(transparent)]
    Shm(#[from] crate::transport::shm::ShmError),
}

struct HostChannel {
    service: ServiceKind,
    channel: Channel,
    /// The offer directory (removed on rescind); `None` for attached channels.
    dir: Option<PathBuf>,
    /// The file holding both rings (`dir/ring`, or a uio device's map).
    ring_path: PathBuf,
    ring_size: u32,
    /// The IC state: offered and negotiated versions, IC transaction ids.
    ic: IcHost,
    /// VMBus transaction ids the host puts in descriptors.
    next_request_id: u64,
}

/// A simulated Hyper-V host on one shm root.
pub struct HostSimulator {
    root: PathBuf,
    channels: HashMap<String, HostChannel>,
    /// hvsock connections kept open (`close: false`) and services listened on.
    hvsock: hvsock_actions::HostHvsock,
}

impl HostSimulator {
    /// A host that creates its offers under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            channels: HashMap::new(),
            hvsock: Default::default(),
        }
    }

    /// Adds a channel the host already has open by other means (a uio test rig, say), so scripts can
    /// address it by `name`. `ring_path` is the file holding both rings (for `corrupt_ring`).
    pub fn attach(
        &mut self,
        name: &str,
        service: ServiceKind,
        channel: Channel,
        ring_path: &Path,
        ring_size: u32,
    ) {
        self.channels.insert(
            name.to_owned(),
            HostChannel {
                service,
                channel,
                dir: None,
                ring_path: ring_path.to_owned(),
                ring_size,
                ic: IcHost::new(service.message_type(), ic_host::offers::FRAMEWORK, &[]),
                next_request_id: 1,
            },
        );
    }

    /// Runs every action of `script` in order and returns the transcript. A failed action is
    /// recorded and the script goes on, so one transcript shows every problem.
    pub async fn run(&mut self, script: &Script) -> Transcript {
        let mut transcript = Transcript::default();
        let timeout = Duration::from_millis(script.timeout_ms);
        for (i, action) in script.actions.iter().enumerate() {
            let started = Instant::now();
            let mut entry = serde_json::Map::new();
            entry.insert("step".into(), json!(i + 1));
            entry.insert("action".into(), json!(action.kind()));
            let result = self.act(action, script, timeout, &mut entry).await;
            entry.insert(
                "elapsed_us".into(),
                json!(started.elapsed().as_micros() as u64),
            );
            match result {
                Ok(()) => {
                    entry.insert("ok".into(), json!(true));
                }
                Err(e) => {
                    entry.insert("ok".into(), json!(false));
                    entry.insert("error".into(), json!(e.to_string()));
                }
            }
            transcript.entries.push(Value::Object(entry));
        }
        transcript
    }

    /// [`HostSimulator::act`] behind a box, for actions nested in others (`backup`'s `during`).
    fn act_boxed<'a>(
        &'a mut self,
        action: &'a Action,
        script: &'a Script,
        timeout: Duration,
        entry: &'a mut serde_json::Map<String, Value>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), SimError>> + Send + 'a>> {
        Box::pin(self.act(action, script, timeout, entry))
    }

    async fn act(
        &mut self,
        action: &Action,
        script: &Script,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::Offer { .. }
            | Action::Negotiate { .. }
            | Action::ExpectClosed { .. }
            | Action::Rescind { .. }
            | Action::Sleep { .. }
            | Action::Crash => self.act_channel(action, script, timeout, entry).await,
            Action::Heartbeat { .. } | Action::Shutdown { .. } | Action::Timesync { .. } => {
                self.act_ic(action, timeout, entry).await
            }
            Action::Raw { .. }
            | Action::CorruptRing { .. }
            | Action::PartialPacket { .. }
            | Action::TruncateRing { .. } => self.act_hostile(action, timeout, entry).await,
            Action::KvpSet { .. }
            | Action::KvpGet { .. }
            | Action::KvpDelete { .. }
            | Action::KvpEnumerate { .. }
            | Action::KvpGetIpInfo { .. }
            | Action::KvpSetIpInfo { .. } => self.act_kvp(action, timeout, entry).await,
            Action::Backup { .. } | Action::VssOp { .. } => {
                self.act_vss(action, script, timeout, entry).await
            }
            Action::HvsockConnect { .. }
            | Action::HvsockListen { .. }
            | Action::HvsockWait { .. } => self.act_hvsock(action, script, timeout, entry).await,
            Action::Fcopy { .. } => self.act_fcopy(action, timeout, entry).await,
        }
    }

    fn channel(&mut self, name: &str) -> Result<&mut HostChannel, SimError> {
        self.channels
            .get_mut(name)
            .ok_or_else(|| SimError::NoChannel(name.to_owned()))
    }

    async fn negotiate(
        &mut self,
        name: &str,
        framework_versions: &Option<Vec<String>>,
        message_versions: &Option<Vec<String>>,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        let ch = self.channel(name)?;
        let message_type = ch.service.message_type();
        let default_msg = ic_host::offers::for_message_type(message_type).ok_or_else(|| {
            SimError::BadArgument(format!("no IC versions known for {}", ch.service.name()))
        })?;
        let fw = parse_versions(framework_versions.as_deref(), ic_host::offers::FRAMEWORK)?;
        let msg = parse_versions(message_versions.as_deref(), default_msg)?;
        ch.ic = IcHost::new(message_type, &fw, &msg);
        let request = ch
            .ic
            .negotiate_request()
            .map_err(|e| SimError::BadArgument(e.to_string()))?;
        let id = ch.next_request_id;
        ch.next_request_id += 1;
        let started = Instant::now();
        ch.channel
            .send(PacketHeader::inband(id), &[&request])
            .await?;
        let packet = recv_one(&mut ch.channel, timeout).await?;
        check_echo(&packet, id)?;
        let outcome = ch
            .ic
            .on_negotiate_response(&packet.payload)
            .map_err(|e| SimError::BadReply(e.to_string()))?;
        entry.insert("name".into(), json!(name));
        entry.insert(
            "offered".into(),
            json!({
                "framework": fw.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "message": msg.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            }),
        );
        entry.insert(
            "negotiate_rtt_us".into(),
            json!(started.elapsed().as_micros() as u64),
        );
        match outcome {
            NegotiateOutcome::Negotiated(n) => {
                entry.insert(
                    "negotiated".into(),
                    json!({"framework": n.framework.to_string(), "message": n.message.to_string()}),
                );
            }
            NegotiateOutcome::NoCommonVersion => {
                entry.insert("negotiated".into(), Value::Null);
                entry.insert("no_common_version".into(), json!(true));
            }
        }
        Ok(())
    }

    /// Sends one service message on a negotiated channel and returns the checked reply.
    async fn request(
        &mut self,
        name: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<OwnedReply, SimError> {
        let ch = self.channel(name)?;
        if ch.ic.negotiated().is_none() {
            return Err(SimError::BadArgument(format!(
                "channel {name:?} has no negotiated versions"
            )));
        }
        let request = ch
            .ic
            .request(body)
            .map_err(|e| SimError::BadArgument(e.to_string()))?;
        let id = ch.next_request_id;
        ch.next_request_id += 1;
        ch.channel
            .send(PacketHeader::inband(id), &[&request])
            .await?;
        let packet = recv_one(&mut ch.channel, timeout).await?;
        check_echo(&packet, id)?;
        let reply = ch
            .ic
            .on_reply(&packet.payload)
            .map_err(|e| SimError::BadReply(e.to_string()))?;
        Ok(OwnedReply {
            status: reply.status,
            body: reply.body.to_vec(),
        })
    }
}

/// A guest reply copied out of its packet.
struct OwnedReply {
    status: u32,
    body: Vec<u8>,
}

/// The ring file mapped a second time, as a host poking at it directly sees it.
fn raw_rings(ch: &HostChannel) -> Result<(MappedRing, MappedRing), SimError> {
    let ring_size = ch.ring_size as usize;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ch.ring_path)
        .map_err(|e| SimError::BadArgument(format!("opening ring file: {e}")))?;
    let map = SharedMapping::map_file(&file, 2 * ring_size)
        .map_err(|e| SimError::BadArgument(format!("mapping ring file: {e}")))?;
    hvisd_ring::ring_pair(map, ring_size).map_err(|e| SimError::BadArgument(e.to_string()))
}

/// An in-band descriptor with the given offset8 and len8.
fn descriptor(offset8: u16, len8: u16) -> [u8; 16] {
    let mut desc = [0u8; 16];
    desc[0..2].copy_from_slice(&PACKET_TYPE_DATA_INBAND.to_le_bytes());
    desc[2..4].copy_from_slice(&offset8.to_le_bytes());
    desc[4..6].copy_from_slice(&len8.to_le_bytes());
    desc
}

async fn recv_one(channel: &mut Channel, timeout: Duration) -> Result<OwnedPacket, SimError> {
    let mut packets = Vec::with_capacity(1);
    match tokio::time::timeout(timeout, channel.recv_batch(&mut packets, 1)).await {
        Ok(Ok(())) => packets.pop().ok_or(SimError::Timeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(SimError::Timeout(timeout)),
    }
}

fn check_echo(packet: &OwnedPacket, id: u64) -> Result<(), SimError> {
    if packet.packet_type != PACKET_TYPE_DATA_INBAND {
        return Err(SimError::BadReply(format!(
            "packet type {} instead of in-band",
            packet.packet_type
        )));
    }
    if packet.transaction_id != id {
        return Err(SimError::BadReply(format!(
            "transaction id {} does not echo the request's {id}",
            packet.transaction_id
        )));
    }
    Ok(())
}

fn status_json(status: u32) -> Value {
    match hvisd_protocol::ic::status::name(status) {
        Some(name) => json!(name),
        None => json!(format!("{status:#010x}")),
    }
}

fn kvp_value(value: &Value, value_type: &str) -> Result<KvpValue, SimError> {
    let bad = |why: &str| SimError::BadArgument(format!("kvp value {value}: {why}"));
    match value_type {
        "string" => match value {
            Value::String(s) => Ok(KvpValue::String(s.encode_utf16().collect())),
            _ => Err(bad("type string needs a JSON string")),
        },
        "u32" => value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(KvpValue::U32)
            .ok_or_else(|| bad("type u32 needs a number from 0 to 4294967295")),
        "u64" => value
            .as_u64()
            .map(KvpValue::U64)
            .ok_or_else(|| bad("type u64 needs a non-negative number")),
        other => Err(SimError::BadArgument(format!(
            "kvp type {other:?}: string, u32 or u64"
        ))),
    }
}

fn kvp_reply_json(op: KvpOperation, body: &[u8]) -> Result<Value, SimError> {
    let view = KvpReplyView::parse(op, body).map_err(|e| SimError::BadReply(e.to_string()))?;
    let utf16 = |units: &[u16]| String::from_utf16_lossy(units);
    Ok(match view {
        KvpReplyView::Entry {
            value_type,
            key,
            value,
        } => {
            let kind = match value_type {
                kvp::REG_U32 => "u32",
                kvp::REG_U64 => "u64",
                _ => "string",
            };
            json!({"key": key, "value": value, "type": kind})
        }
        KvpReplyView::IpInfo(info) => json!({
            "adapter_id": utf16(&info.adapter_id),
            "addr_family": info.addr_family,
            "dhcp_enabled": info.dhcp_enabled != 0,
            "addresses": utf16(&info.ip_addr),
            "masks": utf16(&info.sub_net),
            "gateways": utf16(&info.gate_way),
            "dns": utf16(&info.dns_addr),
        }),
        KvpReplyView::Empty => Value::Null,
    })
}

fn parse_versions(
    given: Option<&[String]>,
    default: &[IcVersion],
) -> Result<Vec<IcVersion>, SimError> {
    let Some(given) = given else {
        return Ok(default.to_vec());
    };
    given
        .iter()
        .map(|text| {
            let (major, minor) = text.split_once('.').unwrap_or((text.as_str(), "0"));
            match (major.parse(), minor.parse()) {
                (Ok(major), Ok(minor)) => Ok(IcVersion::new(major, minor)),
                _ => Err(SimError::BadArgument(format!(
                    "version {text:?} is not MAJOR.MINOR"
                ))),
            }
        })
        .collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub use crate::offer::random_guid;

/// Points the simulated guest's KVP files inside `root`: the simulator must not touch this machine's
/// `/var/lib/hyperv` or run its network scripts. SET_IP_INFO runs a script that only records its
/// arguments in `root/set_ifconfig.log`.
fn sandbox_kvp_paths(config: &mut Config, root: &Path) -> std::io::Result<()> {
    let kvp_dir = root.join("guest-kvp");
    std::fs::create_dir_all(&kvp_dir)?;
    let script = kvp_dir.join("hv_set_ifconfig");
    let log = kvp_dir.join("set_ifconfig.log");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", log.display()),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    config.kvp.pool_dir = kvp_dir.clone();
    config.kvp.ifcfg_dir = kvp_dir.clone();
    config.kvp.set_ifconfig = script;
    Ok(())
}

/// Runs `script` against an in-process guest runtime on a fresh shm root (a temporary directory, or
/// `root` if given). The runtime's shutdown action is forced to "log only": the simulator never
/// powers anything off.
pub async fn run_embedded(
    script: &Script,
    root: Option<&Path>,
    mut config: Config,
) -> anyhow::Result<Transcript> {
    let tmp;
    let root = match root {
        Some(root) => {
            std::fs::create_dir_all(root)?;
            root.to_owned()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    config.shutdown = Default::default();
    sandbox_kvp_paths(&mut config, &root)?;
    // Nor does a copy from the simulated host land in this machine's /var/lib.
    if config.fcopy.drop_dir == Path::new(crate::fcopy::DEFAULT_DROP_DIR) {
        config.fcopy.drop_dir = root.join("guest-fcopy");
    }
    // A simulated host never freezes the machine it runs on unless the config says so (with an
    // allow-list of its own mounts).
    if config.vss.dry_run.is_none() {
        config.vss.dry_run = Some(true);
    }
    // hvsock connections go to the plugins' services; plugins connect through the simulated
    // host's ROOT/control.
    let broker = crate::plugins::broker::PluginBroker::new();
    let acceptor: Option<std::sync::Arc<dyn crate::hvsock::HvsockAcceptor>> =
        if config.plugin.is_empty() {
            None
        } else {
            Some(broker.clone())
        };
    let hvsock = crate::hvsock::Hvsock::new(acceptor, config.hvsock.options());
    hvsock.set_connector(crate::hvsock::Connector::Shm { root: root.clone() });
    let services = Services::new(config.clone())?.with_hvsock(hvsock);
    // Plugins from the config serve the simulated guest too (their keys show in the transcript).
    let plugins = crate::plugins::Plugins::start(&config, &services).await?;
    if let (Some(vss), Some(plugins)) = (services.vss_core(), &plugins) {
        vss.set_plugins(plugins.clone());
    }
    if let Some(plugins) = &plugins {
        broker.set_plugins(plugins);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runtime = tokio::spawn(crate::runtime::run_shm(
        ShmRoot::new(&root),
        services,
        stop_rx,
    ));
    let mut host = HostSimulator::new(&root);
    let transcript = host.run(script).await;
    let _ = stop_tx.send(true);
    runtime.await??;
    Ok(transcript)
}
