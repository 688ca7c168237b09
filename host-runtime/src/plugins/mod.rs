//! Plugins in the runtime. No WebAssembly runs in this process: every plugin runs in a worker
//! process of its own ([`worker`]), confined before it loads a byte of plugin code. This module
//! is the core's side: it compiles components into the cache (compiling runs none of their
//! code), opens each plugin's grants, starts and restarts its worker, calls into it with the
//! plugin's deadlines, and enforces the budgets from outside: wall clock per call (a worker that
//! misses it is killed), CPU over a window (throttled, then disabled), failures in a row
//! (disabled), restarts (backed off, then disabled). It gives KVP providers their Guest-pool keys,
//! tells subscribers what the host set, serves the plugins' `kvp-store` import from the pool
//! store (grants checked again), runs freeze hooks and policies in priority order, and reloads
//! on SIGHUP, all or nothing.

pub mod broker;
pub mod grants;
pub mod worker;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hvisd_kvp::guest_keys::ValueFuture;
use hvisd_kvp::{GuestKeyProvider, GuestKeys, KvpCore, PoolHandle};
use hvisd_plugin_host::manifest::Access;
use hvisd_plugin_host::{
    ComponentCache, KvpError, KvpFuture, KvpStore, PluginManifest, ProviderKeys, World,
    assign_owners, described_keys,
};
use hvisd_protocol::kvp::{Pool, Value};
use hvisd_protocol::text::Escaped;
use hvisd_protocol::worker::{Call, CallReply, FreezeContext, FreezeOutcome, Mount};
use serde::Serialize;

use crate::config::Config;
use crate::services::Services;
use worker::{Worker, WorkerError, WorkerImports, WorkerSpec};

/// The plugins' `kvp-store` import over the real pool files (the same store the KVP service uses,
/// so a plugin's write is what the host enumerates next).
pub struct PoolKvpStore {
    store: PoolHandle,
}

impl PoolKvpStore {
    /// Backs the import with the pool-store thread.
    pub fn new(store: PoolHandle) -> Self {
        Self { store }
    }

    /// Runs `f` against the pool-store thread (its own thread: file locks another process holds
    /// never stall an async worker).
    fn with<T, F>(&self, f: impl FnOnce(PoolHandle) -> F) -> KvpFuture<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, hvisd_kvp::StoreError>> + Send + 'static,
    {
        let fut = f(self.store.clone());
        Box::pin(async move { fut.await.map_err(|e| KvpError::Unavailable(e.to_string())) })
    }
}

impl KvpStore for PoolKvpStore {
    fn get(&self, pool: Pool, key: String) -> KvpFuture<Option<Value>> {
        self.with(|s| async move { Ok(s.get(pool, key).await?.map(Value::Text)) })
    }
    fn set(&self, pool: Pool, key: String, value: Value) -> KvpFuture<()> {
        self.with(|s| async move { s.set(pool, key, value.into_text()).await })
    }
    fn delete(&self, pool: Pool, key: String) -> KvpFuture<bool> {
        self.with(|s| async move { s.delete(pool, key).await })
    }
    fn list(&self, pool: Pool) -> KvpFuture<Vec<String>> {
        self.with(|s| async move { Ok(s.list(pool).await?.into_iter().map(|(k, _)| k).collect()) })
    }
}

/// Why plugins could not start.
#[derive(Debug, thiserror::Error)]
pub enum PluginSetupError {
    /// The engine or the cache could not be set up, or the manifests are invalid.
    #[error(transparent)]
    Host(#[from] hvisd_plugin_host::HostError),
    /// Plugins need the KVP store.
    #[error(
        "plugins are configured but [services] kvp = false; the kvp-store import needs the pools"
    )]
    NoKvp,
    /// No user to run workers as.
    #[error("{0}")]
    User(String),
}

/// How a plugin is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginState {
    /// Its worker is running (or will be started at the next call).
    Running,
    /// Its worker failed and is started again after a back-off.
    Restarting,
    /// It used more than its CPU share: calls are refused until its window passes.
    Throttled,
    /// Stopped for good (until a reload): the reason says why.
    Disabled,
    /// Not loaded: its component, manifest or grants were refused.
    Refused,
}

/// One plugin's line in [`Plugins::status`].
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    /// The plugin.
    pub name: String,
    /// Its state.
    pub state: PluginState,
    /// Why it is refused, disabled or throttled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The worlds its manifest claims.
    pub worlds: Vec<World>,
    /// The worker's pid, while one runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Calls made into it.
    pub calls: u64,
    /// Calls that failed (trap, deadline, dead worker).
    pub failures: u64,
    /// Workers started after the first.
    pub restarts: u64,
    /// CPU its workers used, milliseconds.
    pub cpu_ms: u64,
    /// Resident memory of its worker now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// How its worker is confined (its own account).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub confinement: String,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// First pause before a failed worker is started again; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Failed starts in a row after which a plugin is disabled.
const MAX_FAILED_STARTS: u32 = 5;
/// Windows in which a plugin exceeded its CPU share, after which it is disabled.
const MAX_THROTTLES: u32 = 3;
/// A call's wall-clock allowance beyond the plugin's own deadline (which the worker enforces with
/// epochs first): the round trip and a loaded machine.
fn wall_clock(deadline: Duration) -> Duration {
    deadline + (deadline / 4).min(Duration::from_millis(250)) + Duration::from_millis(20)
}

#[derive(Default)]
struct Health {
    disabled: Option<String>,
    throttled_until: Option<Instant>,
    throttles: u32,
    consecutive_failures: u32,
    failed_starts: u32,
    next_start: Option<Instant>,
    backoff: Duration,
    calls: u64,
    failures: u64,
    starts: u64,
    last_error: Option<String>,
    /// CPU samples (when, total CPU of the worker) over the current window.
    cpu: VecDeque<(Instant, Duration)>,
    /// CPU of workers that ended, plus the current one's at its last sample.
    cpu_total: Duration,
    cpu_of_current: Duration,
    last_cpu_check: Option<Instant>,
    confinement: String,
}

/// Everything the core knows about one loaded plugin.
struct Slot {
    manifest: PluginManifest,
    wasm_sha256: [u8; 32],
    /// The artifact's name in the cache.
    artifact: String,
    keys: ProviderKeys,
    worker: tokio::sync::Mutex<Option<Arc<Worker>>>,
    health: Mutex<Health>,
    shared: Arc<Shared>,
}

/// What every slot needs to start workers.
struct Shared {
    cache: ComponentCache,
    engine: hvisd_plugin_host::Engine,
    kvp_store: Arc<dyn KvpStore>,
    hvsock: Option<broker::HvsockImports>,
    uid: u32,
    gid: u32,
    require_landlock: bool,
}

#[derive(Default)]
struct PluginSet {
    slots: BTreeMap<String, Arc<Slot>>,
    refused: BTreeMap<String, (PluginManifest, String)>,
}

impl PluginSet {
    /// The freeze hooks in groups of equal priority, groups in priority order.
    fn hook_groups(&self) -> Vec<Vec<Arc<Slot>>> {
        let mut groups: Vec<Vec<Arc<Slot>>> = Vec::new();
        for slot in self.ordered(World::FreezeHook) {
            match groups.last_mut() {
                Some(g) if g[0].manifest.priority == slot.manifest.priority => g.push(slot),
                _ => groups.push(vec![slot]),
            }
        }
        groups
    }

    /// The loaded plugins claiming `world`, in hook order (priority, then name).
    fn ordered(&self, world: World) -> Vec<Arc<Slot>> {
        let mut v: Vec<Arc<Slot>> = self
            .slots
            .values()
            .filter(|s| s.manifest.worlds.contains(&world))
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            (a.manifest.priority, &a.manifest.name).cmp(&(b.manifest.priority, &b.manifest.name))
        });
        v
    }
}

impl Slot {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.manifest.name
    }

    fn call_deadline(&self) -> Duration {
        Duration::from_millis(self.manifest.limits.call_deadline_ms)
    }

    /// The running worker, starting one if there is none (or it died), unless the back-off says
    /// not yet.
    async fn worker(&self) -> Result<Arc<Worker>, String> {
        let mut slot = self.worker.lock().await;
        if let Some(w) = &*slot
            && !w.is_gone()
        {
            return Ok(w.clone());
        }
        if let Some(old) = slot.take() {
            // Keep the account of the CPU the dead worker used.
            let mut h = self.health();
            let used = std::mem::take(&mut h.cpu_of_current);
            h.cpu_total += used;
            h.cpu.clear();
            drop(old);
        }
        {
            let h = self.health();
            if let Some(why) = &h.disabled {
                return Err(format!("disabled: {why}"));
            }
            if let Some(at) = h.next_start
                && Instant::now() < at
            {
                return Err(format!(
                    "its worker failed; restarting in {} ms",
                    at.saturating_duration_since(Instant::now()).as_millis()
                ));
            }
        }
        match self.start(Vec::new()).await {
            Ok((w, _)) => {
                let w = Arc::new(w);
                let mut h = self.health();
                h.starts += 1;
                h.failed_starts = 0;
                h.confinement = w.confinement.clone();
                *slot = Some(w.clone());
                Ok(w)
            }
            Err(e) => {
                let why = e.to_string();
                let mut h = self.health();
                h.failed_starts += 1;
                h.backoff = (h.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                h.next_start = Some(Instant::now() + h.backoff);
                h.last_error = Some(why.clone());
                if h.failed_starts >= MAX_FAILED_STARTS && h.disabled.is_none() {
                    let reason = format!(
                        "its worker failed to start {} times in a row; last: {why}",
                        h.failed_starts
                    );
                    tracing::error!(plugin = self.name(), "plugin disabled: {reason}");
                    h.disabled = Some(reason);
                }
                Err(why)
            }
        }
    }

    /// Starts a worker: opens the artifact and the grants (checked again), spawns, waits for
    /// Ready.
    async fn start(
        &self,
        escape_test: Vec<String>,
    ) -> Result<(Worker, Option<Vec<(String, String)>>), WorkerError> {
        let artifact = self
            .shared
            .cache
            .open_artifact(&self.artifact)
            .map_err(|e| WorkerError::Spawn(format!("the compiled plugin: {e}")))?;
        let mut dirs = Vec::new();
        for d in &self.manifest.dirs {
            let fd = grants::open(&d.host).map_err(|e| WorkerError::Spawn(e.to_string()))?;
            dirs.push((fd, d.guest.clone(), d.access == Access::ReadWrite));
        }
        Worker::start(
            WorkerSpec {
                manifest: self.manifest.clone(),
                artifact,
                dirs,
                uid: self.shared.uid,
                gid: self.shared.gid,
                require_landlock: self.shared.require_landlock,
                escape_test,
            },
            WorkerImports {
                kvp: self.shared.kvp_store.clone(),
                hvsock: self.shared.hvsock.clone(),
            },
        )
        .await
    }

    /// A call into the plugin with its deadline, under the core's budgets.
    async fn call(&self, call: Call, deadline: Duration) -> Result<CallReply, String> {
        self.admit()?;
        let worker = self.worker().await?;
        let result = worker.call(call, wall_clock(deadline)).await;
        self.account(&worker, &result);
        result.map_err(|e| format!("plugin `{}`: {e}", self.name()))
    }

    /// Serves one host connection to `service` (a name of its `hvsock.listen`).
    async fn serve_hvsock(&self, service: &str, conn: crate::hvsock::HvsockStream) {
        let label = conn.info().label.clone();
        if let Err(why) = self.admit() {
            hvisd_protocol::throttled!(warn, plugin = self.name(), connection = %label, "hvsock connection closed: {why}");
            return;
        }
        let worker = match self.worker().await {
            Ok(w) => w,
            Err(why) => {
                hvisd_protocol::throttled!(warn, plugin = self.name(), connection = %label, "hvsock connection closed: {why}");
                return;
            }
        };
        let deadline = Duration::from_millis(self.manifest.limits.connection_deadline_ms);
        tracing::info!(plugin = self.name(), connection = %label, "hvsock connection to `{service}`");
        let (result, summary) = worker
            .serve_hvsock(service, conn, wall_clock(deadline))
            .await;
        match &result {
            Ok(CallReply::Served(Err(reason))) => tracing::info!(
                plugin = self.name(),
                connection = %label,
                "hvsock: the plugin ended the connection with an error: {}",
                Escaped::with_max(reason, 512)
            ),
            Ok(_) => {}
            // A connection the plugin could not take (its limit) is not a failed call.
            Err(WorkerError::Call(why)) if why.contains("limits.hvsock_connections") => {
                hvisd_protocol::throttled!(warn, plugin = self.name(), connection = %label, "hvsock connection closed: {why}");
                return;
            }
            Err(_) => {}
        }
        self.account(&worker, &result);
        tracing::info!(
            plugin = self.name(),
            connection = %label,
            to_plugin = summary.to_plugin,
            to_host = summary.to_host,
            idle = summary.idle,
            "hvsock connection closed"
        );
    }

    /// Whether a call may be made now: not disabled, not throttled.
    fn admit(&self) -> Result<(), String> {
        {
            let mut h = self.health();
            if let Some(why) = &h.disabled {
                return Err(format!("plugin `{}` is disabled: {why}", self.name()));
            }
            if let Some(until) = h.throttled_until {
                if Instant::now() < until {
                    return Err(format!(
                        "plugin `{}` is throttled for {} ms: it used more than its CPU share",
                        self.name(),
                        until.saturating_duration_since(Instant::now()).as_millis()
                    ));
                }
                h.throttled_until = None;
            }
        }
        Ok(())
    }

    /// Counts a call's outcome and checks the CPU budget.
    fn account(&self, worker: &Worker, result: &Result<CallReply, WorkerError>) {
        let limits = &self.manifest.limits;
        let now = Instant::now();
        let mut h = self.health();
        h.calls += 1;
        match result {
            Ok(_) => {
                h.consecutive_failures = 0;
                h.backoff = Duration::ZERO;
            }
            Err(e) => {
                h.failures += 1;
                h.consecutive_failures += 1;
                h.last_error = Some(e.to_string());
                tracing::warn!(plugin = self.name(), "plugin call failed: {e}");
                // A worker that was killed or died is replaced at the next call; when that keeps
                // happening, after a back-off that doubles.
                if matches!(
                    e,
                    WorkerError::Timeout(_) | WorkerError::Deadline | WorkerError::Gone(_)
                ) && h.consecutive_failures > 1
                {
                    h.backoff = (h.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                    h.next_start = Some(now + h.backoff);
                }
                if h.consecutive_failures >= limits.max_consecutive_traps && h.disabled.is_none() {
                    let reason = format!(
                        "{} calls in a row failed (limit {}); last: {e}",
                        h.consecutive_failures, limits.max_consecutive_traps
                    );
                    tracing::error!(
                        plugin = self.name(),
                        "plugin disabled: {reason}; fix the plugin and reload (SIGHUP)"
                    );
                    h.disabled = Some(reason);
                    worker.kill();
                }
            }
        }
        // CPU: sampled at most every 50 ms (reading /proc costs more than a call).
        if h.last_cpu_check
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(50))
        {
            return;
        }
        h.last_cpu_check = Some(now);
        let Some(cpu) = worker.cpu_time() else {
            return;
        };
        h.cpu_of_current = cpu;
        let window = Duration::from_secs(limits.cpu_window_s);
        h.cpu.push_back((now, cpu));
        while h
            .cpu
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            h.cpu.pop_front();
        }
        // CPU used since the oldest sample in the window (or since the worker started).
        let (since, base) = match h.cpu.front() {
            Some(&(t, c)) if h.cpu.len() > 1 => (t, c),
            _ => (worker.started(), Duration::ZERO),
        };
        let used = cpu.saturating_sub(base);
        let allowed = window * limits.cpu_percent / 100;
        // Judge only once a meaningful part of the window has passed (or the budget is blown).
        if used > allowed && (now.duration_since(since) >= window / 2 || used > 2 * allowed) {
            h.throttles += 1;
            h.cpu.clear();
            let why = format!(
                "its worker used {} ms of CPU in {} ms (limit {}% of a CPU over {} s)",
                used.as_millis(),
                now.duration_since(since).as_millis(),
                limits.cpu_percent,
                limits.cpu_window_s
            );
            if h.throttles >= MAX_THROTTLES {
                tracing::error!(
                    plugin = self.name(),
                    "plugin disabled: {why}, {} times",
                    h.throttles
                );
                h.disabled = Some(format!("{why}, {} windows", h.throttles));
                worker.kill();
            } else {
                tracing::warn!(
                    plugin = self.name(),
                    "plugin throttled for {} s: {why}",
                    limits.cpu_window_s
                );
                h.throttled_until = Some(now + window);
                h.last_error = Some(format!("throttled: {why}"));
            }
        }
    }

    fn status(&self, worker: Option<&Worker>) -> PluginStatus {
        let h = self.health();
        let now = Instant::now();
        let state = if h.disabled.is_some() {
            PluginState::Disabled
        } else if h.throttled_until.is_some_and(|t| now < t) {
            PluginState::Throttled
        } else if h.next_start.is_some_and(|t| now < t) {
            PluginState::Restarting
        } else {
            PluginState::Running
        };
        let cpu = worker
            .and_then(Worker::cpu_time)
            .unwrap_or(h.cpu_of_current);
        PluginStatus {
            name: self.name().to_owned(),
            state,
            reason: h.disabled.clone().or_else(|| {
                (state == PluginState::Throttled)
                    .then(|| h.last_error.clone())
                    .flatten()
            }),
            worlds: self.manifest.worlds.clone(),
            pid: worker.filter(|w| !w.is_gone()).map(Worker::pid),
            calls: h.calls,
            failures: h.failures,
            restarts: h.starts.saturating_sub(1),
            cpu_ms: (h.cpu_total + cpu).as_millis() as u64,
            rss_bytes: worker.and_then(Worker::rss_bytes),
            confinement: h.confinement.clone(),
            last_error: h.last_error.clone(),
        }
    }
}

/// One KVP-provider plugin as a source of Guest-pool values.
struct ProviderKeysSource {
    slot: Arc<Slot>,
    keys: Vec<String>,
}

impl GuestKeyProvider for ProviderKeysSource {
    fn name(&self) -> &str {
        self.slot.name()
    }
    fn keys(&self) -> Vec<String> {
        self.keys.clone()
    }
    fn value(&self, key: &str) -> ValueFuture {
        let slot = self.slot.clone();
        let key = key.to_owned();
        Box::pin(async move {
            let deadline = slot.call_deadline();
            match slot
                .call(
                    Call::Get {
                        pool: Pool::Guest,
                        key,
                    },
                    deadline,
                )
                .await?
            {
                CallReply::Value(Ok(v)) => Ok(v.into_text()),
                CallReply::Value(Err(e)) => Err(format!(
                    "plugin `{}`: {}",
                    slot.name(),
                    Escaped::with_max(&e.message, 512)
                )),
                other => Err(format!(
                    "plugin `{}` answered {other:?} to get",
                    slot.name()
                )),
            }
        })
    }
}

/// One hook's part in a pre-freeze or post-thaw round.
#[derive(Clone, Debug, Serialize)]
pub struct HookReport {
    /// The plugin.
    pub plugin: String,
    /// Its priority (lower runs earlier before the freeze, later after the thaw).
    pub priority: i32,
    /// How long its call took, microseconds.
    pub elapsed_us: u64,
    /// `None` if it agreed (or, after a thaw, ran); else `veto: REASON` or `failed: WHY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of a pre-freeze round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HookRound {
    /// The hook that vetoed (or failed) and why; `None`: go ahead.
    pub veto: Option<(String, String)>,
    /// Every hook that ran, in the order of their groups.
    pub hooks: Vec<HookReport>,
}

/// Runs `call` on every hook of one priority group in parallel, each with its manifest's
/// deadline cut to `end`, and reports them sorted by name.
async fn run_group<F, Fut>(group: Vec<Arc<Slot>>, end: Instant, call: F) -> Vec<HookReport>
where
    F: Fn(Arc<Slot>, Duration) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for slot in group {
        let deadline = slot
            .call_deadline()
            .min(end.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let (name, priority) = (slot.name().to_owned(), slot.manifest.priority);
        let fut = call(slot, deadline);
        set.spawn(async move {
            let t = Instant::now();
            let result = fut.await;
            HookReport {
                plugin: name,
                priority,
                elapsed_us: t.elapsed().as_micros() as u64,
                error: result.err(),
            }
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(report) => reports.push(report),
            Err(e) => tracing::error!("a freeze hook task failed: {e}"),
        }
    }
    reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    reports
}

/// The Guest-pool key sources of `set`'s providers, each key given to one provider.
fn key_sources(set: &PluginSet) -> Vec<Arc<dyn GuestKeyProvider>> {
    let providers: Vec<Arc<Slot>> = set.ordered(World::KvpProvider);
    let owned = assign_owners(providers.iter().map(|s| &s.keys));
    providers
        .iter()
        .zip(owned)
        .map(|(slot, keys)| {
            Arc::new(ProviderKeysSource {
                slot: slot.clone(),
                keys: keys
                    .keys
                    .into_iter()
                    .filter(|k| k.pool == Pool::Guest)
                    .map(|k| k.key)
                    .collect(),
            }) as Arc<dyn GuestKeyProvider>
        })
        .collect()
}

/// A reload prepared beside the running plugins (see [`Plugins::apply`]).
struct Prepared {
    set: PluginSet,
}

/// The plugins of the runtime: their workers, budgets and the services wired to them.
pub struct Plugins {
    /// Set up at the first load with plugins (the cache, the engine to compile with, the worker
    /// user), so a runtime without plugins touches none of it and a reload can still add some.
    shared: Mutex<Option<Arc<Shared>>>,
    set: RwLock<Arc<PluginSet>>,
    kvp: Arc<KvpCore>,
    /// The runtime's hvsock layer and the service names of the config.
    hvsock: broker::HvsockImports,
}

/// Result of a start or reload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadSummary {
    /// Plugins now running.
    pub loaded: Vec<String>,
    /// Plugins refused, with the reason.
    pub refused: Vec<(String, String)>,
}

impl Plugins {
    /// Starts the workers of `config.plugin` (None when there are none), installs the providers'
    /// keys in the KVP service, and forwards host-set keys to subscribers.
    pub async fn start(
        config: &Config,
        services: &Services,
    ) -> Result<Option<Arc<Self>>, PluginSetupError> {
        if config.plugin.is_empty() {
            return Ok(None);
        }
        Self::start_always(config, services).await.map(Some)
    }

    /// As [`Plugins::start`], even with no plugin configured (so a reload can add some).
    pub async fn start_always(
        config: &Config,
        services: &Services,
    ) -> Result<Arc<Self>, PluginSetupError> {
        let kvp = services
            .kvp_core()
            .cloned()
            .ok_or(PluginSetupError::NoKvp)?;
        let plugins = Arc::new(Self {
            shared: Mutex::new(None),
            set: RwLock::new(Arc::default()),
            kvp,
            hvsock: broker::HvsockImports {
                hvsock: services.hvsock().clone(),
                services: Arc::new(RwLock::new(broker::ServiceMap::new(
                    &config.hvsock.services,
                ))),
            },
        });
        plugins.apply(config).await?;
        plugins.forward_host_sets();
        Ok(plugins)
    }

    /// The cache, compile engine and worker user of `config`, set up once.
    fn shared(&self, config: &Config) -> Result<Arc<Shared>, PluginSetupError> {
        let mut slot = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = &*slot
            && shared.cache.dir() == config.plugins.cache_dir
            && shared.require_landlock == config.plugins.require_landlock
        {
            return Ok(shared.clone());
        }
        let (user, uid, gid) = config
            .plugins
            .worker_user()
            .map_err(PluginSetupError::User)?;
        tracing::info!(user, uid, gid, "plugin workers run as this user");
        let shared = Arc::new(Shared {
            cache: ComponentCache::new(&config.plugins.cache_dir)?,
            engine: hvisd_plugin_host::build_engine()?,
            kvp_store: Arc::new(PoolKvpStore::new(self.kvp.store())),
            hvsock: Some(self.hvsock.clone()),
            uid,
            gid,
            require_landlock: config.plugins.require_landlock,
        });
        *slot = Some(shared.clone());
        Ok(shared)
    }

    fn current(&self) -> Arc<PluginSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What is wrong with the loaded set, one sentence each: plugins refused (their component
    /// missing or invalid, grants refused...) and keys two providers claim. The daemon refuses
    /// to start with any; a reload keeps going and logs them.
    pub fn problems(&self) -> Vec<String> {
        let set = self.current();
        let mut problems: Vec<String> = set
            .refused
            .iter()
            .map(|(name, (_, why))| format!("plugin `{name}` refused: {why}"))
            .collect();
        let mut owner: BTreeMap<(u8, String), String> = BTreeMap::new();
        for slot in set.ordered(World::KvpProvider) {
            for k in &slot.keys.keys {
                let id = (k.pool as u8, k.key.clone());
                match owner.get(&id) {
                    Some(first) => problems.push(format!(
                        "plugins `{first}` and `{}` both claim key `{}` of pool {:?}",
                        slot.name(),
                        Escaped::with_max(&k.key, 128),
                        k.pool
                    )),
                    None => {
                        owner.insert(id, slot.name().to_owned());
                    }
                }
            }
        }
        problems
    }

    /// Serves a host connection to the guest service `service_id` with the plugin listening on
    /// it; without one the connection is closed.
    pub async fn serve_hvsock(
        &self,
        service_id: hvisd_protocol::guid::Guid,
        conn: crate::hvsock::HvsockStream,
    ) {
        let set = self.current();
        let found = set.slots.values().find_map(|slot| {
            slot.manifest
                .hvsock
                .listen
                .iter()
                .find(|name| self.hvsock.resolve(name) == Some(service_id))
                .map(|name| (slot.clone(), name.clone()))
        });
        match found {
            Some((slot, name)) => slot.serve_hvsock(&name, conn).await,
            None => hvisd_protocol::throttled!(
                warn,
                connection = %conn.info().label,
                "hvsock connection to {service_id} closed: no plugin listens on it"
            ),
        }
    }

    /// Loads (or reloads) the plugins of `config` and refreshes the Guest-pool keys, all or
    /// nothing: the new set (its workers started, its providers' keys settled) and its key map
    /// are built beside the running ones, then both are swapped at once; invalid manifests change
    /// nothing. Plugins whose manifest and component did not change keep their worker.
    pub async fn apply(&self, config: &Config) -> Result<LoadSummary, PluginSetupError> {
        let prepared = self.prepare(config).await?;
        *self
            .hvsock
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner()) = broker::ServiceMap::new(&config.hvsock.services);
        let keys = GuestKeys::new(key_sources(&prepared.set), config.kvp.guest_key_options());
        let summary = LoadSummary {
            loaded: prepared.set.slots.keys().cloned().collect(),
            refused: prepared
                .set
                .refused
                .iter()
                .map(|(n, (_, why))| (n.clone(), why.clone()))
                .collect(),
        };
        self.kvp.set_guest_keys(keys);
        let old = std::mem::replace(
            &mut *self.set.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(prepared.set),
        );
        // Workers of plugins that left the set (or changed) end when their last call does.
        let current = self.current();
        for (name, slot) in &old.slots {
            if !current
                .slots
                .get(name)
                .is_some_and(|s| Arc::ptr_eq(s, slot))
                && let Some(w) = slot.worker.lock().await.take()
            {
                w.shutdown(Duration::from_secs(2)).await;
            }
        }
        for name in &summary.loaded {
            tracing::info!(plugin = %name, "plugin loaded");
        }
        for (name, why) in &summary.refused {
            tracing::error!(plugin = %name, "plugin refused: {why}");
        }
        Ok(summary)
    }

    async fn prepare(&self, config: &Config) -> Result<Prepared, PluginSetupError> {
        hvisd_plugin_host::manifest::validate_all(&config.plugin)
            .map_err(|e| PluginSetupError::Host(hvisd_plugin_host::HostError::Manifest(e)))?;
        let old = self.current();
        let mut set = PluginSet::default();
        if config.plugin.is_empty() {
            return Ok(Prepared { set });
        }
        let shared = self.shared(config)?;
        let runtime_paths = [
            ("plugin cache", config.plugins.cache_dir.as_path()),
            ("KVP pool directory", config.kvp.pool_dir.as_path()),
        ];
        let all_grants: Vec<(String, PathBuf)> = config
            .plugin
            .iter()
            .flat_map(|m| m.dirs.iter().map(|d| (m.name.clone(), d.host.clone())))
            .collect();
        let mut grant_problems = grants::check_all(&all_grants, &runtime_paths);
        // Freeze hooks may not write where a backup freezes (only checked when VSS runs).
        if config.services.vss
            && config
                .plugin
                .iter()
                .any(|m| m.worlds.contains(&World::FreezeHook))
        {
            let planned = config
                .vss
                .policy
                .compile()
                .map_err(|e| PluginSetupError::User(format!("[vss.policy]: {e}")))?;
            match hvisd_vss::system::read_mounts() {
                Ok(mounts) => {
                    let plan = hvisd_vss::plan(&mounts, &planned);
                    grant_problems.extend(grants::hooks_writing_to_frozen(&config.plugin, &plan));
                }
                Err(e) => tracing::warn!(
                    "cannot read the mount table to check freeze hooks' directories: {e}"
                ),
            }
        }
        for m in &config.plugin {
            let refuse = |set: &mut PluginSet, why: String| {
                set.refused.insert(m.name.clone(), (m.clone(), why));
            };
            if let Some((_, problem)) = grant_problems.iter().find(|(p, _)| *p == m.name) {
                refuse(&mut set, problem.to_string());
                continue;
            }
            let wasm = match std::fs::read(&m.path) {
                Ok(w) => w,
                Err(e) => {
                    refuse(&mut set, format!("cannot read `{}`: {e}", m.path.display()));
                    continue;
                }
            };
            let sha: [u8; 32] = {
                use sha2::Digest;
                sha2::Sha256::digest(&wasm).into()
            };
            if let Some(slot) = old.slots.get(&m.name)
                && slot.manifest == *m
                && slot.wasm_sha256 == sha
                && slot.health().disabled.is_none()
            {
                set.slots.insert(m.name.clone(), slot.clone());
                continue;
            }
            match self.load(&shared, m, &wasm, sha).await {
                Ok(slot) => {
                    set.slots.insert(m.name.clone(), Arc::new(slot));
                }
                Err(why) => refuse(&mut set, why),
            }
        }
        Ok(Prepared { set })
    }

    /// Compiles (or finds) the artifact, starts the first worker (proving the component loads
    /// and has its worlds) and, for a provider, learns its keys.
    async fn load(
        &self,
        shared: &Arc<Shared>,
        m: &PluginManifest,
        wasm: &[u8],
        sha: [u8; 32],
    ) -> Result<Slot, String> {
        let shared = shared.clone();
        let (artifact, outcome) = {
            let (shared, wasm) = (shared.clone(), wasm.to_vec());
            tokio::task::spawn_blocking(move || shared.cache.artifact(&shared.engine, &wasm))
                .await
                .map_err(|e| format!("compiling: {e}"))?
                .map_err(|e| e.to_string())?
        };
        tracing::debug!(plugin = m.name, cache = ?outcome, "plugin artifact ready");
        let mut slot = Slot {
            manifest: m.clone(),
            wasm_sha256: sha,
            artifact,
            keys: ProviderKeys {
                plugin: m.name.clone(),
                ..ProviderKeys::default()
            },
            worker: tokio::sync::Mutex::new(None),
            health: Mutex::default(),
            shared,
        };
        let (worker, _) = slot.start(Vec::new()).await.map_err(|e| {
            if matches!(e, WorkerError::InitFailed(_)) {
                // A stale or foreign artifact: compile it again next time.
                slot.shared.cache.forget(&slot.shared.engine, wasm);
            }
            e.to_string()
        })?;
        {
            let mut h = slot.health();
            h.starts = 1;
            h.confinement = worker.confinement.clone();
        }
        tracing::info!(plugin = m.name, pid = worker.pid(), confinement = %worker.confinement, "plugin worker ready");
        if m.worlds.contains(&World::KvpProvider) {
            match worker
                .call(Call::Describe, wall_clock(slot.call_deadline()))
                .await
            {
                Ok(CallReply::Described { keys, subscribe }) => {
                    // The worker's filtering is not trusted: the manifest decides again here.
                    slot.keys = described_keys(m, keys, subscribe);
                }
                Ok(other) => return Err(format!("describe answered {other:?}")),
                Err(e) => return Err(format!("describe failed: {e}")),
            }
        }
        *slot.worker.get_mut() = Some(Arc::new(worker));
        Ok(slot)
    }

    fn forward_host_sets(self: &Arc<Self>) {
        // Subscribed before `start` returns, so no host SET after start is missed.
        let mut events = self.kvp.subscribe();
        let plugins = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let Some(plugins) = plugins.upgrade() else {
                            break;
                        };
                        let Some(value) = event.value else { continue };
                        plugins
                            .notify_host_set(event.pool, &event.key, Value::Text(value))
                            .await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            "{n} host-set notifications were dropped: subscribers were too slow"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// The loaded providers as Guest-pool key sources (what [`Plugins::apply`] installs in the
    /// KVP service), for benchmarks and embedders that serve them from another KVP core.
    pub fn guest_key_sources(&self) -> Vec<Arc<dyn GuestKeyProvider>> {
        key_sources(&self.current())
    }

    /// Tells every provider subscribed to `pool` (and granted the key) that the host set `key`.
    pub async fn notify_host_set(&self, pool: Pool, key: &str, value: Value) {
        let set = self.current();
        for slot in set.ordered(World::KvpProvider) {
            if !slot.keys.subscribe.contains(&pool) || slot.manifest.kvp_access(pool, key).is_none()
            {
                continue;
            }
            let call = Call::OnHostSet {
                pool,
                key: key.to_owned(),
                value: value.clone(),
            };
            if let Err(e) = slot.call(call, slot.call_deadline()).await {
                tracing::warn!(plugin = slot.name(), "host-set notification: {e}");
            }
        }
    }

    /// The value provider `plugin` gives for `key` in `pool` (benchmarks, diagnostics).
    pub async fn provider_get(&self, plugin: &str, pool: Pool, key: &str) -> Result<Value, String> {
        let slot = self
            .current()
            .slots
            .get(plugin)
            .cloned()
            .ok_or_else(|| format!("no plugin `{plugin}` is loaded"))?;
        match slot
            .call(
                Call::Get {
                    pool,
                    key: key.to_owned(),
                },
                slot.call_deadline(),
            )
            .await?
        {
            CallReply::Value(Ok(v)) => Ok(v),
            CallReply::Value(Err(e)) => Err(Escaped::with_max(&e.message, 512).to_string()),
            other => Err(format!("answered {other:?}")),
        }
    }

    /// Runs every freeze hook's `pre-freeze`: groups of equal priority in priority order, the
    /// hooks of a group in parallel, each with its own deadline (its manifest's, cut to what is
    /// left of `budget`). A veto or a failure stops the round after its group: the result names
    /// the first (by name) hook that vetoed. Every hook that ran is reported.
    pub async fn pre_freeze(
        &self,
        backup_id: &str,
        mounts: &[String],
        budget: Duration,
    ) -> HookRound {
        let end = Instant::now() + budget;
        let mut reports = Vec::new();
        for group in self.current().hook_groups() {
            let round = run_group(group, end, |slot, deadline| {
                let ctx = FreezeContext {
                    backup_id: backup_id.to_owned(),
                    mounts: mounts.to_vec(),
                    time_left_ms: deadline.as_millis() as u64,
                };
                async move {
                    match slot.call(Call::PreFreeze(ctx), deadline).await {
                        Ok(CallReply::PreFreeze(Ok(()))) => Ok(()),
                        Ok(CallReply::PreFreeze(Err(reason))) => {
                            Err(format!("veto: {}", Escaped::with_max(&reason, 1024)))
                        }
                        Ok(other) => Err(format!("failed: answered {other:?}")),
                        Err(e) => Err(format!("failed: {e}")),
                    }
                }
            })
            .await;
            let vetoed = round.iter().find(|r| r.error.is_some()).cloned();
            reports.extend(round);
            if let Some(v) = vetoed {
                tracing::warn!(plugin = %v.plugin, backup = %Escaped::new(backup_id), "pre-freeze {}", v.error.as_deref().unwrap_or_default());
                return HookRound {
                    veto: Some((v.plugin, v.error.unwrap_or_default())),
                    hooks: reports,
                };
            }
        }
        HookRound {
            veto: None,
            hooks: reports,
        }
    }

    /// Runs every freeze hook's `post-thaw` with the outcome: groups in reverse priority order,
    /// the hooks of a group in parallel, each with its own deadline within `budget`; every hook
    /// runs whatever the others do (a hook whose `pre-freeze` did not run is told too).
    pub async fn post_thaw(
        &self,
        backup_id: &str,
        mounts: &[String],
        outcome: FreezeOutcome,
        budget: Duration,
    ) -> Vec<HookReport> {
        let end = Instant::now() + budget;
        let mut reports = Vec::new();
        for group in self.current().hook_groups().into_iter().rev() {
            reports.extend(
                run_group(group, end, |slot, deadline| {
                    let ctx = FreezeContext {
                        backup_id: backup_id.to_owned(),
                        mounts: mounts.to_vec(),
                        time_left_ms: deadline.as_millis() as u64,
                    };
                    async move {
                        match slot.call(Call::PostThaw(ctx, outcome), deadline).await {
                            Ok(_) => Ok(()),
                            Err(e) => Err(format!("failed: {e}")),
                        }
                    }
                })
                .await,
            );
        }
        reports
    }

    /// Asks the freeze policy (the policy plugin with the lowest priority) what to freeze:
    /// `None` when there is none; `Some(Err(reason))` for a refusal or a failure.
    pub async fn freeze_plan(&self, mounts: &[Mount]) -> Option<Result<Vec<String>, String>> {
        let slot = self
            .current()
            .ordered(World::FreezePolicy)
            .into_iter()
            .next()?;
        Some(
            match slot
                .call(Call::Plan(mounts.to_vec()), slot.call_deadline())
                .await
            {
                Ok(CallReply::Plan(plan)) => plan,
                Ok(other) => Err(format!("answered {other:?}")),
                Err(e) => Err(format!("policy failed: {e}")),
            },
        )
    }

    /// One line per configured plugin.
    pub async fn status(&self) -> Vec<PluginStatus> {
        let set = self.current();
        let mut v = Vec::new();
        for slot in set.slots.values() {
            let worker = slot.worker.lock().await.clone();
            v.push(slot.status(worker.as_deref()));
        }
        for (name, (m, why)) in &set.refused {
            v.push(PluginStatus {
                name: name.clone(),
                state: PluginState::Refused,
                reason: Some(why.clone()),
                worlds: m.worlds.clone(),
                pid: None,
                calls: 0,
                failures: 0,
                restarts: 0,
                cpu_ms: 0,
                rss_bytes: None,
                confinement: String::new(),
                last_error: None,
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Debug builds: starts a worker of `plugin` that tries `attempts` after confinement and
    /// returns what happened to each (the compromised-worker test).
    #[cfg(debug_assertions)]
    pub async fn escape_test(
        &self,
        plugin: &str,
        attempts: Vec<String>,
    ) -> Result<Vec<(String, String)>, String> {
        let slot = self
            .current()
            .slots
            .get(plugin)
            .cloned()
            .ok_or_else(|| format!("no plugin `{plugin}`"))?;
        let (_worker, report) = slot.start(attempts).await.map_err(|e| e.to_string())?;
        report.ok_or_else(|| "the worker served instead of reporting".into())
    }

    /// Stops every worker.
    pub async fn shutdown(&self) {
        for slot in self.current().slots.values() {
            if let Some(w) = slot.worker.lock().await.take() {
                w.shutdown(Duration::from_secs(2)).await;
            }
        }
    }
}
