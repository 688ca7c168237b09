//! The host simulator's script: a JSON list of host actions.
//!
//! A script is either a bare array of actions or an object `{"ring_size": .., "timeout_ms": ..,
//! "actions": [..]}`. Each action is an object whose `action` key names it; unknown actions and
//! unknown fields are errors that name the action, so a typo never silently does nothing. Later
//! services add variants here.

use serde::Deserialize;
use std::path::Path;

/// A whole script.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Default `ring_size` for offers (bytes of one direction, control page included).
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// How long to wait for the guest to connect or to answer, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The actions, run in order.
    pub actions: Vec<Action>,
}

fn default_ring_size() -> u32 {
    // Linux's util drivers use three data pages per direction plus the control page.
    4 * 4096
}

fn default_timeout_ms() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScriptFile {
    Actions(Vec<Action>),
    Full(Script),
}

/// One host action.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Offer a channel, wait for the guest to open it, then negotiate (unless `negotiate` is false).
    Offer {
        /// `heartbeat`, `shutdown`, `timesync`, `kvp`.
        service: String,
        /// What later actions call this channel; defaults to the service name.
        #[serde(default)]
        name: Option<String>,
        /// The instance id; random when absent.
        #[serde(default)]
        instance_id: Option<String>,
        /// Overrides the script's ring size.
        #[serde(default)]
        ring_size: Option<u32>,
        /// Framework versions the host offers (`"3.0"`); defaults to what Hyper-V offers.
        #[serde(default)]
        framework_versions: Option<Vec<String>>,
        /// Message versions the host offers; defaults to what Hyper-V offers for the service.
        #[serde(default)]
        message_versions: Option<Vec<String>>,
        /// Negotiate right after the guest connects (default true).
        #[serde(default = "yes")]
        negotiate: bool,
    },
    /// (Re)negotiate versions on an open channel.
    Negotiate {
        /// The channel.
        name: String,
        /// Framework versions offered.
        #[serde(default)]
        framework_versions: Option<Vec<String>>,
        /// Message versions offered.
        #[serde(default)]
        message_versions: Option<Vec<String>>,
    },
    /// Send heartbeats and check each answer is the sequence number plus one.
    Heartbeat {
        /// The channel (default `heartbeat`).
        #[serde(default = "heartbeat_name")]
        name: String,
        /// How many heartbeats.
        #[serde(default = "one")]
        count: u32,
        /// The first sequence number.
        #[serde(default)]
        sequence: u64,
    },
    /// Ask the guest to shut down. The simulator's runtime never powers off.
    Shutdown {
        /// The channel (default `shutdown`).
        #[serde(default = "shutdown_name")]
        name: String,
        /// `shutdown_msg_data.flags` (bit 0 force, bit 1 restart... as the host sends them).
        #[serde(default)]
        flags: u32,
        /// `reason_code`.
        #[serde(default)]
        reason_code: u32,
        /// The display message.
        #[serde(default)]
        message: String,
    },
    /// Send one time sample.
    Timesync {
        /// The channel (default `timesync`).
        #[serde(default = "timesync_name")]
        name: String,
        /// `ICTIMESYNCFLAG_*`: 1 = sync, 2 = sample (default).
        #[serde(default = "two")]
        flags: u8,
    },
    /// Send raw bytes as one in-band packet (hostile tests).
    Raw {
        /// The channel.
        name: String,
        /// The payload in hex.
        hex: String,
        /// Wait for a reply (default false: the guest may rightly stay silent).
        #[serde(default)]
        expect_reply: bool,
    },
    /// Write a value into a control-page field of the host-to-guest ring and interrupt the guest,
    /// as a broken or hostile host would.
    CorruptRing {
        /// The channel.
        name: String,
        /// `write_index`, `read_index` (of the guest-to-host ring), or `packet` (a garbage descriptor).
        field: String,
        /// The value written.
        value: u32,
    },
    /// Write the first half of a heartbeat packet into the host-to-guest ring without publishing it,
    /// as a host that dies mid-write leaves the ring (follow with `crash`).
    PartialPacket {
        /// The channel.
        name: String,
    },
    /// Truncate the channel's `ring` file to `len` bytes (default 0) and interrupt the guest, as a
    /// hostile host would; the host forgets the channel (its own mapping is as broken).
    TruncateRing {
        /// The channel.
        name: String,
        /// The new length of the ring file.
        #[serde(default)]
        len: u64,
    },
    /// Wait until the guest closes the channel (after a corrupt ring, say).
    ExpectClosed {
        /// The channel.
        name: String,
    },
    /// Remove the offer: the guest must close the channel.
    Rescind {
        /// The channel.
        name: String,
    },
    /// Wait.
    Sleep {
        /// Milliseconds.
        ms: u64,
    },
    /// Leave the process at once, as a crashing host would: nothing is cleaned up.
    Crash,
    /// A backup as Hyper-V runs one: HOT_BACKUP (the guest's feature flags), FREEZE, a pause
    /// (the host's snapshot), THAW, BU_COMPLETE. Each status and time is reported.
    Backup {
        /// The channel (default `vss`).
        #[serde(default = "vss_name")]
        name: String,
        /// How long the file systems stay frozen (the snapshot), milliseconds.
        #[serde(default = "backup_pause_ms")]
        pause_ms: u64,
        /// Send THAW (default true; false plays a host that never does: the guest's watchdog
        /// must thaw).
        #[serde(default = "yes")]
        thaw: bool,
        /// What the FREEZE must answer for the action to pass: `ok` (default) or `fail` (a
        /// veto, a policy refusal...). A failed FREEZE is not followed by THAW.
        #[serde(default = "expect_ok")]
        expect: String,
        /// Actions run while frozen, after the FREEZE answer and before the pause (e.g. a
        /// `kvp_set` the guest must answer at once). Their entries are in `during`.
        #[serde(default)]
        during: Vec<Action>,
        /// A file the host creates once the FREEZE is answered `HV_S_OK` (before `during`),
        /// so a test can act while the file systems are frozen.
        #[serde(default)]
        mark: Option<std::path::PathBuf>,
    },
    /// One VSS operation (by name, e.g. `freeze`, or number), its status reported.
    VssOp {
        /// The channel (default `vss`).
        #[serde(default = "vss_name")]
        name: String,
        /// `create`, `delete`, `hot_backup`, `get_dm_info`, `bu_complete`, `freeze`, `thaw`,
        /// `auto_recover`, or a number (any u8).
        op: serde_json::Value,
    },
    /// KVP SET.
    KvpSet {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// Pool name (external, guest, auto, auto-external, auto-internal) or wire number (any u8).
        pool: PoolArg,
        /// The key.
        key: String,
        /// The value: a string for `string`, a number for `u32`/`u64`.
        value: serde_json::Value,
        /// `string` (REG_SZ, default), `u32` (REG_U32) or `u64` (REG_U64).
        #[serde(default = "string_type", rename = "type")]
        value_type: String,
    },
    /// KVP GET.
    KvpGet {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// Pool.
        pool: PoolArg,
        /// The key.
        key: String,
    },
    /// KVP DELETE.
    KvpDelete {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// Pool.
        pool: PoolArg,
        /// The key.
        key: String,
    },
    /// KVP ENUMERATE from index 0 until the guest answers anything but success.
    KvpEnumerate {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// Pool.
        pool: PoolArg,
        /// At most this many requests.
        #[serde(default = "enumerate_max")]
        max: u32,
    },
    /// KVP GET_IP_INFO for the adapter with this MAC.
    KvpGetIpInfo {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// MAC address as Hyper-V writes it (`00:15:5D:...` or `00-15-5D-...`).
        mac: String,
        /// `ipv4`, `ipv6` or `both` (default).
        #[serde(default = "both")]
        family: String,
    },
    /// KVP SET_IP_INFO for the adapter with this id.
    KvpSetIpInfo {
        /// The channel (default `kvp`).
        #[serde(default = "kvp_name")]
        name: String,
        /// The adapter id (a GUID as Hyper-V sends it, or a MAC).
        adapter_id: String,
        /// DHCP on or off.
        #[serde(default)]
        dhcp: bool,
        /// Addresses, `;`-separated.
        #[serde(default)]
        addresses: String,
        /// Masks, `;`-separated.
        #[serde(default)]
        masks: String,
        /// Gateways, `;`-separated.
        #[serde(default)]
        gateways: String,
        /// DNS servers, `;`-separated.
        #[serde(default)]
        dns: String,
    },
    /// hvsock, host-initiated: offer pipe channels (`pipe=byte`, `conn_from_host=1`) for a
    /// service, wait for the guest, stream bytes, read the replies, check them, close with FIN.
    HvsockConnect {
        /// Names the connection for later actions (with `close: false`); default `hvsock`.
        #[serde(default)]
        name: Option<String>,
        /// The service GUID; or give `port`.
        #[serde(default)]
        service: Option<String>,
        /// A vsock port, standing for `<port>-facb-11e6-bd58-64006a7986d3`.
        #[serde(default)]
        port: Option<u32>,
        /// The endpoint (offer instance) id; random when absent (must be absent with several
        /// connections).
        #[serde(default)]
        instance_id: Option<String>,
        /// Overrides the script's ring size.
        #[serde(default)]
        ring_size: Option<u32>,
        /// Data to send, as text ...
        #[serde(default)]
        text: Option<String>,
        /// ... or as hex ...
        #[serde(default)]
        hex: Option<String>,
        /// ... or this many bytes of a pattern (seeded by the connection's index).
        #[serde(default)]
        size: Option<usize>,
        /// How many times `text`/`hex` is sent.
        #[serde(default = "one_usize")]
        repeat: usize,
        /// Bytes per write call (default 64 KiB).
        #[serde(default = "write_size")]
        write_size: usize,
        /// `echo` (default: the replies must equal what was sent), or `none` (only the guest's
        /// FIN is awaited, if we sent ours).
        #[serde(default = "echo")]
        expect: String,
        /// Concurrent connections, each with its own data (`<i>:` in front of text/hex).
        #[serde(default = "one")]
        connections: u32,
        /// Do not read for this long after writing starts (a stalled reader: the transcript
        /// says how many bytes the guest took meanwhile).
        #[serde(default)]
        pause_reading_ms: u64,
        /// Send our FIN after the data (default true).
        #[serde(default = "yes")]
        fin: bool,
        /// Close and rescind once done (default true); `false` keeps the connection open under
        /// `name` (e.g. for a `crash` mid-stream).
        #[serde(default = "yes")]
        close: bool,
        /// Deadline of the whole exchange (default: the script's timeout).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// hvsock, guest-initiated: serve a host service on `ROOT/control` in the background for
    /// the rest of the script (or until `count` connections are served).
    HvsockListen {
        /// Names the listener for `hvsock_wait`; default `listener`.
        #[serde(default = "listener_name")]
        name: String,
        /// The service GUID; or give `port`.
        #[serde(default)]
        service: Option<String>,
        /// A vsock port.
        #[serde(default)]
        port: Option<u32>,
        /// `echo` (default), `text` (read to the guest's FIN, answer `text`, FIN), or `refuse`
        /// (answer the request with `status`).
        #[serde(default = "echo")]
        reply: String,
        /// The answer for `reply: text`.
        #[serde(default)]
        text: Option<String>,
        /// The refusal status for `reply: refuse` (default -111).
        #[serde(default)]
        status: Option<i32>,
        /// Serve this many connections, then refuse.
        #[serde(default)]
        count: Option<u32>,
        /// Overrides the script's ring size for the offers.
        #[serde(default)]
        ring_size: Option<u32>,
    },
    /// Copy a file into the guest as `Copy-VMFile` does: START_FILE_COPY, WRITE_TO_FILE per
    /// 6 KiB fragment, COMPLETE_FCOPY (or CANCEL_FCOPY after `cancel_after` bytes); every status,
    /// the bytes sent and the time are reported.
    Fcopy {
        /// The channel (default `fcopy`).
        #[serde(default = "fcopy_name")]
        name: String,
        /// The guest's destination directory (`path_name`).
        path: String,
        /// The file's name (`file_name`).
        file_name: String,
        /// The content, as text ...
        #[serde(default)]
        text: Option<String>,
        /// ... or this many pattern bytes (byte `i` is `i % 251`).
        #[serde(default)]
        size: Option<u64>,
        /// Announce this `file_size` instead of the content's (hostile tests).
        #[serde(default)]
        file_size: Option<u64>,
        /// `OVER_WRITE`.
        #[serde(default)]
        overwrite: bool,
        /// `CREATE_PATH`.
        #[serde(default)]
        create_path: bool,
        /// What the copy must end with: `ok` (default), `fail`, or a status name
        /// (`HV_ERROR_ALREADY_EXISTS`...): the first status other than `HV_S_OK`, else the last.
        #[serde(default = "expect_ok")]
        expect: String,
        /// Send CANCEL_FCOPY (instead of the rest and COMPLETE) once this many bytes are sent.
        #[serde(default)]
        cancel_after: Option<u64>,
    },
    /// Wait until a listener has served its `count` connections (or, without a count, until
    /// it served at least one and none is in progress); records its figures.
    HvsockWait {
        /// The listener (default `listener`).
        #[serde(default = "listener_name")]
        name: String,
        /// Deadline (default: the script's timeout).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// A KVP pool in a script: a name, or a raw wire number (hostile tests send 5..255).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PoolArg {
    /// The wire number as sent.
    Number(u8),
    /// An operator's name.
    Name(String),
}

impl PoolArg {
    /// The byte sent on the wire.
    pub fn wire(&self) -> Result<u8, String> {
        match self {
            PoolArg::Number(n) => Ok(*n),
            PoolArg::Name(name) => hvisd_protocol::kvp::Pool::parse(name)
                .map(|p| p.number())
                .ok_or_else(|| {
                    format!("unknown pool {name:?}: external, guest, auto, auto-external, auto-internal or 0-255")
                }),
        }
    }
}

fn kvp_name() -> String {
    "kvp".into()
}
fn string_type() -> String {
    "string".into()
}
fn enumerate_max() -> u32 {
    1000
}
fn both() -> String {
    "both".into()
}

fn yes() -> bool {
    true
}
fn vss_name() -> String {
    "vss".into()
}
fn backup_pause_ms() -> u64 {
    100
}
fn expect_ok() -> String {
    "ok".into()
}
fn one_usize() -> usize {
    1
}
fn write_size() -> usize {
    64 << 10
}
fn echo() -> String {
    "echo".into()
}
fn fcopy_name() -> String {
    "fcopy".into()
}
fn listener_name() -> String {
    "listener".into()
}
fn one() -> u32 {
    1
}
fn two() -> u8 {
    2
}
fn heartbeat_name() -> String {
    "heartbeat".into()
}
fn shutdown_name() -> String {
    "shutdown".into()
}
fn timesync_name() -> String {
    "timesync".into()
}

impl Action {
    /// The action's name as written in scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Offer { .. } => "offer",
            Action::Negotiate { .. } => "negotiate",
            Action::Heartbeat { .. } => "heartbeat",
            Action::Shutdown { .. } => "shutdown",
            Action::Timesync { .. } => "timesync",
            Action::Raw { .. } => "raw",
            Action::CorruptRing { .. } => "corrupt_ring",
            Action::PartialPacket { .. } => "partial_packet",
            Action::TruncateRing { .. } => "truncate_ring",
            Action::ExpectClosed { .. } => "expect_closed",
            Action::Rescind { .. } => "rescind",
            Action::Sleep { .. } => "sleep",
            Action::Crash => "crash",
            Action::Backup { .. } => "backup",
            Action::VssOp { .. } => "vss_op",
            Action::KvpSet { .. } => "kvp_set",
            Action::KvpGet { .. } => "kvp_get",
            Action::KvpDelete { .. } => "kvp_delete",
            Action::KvpEnumerate { .. } => "kvp_enumerate",
            Action::KvpGetIpInfo { .. } => "kvp_get_ip_info",
            Action::KvpSetIpInfo { .. } => "kvp_set_ip_info",
            Action::HvsockConnect { .. } => "hvsock_connect",
            Action::HvsockListen { .. } => "hvsock_listen",
            Action::HvsockWait { .. } => "hvsock_wait",
            Action::Fcopy { .. } => "fcopy",
        }
    }
}

/// Why a script was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file could not be read.
    #[error("reading script {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The JSON is not a script.
    #[error("script {path}: {why}")]
    Parse {
        /// The path.
        path: String,
        /// What serde said, with the action that failed.
        why: String,
    },
}

impl Script {
    /// Reads a script file.
    pub fn load(path: &Path) -> Result<Self, ScriptError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses script text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScriptError> {
        // Parse as a value first so that an error in one action is reported with its index, rather
        // than serde's "did not match any variant of untagged enum".
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ScriptError::Parse {
                path: origin.to_owned(),
                why: e.to_string(),
            })?;
        let actions = match &value {
            serde_json::Value::Array(items) => items.as_slice(),
            serde_json::Value::Object(map) => {
                match map.get("actions") {
                    Some(serde_json::Value::Array(items)) => items.as_slice(),
                    _ => {
                        return Err(ScriptError::Parse {
                        path: origin.to_owned(),
                        why: "a script is an array of actions or an object with an \"actions\" array".into(),
                    });
                    }
                }
            }
            _ => {
                return Err(ScriptError::Parse {
                    path: origin.to_owned(),
                    why: "a script is an array of actions or an object with an \"actions\" array"
                        .into(),
                });
            }
        };
        for (i, item) in actions.iter().enumerate() {
            if let Err(e) = Action::deserialize(item) {
                return Err(ScriptError::Parse {
                    path: origin.to_owned(),
                    why: format!(
                        "action {} ({}): {e}",
                        i + 1,
                        item.get("action").unwrap_or(&serde_json::Value::Null)
                    ),
                });
            }
        }
        let file: ScriptFile = serde_json::from_value(value).map_err(|e| ScriptError::Parse {
            path: origin.to_owned(),
            why: e.to_string(),
        })?;
        Ok(match file {
            ScriptFile::Actions(actions) => Script {
                ring_size: default_ring_size(),
                timeout_ms: default_timeout_ms(),
                actions,
            },
            ScriptFile::Full(script) => script,
        })
    }

    /// The tour `hvisd sim` plays without a script: every IC offered and negotiated, heartbeats, a
    /// time sample, a shutdown request (logged, never acted on), a version mismatch, and a rescind
    /// followed by a new offer.
    pub fn tour() -> Self {
        let text = include_str!("tour.json");
        // The tour is part of the binary and covered by a test; failing here is a build defect.
        Self::parse(text, "built-in tour").expect("built-in tour script parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_tour_parses() {
        assert!(!Script::tour().actions.is_empty());
    }

    #[test]
    fn a_bare_array_is_a_script_with_defaults() {
        let s = Script::parse(r#"[{"action":"sleep","ms":5}]"#, "t").unwrap();
        assert_eq!(s.ring_size, 16384);
        assert!(matches!(s.actions[0], Action::Sleep { ms: 5 }));
    }

    #[test]
    fn hvsock_actions_parse_with_defaults() {
        let s = Script::parse(
            r#"[{"action":"hvsock_connect","port":5000,"text":"hi"},
                {"action":"hvsock_listen","service":"00001388-facb-11e6-bd58-64006a7986d3","count":1},
                {"action":"hvsock_wait"}]"#,
            "t",
        )
        .unwrap();
        match &s.actions[0] {
            Action::HvsockConnect {
                expect,
                fin,
                close,
                connections,
                ..
            } => {
                assert_eq!(expect, "echo");
                assert!(*fin && *close);
                assert_eq!(*connections, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.actions[1].kind(), "hvsock_listen");
        assert_eq!(s.actions[2].kind(), "hvsock_wait");
    }

    #[test]
    fn typos_are_reported_with_the_action_index() {
        let err = Script::parse(r#"[{"action":"sleep","ms":5},{"action":"heartbeet"}]"#, "t")
            .unwrap_err();
        assert!(err.to_string().contains("action 2"), "{err}");
        let err = Script::parse(r#"[{"action":"sleep","msec":5}]"#, "t").unwrap_err();
        assert!(err.to_string().contains("msec"), "{err}");
    }
}
