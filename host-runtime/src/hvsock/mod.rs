//! hvsock: byte streams between host services and the guest, one API whatever carries them.
//!
//! - **shm** (and a real VMBus through the same channel code): a connection is a pipe channel
//!   (`pipe=byte`) framed as Linux's `hv_sock` frames it ([`pipe`]). The host initiates one by
//!   offering a channel with `conn_from_host=1`; the runtime opens it and hands the stream to the
//!   [`HvsockAcceptor`]. The guest initiates one with [`Hvsock::connect`]: a request on
//!   `ROOT/control` ([`control`]), then the host's offer with `conn_from_host=0`, matched to the
//!   request by its endpoint id.
//! - **Unix stand-in** ([`unix`]), for local development: a Unix stream socket whose connections
//!   reach the same acceptor as if the host had made them.
//! - **AF_VSOCK** ([`vsock`]), for a guest whose kernel runs `hv_sock`: vsock port `P` is the
//!   service GUID `P-facb-11e6-bd58-64006a7986d3`.
//!
//! # For a broker
//! Build an [`Hvsock`] with an acceptor and give it to the runtime
//! ([`crate::services::Services::with_hvsock`]); host-initiated streams arrive in
//! [`HvsockAcceptor::accept`] with their service GUID. Open guest-initiated streams with
//! [`Hvsock::connect`]`(service_id)`. Every stream is an [`HvsockStream`]: tokio `AsyncRead` +
//! `AsyncWrite` (`shutdown` sends the FIN), splittable with [`HvsockStream::into_split`] into
//! halves usable from different tasks. Dropping both halves closes the connection.

pub mod control;
#[cfg(any(debug_assertions, test, feature = "bench"))]
pub mod echo;
pub mod pipe;
#[cfg(test)]
mod tests;
pub mod unix;
pub mod vsock;

pub use pipe::{HvsockError, PipeMonitor, PipeStream, PipeSummary};

use hvisd_protocol::guid::Guid;
use hvisd_protocol::hvsock::ConnectRequest;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// Most hvsock pipe channels open at once. Below the runtime's
/// [`MAX_OPEN_CHANNELS`](crate::runtime::MAX_OPEN_CHANNELS), so that a host flooding pipe offers
/// cannot take the slots of the integration-component channels.
pub const MAX_PIPE_CHANNELS: usize = 224;

/// Most guest-initiated connects in progress at once (each holds an entry until its offer
/// arrives or it times out).
pub const MAX_PENDING_CONNECTS: usize = 64;

/// How long a guest-initiated connect waits by default for the host's reply and offer. Linux's
/// vsock default (`VSOCK_DEFAULT_CONNECT_TIMEOUT`) is 2 s; the shm runtime notices offers through
/// inotify within milliseconds but falls back to a 2 s scan if an event is missed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HvsockTransport {
    /// A VMBus pipe channel (shm transport).
    Pipe,
    /// The Unix-socket stand-in.
    Unix,
    /// Kernel AF_VSOCK.
    Vsock,
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Initiator {
    /// The host connected to a guest service.
    Host,
    /// The guest connected to a host service.
    Guest,
}

/// What is known about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The service GUID (for vsock, the port's GUID).
    pub service_id: Guid,
    /// The connection's endpoint (the pipe channel's instance id), when the transport has one.
    pub endpoint_id: Option<Guid>,
    /// What carries it.
    pub transport: HvsockTransport,
    /// Who opened it.
    pub initiator: Initiator,
    /// A name for logs.
    pub label: String,
}

/// One hvsock connection: a duplex byte stream.
pub struct HvsockStream {
    info: ConnectionInfo,
    inner: StreamInner,
}

enum StreamInner {
    Pipe(Box<PipeStream>),
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

/// The reading half of an [`HvsockStream`].
pub struct HvsockReadHalf {
    inner: ReadInner,
}

enum ReadInner {
    Pipe(pipe::PipeReadHalf),
    Unix(tokio::net::unix::OwnedReadHalf),
    Vsock(tokio_vsock::OwnedReadHalf),
}

/// The writing half of an [`HvsockStream`]; `shutdown` sends the FIN.
pub struct HvsockWriteHalf {
    inner: WriteInner,
}

enum WriteInner {
    Pipe(pipe::PipeWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
    Vsock(tokio_vsock::OwnedWriteHalf),
}

impl HvsockStream {
    /// A stream over a VMBus pipe.
    pub fn pipe(stream: PipeStream, info: ConnectionInfo) -> Self {
        Self {
            info,
            inner: StreamInner::Pipe(Box::new(stream)),
        }
    }

    /// A stream over the Unix stand-in.
    pub fn unix(stream: tokio::net::UnixStream, info: ConnectionInfo) -> Self {
        Self {
            info,
            inner: StreamInner::Unix(stream),
        }
    }

    /// A stream over AF_VSOCK.
    pub fn vsock(stream: tokio_vsock::VsockStream, info: ConnectionInfo) -> Self {
        Self {
            info,
            inner: StreamInner::Vsock(stream),
        }
    }

    /// What is known about the connection.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Splits the stream into halves that can be used at the same time from different tasks.
    pub fn into_split(self) -> (HvsockReadHalf, HvsockWriteHalf) {
        let (r, w) = match self.inner {
            StreamInner::Pipe(s) => {
                let (r, w) = (*s).into_split();
                (ReadInner::Pipe(r), WriteInner::Pipe(w))
            }
            StreamInner::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadInner::Unix(r), WriteInner::Unix(w))
            }
            StreamInner::Vsock(s) => {
                let (r, w) = s.into_split();
                (ReadInner::Vsock(r), WriteInner::Vsock(w))
            }
        };
        (HvsockReadHalf { inner: r }, HvsockWriteHalf { inner: w })
    }
}

impl std::fmt::Debug for HvsockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvsockStream")
            .field("info", &self.info)
            .finish()
    }
}

macro_rules! dispatch {
    ($inner:expr, $s:ident => $body:expr, $($variant:ident),*) => {
        match $inner { $( $variant::Pipe($s) => $body, $variant::Unix($s) => $body, $variant::Vsock($s) => $body, )* }
    };
}

impl AsyncRead for HvsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_read(cx, buf), StreamInner)
    }
}

impl AsyncWrite for HvsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_write(cx, buf), StreamInner)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_flush(cx), StreamInner)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_shutdown(cx), StreamInner)
    }
}

impl AsyncRead for HvsockReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_read(cx, buf), ReadInner)
    }
}

impl AsyncWrite for HvsockWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_write(cx, buf), WriteInner)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_flush(cx), WriteInner)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(&mut self.get_mut().inner, s => Pin::new(s).poll_shutdown(cx), WriteInner)
    }
}

/// Receives host-initiated connections (and those of the Unix stand-in and AF_VSOCK listeners).
pub trait HvsockAcceptor: Send + Sync + 'static {
    /// Takes a new connection to the guest service `service_id`. Called from the runtime's
    /// supervision loop: must not block or await; hand the stream to a task. Dropping the
    /// stream refuses (closes) the connection.
    fn accept(&self, service_id: Guid, stream: HvsockStream);
}

/// A channel as an acceptor: each connection is sent as `(service_id, stream)`; when the
/// receiver is full or gone the connection is closed (and logged).
impl HvsockAcceptor for tokio::sync::mpsc::Sender<(Guid, HvsockStream)> {
    fn accept(&self, service_id: Guid, stream: HvsockStream) {
        if let Err(e) = self.try_send((service_id, stream)) {
            let (reason, stream) = match e {
                tokio::sync::mpsc::error::TrySendError::Full((_, s)) => ("queue full", s),
                tokio::sync::mpsc::error::TrySendError::Closed((_, s)) => ("receiver gone", s),
            };
            hvisd_protocol::throttled!(
                warn,
                connection = %stream.info().label,
                "hvsock connection refused: acceptor {reason}"
            );
        }
    }
}

/// Starts the local listeners `[hvsock]` configures (the Unix stand-in, AF_VSOCK ports), each
/// handing its connections to `hvsock`'s acceptor until `stop`. Without an acceptor nothing is
/// started (logged once): a listener would only refuse.
pub fn start_listeners(
    hvsock: &Hvsock,
    config: &crate::config::HvsockSection,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if config.unix_listen.is_none() && config.vsock_listen_ports.is_empty() {
        return Ok(tasks);
    }
    if !hvsock.has_acceptor() {
        tracing::warn!(
            "[hvsock] listeners are configured but nothing accepts hvsock connections yet (no broker); not listening"
        );
        return Ok(tasks);
    }
    if let Some(path) = &config.unix_listen {
        let listener = unix::bind(path).map_err(io::Error::other)?;
        tracing::info!(socket = %path.display(), "hvsock Unix stand-in listening");
        tasks.push(tokio::spawn(unix::serve(
            listener,
            hvsock.clone(),
            stop.clone(),
        )));
    }
    for &port in &config.vsock_listen_ports {
        let listener = vsock::bind(vsock::VMADDR_CID_ANY, port).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("hvsock: listening on vsock port {port}: {e}"),
            )
        })?;
        tracing::info!(port, "hvsock listening on AF_VSOCK");
        tasks.push(tokio::spawn(vsock::serve(
            listener,
            port,
            hvsock.clone(),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

/// Why a guest-initiated connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The runtime serves no transport that can connect (no `run_shm`, vsock or Unix connector).
    #[error("hvsock connect to {service_id}: no transport to connect over")]
    NoTransport {
        /// The service asked for.
        service_id: Guid,
    },
    /// Too many connects are in progress.
    #[error("hvsock connect to {service_id}: {limit} connects already in progress")]
    TooManyPending {
        /// The service asked for.
        service_id: Guid,
        /// [`MAX_PENDING_CONNECTS`].
        limit: usize,
    },
    /// The host's `control` socket (or the stand-in's socket) could not be used.
    #[error("hvsock connect to {service_id}: {what} {}: {source}", path.display())]
    Socket {
        /// The service asked for.
        service_id: Guid,
        /// What we were doing.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The host's reply is not a valid answer to our request.
    #[error("hvsock connect to {service_id}: bad reply on ROOT/control: {reason}")]
    BadReply {
        /// The service asked for.
        service_id: Guid,
        /// What was wrong.
        reason: String,
    },
    /// The host refused the connection.
    #[error("hvsock connect to {service_id}: refused by the host (status {status})")]
    Refused {
        /// The service asked for.
        service_id: Guid,
        /// The reply's status (non-zero).
        status: i32,
    },
    /// No reply or no offer in time.
    #[error("hvsock connect to {service_id}: no connection within {after:?} ({stage})")]
    Timeout {
        /// The service asked for.
        service_id: Guid,
        /// The connect timeout.
        after: Duration,
        /// What we were waiting for.
        stage: &'static str,
    },
    /// The runtime stopped (or the offer's channel could not be opened) before the connection
    /// was made.
    #[error(
        "hvsock connect to {service_id}: the runtime dropped the connection before it was made"
    )]
    Dropped {
        /// The service asked for.
        service_id: Guid,
    },
    /// AF_VSOCK needs a service GUID of the vsock template.
    #[error(
        "hvsock connect to {service_id}: not a vsock port GUID (<port>-facb-11e6-bd58-64006a7986d3)"
    )]
    NotVsockService {
        /// The service asked for.
        service_id: Guid,
    },
    /// AF_VSOCK connect failed.
    #[error("hvsock connect to {service_id}: vsock cid {cid} port {port}: {source}")]
    Vsock {
        /// The service asked for.
        service_id: Guid,
        /// The CID.
        cid: u32,
        /// The port.
        port: u32,
        /// The error.
        source: io::Error,
    },
}

/// How guest-initiated connections are made.
#[derive(Debug, Clone)]
pub enum Connector {
    /// shm: request on `ROOT/control`, then wait for the offer (the runtime must serve `ROOT`).
    Shm {
        /// The shm root.
        root: PathBuf,
    },
    /// The Unix stand-in: connect to this stream socket and write the service line.
    Unix {
        /// The socket.
        path: PathBuf,
    },
    /// AF_VSOCK to this CID (`VMADDR_CID_HOST`, 2, on a Hyper-V guest).
    Vsock {
        /// The peer's CID.
        cid: u32,
    },
}

/// Options of the hvsock layer.
#[derive(Debug, Clone)]
pub struct HvsockOptions {
    /// How long [`Hvsock::connect`] waits for the reply and the offer.
    pub connect_timeout: Duration,
}

impl Default for HvsockOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

struct PendingConnect {
    service_id: Guid,
    deliver: oneshot::Sender<HvsockStream>,
}

struct HvsockInner {
    acceptor: Option<Arc<dyn HvsockAcceptor>>,
    options: HvsockOptions,
    connector: Mutex<Option<Connector>>,
    /// Guest-initiated connects waiting for their offer, by endpoint id.
    pending: Mutex<HashMap<Guid, PendingConnect>>,
}

/// The runtime's hvsock state: the acceptor for host-initiated connections, the connector and
/// the connects in progress for guest-initiated ones. Cheap to clone.
#[derive(Clone)]
pub struct Hvsock {
    inner: Arc<HvsockInner>,
}

impl Default for Hvsock {
    /// No acceptor (pipe offers are left alone), default options.
    fn default() -> Self {
        Self::new(None, HvsockOptions::default())
    }
}

impl std::fmt::Debug for Hvsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hvsock")
            .field("acceptor", &self.inner.acceptor.is_some())
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Removes a connect's pending entry when the connect ends, whatever way.
struct PendingGuard<'a> {
    hvsock: &'a Hvsock,
    endpoint_id: Guid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.hvsock.lock_pending().remove(&self.endpoint_id);
    }
}

impl Hvsock {
    /// hvsock with `acceptor` for host-initiated connections (`None`: such offers are left
    /// alone, logged once each).
    pub fn new(acceptor: Option<Arc<dyn HvsockAcceptor>>, options: HvsockOptions) -> Self {
        Self {
            inner: Arc::new(HvsockInner {
                acceptor,
                options,
                connector: Mutex::new(None),
                pending: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether host-initiated connections have somewhere to go.
    pub fn has_acceptor(&self) -> bool {
        self.inner.acceptor.is_some()
    }

    /// The options.
    pub fn options(&self) -> &HvsockOptions {
        &self.inner.options
    }

    /// Hands a host-initiated connection to the acceptor (or closes it if there is none).
    pub fn accept(&self, stream: HvsockStream) {
        match &self.inner.acceptor {
            Some(acceptor) => acceptor.accept(stream.info().service_id, stream),
            None => hvisd_protocol::throttled!(
                info,
                connection = %stream.info().label,
                "no hvsock acceptor; connection closed"
            ),
        }
    }

    /// Sets how [`Hvsock::connect`] connects (the shm runtime sets [`Connector::Shm`] when it
    /// starts, unless one is set already).
    pub fn set_connector(&self, connector: Connector) {
        *self
            .inner
            .connector
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(connector);
    }

    /// Sets the connector if none is set yet.
    pub fn set_default_connector(&self, connector: Connector) {
        let mut slot = self
            .inner
            .connector
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(connector);
        }
    }

    /// The connector in use.
    pub fn connector(&self) -> Option<Connector> {
        self.inner
            .connector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<Guid, PendingConnect>> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a connection to the host service `service_id`, within the connect timeout.
    pub async fn connect(&self, service_id: Guid) -> Result<HvsockStream, ConnectError> {
        let timeout = self.inner.options.connect_timeout;
        match self.connector() {
            None => Err(ConnectError::NoTransport { service_id }),
            Some(Connector::Shm { root }) => self.connect_shm(&root, service_id, timeout).await,
            Some(Connector::Unix { path }) => unix::connect(&path, service_id, timeout).await,
            Some(Connector::Vsock { cid }) => vsock::connect(cid, service_id, timeout).await,
        }
    }

    async fn connect_shm(
        &self,
        root: &std::path::Path,
        service_id: Guid,
        timeout: Duration,
    ) -> Result<HvsockStream, ConnectError> {
        let endpoint_id = crate::offer::random_guid();
        let (deliver, delivered) = oneshot::channel();
        {
            let mut pending = self.lock_pending();
            if pending.len() >= MAX_PENDING_CONNECTS {
                return Err(ConnectError::TooManyPending {
                    service_id,
                    limit: MAX_PENDING_CONNECTS,
                });
            }
            // Registered before the request is sent: the host may publish the offer before
            // its reply reaches us.
            pending.insert(
                endpoint_id,
                PendingConnect {
                    service_id,
                    deliver,
                },
            );
        }
        let _guard = PendingGuard {
            hvsock: self,
            endpoint_id,
        };
        let request = ConnectRequest {
            endpoint_id,
            service_id,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = |stage| ConnectError::Timeout {
            service_id,
            after: timeout,
            stage,
        };
        let reply =
            tokio::time::timeout_at(deadline, control::request(&root.join("control"), &request))
                .await
                .map_err(|_| timed_out("waiting for the host's reply on ROOT/control"))??;
        if !reply.accepted() {
            return Err(ConnectError::Refused {
                service_id,
                status: reply.status,
            });
        }
        tokio::time::timeout_at(deadline, delivered)
            .await
            .map_err(|_| timed_out("waiting for the host's offer"))?
            .map_err(|_| ConnectError::Dropped { service_id })
    }

    /// Whether a connect in progress waits for an offer of `service_id` at `endpoint_id`.
    pub fn is_pending(&self, endpoint_id: &Guid, service_id: &Guid) -> bool {
        self.lock_pending()
            .get(endpoint_id)
            .is_some_and(|p| p.service_id == *service_id)
    }

    /// Hands the stream of a guest-initiated offer to the connect waiting for it. Returns the
    /// stream back if no connect waits (any more).
    pub fn complete_connect(
        &self,
        endpoint_id: &Guid,
        stream: HvsockStream,
    ) -> Result<(), HvsockStream> {
        let pending = {
            let mut map = self.lock_pending();
            match map.get(endpoint_id) {
                Some(p) if p.service_id == stream.info().service_id => map.remove(endpoint_id),
                _ => None,
            }
        };
        match pending {
            Some(p) => p.deliver.send(stream),
            None => Err(stream),
        }
    }
}
