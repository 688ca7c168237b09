//! One plugin worker process, seen from the core: started, told what to run, called, watched,
//! and killed when it misses a deadline or misbehaves.
//!
//! Everything that comes back from the worker is hostile input: frames are bounded and decoded
//! with `hvisd_protocol::worker::decode_to_core`; a frame that does not decode, a reply to a call
//! that was never made, or an answer of the wrong shape ends the worker. Log lines are attributed
//! here (the plugin's name is the core's, never the worker's), escaped and rate-limited; imports
//! are checked against the manifest again before they reach the pool store.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvisd_plugin_host::worker::link::{self, FrameReader, FrameWriter};
use hvisd_plugin_host::{CheckedKvp, KvpError, KvpStore, PluginManifest};
use hvisd_protocol::text::{Escaped, LogBudget, suppressed_note};
use hvisd_protocol::worker::{
    self as wire, Call, CallFailure, CallReply, DirFd, ErrorKind, Import, ImportReply, Init,
    LogLevel, PROTOCOL_VERSION, PluginError, ToCore, ToWorker,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};

/// How long a worker may take to confine itself and load its component.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls in flight to one worker; more wait (bounded by their own deadlines).
const MAX_IN_FLIGHT: usize = 64;

/// What the core needs to start a worker.
pub struct WorkerSpec {
    /// The plugin's manifest (its name is what every log line is attributed to).
    pub manifest: PluginManifest,
    /// The compiled component, read-only.
    pub artifact: OwnedFd,
    /// The directory grants, opened by the core, each with its guest path and access.
    pub dirs: Vec<(OwnedFd, String, bool)>,
    /// The unprivileged user and group.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Refuse to start without Landlock.
    pub require_landlock: bool,
    /// Debug builds: escapes to attempt instead of serving (the compromised-worker test).
    pub escape_test: Vec<String>,
}

/// What backs a worker's imports.
#[derive(Clone)]
pub struct WorkerImports {
    /// `kvp-store`.
    pub kvp: Arc<dyn KvpStore>,
    /// `hvsock.connect` (`None`: connects are refused as unavailable).
    pub hvsock: Option<super::broker::HvsockImports>,
}

/// The hvsock side of a worker whose plugin listens or connects.
struct Streams {
    sender: hvisd_plugin_host::worker::streams::StreamSender,
    /// Connections open (served and opened), bounded by `limits.hvsock_connections`.
    open: Arc<tokio::sync::Semaphore>,
    limit: u32,
    next_conn: AtomicU64,
    idle: Duration,
    buffer: usize,
}

impl Streams {
    /// A connection id, a permit for it, and the pair whose worker end was sent tagged with it.
    async fn open(&self) -> Result<(u64, tokio::sync::OwnedSemaphorePermit, OwnedFd), String> {
        let permit = self.open.clone().try_acquire_owned().map_err(|_| {
            format!(
                "the plugin has {} hvsock connections open (limits.hvsock_connections)",
                self.limit
            )
        })?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (core_end, worker_end) =
            hvisd_plugin_host::worker::streams::connection_pair(self.buffer)
                .map_err(|e| format!("socketpair: {e}"))?;
        self.sender
            .send(conn, std::os::fd::AsFd::as_fd(&worker_end))
            .await
            .map_err(|e| format!("sending the stream to the worker: {e}"))?;
        Ok((conn, permit, core_end))
    }
}

/// Why a worker could not start or a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    /// The process could not be started.
    #[error("cannot start the worker: {0}")]
    Spawn(String),
    /// The worker refused its plugin (it does not load, confinement failed...).
    #[error("{0}")]
    InitFailed(String),
    /// The worker did not answer in time: it was killed.
    #[error("no answer within {0:?}; the worker was killed")]
    Timeout(Duration),
    /// The call ran past the plugin's deadline inside the worker (the engine stopped it): the
    /// worker was killed all the same, so the next call gets a fresh one.
    #[error("ran past its deadline; the worker was killed")]
    Deadline,
    /// The worker is gone (it crashed, was killed, or broke the protocol).
    #[error("the worker is gone: {0}")]
    Gone(String),
    /// The call failed inside the worker.
    #[error("{0}")]
    Call(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<CallReply, CallFailure>>>>>;

/// A running worker.
pub struct Worker {
    plugin: Arc<str>,
    pid: u32,
    outbox: Arc<FrameWriter>,
    pending: Pending,
    next_id: AtomicU64,
    in_flight: tokio::sync::Semaphore,
    /// `Some(reason)` once the process has ended.
    gone: watch::Receiver<Option<String>>,
    kill: mpsc::Sender<()>,
    /// Set when the core kills it: from then on it counts as gone, even before it is reaped.
    killed: std::sync::atomic::AtomicBool,
    /// The worker's account of its confinement.
    pub confinement: String,
    started: Instant,
    /// For a plugin that listens or connects: where its connections' streams go.
    streams: Option<Arc<Streams>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("plugin", &self.plugin)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

static WORKER_BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Starts workers from `hvisd` at `path` instead of this program: for tests and embedders whose
/// own executable is not `hvisd`. Only the first call counts; the daemon never calls it.
pub fn set_worker_binary(path: std::path::PathBuf) {
    let _ = WORKER_BINARY.set(path);
}

/// The binary to start workers from: this very program (or [`set_worker_binary`]'s).
fn worker_binary() -> std::path::PathBuf {
    if let Some(path) = WORKER_BINARY.get() {
        return path.clone();
    }
    // /proc/self/exe names the running binary's inode even if the file was replaced (a package
    // upgrade): the worker is always this program; the protocol version guards the rest.
    "/proc/self/exe".into()
}

impl Worker {
    /// Starts a worker for `spec` and waits until it is confined and ready. `kvp` backs the
    /// plugin's `kvp-store` import. With a non-empty `spec.escape_test`, returns the escape report
    /// instead (debug builds).
    pub async fn start(
        spec: WorkerSpec,
        imports: WorkerImports,
    ) -> Result<(Worker, Option<Vec<(String, String)>>), WorkerError> {
        let plugin: Arc<str> = spec.manifest.name.as_str().into();
        let (core_end, worker_end) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| WorkerError::Spawn(format!("socketpair: {e}")))?;
        let mut fds = vec![
            (worker_end, hvisd_plugin_host::worker::CONTROL_FD),
            (spec.artifact, 4),
        ];
        let mut dirs = Vec::new();
        for (i, (fd, guest, writable)) in spec.dirs.into_iter().enumerate() {
            let target = 5 + i as i32;
            fds.push((fd, target));
            dirs.push(DirFd {
                fd: target,
                guest,
                writable,
            });
        }
        // A plugin that serves or opens hvsock connections gets a stream socket.
        let hv = &spec.manifest.hvsock;
        let mut streams = None;
        let mut streams_fd = None;
        if !hv.listen.is_empty() || !hv.connect.is_empty() {
            let (core_streams, worker_streams) =
                hvisd_plugin_host::worker::streams::socketpair()
                    .map_err(|e| WorkerError::Spawn(format!("stream socketpair: {e}")))?;
            let target = 5 + dirs.len() as i32;
            fds.push((worker_streams, target));
            streams_fd = Some(target);
            let limits = &spec.manifest.limits;
            streams = Some(Arc::new(Streams {
                sender: hvisd_plugin_host::worker::streams::StreamSender::new(core_streams)
                    .map_err(|e| WorkerError::Spawn(format!("stream socket: {e}")))?,
                open: Arc::new(tokio::sync::Semaphore::new(
                    limits.hvsock_connections as usize,
                )),
                limit: limits.hvsock_connections,
                next_conn: AtomicU64::new(1),
                idle: Duration::from_millis(limits.hvsock_idle_ms),
                buffer: limits.hvsock_buffer_kib as usize * 1024,
            }));
        }
        let manifest_toml = toml::to_string(&spec.manifest)
            .map_err(|e| WorkerError::Spawn(format!("manifest: {e}")))?;
        let mut cmd = tokio::process::Command::new(worker_binary());
        cmd.arg("plugin-worker")
            .env_clear()
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        hvisd_sys::process::inherit_fds(cmd.as_std_mut(), fds);
        let mut child = cmd.spawn().map_err(|e| WorkerError::Spawn(e.to_string()))?;
        // The command owns the worker's ends of the descriptors: dropping it closes them here,
        // so the control socket reports the worker's exit as end of file.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let (reader, writer) = link::split(core_end)
            .map_err(|e| WorkerError::Spawn(format!("control socket: {e}")))?;
        let outbox = Arc::new(writer);

        // The process: reaped by its own task, killed on request (only while not yet reaped, so
        // a recycled pid is never signalled).
        let (gone_tx, gone) = watch::channel(None);
        let (kill, mut kill_rx) = mpsc::channel::<()>(1);
        let stderr = child.stderr.take();
        let plugin_for_wait = plugin.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                status = child.wait() => match status {
                    Ok(s) => format!("worker exited: {s}"),
                    Err(e) => format!("waiting for the worker: {e}"),
                },
                _ = kill_rx.recv() => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    "worker killed by the core".to_owned()
                }
            };
            tracing::debug!(plugin = %plugin_for_wait, "{reason}");
            let _ = gone_tx.send(Some(reason));
        });
        if let Some(stderr) = stderr {
            tokio::spawn(stderr_lines(plugin.clone(), stderr));
        }

        let init = ToWorker::Init(Init {
            version: PROTOCOL_VERSION,
            plugin: plugin.to_string(),
            manifest_toml,
            core_uid: rustix::process::geteuid().as_raw(),
            uid: spec.uid,
            gid: spec.gid,
            artifact_fd: 4,
            dirs,
            require_landlock: spec.require_landlock,
            streams_fd,
            escape_test: spec.escape_test,
        });
        outbox
            .send(&wire::encode_to_worker(&init))
            .await
            .map_err(|e| WorkerError::Spawn(format!("sending Init: {e}")))?;

        let pending = Pending::default();
        let (started_tx, started_rx) = oneshot::channel();
        tokio::spawn(serve_worker(
            spec.manifest,
            reader,
            outbox.clone(),
            pending.clone(),
            (imports, streams.clone()),
            kill.clone(),
            started_tx,
        ));
        let refuse = |why: String| {
            let _ = kill.try_send(());
            Err(WorkerError::InitFailed(why))
        };
        let confinement = match tokio::time::timeout(START_TIMEOUT, started_rx).await {
            Err(_) => return refuse(format!("the worker was not ready within {START_TIMEOUT:?}")),
            Ok(Err(_)) => {
                // The connection ended first: say how the process ended, if it has by now.
                let mut gone = gone.clone();
                let how = tokio::time::timeout(
                    Duration::from_millis(500),
                    gone.wait_for(|g| g.is_some()),
                )
                .await
                .ok()
                .and_then(|g| g.ok().and_then(|g| g.clone()))
                .unwrap_or_else(|| "its control socket closed".to_owned());
                return refuse(format!("the worker failed to start: {how}"));
            }
            Ok(Ok(Startup::Ready(confinement))) => confinement,
            Ok(Ok(Startup::Failed(reason))) => return refuse(reason),
            Ok(Ok(Startup::Escape(report))) => {
                let _ = kill.try_send(());
                let worker = Worker {
                    plugin,
                    pid,
                    outbox,
                    pending,
                    next_id: AtomicU64::new(1),
                    in_flight: tokio::sync::Semaphore::new(0),
                    gone,
                    kill,
                    killed: std::sync::atomic::AtomicBool::new(true),
                    confinement: String::new(),
                    started: Instant::now(),
                    streams: None,
                };
                return Ok((worker, Some(report)));
            }
        };

        Ok((
            Worker {
                plugin,
                pid,
                outbox,
                pending,
                next_id: AtomicU64::new(1),
                // Connections' `serve` calls last: they get room of their own, so they never
                // hold up the short calls.
                in_flight: tokio::sync::Semaphore::new(
                    MAX_IN_FLIGHT + streams.as_ref().map_or(0, |s| s.limit as usize),
                ),
                gone,
                kill,
                killed: std::sync::atomic::AtomicBool::new(false),
                confinement,
                started: Instant::now(),
                streams,
            },
            None,
        ))
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has ended or is being killed.
    pub fn is_gone(&self) -> bool {
        self.killed.load(Ordering::Relaxed) || self.gone.borrow().is_some()
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Kills the process (idempotent).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        let _ = self.kill.try_send(());
    }

    /// CPU time the process has used (user + system), from `/proc/PID/stat`; `None` once it is
    /// gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        if self.is_gone() {
            return None;
        }
        cpu_time_of(self.pid)
    }

    /// Resident memory of the process, from `/proc/PID/status`.
    pub fn rss_bytes(&self) -> Option<u64> {
        if self.is_gone() {
            return None;
        }
        rss_of(self.pid)
    }

    /// Makes `call` and waits for its reply for at most `deadline`; past it the worker is
    /// killed and the caller gets [`WorkerError::Timeout`] at once.
    pub async fn call(&self, call: Call, deadline: Duration) -> Result<CallReply, WorkerError> {
        self.call_inner(call, deadline, true).await
    }

    /// As [`Worker::call`]; `kill_on_deadline` false for calls on a fresh instance (an hvsock
    /// `serve`), whose end at the engine's deadline leaves nothing behind in the worker.
    async fn call_inner(
        &self,
        call: Call,
        deadline: Duration,
        kill_on_deadline: bool,
    ) -> Result<CallReply, WorkerError> {
        let started = Instant::now();
        let mut gone = self.gone.clone();
        if let Some(reason) = gone.borrow().clone() {
            return Err(WorkerError::Gone(reason));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let work = async {
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| WorkerError::Gone("closed".into()))?;
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, tx);
            self.outbox
                .send(&wire::encode_to_worker(&ToWorker::Call { id, call }))
                .await
                .map_err(|_| WorkerError::Gone("its control socket is closed".into()))?;
            tokio::select! {
                reply = rx => reply.map_err(|_| WorkerError::Gone("it ended during the call".into())),
                g = gone.wait_for(|g| g.is_some()) => {
                    Err(WorkerError::Gone(g.map(|g| g.clone().unwrap_or_default()).unwrap_or_default()))
                }
            }
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(CallFailure::Deadline))) => {
                // Whatever the plugin was parked in is not trusted to have let go.
                if kill_on_deadline {
                    self.kill();
                }
                Err(WorkerError::Deadline)
            }
            Ok(Ok(Err(failure))) => Err(WorkerError::Call(describe_failure(&failure))),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                self.kill();
                Err(WorkerError::Timeout(started.elapsed()))
            }
        }
    }

    /// Serves the host connection `conn` to `service` (a name of the manifest's
    /// `hvsock.listen`): its stream goes to the worker, the plugin's `serve` runs on a fresh
    /// instance within `deadline`, and the core pumps the bytes until both sides are done.
    /// Returns the call's outcome and what was pumped.
    pub async fn serve_hvsock(
        &self,
        service: &str,
        conn: crate::hvsock::HvsockStream,
        deadline: Duration,
    ) -> (Result<CallReply, WorkerError>, super::broker::PumpSummary) {
        let Some(streams) = self.streams.clone() else {
            return (
                Err(WorkerError::Call(
                    "the plugin listens on no hvsock service".into(),
                )),
                Default::default(),
            );
        };
        let (id, permit, core_end) = match streams.open().await {
            Ok(opened) => opened,
            Err(why) => return (Err(WorkerError::Call(why)), Default::default()),
        };
        let pump = super::broker::pump(conn, core_end, streams.idle);
        let call = self.call_inner(
            Call::ServeHvsock {
                service: service.to_owned(),
                conn: id,
            },
            deadline,
            false,
        );
        let (reply, summary) = tokio::join!(call, pump);
        drop(permit);
        (reply, summary)
    }

    /// Asks the worker to finish and exit; kills it if it has not within `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = tokio::time::timeout(
            grace,
            self.outbox
                .send(&wire::encode_to_worker(&ToWorker::Shutdown)),
        )
        .await;
        let mut gone = self.gone.clone();
        if tokio::time::timeout(grace, gone.wait_for(|g| g.is_some()))
            .await
            .is_err()
        {
            self.kill();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a worker's start ended, as its connection task saw it.
enum Startup {
    /// Confined and ready; the confinement summary.
    Ready(String),
    /// It said why it could not start.
    Failed(String),
    /// The debug escape test's results.
    Escape(Vec<(String, String)>),
}

fn describe_failure(f: &CallFailure) -> String {
    match f {
        CallFailure::Trap(m) => format!("trapped: {}", Escaped::with_max(m, 512)),
        CallFailure::Deadline => "ran past its deadline".into(),
        CallFailure::Instantiate(m) => {
            format!("could not be instantiated: {}", Escaped::with_max(m, 512))
        }
        CallFailure::NotProvided => "does not export what this call needs".into(),
    }
}

async fn read_frame(reader: &mut FrameReader) -> Result<ToCore, String> {
    match reader.next().await {
        Ok(Some(payload)) => wire::decode_to_core(&payload).map_err(|e| e.to_string()),
        Ok(None) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the worker's frames until it ends or breaks the protocol (then it is killed).
async fn serve_worker(
    manifest: PluginManifest,
    mut reader: FrameReader,
    outbox: Arc<FrameWriter>,
    pending: Pending,
    (imports_of, streams): (WorkerImports, Option<Arc<Streams>>),
    kill: mpsc::Sender<()>,
    started: oneshot::Sender<Startup>,
) {
    let mut started = Some(started);
    let plugin = manifest.name.clone();
    let manifest = Arc::new(manifest);
    let mut budget = LogBudget::new(
        manifest.limits.log_lines_per_minute.max(1),
        manifest.limits.log_lines_per_minute,
    );
    let imports = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let why = loop {
        let message = match read_frame(&mut reader).await {
            Ok(m) => m,
            Err(e) => break format!("control socket: {e}"),
        };
        match message {
            ToCore::Reply { id, reply } => {
                let waiter = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                // A reply to a call that timed out is dropped; a reply to a call never made is
                // not distinguishable from that and is dropped too.
                if let Some(tx) = waiter {
                    let _ = tx.send(reply);
                }
            }
            ToCore::Import { id, import } => {
                let Ok(permit) = imports.clone().try_acquire_owned() else {
                    break "more imports in flight than allowed".to_owned();
                };
                let (manifest, imports_of, outbox) =
                    (manifest.clone(), imports_of.clone(), outbox.clone());
                let streams = streams.clone();
                tokio::spawn(async move {
                    let reply =
                        serve_import(&manifest, &imports_of, streams.as_deref(), import).await;
                    let _ = outbox
                        .send(&wire::encode_to_worker(&ToWorker::ImportReply {
                            id,
                            reply,
                        }))
                        .await;
                    drop(permit);
                });
            }
            ToCore::Log { level, message } => {
                if let Some(n) = budget.allow() {
                    log_line(&plugin, level, &message, n);
                }
            }
            ToCore::Ready {
                version,
                confinement,
            } => match started.take() {
                Some(tx) if version == PROTOCOL_VERSION => {
                    // The worker's own account: shown to the operator, so escaped and cut.
                    let confinement = Escaped::with_max(&confinement, 512).to_string();
                    let _ = tx.send(Startup::Ready(confinement));
                }
                Some(tx) => {
                    let _ = tx.send(Startup::Failed(format!(
                        "the worker speaks protocol {version}, the core {PROTOCOL_VERSION}"
                    )));
                    break "protocol version mismatch".to_owned();
                }
                None => break "a second Ready".to_owned(),
            },
            ToCore::InitFailed { reason } => {
                let reason = Escaped::with_max(&reason, 1024).to_string();
                if let Some(tx) = started.take() {
                    let _ = tx.send(Startup::Failed(reason.clone()));
                }
                break format!("it failed: {reason}");
            }
            ToCore::EscapeReport(report) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Startup::Escape(report));
                }
                break "escape report delivered".to_owned();
            }
        }
    };
    tracing::debug!(plugin = %plugin, "worker connection ended: {why}");
    let _ = kill.try_send(());
    // Wake every call still waiting: its worker is gone.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn log_line(plugin: &str, level: LogLevel, message: &str, suppressed: u64) {
    let text = Escaped::with_max(message, 4096);
    let note = suppressed_note(suppressed);
    match level {
        LogLevel::Trace => tracing::trace!(target: "hvisd::plugin", plugin, "{text}{note}"),
        LogLevel::Debug => tracing::debug!(target: "hvisd::plugin", plugin, "{text}{note}"),
        LogLevel::Info => tracing::info!(target: "hvisd::plugin", plugin, "{text}{note}"),
        LogLevel::Warn => tracing::warn!(target: "hvisd::plugin", plugin, "{text}{note}"),
        LogLevel::Error => tracing::error!(target: "hvisd::plugin", plugin, "{text}{note}"),
    }
}

/// The worker's stderr (a panic message, wasmtime's own complaints): attributed, escaped and
/// budgeted like its log lines; lines are cut at 4 KiB.
async fn stderr_lines(plugin: Arc<str>, stderr: tokio::process::ChildStderr) {
    let mut lines = tokio::io::BufReader::new(stderr.take(64 << 20));
    let mut budget = LogBudget::new(20, 20);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut lines).take(4096).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(n) = budget.allow() {
                    let text = String::from_utf8_lossy(&line);
                    tracing::warn!(
                        target: "hvisd::plugin",
                        plugin = %plugin,
                        "worker stderr: {}{}",
                        Escaped::with_max(text.trim_end(), 4096),
                        suppressed_note(n)
                    );
                }
            }
        }
    }
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

/// Answers a worker's import, with the grants checked here again.
async fn serve_import(
    manifest: &PluginManifest,
    imports: &WorkerImports,
    streams: Option<&Streams>,
    import: Import,
) -> ImportReply {
    let kvp = CheckedKvp {
        manifest,
        store: &*imports.kvp,
    };
    match import {
        Import::HvsockConnect { service } => {
            ImportReply::HvsockConnect(connect_for(manifest, imports, streams, &service).await)
        }
        Import::KvpGet { pool, key } => {
            ImportReply::KvpGet(kvp.get(pool, key).await.map_err(plugin_error))
        }
        Import::KvpSet { pool, key, value } => {
            ImportReply::KvpSet(kvp.set(pool, key, value).await.map_err(plugin_error))
        }
        Import::KvpDelete { pool, key } => {
            ImportReply::KvpDelete(kvp.delete(pool, key).await.map_err(plugin_error))
        }
        Import::KvpList { pool } => {
            ImportReply::KvpList(kvp.list(pool, "").await.map_err(plugin_error))
        }
    }
}

/// A plugin's `hvsock.connect`, checked here again: the grant, the name, the limit.
async fn connect_for(
    manifest: &PluginManifest,
    imports: &WorkerImports,
    streams: Option<&Streams>,
    service: &str,
) -> Result<u64, PluginError> {
    let refuse = |kind, message: String| PluginError { kind, message };
    let shown = Escaped::with_max(service, 64);
    if !manifest.hvsock.connect.iter().any(|s| s == service) {
        return Err(refuse(
            ErrorKind::Denied,
            format!(
                "plugin `{}` may not connect to hvsock service `{shown}`; add it to hvsock.connect",
                manifest.name
            ),
        ));
    }
    let (Some(streams), Some(hv)) = (streams, &imports.hvsock) else {
        return Err(refuse(
            ErrorKind::Unavailable,
            "hvsock is not available in this runtime".into(),
        ));
    };
    let Some(service_id) = hv.resolve(service) else {
        return Err(refuse(
            ErrorKind::NotFound,
            format!("hvsock service `{shown}` is neither in [hvsock.services] nor a GUID or port"),
        ));
    };
    let (id, permit, core_end) = streams
        .open()
        .await
        .map_err(|why| refuse(ErrorKind::Unavailable, why))?;
    let conn = match hv.hvsock.connect(service_id).await {
        Ok(c) => c,
        Err(e) => {
            return Err(refuse(
                ErrorKind::Unavailable,
                format!("hvsock connect to `{shown}`: {e}"),
            ));
        }
    };
    tracing::info!(
        plugin = %manifest.name,
        connection = %conn.info().label,
        "hvsock: plugin connected to `{shown}`"
    );
    let idle = streams.idle;
    let label = conn.info().label.clone();
    let plugin = manifest.name.clone();
    tokio::spawn(async move {
        let summary = super::broker::pump(conn, core_end, idle).await;
        drop(permit);
        tracing::info!(
            plugin = %plugin,
            connection = %label,
            to_host = summary.to_host,
            to_plugin = summary.to_plugin,
            idle = summary.idle,
            "hvsock: plugin's connection closed"
        );
    });
    Ok(id)
}

/// CPU time (user + system) of `pid` from `/proc/PID/stat`.
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI hvisd runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// Resident set size of `pid`, from `/proc/PID/status` (VmRSS).
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_plugin_host::MemoryKvpStore;
    use hvisd_plugin_host::manifest::{Access, KvpGrant, Limits};

    fn manifest() -> PluginManifest {
        PluginManifest {
            name: "p".into(),
            path: "/nonexistent.wasm".into(),
            worlds: vec![hvisd_plugin_host::World::KvpProvider],
            priority: 100,
            limits: Limits::default(),
            kvp: vec![KvpGrant {
                pool: hvisd_protocol::kvp::Pool::Guest,
                keys: vec!["mine.*".into()],
                access: Access::ReadWrite,
            }],
            dirs: Vec::new(),
            hvsock: Default::default(),
        }
    }

    /// The core's side of a worker connection, with the test playing the worker.
    struct Harness {
        worker: FrameWriter,
        from_core: FrameReader,
        kill: mpsc::Receiver<()>,
        pending: Pending,
        started: oneshot::Receiver<Startup>,
    }

    fn harness() -> Harness {
        let (core, worker) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (reader, writer) = link::split(core).unwrap();
        let (from_core, worker) = link::split(worker).unwrap();
        let (kill_tx, kill) = mpsc::channel(1);
        let pending = Pending::default();
        let (started_tx, started) = oneshot::channel();
        tokio::spawn(serve_worker(
            manifest(),
            reader,
            Arc::new(writer),
            pending.clone(),
            (
                WorkerImports {
                    kvp: Arc::new(MemoryKvpStore::default()),
                    hvsock: None,
                },
                None,
            ),
            kill_tx,
            started_tx,
        ));
        Harness {
            worker,
            from_core,
            kill,
            pending,
            started,
        }
    }

    async fn killed(h: &mut Harness) -> bool {
        tokio::time::timeout(Duration::from_secs(5), h.kill.recv())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_frame_that_does_not_decode_ends_the_worker() {
        let mut h = harness();
        h.worker
            .send(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert!(killed(&mut h).await);
        // A start still waiting learns the worker is gone.
        assert!((&mut h.started).await.is_err());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_anything_is_allocated() {
        let mut h = harness();
        h.worker.send(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(killed(&mut h).await);
    }

    #[tokio::test]
    async fn a_second_ready_ends_the_worker_and_a_stray_reply_is_dropped() {
        let mut h = harness();
        let ready = ToCore::Ready {
            version: PROTOCOL_VERSION,
            confinement: "x\u{1b}[31m\nforged".into(),
        };
        h.worker.send(&wire::encode_to_core(&ready)).await.unwrap();
        match (&mut h.started).await.unwrap() {
            Startup::Ready(c) => assert!(!c.contains('\u{1b}') && !c.contains('\n'), "{c}"),
            _ => panic!("expected Ready"),
        }
        let stray = ToCore::Reply {
            id: 999,
            reply: Ok(CallReply::Done),
        };
        h.worker.send(&wire::encode_to_core(&stray)).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), h.kill.recv())
                .await
                .is_err(),
            "a stray reply is not a reason to kill"
        );
        h.worker.send(&wire::encode_to_core(&ready)).await.unwrap();
        assert!(killed(&mut h).await);
        assert!(h.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn imports_are_checked_against_the_grants_in_the_core() {
        let mut h = harness();
        let set = |key: &str, id| ToCore::Import {
            id,
            import: Import::KvpSet {
                pool: hvisd_protocol::kvp::Pool::Guest,
                key: key.into(),
                value: hvisd_protocol::kvp::Value::Text("v".into()),
            },
        };
        h.worker
            .send(&wire::encode_to_core(&set("stolen", 1)))
            .await
            .unwrap();
        h.worker
            .send(&wire::encode_to_core(&set("mine.ok", 2)))
            .await
            .unwrap();
        let mut replies = std::collections::BTreeMap::new();
        for _ in 0..2 {
            let payload = tokio::time::timeout(Duration::from_secs(5), h.from_core.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            match wire::decode_to_worker(&payload).unwrap() {
                ToWorker::ImportReply { id, reply } => {
                    replies.insert(id, reply);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(
            matches!(&replies[&1], ImportReply::KvpSet(Err(e)) if e.kind == ErrorKind::Denied),
            "{:?}",
            replies[&1]
        );
        assert_eq!(replies[&2], ImportReply::KvpSet(Ok(())));
    }

    #[tokio::test]
    async fn an_hvsock_connect_the_manifest_does_not_grant_is_denied_by_the_core() {
        // A compromised worker skips its own check: the core's still refuses.
        let mut h = harness();
        h.worker
            .send(&wire::encode_to_core(&ToCore::Import {
                id: 5,
                import: Import::HvsockConnect {
                    service: "host-secrets".into(),
                },
            }))
            .await
            .unwrap();
        let payload = tokio::time::timeout(Duration::from_secs(5), h.from_core.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match wire::decode_to_worker(&payload).unwrap() {
            ToWorker::ImportReply {
                id: 5,
                reply: ImportReply::HvsockConnect(Err(e)),
            } => {
                assert_eq!(e.kind, ErrorKind::Denied);
                assert!(e.message.contains("hvsock.connect"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }
}
