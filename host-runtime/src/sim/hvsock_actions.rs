//! Host actions for hvsock: connections the host initiates (`hvsock_connect`), and host services
//! the guest connects to through `ROOT/control` (`hvsock_listen`, `hvsock_wait`).
//!
//! The host's end of each connection is the same [`PipeStream`] the guest runtime uses: the
//! framing is symmetric, so one implementation serves both sides.

use super::*;
use crate::hvsock::{PipeMonitor, PipeStream};
use crate::transport::shm_host::{ControlConnection, ControlListener};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::hvsock::{ConnectReply, ConnectRequest};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The status the simulator refuses a connect with when nothing listens on the service (or a
/// listener says `refuse` without a status): `-ECONNREFUSED`.
pub const REFUSED_STATUS: i32 = -111;

/// The host's hvsock state across actions.
#[derive(Default)]
pub(super) struct HostHvsock {
    /// Connections kept open (`close: false`), by name.
    kept: HashMap<String, KeptConnection>,
    /// `ROOT/control` and the services listened on, once a listen action ran.
    control: Option<ControlServer>,
}

/// A connection left open for later actions (a `crash` mid-stream, say).
struct KeptConnection {
    _read: crate::hvsock::pipe::PipeReadHalf,
    _write: crate::hvsock::pipe::PipeWriteHalf,
    _monitor: PipeMonitor,
}

struct ControlServer {
    services: Arc<Mutex<HashMap<Guid, Arc<Listener>>>>,
    by_name: HashMap<String, Arc<Listener>>,
    task: tokio::task::AbortHandle,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone)]
enum Reply {
    Echo,
    Text(Vec<u8>),
    Refuse(i32),
}

/// One service the host listens on.
struct Listener {
    service_id: Guid,
    reply: Reply,
    count: Option<u32>,
    ring_size: u32,
    stats: Mutex<ListenStats>,
    changed: tokio::sync::Notify,
}

/// What a listener did, as the transcript shows it.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct ListenStats {
    /// Requests answered with status 0.
    accepted: u32,
    /// Requests refused.
    refused: u32,
    /// Accepted connections that ended.
    finished: u32,
    /// ... of which ended in an error.
    failed: u32,
    bytes_in: u64,
    bytes_out: u64,
    /// The first errors (at most 8).
    errors: Vec<String>,
}

impl Listener {
    /// Decides a request: 0 (an offer follows) or a refusal status.
    fn admit(&self) -> i32 {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let status = match self.reply {
            Reply::Refuse(status) => status,
            _ if self.count.is_some_and(|c| stats.accepted >= c) => REFUSED_STATUS,
            _ => 0,
        };
        if status == 0 {
            stats.accepted += 1;
        } else {
            stats.refused += 1;
        }
        self.changed.notify_waiters();
        status
    }

    fn finish(&self, result: Result<(u64, u64), String>) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.finished += 1;
        match result {
            Ok((bytes_in, bytes_out)) => {
                stats.bytes_in += bytes_in;
                stats.bytes_out += bytes_out;
            }
            Err(e) => {
                stats.failed += 1;
                if stats.errors.len() < 8 {
                    stats.errors.push(e);
                }
            }
        }
        drop(stats);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> ListenStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What one host-initiated connection did.
struct ConnOutcome {
    instance_id: Guid,
    connect_us: u64,
    elapsed_us: u64,
    bytes_sent: usize,
    bytes_received: usize,
    sent_before_reading: Option<usize>,
    echo_ok: Option<bool>,
    /// Without `expect: echo`: what the guest sent (its first 4 KiB, as text).
    reply_text: Option<String>,
    guest_fin: bool,
    kept: Option<KeptConnection>,
}

/// The `hvsock_connect` arguments that shape each connection.
struct ConnectPlan {
    write_size: usize,
    expect_echo: bool,
    pause_reading: Duration,
    fin: bool,
    close: bool,
}

fn service_arg(service: &Option<String>, port: &Option<u32>) -> Result<Guid, SimError> {
    match (service, port) {
        (Some(text), None) => text
            .parse()
            .map_err(|_| SimError::BadArgument(format!("service {text:?} is not a GUID"))),
        (None, Some(port)) => Ok(Guid::for_vsock_port(*port)),
        _ => Err(SimError::BadArgument(
            "give exactly one of `service` (a GUID) and `port`".into(),
        )),
    }
}

/// A deterministic pattern of `len` bytes, different for each `seed`.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

impl HostSimulator {
    pub(super) async fn act_hvsock(
        &mut self,
        action: &Action,
        script: &Script,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::HvsockConnect {
                name,
                service,
                port,
                instance_id,
                ring_size,
                text,
                hex,
                size,
                repeat,
                write_size,
                expect,
                connections,
                pause_reading_ms,
                fin,
                close,
                timeout_ms,
            } => {
                let service_id = service_arg(service, port)?;
                let name = name.clone().unwrap_or_else(|| "hvsock".into());
                let base = match (text, hex, size) {
                    (Some(t), None, None) => t.as_bytes().repeat(*repeat),
                    (None, Some(h), None) => decode_hex(h)
                        .ok_or_else(|| {
                            SimError::BadArgument(format!("hex {h:?} is not even-length hex"))
                        })?
                        .repeat(*repeat),
                    (None, None, Some(_)) | (None, None, None) => Vec::new(),
                    _ => {
                        return Err(SimError::BadArgument(
                            "give at most one of `text`, `hex` and `size`".into(),
                        ));
                    }
                };
                let expect_echo = match expect.as_str() {
                    "echo" => true,
                    "none" => false,
                    other => {
                        return Err(SimError::BadArgument(format!(
                            "expect {other:?}: use echo or none"
                        )));
                    }
                };
                if *connections == 0 || (*connections > 1 && (instance_id.is_some() || !close)) {
                    return Err(SimError::BadArgument(
                        "connections must be at least 1; several connections take no instance_id and need close: true".into(),
                    ));
                }
                if !close && self.hvsock.kept.contains_key(&name) {
                    return Err(SimError::BadArgument(format!(
                        "an hvsock connection named {name:?} is already open"
                    )));
                }
                let fixed_instance = match instance_id {
                    Some(text) => Some(text.parse::<Guid>().map_err(|_| {
                        SimError::BadArgument(format!("instance_id {text:?} is not a GUID"))
                    })?),
                    None => None,
                };
                let plan = Arc::new(ConnectPlan {
                    write_size: (*write_size).max(1),
                    expect_echo,
                    pause_reading: Duration::from_millis(*pause_reading_ms),
                    fin: *fin,
                    close: *close,
                });
                let limit = timeout_ms.map(Duration::from_millis).unwrap_or(timeout);
                let deadline = tokio::time::Instant::now() + limit;
                entry.insert("service".into(), json!(service_id.to_string()));
                if let Some(port) = service_id.vsock_port() {
                    entry.insert("port".into(), json!(port));
                }
                entry.insert("connections".into(), json!(connections));
                let started = Instant::now();
                let mut set = tokio::task::JoinSet::new();
                for i in 0..*connections {
                    let data = match size {
                        Some(len) => pattern(*len, i),
                        None if *connections > 1 => [format!("{i}:").as_bytes(), &base].concat(),
                        None => base.clone(),
                    };
                    let offer = Offer {
                        class_id: service_id,
                        instance_id: fixed_instance.unwrap_or_else(random_guid),
                        ring_size: ring_size.unwrap_or(script.ring_size),
                        pipe: PipeMode::Byte,
                        conn_from_host: Some(true),
                    };
                    let (root, plan) = (self.root.clone(), plan.clone());
                    set.spawn(async move {
                        tokio::time::timeout_at(deadline, host_connect(&root, offer, data, &plan))
                            .await
                            .unwrap_or(Err(SimError::Timeout(limit)))
                    });
                }
                let mut outcomes = Vec::new();
                let mut errors = Vec::new();
                while let Some(joined) = set.join_next().await {
                    match joined {
                        Ok(Ok(outcome)) => outcomes.push(outcome),
                        Ok(Err(e)) => errors.push(e.to_string()),
                        Err(e) => errors.push(format!("connection task failed: {e}")),
                    }
                }
                let elapsed = started.elapsed();
                record_connects(entry, &mut outcomes, elapsed);
                if let Some(kept) = outcomes.iter_mut().find_map(|o| o.kept.take()) {
                    entry.insert("name".into(), json!(name));
                    entry.insert("kept_open".into(), json!(true));
                    self.hvsock.kept.insert(name, kept);
                }
                if let Some(first) = errors.first() {
                    return Err(SimError::BadReply(format!(
                        "{} of {connections} hvsock connections failed; first: {first}",
                        errors.len()
                    )));
                }
                if outcomes.iter().any(|o| o.echo_ok == Some(false)) {
                    return Err(SimError::BadReply(
                        "the guest's replies differ from what was sent".into(),
                    ));
                }
                Ok(())
            }
            Action::HvsockListen {
                name,
                service,
                port,
                reply,
                text,
                status,
                count,
                ring_size,
            } => {
                let service_id = service_arg(service, port)?;
                let reply = match (reply.as_str(), text) {
                    ("echo", None) => Reply::Echo,
                    ("text", Some(t)) => Reply::Text(t.as_bytes().to_vec()),
                    ("refuse", None) => Reply::Refuse(status.unwrap_or(REFUSED_STATUS)),
                    _ => {
                        return Err(SimError::BadArgument(format!(
                            "reply {reply:?}: use echo, text (with `text`) or refuse"
                        )));
                    }
                };
                if matches!(reply, Reply::Refuse(0)) {
                    return Err(SimError::BadArgument(
                        "a refusal status must not be 0".into(),
                    ));
                }
                let listener = Arc::new(Listener {
                    service_id,
                    reply,
                    count: *count,
                    ring_size: ring_size.unwrap_or(script.ring_size),
                    stats: Mutex::default(),
                    changed: tokio::sync::Notify::new(),
                });
                let server = match &mut self.hvsock.control {
                    Some(server) => server,
                    None => {
                        let control = ControlListener::bind(&self.root)?;
                        let services = Arc::new(Mutex::new(HashMap::new()));
                        let task = tokio::spawn(serve_control(
                            control,
                            self.root.clone(),
                            services.clone(),
                            timeout,
                        ))
                        .abort_handle();
                        self.hvsock.control.insert(ControlServer {
                            services,
                            by_name: HashMap::new(),
                            task,
                        })
                    }
                };
                if server.by_name.contains_key(name) {
                    return Err(SimError::BadArgument(format!(
                        "a listener named {name:?} exists already"
                    )));
                }
                server
                    .services
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(service_id, listener.clone());
                server.by_name.insert(name.clone(), listener);
                entry.insert("name".into(), json!(name));
                entry.insert("service".into(), json!(service_id.to_string()));
                entry.insert("control".into(), json!(self.root.join("control")));
                Ok(())
            }
            Action::HvsockWait { name, timeout_ms } => {
                let listener = self
                    .hvsock
                    .control
                    .as_ref()
                    .and_then(|s| s.by_name.get(name))
                    .cloned()
                    .ok_or_else(|| {
                        SimError::BadArgument(format!("no hvsock listener named {name:?}"))
                    })?;
                let wait = timeout_ms.map(Duration::from_millis).unwrap_or(timeout);
                let done = |s: &ListenStats| match listener.count {
                    Some(count) => s.finished >= count,
                    None => s.accepted >= 1 && s.finished == s.accepted,
                };
                let outcome = tokio::time::timeout(wait, async {
                    loop {
                        let changed = listener.changed.notified();
                        if done(&listener.snapshot()) {
                            return;
                        }
                        changed.await;
                    }
                })
                .await;
                let stats = listener.snapshot();
                entry.insert("name".into(), json!(name));
                entry.insert("service".into(), json!(listener.service_id.to_string()));
                entry.insert("stats".into(), json!(stats));
                if outcome.is_err() {
                    return Err(SimError::Timeout(wait));
                }
                if stats.failed > 0 {
                    return Err(SimError::BadReply(format!(
                        "{} guest-initiated connections failed: {:?}",
                        stats.failed, stats.errors
                    )));
                }
                Ok(())
            }
            other => Err(SimError::BadArgument(format!(
                "{} is not an hvsock action",
                other.kind()
            ))),
        }
    }
}

/// Summarises the connections of one `hvsock_connect` in its transcript entry.
fn record_connects(
    entry: &mut serde_json::Map<String, Value>,
    outcomes: &mut [ConnOutcome],
    elapsed: Duration,
) {
    let sent: usize = outcomes.iter().map(|o| o.bytes_sent).sum();
    let received: usize = outcomes.iter().map(|o| o.bytes_received).sum();
    entry.insert("bytes_sent".into(), json!(sent));
    entry.insert("bytes_received".into(), json!(received));
    entry.insert("completed".into(), json!(outcomes.len()));
    if outcomes.iter().any(|o| o.echo_ok.is_some()) {
        entry.insert(
            "echo_ok".into(),
            json!(outcomes.iter().all(|o| o.echo_ok != Some(false))),
        );
    }
    entry.insert(
        "guest_fin".into(),
        json!(outcomes.iter().all(|o| o.guest_fin)),
    );
    let secs = elapsed.as_secs_f64().max(1e-9);
    entry.insert(
        "mib_per_s".into(),
        json!(((sent + received) as f64 / secs / (1 << 20) as f64 * 10.0).round() / 10.0),
    );
    outcomes.sort_by_key(|o| o.elapsed_us);
    if let [only] = &outcomes[..] {
        entry.insert("instance_id".into(), json!(only.instance_id.to_string()));
        entry.insert("connect_us".into(), json!(only.connect_us));
        if let Some(n) = only.sent_before_reading {
            entry.insert("sent_before_reading".into(), json!(n));
        }
        if let Some(text) = &only.reply_text {
            entry.insert("reply_text".into(), json!(text));
        }
    } else if !outcomes.is_empty() {
        let at = |q: f64| outcomes[((outcomes.len() - 1) as f64 * q) as usize].elapsed_us;
        entry.insert(
            "connection_us".into(),
            json!({"min": at(0.0), "p50": at(0.5), "max": at(1.0)}),
        );
        if let Some(max) = outcomes.iter().filter_map(|o| o.sent_before_reading).max() {
            entry.insert("max_sent_before_reading".into(), json!(max));
        }
    }
}

/// One host-initiated connection: offer, accept, write and read at once, check, close.
async fn host_connect(
    root: &Path,
    offer: Offer,
    data: Vec<u8>,
    plan: &ConnectPlan,
) -> Result<ConnOutcome, SimError> {
    let started = Instant::now();
    let dir = root.join(offer.instance_id.to_string());
    // A crashed host may have left this instance's directory behind; the host owns ROOT.
    if dir.exists() {
        shm_host::rescind(&dir)?;
    }
    let published = shm_host::publish_offer(root, &offer)?;
    let label = format!("host hvsock {} {}", offer.class_id, offer.instance_id);
    // The caller's deadline bounds the whole exchange; this only has to outlast it.
    let channel = published.accept(Duration::from_secs(3600), &label).await?;
    let connect_us = started.elapsed().as_micros() as u64;
    let (stream, monitor) = PipeStream::new(channel);
    let (mut rx, mut tx) = stream.into_split();
    let written = std::sync::atomic::AtomicUsize::new(0);
    let writer = async {
        let mut at = 0;
        while at < data.len() {
            let end = (at + plan.write_size).min(data.len());
            at += tx.write(&data[at..end]).await?;
            written.store(at, std::sync::atomic::Ordering::Relaxed);
        }
        if plan.fin {
            tx.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let reader = async {
        let mut sent_before_reading = None;
        if !plan.pause_reading.is_zero() {
            tokio::time::sleep(plan.pause_reading).await;
            sent_before_reading = Some(written.load(std::sync::atomic::Ordering::Relaxed));
        }
        let mut got = Vec::new();
        let mut guest_fin = false;
        if plan.fin {
            // The guest answers our FIN with its own once it is done.
            rx.read_to_end(&mut got).await?;
            guest_fin = true;
        } else if plan.expect_echo {
            got.resize(data.len(), 0);
            rx.read_exact(&mut got).await?;
        }
        Ok::<_, std::io::Error>((got, guest_fin, sent_before_reading))
    };
    let (w, r) = tokio::join!(writer, reader);
    w.map_err(|e| SimError::BadReply(format!("{label}: writing: {e}")))?;
    let (got, guest_fin, sent_before_reading) =
        r.map_err(|e| SimError::BadReply(format!("{label}: reading: {e}")))?;
    let outcome = ConnOutcome {
        instance_id: offer.instance_id,
        connect_us,
        elapsed_us: started.elapsed().as_micros() as u64,
        bytes_sent: data.len(),
        bytes_received: got.len(),
        sent_before_reading,
        echo_ok: plan.expect_echo.then(|| got == data),
        reply_text: (!plan.expect_echo)
            .then(|| String::from_utf8_lossy(&got[..got.len().min(4096)]).into_owned()),
        guest_fin,
        kept: None,
    };
    if plan.close {
        drop((rx, tx, monitor));
        shm_host::rescind(&dir)?;
        Ok(outcome)
    } else {
        Ok(ConnOutcome {
            kept: Some(KeptConnection {
                _read: rx,
                _write: tx,
                _monitor: monitor,
            }),
            ..outcome
        })
    }
}

/// Accepts guests on `ROOT/control` for as long as the script runs.
async fn serve_control(
    control: ControlListener,
    root: PathBuf,
    services: Arc<Mutex<HashMap<Guid, Arc<Listener>>>>,
    timeout: Duration,
) {
    loop {
        match control.accept().await {
            Ok(conn) => {
                tokio::spawn(serve_control_connection(
                    conn,
                    root.clone(),
                    services.clone(),
                    timeout,
                ));
            }
            Err(e) => {
                tracing::warn!(
                    "simulated host: accepting on {}: {e}",
                    control.path().display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers the requests of one control connection, starting a connection for each accepted.
async fn serve_control_connection(
    conn: ControlConnection,
    root: PathBuf,
    services: Arc<Mutex<HashMap<Guid, Arc<Listener>>>>,
    timeout: Duration,
) {
    while let Ok(Some(request)) = conn.recv_request().await {
        let Ok(request) = request else {
            tracing::warn!("simulated host: malformed connect request on ROOT/control; closing");
            return;
        };
        let listener = services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request.service_id)
            .cloned();
        let status = listener.as_ref().map_or(REFUSED_STATUS, |l| l.admit());
        let reply = ConnectReply {
            endpoint_id: request.endpoint_id,
            service_id: request.service_id,
            status,
        };
        if conn.send_reply(&reply).await.is_err() {
            return;
        }
        if let (0, Some(listener)) = (status, listener) {
            tokio::spawn(serve_guest_connection(
                root.clone(),
                listener,
                request,
                timeout,
            ));
        }
    }
}

/// Offers the channel of an accepted guest-initiated connection and serves it.
async fn serve_guest_connection(
    root: PathBuf,
    listener: Arc<Listener>,
    request: ConnectRequest,
    timeout: Duration,
) {
    let result = async {
        let offer = Offer {
            class_id: request.service_id,
            instance_id: request.endpoint_id,
            ring_size: listener.ring_size,
            pipe: PipeMode::Byte,
            conn_from_host: Some(false),
        };
        let dir = root.join(offer.instance_id.to_string());
        if dir.exists() {
            shm_host::rescind(&dir).map_err(|e| e.to_string())?;
        }
        let published = shm_host::publish_offer(&root, &offer).map_err(|e| e.to_string())?;
        let label = format!(
            "host hvsock service {} {}",
            offer.class_id, offer.instance_id
        );
        let channel = published
            .accept(timeout, &label)
            .await
            .map_err(|e| e.to_string())?;
        let (stream, monitor) = PipeStream::new(channel);
        let (mut rx, mut tx) = stream.into_split();
        let counts = match &listener.reply {
            Reply::Echo => {
                let n = tokio::io::copy(&mut rx, &mut tx)
                    .await
                    .map_err(|e| format!("{label}: echo: {e}"))?;
                (n, n)
            }
            Reply::Text(text) => {
                // A line service: the answer goes out after the request's first line (or its
                // FIN), then the rest is read until the FIN.
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while request.len() < 64 << 10 {
                    let n = rx
                        .read(&mut byte)
                        .await
                        .map_err(|e| format!("{label}: reading: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    request.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                tx.write_all(text)
                    .await
                    .map_err(|e| format!("{label}: writing: {e}"))?;
                let mut rest = Vec::new();
                rx.read_to_end(&mut rest)
                    .await
                    .map_err(|e| format!("{label}: reading: {e}"))?;
                ((request.len() + rest.len()) as u64, text.len() as u64)
            }
            Reply::Refuse(_) => (0, 0),
        };
        tx.shutdown()
            .await
            .map_err(|e| format!("{label}: FIN: {e}"))?;
        drop((rx, tx, monitor));
        shm_host::rescind(&dir).map_err(|e| e.to_string())?;
        Ok(counts)
    }
    .await;
    listener.finish(result);
}
