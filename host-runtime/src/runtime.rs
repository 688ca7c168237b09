//! The guest runtime: watches a transport for offers, opens the channels it has a service for, serves
//! them, and notices when the host rescinds them or goes away.
//!
//! One supervision loop serves every transport; a transport only says what offers exist now
//! ([`OfferSource`]), how to open one, and when to look again.
//!
//! The host is not trusted here either: it can publish any number of offers, malformed ones among
//! them, and make them appear and vanish at any rate. The loop sorts what a scan finds in a total
//! order (a comparator that is not one can panic), looks at a bounded number of offers, keeps at
//! most [`MAX_OPEN_CHANNELS`] channels open, logs each problem once per offer (and all of them
//! within a [`LogBudget`]), and keeps state only for offers that are present.

use crate::channel::{Channel, ChannelError};
use crate::hvsock::{
    ConnectionInfo, Connector, HvsockStream, HvsockTransport, Initiator, MAX_PIPE_CHANNELS,
    PipeStream, PipeSummary,
};
use crate::services::{ServiceKind, Services};
use crate::transport::shm::{FoundOffer, ShmError, ShmRoot, ShmWatcher};
use crate::transport::uio::UioDevice;
use hvisd_protocol::guid::Guid;
use hvisd_protocol::text::{LogBudget, suppressed_note};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

/// How often a source is scanned when nothing told us it changed: shm roots are watched with
/// inotify and this only makes up for a missed event; uio devices (sysfs has no change events)
/// appear when an operator binds one, which this interval is quick enough for.
pub const FALLBACK_SCAN_INTERVAL: Duration = Duration::from_secs(2);

/// Most channels open at once. Real VMBus gives a guest a handful of integration-component
/// channels and some hvsock pipes; a host offering more is refused the rest (logged once).
pub const MAX_OPEN_CHANNELS: usize = 256;

/// Why an offer could not be opened.
#[derive(Debug)]
pub enum OpenFailure {
    /// Not now (e.g. the host is not accepting yet): try again on the next scan.
    Retry(String),
    /// This offer is unusable: do not try it again until the host replaces it.
    Fatal(String),
}

/// What an hvsock pipe offer (`pipe=byte`) says about its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeOffer {
    /// `conn_from_host`: `Some(true)` host-initiated, `Some(false)` the answer to a guest's
    /// connect, `None` absent (refused: the spec requires it on hvsock offers).
    pub conn_from_host: Option<bool>,
}

/// One offer a transport found.
pub trait Candidate {
    /// What identifies this offer: a replaced offer must get a new identity.
    fn identity(&self) -> String;
    /// The interface type offered.
    fn class_id(&self) -> Guid;
    /// The channel instance.
    fn instance_id(&self) -> Guid;
    /// Opens the guest's end of the channel.
    fn open(&self, label: &str) -> Result<Channel, OpenFailure>;
    /// `Some` for an hvsock pipe offer (its packets are `vmpipe_proto_header` framed).
    fn pipe(&self) -> Option<PipeOffer> {
        None
    }
}

/// A malformed offer: what identifies it (so it is logged once), and what is wrong.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Identity of the offer (directory and inode, device path...).
    pub identity: String,
    /// The message, with host-chosen text already escaped.
    pub message: String,
}

/// What a scan found.
pub struct Scan<O> {
    /// Offers and problems, in a total order.
    pub offers: Vec<Result<O, Problem>>,
    /// Entries not looked at (over the source's cap).
    pub skipped: usize,
}

/// Something that lists the offers present now.
pub trait OfferSource {
    /// The offer type.
    type Offer: Candidate;
    /// Where the offers come from, for logs.
    fn describe(&self) -> String;
    /// Lists offers; malformed ones come back as problems (logged once each).
    fn scan(&mut self) -> std::io::Result<Scan<Self::Offer>>;
    /// Resolves when the source may have changed. Spurious returns are fine; it must be cancel
    /// safe (dropped unfinished, it must not have consumed a change).
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
}

/// An shm root with the channel opener, watched with inotify.
pub struct ShmSource {
    root: ShmRoot,
    watcher: Option<ShmWatcher>,
    /// Watch descriptors already seen (bounded; cleared when it grows past the scan cap).
    watched: HashSet<i32>,
    /// A directory started being watched after it was read: look once more, in case its `offer`
    /// arrived between the read and the watch.
    recheck: bool,
}

impl ShmSource {
    /// Watches `root` (falls back to periodic scans if inotify is unavailable).
    pub fn new(root: ShmRoot) -> Self {
        let watcher = match ShmWatcher::new(root.path()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(root = %root.path().display(), "cannot watch the shm root ({e}); scanning it every {FALLBACK_SCAN_INTERVAL:?}");
                None
            }
        };
        Self {
            root,
            watcher,
            watched: HashSet::new(),
            recheck: false,
        }
    }

    fn watch(&mut self, dir: &Path) {
        let Some(w) = &self.watcher else { return };
        if let Some(wd) = w.watch(dir) {
            if self.watched.len() > 4 * crate::transport::shm::MAX_OFFER_DIRS {
                self.watched.clear();
            }
            if self.watched.insert(wd) {
                self.recheck = true;
            }
        }
    }
}

/// An shm offer, opened through its root.
#[derive(Debug, Clone)]
pub struct ShmCandidate {
    root: ShmRoot,
    found: FoundOffer,
}

impl OfferSource for ShmSource {
    type Offer = ShmCandidate;
    fn describe(&self) -> String {
        format!("shm root {}", self.root.path().display())
    }
    fn scan(&mut self) -> std::io::Result<Scan<ShmCandidate>> {
        let scan = self.root.scan()?;
        // Watch every directory seen: an `offer` will be renamed into a pending one, a present one
        // can be replaced or rescinded.
        for dir in &scan.pending {
            self.watch(dir);
        }
        let mut offers = Vec::with_capacity(scan.offers.len());
        for entry in scan.offers {
            offers.push(match entry {
                Ok(found) => {
                    self.watch(&found.dir);
                    Ok(ShmCandidate {
                        root: self.root.clone(),
                        found,
                    })
                }
                Err((identity, e)) => {
                    if let ShmError::Offer { dir, .. } = &e {
                        self.watch(dir);
                    }
                    Err(Problem {
                        identity,
                        message: e.to_string(),
                    })
                }
            });
        }
        Ok(Scan {
            offers,
            skipped: scan.skipped,
        })
    }
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        let recheck = std::mem::take(&mut self.recheck);
        let watcher = self.watcher.as_ref();
        async move {
            if recheck {
                return;
            }
            match watcher {
                Some(w) => {
                    // Cancel-safe: events are consumed only in the poll that returns them.
                    tokio::select! {
                        r = w.changed() => {
                            if let Err(e) = r {
                                tracing::warn!("shm root watch failed: {e}");
                                tokio::time::sleep(FALLBACK_SCAN_INTERVAL).await;
                            }
                        }
                        _ = tokio::time::sleep(FALLBACK_SCAN_INTERVAL * 5) => {}
                    }
                }
                None => tokio::time::sleep(FALLBACK_SCAN_INTERVAL).await,
            }
        }
    }
}

impl Candidate for ShmCandidate {
    fn identity(&self) -> String {
        self.found.identity()
    }
    fn class_id(&self) -> Guid {
        self.found.offer.class_id
    }
    fn instance_id(&self) -> Guid {
        self.found.offer.instance_id
    }
    fn pipe(&self) -> Option<PipeOffer> {
        (self.found.offer.pipe == crate::offer::PipeMode::Byte).then_some(PipeOffer {
            conn_from_host: self.found.offer.conn_from_host,
        })
    }
    fn open(&self, label: &str) -> Result<Channel, OpenFailure> {
        match self.root.open(&self.found, label) {
            Ok(channel) => Ok(channel),
            // The host binds the doorbell before it publishes `offer`, but a host that died leaves a
            // stale socket that refuses connections until it is replaced: retry quietly.
            Err(ShmError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Err(OpenFailure::Retry(format!(
                    "host not accepting on its doorbell: {source}"
                )))
            }
            Err(e) => Err(OpenFailure::Fatal(e.to_string())),
        }
    }
}

/// The uio devices under a sysfs directory.
#[derive(Debug, Clone)]
pub struct UioSource {
    /// `/sys/bus/vmbus/devices` or a test tree.
    pub devices: PathBuf,
    /// `/dev` or a test directory.
    pub dev_dir: PathBuf,
}

impl OfferSource for UioSource {
    type Offer = UioDevice;
    fn describe(&self) -> String {
        format!("uio devices under {}", self.devices.display())
    }
    fn scan(&mut self) -> std::io::Result<Scan<UioDevice>> {
        let found = crate::transport::uio::discover(&self.devices, &self.dev_dir)?;
        Ok(Scan {
            offers: found
                .offers
                .into_iter()
                .map(|r| {
                    r.map_err(|(identity, e)| Problem {
                        identity,
                        message: e.to_string(),
                    })
                })
                .collect(),
            skipped: found.skipped,
        })
    }
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(FALLBACK_SCAN_INTERVAL)
    }
}

impl Candidate for UioDevice {
    fn identity(&self) -> String {
        format!("{}/{}", self.instance_id, self.uio_name)
    }
    fn class_id(&self) -> Guid {
        self.class_id
    }
    fn instance_id(&self) -> Guid {
        self.instance_id
    }
    fn open(&self, label: &str) -> Result<Channel, OpenFailure> {
        UioDevice::open(self, label).map_err(|e| OpenFailure::Fatal(e.to_string()))
    }
}

/// Serves every offer under an shm root until `stop` turns true. Guest-initiated hvsock
/// connects go through this root's `control` socket unless another connector was set.
pub async fn run_shm(
    root: ShmRoot,
    services: Services,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    services.hvsock().set_default_connector(Connector::Shm {
        root: root.path().to_owned(),
    });
    supervise(ShmSource::new(root), services, stop).await
}

/// Serves every device bound to `uio_hv_generic` until `stop` turns true.
pub async fn run_uio(
    devices: &Path,
    dev_dir: &Path,
    services: Services,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let source = UioSource {
        devices: devices.to_owned(),
        dev_dir: dev_dir.to_owned(),
    };
    supervise(source, services, stop).await
}

/// How a channel's task ended.
enum ChannelEnd {
    /// An integration-component channel: the service loop's result.
    Ic(Result<(), ChannelError>),
    /// An hvsock pipe: both halves of its stream are gone.
    Pipe(PipeSummary),
}

/// The tasks of the open channels: (identity, label, how it ended).
type ChannelTasks = JoinSet<(String, String, ChannelEnd)>;

/// An open channel.
struct OpenChannel {
    label: String,
    abort: AbortHandle,
    /// An hvsock pipe (counted against [`MAX_PIPE_CHANNELS`]).
    pipe: bool,
}

/// State of the supervision loop that a host's behaviour can grow, each part bounded by what is
/// present now.
#[derive(Default)]
struct Book {
    /// Open channels by identity.
    open: HashMap<String, OpenChannel>,
    /// Offers whose channel ended or cannot be opened: not retried until replaced or rescinded.
    finished: HashSet<String>,
    /// Offers already reported (problem, retry, no service, over the cap).
    reported: HashSet<String>,
}

/// The supervision loop shared by every transport.
///
/// An offer is opened once per identity: when its channel ends (the host closed it, or broke the ring
/// protocol) the runtime waits for the host to publish a new offer rather than hammering the old one.
/// An offer that disappears is rescinded: its channel task is stopped.
pub async fn supervise<S: OfferSource>(
    mut source: S,
    services: Services,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut book = Book::default();
    let mut tasks: ChannelTasks = JoinSet::new();
    let mut budget = LogBudget::new(100, 60);
    let mut scan_failed = false;
    let mut skipped_reported = 0usize;
    tracing::info!("watching {} for offers", source.describe());
    while !*stop.borrow() {
        match source.scan() {
            Ok(scan) => {
                tracing::debug!(
                    offers = scan.offers.len(),
                    skipped = scan.skipped,
                    "scanned {}",
                    source.describe()
                );
                scan_failed = false;
                let present = step(&scan, &services, &mut book, &mut tasks, &mut budget);
                // Forget everything about offers that are gone: memory stays bounded by what
                // exists, and rescinded channels are stopped.
                book.open.retain(|id, open| {
                    let keep = present.contains(id);
                    if !keep {
                        open.abort.abort();
                        tracing::info!(channel = %open.label, "offer rescinded; channel closed");
                    }
                    keep
                });
                book.finished.retain(|id| present.contains(id));
                book.reported.retain(|id| present.contains(id));
                if scan.skipped != skipped_reported {
                    skipped_reported = scan.skipped;
                    if scan.skipped > 0 {
                        tracing::warn!(
                            "{}: {} more offer directories than the {} looked at are ignored",
                            source.describe(),
                            scan.skipped,
                            crate::transport::shm::MAX_OFFER_DIRS
                        );
                    }
                }
            }
            Err(e) => {
                // Without a successful scan we do not know what was rescinded: keep every channel.
                if !scan_failed {
                    tracing::warn!("cannot scan {}: {e}", source.describe());
                    scan_failed = true;
                }
            }
        }
        // Wait for a change, a channel's end, or the stop.
        loop {
            tokio::select! {
                _ = source.changed() => {
                    // Offers are written in several steps (files, then `offer` by rename): let a
                    // burst of events settle into one scan.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    break;
                }
                _ = stop.changed() => break,
                Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((id, label, result)) = ended {
                        book.open.remove(&id);
                        book.finished.insert(id);
                        log_channel_end(&label, result);
                    }
                }
            }
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// Handles one scan: opens what is new and ours, logs each problem once. Returns the identities
/// present (offers and problems).
fn step<O: Candidate>(
    scan: &Scan<O>,
    services: &Services,
    book: &mut Book,
    tasks: &mut ChannelTasks,
    budget: &mut LogBudget,
) -> HashSet<String> {
    let mut present = HashSet::with_capacity(scan.offers.len());
    for entry in &scan.offers {
        match entry {
            Ok(offer) => {
                let id = offer.identity();
                present.insert(id.clone());
                if book.open.contains_key(&id) || book.finished.contains(&id) {
                    continue;
                }
                match offer.pipe() {
                    Some(pipe) => try_open_pipe(offer, pipe, id, services, book, tasks, budget),
                    None => try_open(offer, id, services, book, tasks, budget),
                }
            }
            Err(problem) => {
                present.insert(problem.identity.clone());
                if book.reported.insert(problem.identity.clone())
                    && let Some(n) = budget.allow()
                {
                    tracing::warn!("ignoring offer: {}{}", problem.message, suppressed_note(n));
                }
            }
        }
    }
    present
}

fn try_open<O: Candidate>(
    offer: &O,
    id: String,
    services: &Services,
    book: &mut Book,
    tasks: &mut ChannelTasks,
    budget: &mut LogBudget,
) {
    let mut report = |book: &mut Book, line: &dyn Fn(u64)| {
        if book.reported.insert(id.clone())
            && let Some(n) = budget.allow()
        {
            line(n);
        }
    };
    let Some(kind) = services.kind_for(&offer.class_id()) else {
        report(book, &|n| {
            tracing::info!(
                class_id = %offer.class_id(),
                instance_id = %offer.instance_id(),
                "no enabled service for this offer's class; leaving it alone{}",
                suppressed_note(n)
            )
        });
        return;
    };
    let label = channel_label(kind, &offer.instance_id());
    if book.open.len() >= MAX_OPEN_CHANNELS {
        report(
            book,
            &|n| tracing::warn!(channel = %label, "{MAX_OPEN_CHANNELS} channels are open already; not opening this one{}", suppressed_note(n)),
        );
        return;
    }
    match offer.open(&label) {
        Ok(channel) => {
            tracing::info!(channel = %label, "channel opened");
            let services = services.clone();
            let (task_id, task_label) = (id.clone(), label.clone());
            let abort = tasks.spawn(async move {
                let result = services.serve(kind, channel).await;
                (task_id, task_label, ChannelEnd::Ic(result))
            });
            book.reported.remove(&id);
            book.open.insert(
                id,
                OpenChannel {
                    label,
                    abort,
                    pipe: false,
                },
            );
        }
        Err(OpenFailure::Retry(why)) => report(
            book,
            &|n| tracing::info!(channel = %label, "cannot open yet, will retry: {why}{}", suppressed_note(n)),
        ),
        Err(OpenFailure::Fatal(why)) => {
            if let Some(n) = budget.allow() {
                tracing::error!(channel = %label, "cannot open channel: {why}{}", suppressed_note(n));
            }
            book.finished.insert(id);
        }
    }
}

/// Opens an hvsock pipe offer if something waits for it: the acceptor for a host-initiated
/// connection, or the connect in progress whose endpoint id the offer carries. The channel's
/// task owns the stream's monitor: it ends when both halves are dropped, and aborting it (the
/// offer rescinded, the runtime stopping) closes the connection.
fn try_open_pipe<O: Candidate>(
    offer: &O,
    pipe: PipeOffer,
    id: String,
    services: &Services,
    book: &mut Book,
    tasks: &mut ChannelTasks,
    budget: &mut LogBudget,
) {
    let mut report = |book: &mut Book, line: &dyn Fn(u64)| {
        if book.reported.insert(id.clone())
            && let Some(n) = budget.allow()
        {
            line(n);
        }
    };
    let hvsock = services.hvsock();
    let (service_id, endpoint_id) = (offer.class_id(), offer.instance_id());
    let label = format!("hvsock {service_id} {endpoint_id}");
    let initiator = match pipe.conn_from_host {
        Some(true) if hvsock.has_acceptor() => Initiator::Host,
        Some(true) => {
            report(
                book,
                &|n| tracing::info!(connection = %label, "hvsock pipe offer from the host, but nothing accepts hvsock connections (no broker); leaving it alone{}", suppressed_note(n)),
            );
            return;
        }
        Some(false) if hvsock.is_pending(&endpoint_id, &service_id) => Initiator::Guest,
        Some(false) => {
            report(
                book,
                &|n| tracing::warn!(connection = %label, "hvsock pipe offer answers no connect of ours (conn_from_host=0, unknown endpoint or service); leaving it alone{}", suppressed_note(n)),
            );
            return;
        }
        None => {
            report(
                book,
                &|n| tracing::warn!(connection = %label, "hvsock pipe offer without conn_from_host; refused{}", suppressed_note(n)),
            );
            return;
        }
    };
    let pipes = book.open.values().filter(|o| o.pipe).count();
    let open = book.open.len();
    if pipes >= MAX_PIPE_CHANNELS || open >= MAX_OPEN_CHANNELS {
        report(
            book,
            &|n| tracing::warn!(connection = %label, "{pipes} hvsock pipes and {open} channels are open (limits {MAX_PIPE_CHANNELS} and {MAX_OPEN_CHANNELS}); not opening this one{}", suppressed_note(n)),
        );
        return;
    }
    let channel = match offer.open(&label) {
        Ok(channel) => channel,
        Err(OpenFailure::Retry(why)) => {
            report(
                book,
                &|n| tracing::info!(connection = %label, "cannot open yet, will retry: {why}{}", suppressed_note(n)),
            );
            return;
        }
        Err(OpenFailure::Fatal(why)) => {
            if let Some(n) = budget.allow() {
                tracing::error!(connection = %label, "cannot open hvsock pipe: {why}{}", suppressed_note(n));
            }
            book.finished.insert(id);
            return;
        }
    };
    let (stream, mut monitor) = PipeStream::new(channel);
    let stream = HvsockStream::pipe(
        stream,
        ConnectionInfo {
            service_id,
            endpoint_id: Some(endpoint_id),
            transport: HvsockTransport::Pipe,
            initiator,
            label: label.clone(),
        },
    );
    tracing::info!(connection = %label, initiator = ?initiator, "hvsock connection opened");
    match initiator {
        Initiator::Host => hvsock.accept(stream),
        Initiator::Guest => {
            if hvsock.complete_connect(&endpoint_id, stream).is_err() {
                tracing::info!(connection = %label, "the connect gave up before its offer was opened; closing");
            }
        }
    }
    let (task_id, task_label) = (id.clone(), label.clone());
    let abort = tasks.spawn(async move {
        let summary = monitor.closed().await;
        (task_id, task_label, ChannelEnd::Pipe(summary))
    });
    book.reported.remove(&id);
    book.open.insert(
        id,
        OpenChannel {
            label,
            abort,
            pipe: true,
        },
    );
}

/// The name a channel goes by in logs: service and instance.
pub fn channel_label(kind: ServiceKind, instance_id: &Guid) -> String {
    format!("{} {}", kind.name(), instance_id)
}

fn log_channel_end(label: &str, end: ChannelEnd) {
    match end {
        ChannelEnd::Ic(Ok(())) => tracing::info!(channel = %label, "channel finished"),
        ChannelEnd::Ic(Err(ChannelError::Closed { .. })) => {
            tracing::info!(channel = %label, "host closed the channel")
        }
        ChannelEnd::Ic(Err(e)) => tracing::error!(channel = %label, "channel closed: {e}"),
        ChannelEnd::Pipe(s) => {
            let (bytes_in, bytes_out) = (s.bytes_in, s.bytes_out);
            match &s.error {
                None => {
                    tracing::info!(connection = %label, bytes_in, bytes_out, fin_received = s.fin_received, "hvsock connection closed")
                }
                Some(e) if e.is_peer_closed() && !s.fin_received => {
                    tracing::warn!(connection = %label, bytes_in, bytes_out, "hvsock connection lost: the host closed the channel without shutting its direction down")
                }
                Some(e) if e.is_peer_closed() => {
                    tracing::info!(connection = %label, bytes_in, bytes_out, "hvsock connection closed by the host")
                }
                Some(e) => {
                    tracing::error!(connection = %label, bytes_in, bytes_out, "hvsock connection closed: {e}")
                }
            }
        }
    }
}
