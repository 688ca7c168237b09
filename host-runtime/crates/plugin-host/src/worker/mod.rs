//! The plugin worker: the process that runs one plugin's WebAssembly, outside the privileged core.
//!
//! The core starts `hvisd plugin-worker` (the same binary) with a control socket, the compiled
//! component and the plugin's directory grants as inherited descriptors, and sends [`Init`]. The
//! worker then, before it reads a byte of plugin code:
//!
//! 1. confines itself ([`confine`]): resource limits, a private network namespace, no new
//!    privileges, the unprivileged user (which leaves it no capabilities), death with its parent,
//!    Landlock limited to the granted directories, a seccomp allow-list;
//! 2. loads the artifact through [`hvisd_sys::wasm::TrustedArtifact::from_fd`] (a read-only file
//!    of the core's user: the worker cannot choose what native code it runs);
//! 3. answers [`ToWorker::Call`]s with the in-process [`PluginHost`] (one plugin), forwarding the
//!    plugin's imports (`kvp-store`) to the core as [`ToCore::Import`] and its log lines as
//!    [`ToCore::Log`]. The core checks every import against the grants again, attributes and
//!    rate-limits every log line, and enforces the budgets from outside (wall clock, CPU, memory
//!    through `RLIMIT_AS`): nothing the worker says or does is trusted.

mod confine;
#[cfg(debug_assertions)]
mod escape;
mod imports;
pub mod link;
mod logs;
pub mod streams;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvisd_protocol::worker::{
    self as wire, Call, CallFailure, CallReply, ErrorKind, Init, PROTOCOL_VERSION, PluginError,
    ToCore, ToWorker,
};
use tokio::sync::mpsc;

use crate::lifecycle::{HostServices, PluginHost};
use crate::manifest::PluginManifest;
use crate::types::KvpError;
use crate::worlds::freeze_hooks::{FreezeContext, FreezeOutcome, PreFreeze};
use crate::worlds::freeze_policy::{FreezePlan, Mount};
use crate::{CallError, HostError};

/// Why a worker stopped before serving.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The control socket failed or the core sent something that is not the protocol.
    #[error("worker control socket: {0}")]
    Control(String),
    /// Confinement could not be applied: the worker refuses to run the plugin unconfined.
    #[error("confinement: {0}")]
    Confine(String),
}

/// Frames waiting to be written to the core.
pub(crate) type Outbox = mpsc::Sender<Vec<u8>>;

/// Queued frames to the core; past this the worker waits (imports, replies) or drops (logs).
const OUTBOX_DEPTH: usize = 256;

fn read_frame_blocking(
    stream: &mut std::os::unix::net::UnixStream,
) -> Result<Vec<u8>, WorkerError> {
    let mut header = [0u8; wire::FRAME_HEADER];
    stream
        .read_exact(&mut header)
        .map_err(|e| WorkerError::Control(e.to_string()))?;
    let len = wire::frame_len(header).map_err(|e| WorkerError::Control(e.to_string()))?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(|e| WorkerError::Control(e.to_string()))?;
    Ok(payload)
}

/// The worker's main: serves the core on the control socket `control_fd` until told to stop or
/// the socket closes. Call it first thing in the process, single-threaded.
pub fn run(control_fd: i32) -> Result<(), WorkerError> {
    let control: OwnedFd = hvisd_sys::process::adopt_inherited_fd(control_fd)
        .map_err(|e| WorkerError::Control(format!("descriptor {control_fd}: {e}")))?;
    let mut stream = std::os::unix::net::UnixStream::from(control);
    let init = match wire::decode_to_worker(&read_frame_blocking(&mut stream)?) {
        Ok(ToWorker::Init(init)) => init,
        Ok(other) => {
            return Err(WorkerError::Control(format!(
                "expected Init, got {other:?}"
            )));
        }
        Err(e) => return Err(WorkerError::Control(e.to_string())),
    };
    let fail = |stream: &mut std::os::unix::net::UnixStream, reason: String| {
        let _ = stream.write_all(&wire::encode_to_core(&ToCore::InitFailed {
            reason: reason.clone(),
        }));
        reason
    };
    if init.version != PROTOCOL_VERSION {
        let why = fail(
            &mut stream,
            format!(
                "core speaks worker protocol {}, this worker {PROTOCOL_VERSION}",
                init.version
            ),
        );
        return Err(WorkerError::Control(why));
    }
    let mut manifest: PluginManifest = match toml::from_str(&init.manifest_toml) {
        Ok(m) => m,
        Err(e) => {
            let why = fail(&mut stream, format!("manifest: {e}"));
            return Err(WorkerError::Control(why));
        }
    };
    // The plugin sees its grants through the descriptors the core opened.
    for d in &mut manifest.dirs {
        match init.dirs.iter().find(|g| g.guest == d.guest) {
            Some(g) => d.host = format!("/proc/self/fd/{}", g.fd).into(),
            None => {
                let why = fail(
                    &mut stream,
                    format!("no descriptor for the grant of {}", d.guest),
                );
                return Err(WorkerError::Control(why));
            }
        }
    }
    // The async runtime is built before the seccomp filter: its I/O and signal drivers create
    // their descriptors (an epoll instance, a wake-up socket pair) once, here, and the filter then
    // need not allow creating more.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Control(format!("async runtime: {e}")))?;
    let connections = if init.streams_fd.is_some() {
        manifest.limits.hvsock_connections
    } else {
        0
    };
    let (report, _grants) = match confine::confine(&init, manifest.limits.memory_mib, connections) {
        Ok(confined) => confined,
        Err(e) => {
            let why = fail(&mut stream, format!("confinement failed: {e}"));
            return Err(WorkerError::Confine(why));
        }
    };
    #[cfg(debug_assertions)]
    if !init.escape_test.is_empty() {
        let results = escape::attempt(&init.escape_test);
        let _ = stream.write_all(&wire::encode_to_core(&ToCore::EscapeReport(results)));
        return Ok(());
    }
    let served = runtime.block_on(serve(stream, init, manifest, report));
    drop(_grants);
    served
}

async fn serve(
    stream: std::os::unix::net::UnixStream,
    init: Init,
    manifest: PluginManifest,
    confinement: String,
) -> Result<(), WorkerError> {
    let (mut reader, writer) =
        link::split(OwnedFd::from(stream)).map_err(|e| WorkerError::Control(e.to_string()))?;
    let writer = Arc::new(writer);
    // Log lines and imports queue here (a log line is written from code that cannot wait);
    // replies, the hot path, go straight to the socket.
    let (outbox, mut outgoing) = mpsc::channel::<Vec<u8>>(OUTBOX_DEPTH);
    let writer_task = {
        let writer = writer.clone();
        tokio::spawn(async move {
            while let Some(frame) = outgoing.recv().await {
                if writer.send(&frame).await.is_err() {
                    break;
                }
            }
        })
    };
    logs::install(outbox.clone());
    let pending: imports::Pending = Arc::new(Mutex::new(HashMap::new()));
    // hvsock connections arrive as descriptors on the stream socket.
    let inbox = match init.streams_fd {
        None => None,
        Some(fd) => {
            match hvisd_sys::process::adopt_inherited_fd(fd).and_then(streams::StreamInbox::start) {
                Ok(inbox) => Some(inbox),
                Err(e) => return init_failed(&outbox, format!("stream socket: {e}")).await,
            }
        }
    };
    let hvsock: Option<Arc<dyn crate::HvsockConnector>> = inbox.clone().map(|inbox| {
        Arc::new(imports::ForwardingConnector::new(
            outbox.clone(),
            pending.clone(),
            inbox,
        )) as Arc<dyn crate::HvsockConnector>
    });
    let host = match PluginHost::for_worker(HostServices {
        kvp: Arc::new(imports::ForwardingKvpStore::new(
            outbox.clone(),
            pending.clone(),
        )),
        hvsock,
    }) {
        Ok(h) => Arc::new(h),
        Err(e) => return init_failed(&outbox, e.to_string()).await,
    };
    // The core's frames are read from now on: loading may already call imports (a provider's
    // `describe` reading its settings), whose replies must get through.
    let plugin = manifest.name.clone();
    let reader_task = {
        let (host, writer, pending) = (host.clone(), writer.clone(), pending.clone());
        tokio::spawn(async move {
            while let Ok(Some(payload)) = reader.next().await {
                match wire::decode_to_worker(&payload) {
                    Ok(ToWorker::Call { id, call }) => {
                        let (host, writer, plugin) = (host.clone(), writer.clone(), plugin.clone());
                        let inbox = inbox.clone();
                        tokio::spawn(async move {
                            let reply = handle(&host, &plugin, inbox.as_deref(), call).await;
                            let _ = writer
                                .send(&wire::encode_to_core(&ToCore::Reply { id, reply }))
                                .await;
                        });
                    }
                    Ok(ToWorker::ImportReply { id, reply }) => {
                        imports::complete(&pending, id, reply)
                    }
                    Ok(ToWorker::Shutdown) | Ok(ToWorker::Init(_)) | Err(_) => break,
                }
            }
        })
    };
    let artifact = match hvisd_sys::wasm::TrustedArtifact::from_fd(
        match hvisd_sys::process::adopt_inherited_fd(init.artifact_fd) {
            Ok(fd) => fd,
            Err(e) => return init_failed(&outbox, format!("artifact descriptor: {e}")).await,
        },
        init.core_uid,
    ) {
        Ok(a) => a,
        Err(e) => return init_failed(&outbox, e.to_string()).await,
    };
    if let Err(e) = host.load_artifact(&manifest, &artifact).await {
        let why = match e {
            HostError::Refused { problem, .. } => problem,
            other => other.to_string(),
        };
        return init_failed(&outbox, why).await;
    }
    drop(artifact);
    let _ = outbox
        .send(wire::encode_to_core(&ToCore::Ready {
            version: PROTOCOL_VERSION,
            confinement,
        }))
        .await;
    let _ = reader_task.await;
    drop(outbox);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    Ok(())
}

async fn init_failed(outbox: &Outbox, reason: String) -> Result<(), WorkerError> {
    let _ = outbox
        .send(wire::encode_to_core(&ToCore::InitFailed {
            reason: reason.clone(),
        }))
        .await;
    // Let the writer flush it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Err(WorkerError::Control(reason))
}

fn plugin_error(e: KvpError) -> PluginError {
    let (kind, message) = match e {
        KvpError::NotFound(m) => (ErrorKind::NotFound, m),
        KvpError::Denied(m) => (ErrorKind::Denied, m),
        KvpError::Invalid(m) => (ErrorKind::Invalid, m),
        KvpError::Unavailable(m) => (ErrorKind::Unavailable, m),
        KvpError::Failed(m) => (ErrorKind::Failed, m),
    };
    PluginError { kind, message }
}

fn failure(e: CallError) -> CallFailure {
    match e {
        CallError::Deadline { .. } => CallFailure::Deadline,
        CallError::Instantiate { message, .. } => CallFailure::Instantiate(message),
        CallError::NotProvided { .. } | CallError::NoSuchPlugin(_) => CallFailure::NotProvided,
        CallError::Trap { message, .. } => CallFailure::Trap(message),
        CallError::Disabled { reason, .. } => CallFailure::Trap(reason),
        CallError::Plugin(e) => CallFailure::Trap(e.to_string()),
    }
}

fn freeze_context(ctx: wire::FreezeContext) -> FreezeContext {
    FreezeContext {
        backup_id: ctx.backup_id,
        mounts: ctx.mounts,
        deadline: Instant::now() + Duration::from_millis(ctx.time_left_ms),
    }
}

/// One call on the worker's one plugin.
async fn handle(
    host: &PluginHost,
    plugin: &str,
    inbox: Option<&streams::StreamInbox>,
    call: Call,
) -> Result<CallReply, CallFailure> {
    match call {
        Call::ServeHvsock { service, conn } => {
            let inbox = inbox.ok_or(CallFailure::NotProvided)?;
            // The core sent the descriptor before the call: it is there, or the core is gone.
            let fd = inbox
                .take(conn, Duration::from_secs(5))
                .await
                .ok_or_else(|| CallFailure::Trap(format!("no stream for connection {conn}")))?;
            let stream = streams::tokio_stream(fd)
                .map_err(|e| CallFailure::Trap(format!("connection {conn}: {e}")))?;
            // tokio's write half sends the FIN (shutdown of writing) when it is dropped, with
            // the plugin's instance, whether or not the plugin closed its stream.
            let (r, w) = stream.into_split();
            match host.serve_hvsock(&service, Box::pin(r), Box::pin(w)).await {
                Ok(()) => Ok(CallReply::Served(Ok(()))),
                Err(CallError::Plugin(e)) => Ok(CallReply::Served(Err(e.to_string()))),
                Err(e) => Err(failure(e)),
            }
        }
        Call::Describe => {
            let keys = host
                .provider_keys()
                .into_iter()
                .find(|p| p.plugin == plugin)
                .ok_or(CallFailure::NotProvided)?;
            Ok(CallReply::Described {
                keys: keys.keys.into_iter().map(|k| (k.pool, k.key)).collect(),
                subscribe: keys.subscribe,
            })
        }
        Call::Get { pool, key } => match host.provider_get(plugin, pool, &key).await {
            Ok(v) => Ok(CallReply::Value(Ok(v))),
            Err(CallError::Plugin(e)) => Ok(CallReply::Value(Err(plugin_error(e)))),
            Err(e) => Err(failure(e)),
        },
        Call::OnHostSet { pool, key, value } => {
            match host.notify_host_set(pool, &key, &value).await.pop() {
                None => Ok(CallReply::Done),
                Some(e) => Err(failure(e)),
            }
        }
        Call::PreFreeze(ctx) => match host.pre_freeze(&freeze_context(ctx)).await {
            PreFreeze::Proceed => Ok(CallReply::PreFreeze(Ok(()))),
            PreFreeze::Veto { reason, .. } => Ok(CallReply::PreFreeze(Err(reason))),
        },
        Call::PostThaw(ctx, outcome) => {
            let outcome = match outcome {
                wire::FreezeOutcome::Thawed => FreezeOutcome::Thawed,
                wire::FreezeOutcome::Vetoed => FreezeOutcome::Vetoed,
                wire::FreezeOutcome::FreezeFailed => FreezeOutcome::FreezeFailed,
                wire::FreezeOutcome::Aborted => FreezeOutcome::Aborted,
            };
            match host.post_thaw(&freeze_context(ctx), outcome).await.pop() {
                None => Ok(CallReply::Done),
                Some(e) => Err(failure(e)),
            }
        }
        Call::Plan(mounts) => {
            let mounts: Vec<Mount> = mounts
                .into_iter()
                .map(|m| Mount {
                    path: m.path,
                    fs_type: m.fs_type,
                    device: m.device,
                })
                .collect();
            match host.freeze_plan(&mounts).await {
                FreezePlan::Default => Err(CallFailure::NotProvided),
                FreezePlan::Freeze { order, .. } => Ok(CallReply::Plan(Ok(order))),
                FreezePlan::Refuse { reason, .. } => Ok(CallReply::Plan(Err(reason))),
            }
        }
    }
}

/// The descriptor number where the core puts a worker's control socket.
pub const CONTROL_FD: i32 = 3;
