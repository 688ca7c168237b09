//! The local control socket: `hvisd status` and Prometheus metrics.
//!
//! A Unix stream socket (`[control] socket`, mode 0600 in a 0700 directory; a peer whose uid is
//! neither root's nor the daemon's is refused by `SO_PEERCRED`). A client writes one line,
//! `status`, `status-text` or `metrics`, and reads the answer until the daemon closes: the status
//! as JSON or for a person, or the metrics in the Prometheus text format. The same metrics can be served over HTTP on a
//! loopback address (`[control] metrics_listen`). Requests are bounded (64 bytes, 2 s, 16 at
//! once); nothing a client sends reaches anything but this parser.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plugins::{PluginStatus, Plugins};
use crate::services::{ChannelEntry, Services};
use crate::vss::BackupReport;

/// Longest request line.
const MAX_REQUEST: usize = 64;
/// How long a client has to send it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests served at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 16;

/// What the control socket reports on.
#[derive(Clone)]
pub struct ControlState {
    /// The services (channels, KVP, VSS).
    pub services: Services,
    /// The plugins, if any are set up.
    pub plugins: Option<Arc<Plugins>>,
    /// The transport being served.
    pub transport: String,
    /// When the daemon started.
    pub started: Instant,
}

/// One KVP pool in the status.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSize {
    /// The pool's number.
    pub pool: u8,
    /// Its name.
    pub name: String,
    /// Records in it.
    pub records: usize,
}

/// `hvisd status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// hvisd's version.
    pub version: &'static str,
    /// The daemon's pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// The transport.
    pub transport: String,
    /// IC channels being served, with their negotiated versions and counts.
    pub channels: Vec<ChannelEntry>,
    /// Plugins and their workers.
    pub plugins: Vec<PluginStatus>,
    /// The last backup's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupReport>,
    /// Backups since start (the last 32 are kept).
    pub backups: usize,
    /// KVP pool sizes (empty when KVP is off).
    pub kvp_pools: Vec<PoolSize>,
}

impl ControlState {
    /// The status now.
    pub async fn status(&self) -> Status {
        let plugins = match &self.plugins {
            Some(p) => p.status().await,
            None => Vec::new(),
        };
        let history = self
            .services
            .vss_core()
            .map(|v| v.history())
            .unwrap_or_default();
        let mut kvp_pools = Vec::new();
        if let Some(core) = self.services.kvp_core() {
            let store = core.store();
            for pool in hvisd_protocol::kvp::Pool::ALL {
                if let Ok(records) = store.read(pool, |r| r.len()).await {
                    kvp_pools.push(PoolSize {
                        pool: pool as u8,
                        name: format!("{pool:?}"),
                        records,
                    });
                }
            }
        }
        Status {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            transport: self.transport.clone(),
            channels: self.services.channels().snapshot(),
            plugins,
            backups: history.len(),
            last_backup: history.last().cloned(),
            kvp_pools,
        }
    }
}

/// A label value, escaped for the Prometheus text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Status {
    /// The status as Prometheus metrics (text format 0.0.4).
    pub fn metrics(&self) -> String {
        const FAMILIES: [(&str, &str, &str); 15] = [
            ("hvisd_up", "gauge", "1 while the daemon runs."),
            (
                "hvisd_uptime_seconds",
                "gauge",
                "Seconds since the daemon started.",
            ),
            (
                "hvisd_ic_messages_total",
                "counter",
                "IC messages answered per served channel.",
            ),
            (
                "hvisd_ic_failures_total",
                "counter",
                "IC packets answered with a failure or dropped.",
            ),
            (
                "hvisd_ic_negotiated",
                "gauge",
                "1 once the channel negotiated its versions.",
            ),
            (
                "hvisd_plugin_calls_total",
                "counter",
                "Calls into the plugin.",
            ),
            (
                "hvisd_plugin_failures_total",
                "counter",
                "Calls that trapped, timed out or lost their worker.",
            ),
            (
                "hvisd_plugin_restarts_total",
                "counter",
                "Workers started after the first.",
            ),
            (
                "hvisd_plugin_cpu_seconds_total",
                "counter",
                "CPU used by the plugin's workers.",
            ),
            (
                "hvisd_plugin_rss_bytes",
                "gauge",
                "Resident memory of the plugin's worker.",
            ),
            (
                "hvisd_plugin_state",
                "gauge",
                "1 for the plugin's current state (label state).",
            ),
            (
                "hvisd_kvp_pool_records",
                "gauge",
                "Records in each KVP pool file.",
            ),
            (
                "hvisd_vss_backups",
                "gauge",
                "Backup reports kept (at most 32).",
            ),
            (
                "hvisd_vss_last_frozen_window_seconds",
                "gauge",
                "First FIFREEZE to last FITHAW of the last backup.",
            ),
            (
                "hvisd_vss_last_freeze_request_seconds",
                "gauge",
                "The last FREEZE request, arrival to answer.",
            ),
        ];
        let mut samples: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        let mut add = |name: &'static str, labels: String, value: String| {
            samples
                .entry(name)
                .or_default()
                .push(format!("{name}{labels} {value}"));
        };
        add("hvisd_up", String::new(), "1".into());
        add(
            "hvisd_uptime_seconds",
            String::new(),
            self.uptime_s.to_string(),
        );
        for c in &self.channels {
            let l = format!("{{service=\"{}\"}}", label(c.ic.service));
            add(
                "hvisd_ic_messages_total",
                l.clone(),
                c.ic.messages.to_string(),
            );
            add(
                "hvisd_ic_failures_total",
                l.clone(),
                c.ic.failures.to_string(),
            );
            add(
                "hvisd_ic_negotiated",
                l,
                u8::from(c.ic.negotiated.is_some()).to_string(),
            );
        }
        for p in &self.plugins {
            let l = format!("{{plugin=\"{}\"}}", label(&p.name));
            add("hvisd_plugin_calls_total", l.clone(), p.calls.to_string());
            add(
                "hvisd_plugin_failures_total",
                l.clone(),
                p.failures.to_string(),
            );
            add(
                "hvisd_plugin_restarts_total",
                l.clone(),
                p.restarts.to_string(),
            );
            add(
                "hvisd_plugin_cpu_seconds_total",
                l.clone(),
                format!("{:.3}", p.cpu_ms as f64 / 1e3),
            );
            if let Some(rss) = p.rss_bytes {
                add("hvisd_plugin_rss_bytes", l, rss.to_string());
            }
            let state = format!("{:?}", p.state).to_lowercase();
            add(
                "hvisd_plugin_state",
                format!(
                    "{{plugin=\"{}\",state=\"{}\"}}",
                    label(&p.name),
                    label(&state)
                ),
                "1".into(),
            );
        }
        for p in &self.kvp_pools {
            add(
                "hvisd_kvp_pool_records",
                format!("{{pool=\"{}\"}}", p.pool),
                p.records.to_string(),
            );
        }
        add("hvisd_vss_backups", String::new(), self.backups.to_string());
        if let Some(b) = &self.last_backup {
            if let Some(w) = b.frozen_window_ms {
                add(
                    "hvisd_vss_last_frozen_window_seconds",
                    String::new(),
                    format!("{:.6}", w / 1e3),
                );
            }
            add(
                "hvisd_vss_last_freeze_request_seconds",
                String::new(),
                format!("{:.6}", b.freeze_request_ms / 1e3),
            );
        }
        let mut text = String::new();
        for (name, kind, help) in FAMILIES {
            if let Some(lines) = samples.get(name) {
                let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for l in lines {
                    text.push_str(l);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// The status for a person.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "hvisd {} (pid {}), up {} s, transport {}",
            self.version, self.pid, self.uptime_s, self.transport
        );
        let _ = writeln!(s, "\nchannels ({}):", self.channels.len());
        for c in &self.channels {
            let versions =
                c.ic.negotiated
                    .map(|n| format!("framework {} message {}", n.framework, n.message))
                    .unwrap_or_else(|| "not negotiated".into());
            let _ = writeln!(
                s,
                "  {:<10} {versions}; {} messages, {} failures; open {} s  [{}]",
                c.ic.service, c.ic.messages, c.ic.failures, c.open_s, c.label
            );
        }
        let _ = writeln!(s, "\nplugins ({}):", self.plugins.len());
        for p in &self.plugins {
            let _ = writeln!(
                s,
                "  {:<16} {:<10} pid {:<7} calls {} failures {} restarts {} cpu {} ms rss {}{}",
                p.name,
                format!("{:?}", p.state).to_lowercase(),
                p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                p.calls,
                p.failures,
                p.restarts,
                p.cpu_ms,
                p.rss_bytes
                    .map(|b| format!("{} KiB", b / 1024))
                    .unwrap_or_else(|| "-".into()),
                p.reason
                    .as_ref()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
        match &self.last_backup {
            Some(b) => {
                let _ = writeln!(
                    s,
                    "\nlast backup: {} {:?}, {} file systems, frozen window {}, FREEZE answered in {:.1} ms ({} backups kept)",
                    b.id,
                    b.outcome,
                    b.frozen.len(),
                    b.frozen_window_ms
                        .map(|w| format!("{w:.1} ms"))
                        .unwrap_or_else(|| "-".into()),
                    b.freeze_request_ms,
                    self.backups
                );
            }
            None => {
                let _ = writeln!(s, "\nno backup since start");
            }
        }
        if !self.kvp_pools.is_empty() {
            let pools: Vec<String> = self
                .kvp_pools
                .iter()
                .map(|p| format!("{} {}: {}", p.pool, p.name, p.records))
                .collect();
            let _ = writeln!(s, "KVP pools (records): {}", pools.join(", "));
        }
        s
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error("another hvisd is running: its control socket {0} answers")]
    InUse(PathBuf),
    /// Creating the directory or socket failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `metrics_listen` is not a loopback address.
    #[error("[control] metrics_listen {0}: only loopback addresses (127.0.0.0/8, ::1)")]
    NotLoopback(std::net::SocketAddr),
}

/// Binds the control socket at `path` (a stale one is replaced; a live one is an error).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves the control socket until `stop`; removes it afterwards.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    state: ControlState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let me = rustix::process::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let allowed = rustix::net::sockopt::socket_peercred(&stream)
            .map(|c| c.uid.as_raw() == 0 || c.uid.as_raw() == me)
            .unwrap_or(false);
        if !allowed {
            hvisd_protocol::throttled!(
                warn,
                "control socket: a client of another user was refused"
            );
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &state).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut buf = Vec::with_capacity(MAX_REQUEST);
    let read = async {
        let mut byte = [0u8; 1];
        while buf.len() < MAX_REQUEST {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => buf.push(byte[0]),
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read).await.ok()?;
    Some(String::from_utf8_lossy(&buf).trim().to_owned())
}

async fn answer(mut stream: tokio::net::UnixStream, state: &ControlState) -> std::io::Result<()> {
    let request = read_request(&mut stream).await.unwrap_or_default();
    let text = match request.as_str() {
        "status" => serde_json::to_string(&state.status().await).unwrap_or_default() + "\n",
        "status-text" => state.status().await.render(),
        "metrics" => state.status().await.metrics(),
        _ => "error: send `status` or `metrics`\n".to_owned(),
    };
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

/// Serves the metrics over HTTP on the loopback address `addr` until `stop`.
pub async fn serve_metrics_http(
    addr: std::net::SocketAddr,
    state: ControlState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ControlError> {
    if !addr.ip().is_loopback() {
        return Err(ControlError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ControlError::Io {
            path: PathBuf::from(addr.to_string()),
            source,
        })?;
    tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let state = state.clone();
        tokio::spawn(async move {
            // The request line and headers, bounded; the answer is the same for any GET.
            let mut head = vec![0u8; 8192];
            let mut n = 0;
            let got = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while n < head.len() {
                    match stream.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                    if head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            let response = if got && head.starts_with(b"GET ") {
                let body = state.status().await.metrics();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            drop(permit);
        });
    }
}

/// `hvisd status`: asks the daemon at `path` for `what` (`status` or `metrics`).
pub async fn query(path: &Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| {
            format!(
                "cannot reach hvisd's control socket {} (is the daemon running, and are you root?)",
                path.display()
            )
        })?;
    stream.write_all(format!("{what}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        (&mut stream).take(16 << 20).read_to_string(&mut out),
    )
    .await
    .context("hvisd did not answer within 10 s")??;
    Ok(out)
}
