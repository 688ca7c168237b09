//! The messages between the privileged core and a plugin worker process.
//!
//! A worker runs one plugin's WebAssembly in a confined process; the core keeps the rings, the
//! pools and every decision. They talk over one `SOCK_STREAM` Unix socket (a socketpair the core
//! creates): each message is a frame of a 4-byte little-endian length and a [postcard]-encoded
//! [`ToWorker`] or [`ToCore`]. A frame longer than [`MAX_FRAME`] is a protocol error.
//!
//! The core parses everything a worker sends as hostile input ([`decode_to_core`] is fuzzed):
//! lengths are bounded before anything is allocated, every string and list is bounded by the
//! frame, and what a worker claims (keys, plans, log lines) is checked again by the core against
//! the plugin's manifest. The first message each way carries [`PROTOCOL_VERSION`]; a worker of
//! another version is refused (an upgraded binary replacing the running one, say).

use serde::{Deserialize, Serialize};

use crate::kvp::{Pool, Value};

/// Version of this message set; both sides must agree.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame either side sends or accepts (a `describe` of thousands of keys fits).
pub const MAX_FRAME: usize = 4 << 20;

/// Bytes of the length prefix.
pub const FRAME_HEADER: usize = 4;

/// Core to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first message: what to run and with which grants.
    Init(Init),
    /// A call into the plugin, answered by [`ToCore::Reply`] with the same id.
    Call {
        /// Chosen by the core, unique among calls in flight.
        id: u64,
        /// The call.
        call: Call,
    },
    /// The answer to a worker's [`ToCore::Import`].
    ImportReply {
        /// The import's id.
        id: u64,
        /// The answer.
        reply: ImportReply,
    },
    /// Finish the calls in flight, then exit.
    Shutdown,
}

/// What a worker needs to start. The descriptors it names were given to the process at exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// [`PROTOCOL_VERSION`] of the core.
    pub version: u32,
    /// The plugin's name (for the worker's own diagnostics only: the core attributes everything).
    pub plugin: String,
    /// The plugin's `[[plugin]]` table, as TOML.
    pub manifest_toml: String,
    /// The uid that owns the precompiled artifact (the core's).
    pub core_uid: u32,
    /// Descriptor of the precompiled component (`.cwasm`), read-only.
    pub artifact_fd: i32,
    /// The plugin's directory grants, opened by the core.
    pub dirs: Vec<DirFd>,
    /// The unprivileged user and group the worker switches to before it loads anything.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Whether the worker must refuse to start without Landlock (tests set it on kernels that
    /// have it, so a silent downgrade fails them).
    pub require_landlock: bool,
    /// The worker's end of the stream socket (a `SOCK_SEQPACKET` socketpair), for a plugin
    /// that serves or opens hvsock connections: each connection's byte stream reaches the
    /// worker as one descriptor there, sent with `SCM_RIGHTS` and tagged with its connection id
    /// (see [`StreamTag`]). `None` for every other plugin.
    pub streams_fd: Option<i32>,
    /// Debug builds only: after confinement, try these escapes and report them instead of
    /// serving (the compromised-worker test). Ignored by release builds.
    pub escape_test: Vec<String>,
}

/// One directory grant, as a descriptor the worker inherited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirFd {
    /// The descriptor (`O_DIRECTORY`, opened by the core without following links).
    pub fd: i32,
    /// The path the plugin sees.
    pub guest: String,
    /// Whether the plugin may write below it.
    pub writable: bool,
}

/// A call into the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// A KVP provider's `describe` (on a fresh instance).
    Describe,
    /// A KVP provider's `get`.
    Get {
        /// The pool.
        pool: Pool,
        /// The key.
        key: String,
    },
    /// A KVP provider's `on-host-set`.
    OnHostSet {
        /// The pool.
        pool: Pool,
        /// The key.
        key: String,
        /// The value.
        value: Value,
    },
    /// A freeze hook's `pre-freeze`.
    PreFreeze(FreezeContext),
    /// A freeze hook's `post-thaw`.
    PostThaw(FreezeContext, FreezeOutcome),
    /// A freeze policy's `plan`.
    Plan(Vec<Mount>),
    /// An hvsock service's `serve` of one connection (on a fresh instance). The connection's
    /// stream was sent on the stream socket before this call, tagged `conn`.
    ServeHvsock {
        /// The service name from the manifest's `hvsock.listen`.
        service: String,
        /// The connection id tagging its stream.
        conn: u64,
    },
}

/// The bytes that travel with each descriptor on the stream socket: the connection's id.
pub type StreamTag = [u8; 8];

/// The tag of connection `conn`.
pub fn stream_tag(conn: u64) -> StreamTag {
    conn.to_le_bytes()
}

/// What a freeze hook is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeContext {
    /// The host's backup id.
    pub backup_id: String,
    /// Mount points concerned, in freeze order.
    pub mounts: Vec<String>,
    /// Milliseconds the hook has for this call.
    pub time_left_ms: u64,
}

/// How a freeze window ended (told to every post-thaw hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FreezeOutcome {
    /// Frozen and thawed.
    Thawed,
    /// A pre-freeze hook vetoed.
    Vetoed,
    /// Freezing failed (or its window ran out).
    FreezeFailed,
    /// The host aborted.
    Aborted,
}

/// A mount offered to a freeze policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mount {
    /// Mount point.
    pub path: String,
    /// File system type.
    pub fs_type: String,
    /// The mounted device.
    pub device: String,
}

/// A successful call's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallReply {
    /// `describe`: the keys the provider claims and the pools it listens to (the core checks
    /// them against the manifest again).
    Described {
        /// Claimed keys.
        keys: Vec<(Pool, String)>,
        /// Pools whose host sets it wants to hear about.
        subscribe: Vec<Pool>,
    },
    /// `get`: the value, or the provider's own error.
    Value(Result<Value, PluginError>),
    /// `on-host-set`, `post-thaw`: done.
    Done,
    /// `pre-freeze`: proceed, or veto with a reason.
    PreFreeze(Result<(), String>),
    /// `plan`: mount points in order, or a refusal with a reason.
    Plan(Result<Vec<String>, String>),
    /// `serve`: the connection ended, cleanly or with the plugin's reason.
    Served(Result<(), String>),
}

/// An error a plugin returns through its WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginError {
    /// Which case of the WIT `error`.
    pub kind: ErrorKind,
    /// Its sentence.
    pub message: String,
}

/// The cases of the WIT `error` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// `not-found`.
    NotFound,
    /// `denied`.
    Denied,
    /// `invalid`.
    Invalid,
    /// `unavailable`.
    Unavailable,
    /// `failed`.
    Failed,
}

/// Why a call produced no result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallFailure {
    /// The wasm trapped (the message is the worker's account, shown escaped).
    Trap(String),
    /// The call ran past its epoch deadline inside the worker.
    Deadline,
    /// A fresh instance could not be created.
    Instantiate(String),
    /// The plugin does not export what this call needs.
    NotProvided,
}

/// A call a plugin made to the core through one of its imports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Import {
    /// `kvp-store.get`.
    KvpGet {
        /// The pool.
        pool: Pool,
        /// The key.
        key: String,
    },
    /// `kvp-store.set`.
    KvpSet {
        /// The pool.
        pool: Pool,
        /// The key.
        key: String,
        /// The value.
        value: Value,
    },
    /// `kvp-store.delete`.
    KvpDelete {
        /// The pool.
        pool: Pool,
        /// The key.
        key: String,
    },
    /// `kvp-store.list` (every key of the pool the plugin may read; the worker filters by
    /// prefix).
    KvpList {
        /// The pool.
        pool: Pool,
    },
    /// `hvsock.connect`: the core checks the grant, connects, and sends the stream on the
    /// stream socket (tagged with the connection id of the reply) before it replies.
    HvsockConnect {
        /// The service name (one of the manifest's `hvsock.connect`).
        service: String,
    },
}

/// The core's answer to an [`Import`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportReply {
    /// `kvp-store.get`.
    KvpGet(Result<Option<Value>, PluginError>),
    /// `kvp-store.set`.
    KvpSet(Result<(), PluginError>),
    /// `kvp-store.delete`.
    KvpDelete(Result<bool, PluginError>),
    /// `kvp-store.list`.
    KvpList(Result<Vec<String>, PluginError>),
    /// `hvsock.connect`: the connection id of the stream sent on the stream socket.
    HvsockConnect(Result<u64, PluginError>),
}

/// Log levels a plugin may write at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// Worker to core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCore {
    /// The answer to [`ToWorker::Init`]: the worker is confined and its component loaded.
    Ready {
        /// [`PROTOCOL_VERSION`] of the worker.
        version: u32,
        /// How the confinement went (Landlock enforcement, for the core's log and status).
        confinement: String,
    },
    /// The answer to a [`ToWorker::Call`].
    Reply {
        /// The call's id.
        id: u64,
        /// The result.
        reply: Result<CallReply, CallFailure>,
    },
    /// A plugin's import call, answered by [`ToWorker::ImportReply`].
    Import {
        /// Chosen by the worker.
        id: u64,
        /// The call.
        import: Import,
    },
    /// A line the plugin logged (the `logging` import, or its stdout/stderr). The core
    /// attributes it, escapes it and rate-limits it.
    Log {
        /// Level.
        level: LogLevel,
        /// The text.
        message: String,
    },
    /// The worker could not start its plugin (the component does not load, a world is missing,
    /// the confinement failed). It exits after sending this.
    InitFailed {
        /// Why, for the operator.
        reason: String,
    },
    /// Debug builds: the results of [`Init::escape_test`].
    EscapeReport(Vec<(String, String)>),
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("a worker frame of {0} bytes announced; at most {MAX_FRAME}")]
    TooLarge(usize),
    /// The payload does not decode.
    #[error("a worker frame does not decode: {0}")]
    Malformed(String),
}

/// The payload length a frame header announces, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; FRAME_HEADER]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER];
    // postcard into a Vec cannot fail for these types (no maps with non-string keys, no
    // unsupported serde features); an empty payload would be refused by the peer's decoder.
    let _ = postcard::to_io(message, &mut frame);
    let len = (frame.len() - FRAME_HEADER) as u32;
    frame[..FRAME_HEADER].copy_from_slice(&len.to_le_bytes());
    frame
}

/// A [`ToWorker`] as a frame (length prefix included).
pub fn encode_to_worker(message: &ToWorker) -> Vec<u8> {
    encode(message)
}

/// A [`ToCore`] as a frame (length prefix included).
pub fn encode_to_core(message: &ToCore) -> Vec<u8> {
    encode(message)
}

/// Decodes exactly one message from `payload`: trailing bytes are an error too.
fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    match postcard::take_from_bytes(payload) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Decodes a frame's payload from a worker (hostile input: bounded, never panics).
pub fn decode_to_core(payload: &[u8]) -> Result<ToCore, FrameError> {
    decode(payload)
}

/// Decodes a frame's payload from the core.
pub fn decode_to_worker(payload: &[u8]) -> Result<ToWorker, FrameError> {
    decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_core(m: ToCore) {
        let frame = encode_to_core(&m);
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_to_core(&frame[4..]).unwrap(), m);
    }

    #[test]
    fn every_kind_of_message_round_trips() {
        round_trip_core(ToCore::Ready {
            version: PROTOCOL_VERSION,
            confinement: "landlock: fully enforced".into(),
        });
        round_trip_core(ToCore::Reply {
            id: 7,
            reply: Ok(CallReply::Described {
                keys: vec![(Pool::Guest, "app.version".into())],
                subscribe: vec![Pool::External],
            }),
        });
        round_trip_core(ToCore::Reply {
            id: 8,
            reply: Err(CallFailure::Trap("unreachable".into())),
        });
        round_trip_core(ToCore::Import {
            id: 1,
            import: Import::KvpSet {
                pool: Pool::Guest,
                key: "k".into(),
                value: Value::U64(9),
            },
        });
        round_trip_core(ToCore::Import {
            id: 1 << 63,
            import: Import::HvsockConnect {
                service: "host-time".into(),
            },
        });
        round_trip_core(ToCore::Reply {
            id: 9,
            reply: Ok(CallReply::Served(Err("bye".into()))),
        });
        round_trip_core(ToCore::Log {
            level: LogLevel::Warn,
            message: "line\nforged".into(),
        });
        let init = ToWorker::Init(Init {
            version: PROTOCOL_VERSION,
            plugin: "p".into(),
            manifest_toml: "name = \"p\"".into(),
            core_uid: 0,
            uid: 65534,
            gid: 65534,
            artifact_fd: 4,
            dirs: vec![DirFd {
                fd: 5,
                guest: "/data".into(),
                writable: true,
            }],
            require_landlock: false,
            streams_fd: Some(6),
            escape_test: vec![],
        });
        let frame = encode_to_worker(&init);
        assert_eq!(decode_to_worker(&frame[4..]).unwrap(), init);
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        assert!(matches!(
            frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(decode_to_core(&[0xff; 16]).is_err());
        assert!(decode_to_core(&[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_from_a_worker_decode_or_fail_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = decode_to_core(&bytes);
        }
    }
}
