//! [`PluginHost`]: one engine, the epoch ticker, the loaded plugins and every
//! call the runtime makes into them, each under the plugin's limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::cache::{CacheOutcome, ComponentCache};
use crate::manifest::{Access, PluginManifest, World, validate_all};
use crate::state::bindings::exports::hyperv::integration::{
    freeze_hooks, freeze_policy, hvsock_service, kvp_provider,
};
use crate::state::{
    BoxedReader, BoxedWriter, HostState, HvsockConnector, PluginContext, build_linker, push_streams,
};
use crate::stdio::TracingStdio;
use crate::types::{KvpError, KvpStore, Pool, Value};
use crate::{CallError, HostError};

/// How often the epoch advances; the unit of every CPU deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Wasm stack cap: deep recursion traps with a stack overflow well before the host's stack.
const MAX_WASM_STACK: usize = 512 * 1024;
/// Instances, tables and memories a component may create (Rust components use a handful).
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 64;
/// One linear memory per instance, so the manifest's memory cap is the plugin's
/// whole heap (Rust wasm32-wasip2 components have exactly one).
const MAX_MEMORIES: usize = 1;
/// Most keys one provider may own; more are ignored with a warning.
const MAX_OWNED_KEYS: usize = 4096;
/// Table elements per table.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Builds the one engine every plugin runs in.
pub fn build_engine() -> Result<Engine, HostError> {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + 1024 * 1024)
        .concurrency_support(false)
        .parallel_compilation(true);
    Engine::new(&c).map_err(|e| HostError::Engine(format!("{e:#}")))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<Self, HostError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hvisd-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| HostError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which plugin exports the component provides, resolved once at load.
#[derive(Default)]
struct Exports {
    provider: Option<kvp_provider::GuestIndices>,
    hooks: Option<freeze_hooks::GuestIndices>,
    policy: Option<freeze_policy::GuestIndices>,
    hvsock: Option<hvsock_service::GuestIndices>,
}

/// A KVP key and pool a provider owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OwnedKey {
    /// The pool.
    pub pool: Pool,
    /// The key.
    pub key: String,
}

/// What one provider owns and listens to (from its `describe`, filtered by its grants).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProviderKeys {
    /// The plugin.
    pub plugin: String,
    /// Keys it answers for.
    pub keys: Vec<OwnedKey>,
    /// Pools whose host-set keys it is told about.
    pub subscribe: Vec<Pool>,
}

struct ProviderInstance {
    store: Store<HostState>,
    guest: kvp_provider::Guest,
    calls: u64,
}

/// The slow-changing part of a plugin's health (the counters on the hot path are atomics).
#[derive(Default)]
struct Health {
    consecutive_traps: u32,
    total_traps: u64,
    instantiations: u64,
    disabled: Option<String>,
    last_error: Option<String>,
}

/// A loaded plugin.
struct Plugin {
    ctx: Arc<PluginContext>,
    wasm_sha256: [u8; 32],
    pre: InstancePre<HostState>,
    exports: Exports,
    cache: CacheOutcome,
    provider: tokio::sync::Mutex<Option<ProviderInstance>>,
    provider_keys: Mutex<ProviderKeys>,
    health: Mutex<Health>,
    /// Calls made (successful or not).
    calls: AtomicU64,
    /// Mirrors `health.disabled.is_some()` for the lock-free check on every call.
    disabled: AtomicBool,
    /// Mirrors `health.consecutive_traps != 0`, so a successful call only locks after a failure.
    failing: AtomicBool,
}

impl Plugin {
    fn name(&self) -> &str {
        &self.ctx.manifest.name
    }
    fn manifest(&self) -> &PluginManifest {
        &self.ctx.manifest
    }
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn check_enabled(&self) -> Result<(), CallError> {
        if !self.disabled.load(Ordering::Acquire) {
            return Ok(());
        }
        match &self.health().disabled {
            Some(why) => Err(CallError::Disabled {
                plugin: self.name().to_owned(),
                reason: why.clone(),
            }),
            None => Ok(()),
        }
    }
    fn record_ok(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            self.health().consecutive_traps = 0;
            self.failing.store(false, Ordering::Relaxed);
        }
    }
    /// Counts a trap or deadline; disables the plugin after too many in a row.
    fn record_trap(&self, err: &CallError) {
        let max = self.manifest().limits.max_consecutive_traps;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        let mut h = self.health();
        h.total_traps += 1;
        h.consecutive_traps += 1;
        h.last_error = Some(err.to_string());
        tracing::warn!(plugin = self.name(), "plugin call failed: {err}");
        if h.consecutive_traps >= max && h.disabled.is_none() {
            let why = format!(
                "{} calls in a row trapped or ran past their deadline (limit {max}); last: {err}",
                h.consecutive_traps
            );
            tracing::error!(
                plugin = self.name(),
                "plugin disabled: {why}; fix the plugin and reload (SIGHUP)"
            );
            h.disabled = Some(why);
            self.disabled.store(true, Ordering::Release);
        }
    }
}

/// One plugin's line in `status()`.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    /// The plugin.
    pub name: String,
    /// `running`, `disabled` or `refused`.
    pub state: PluginState,
    /// Why it is disabled or refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The worlds its manifest claims.
    pub worlds: Vec<World>,
    /// Calls made into it since load.
    pub calls: u64,
    /// Calls that trapped or ran out of time.
    pub traps: u64,
    /// Fresh instances created.
    pub instantiations: u64,
    /// The last failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The state of a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginState {
    /// Loaded and serving.
    Running,
    /// Stopped after repeated traps; a reload re-enables it.
    Disabled,
    /// Not loaded: the component or its manifest was refused.
    Refused,
}

/// Result of `load` / `reload`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadSummary {
    /// Plugins now running.
    pub loaded: Vec<String>,
    /// Plugins that were refused, with the reason.
    pub refused: Vec<(String, String)>,
}

#[derive(Default)]
struct PluginSet {
    plugins: BTreeMap<String, Arc<Plugin>>,
    refused: BTreeMap<String, (PluginManifest, String)>,
}

/// Context handed to freeze hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeContext {
    /// The host's backup id.
    pub backup_id: String,
    /// Mount points concerned, in freeze order.
    pub mounts: Vec<String>,
    /// When the whole freeze operation must be over; each hook's deadline is
    /// the smaller of this and its manifest's call deadline.
    pub deadline: Instant,
}

/// How a freeze window ended (told to every post-thaw hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FreezeOutcome {
    /// Frozen and thawed.
    Thawed,
    /// A pre-freeze hook vetoed.
    Vetoed,
    /// Freezing failed.
    FreezeFailed,
    /// The host aborted.
    Aborted,
}

/// Result of the pre-freeze round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PreFreeze {
    /// Every hook agreed.
    Proceed,
    /// A hook vetoed (or failed, which counts as a veto).
    Veto {
        /// The plugin.
        plugin: String,
        /// Its reason, or the failure.
        reason: String,
    },
}

/// A mount offered to the freeze policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Mount point.
    pub path: String,
    /// File system type.
    pub fs_type: String,
    /// Device.
    pub device: String,
}

/// The freeze policy's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum FreezePlan {
    /// No policy plugin is loaded: the runtime uses its default.
    Default,
    /// Freeze these mount points in this order.
    Freeze {
        /// The policy plugin.
        plugin: String,
        /// Mount points.
        order: Vec<String>,
    },
    /// The policy refused the backup.
    Refuse {
        /// The policy plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
}

/// Runtime services the plugins' imports reach.
#[derive(Clone)]
pub struct HostServices {
    /// Backs the `kvp-store` import.
    pub kvp: Arc<dyn KvpStore>,
    /// Backs the `hvsock` import (`None`: connects fail with `unavailable`).
    pub hvsock: Option<Arc<dyn HvsockConnector>>,
}

/// The plugin host.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    cache: ComponentCache,
    services: HostServices,
    plugins: RwLock<Arc<PluginSet>>,
    _ticker: EpochTicker,
}

fn epoch_ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// Turns a wasmtime error from a call into a [`CallError`] with a short,
/// readable message (the trap or root cause, and the innermost wasm function).
fn classify(plugin: &str, deadline: Duration, e: wasmtime::Error) -> CallError {
    let trap = e.downcast_ref::<Trap>().copied();
    if let Some(Trap::Interrupt) = trap {
        return CallError::Deadline {
            plugin: plugin.to_owned(),
            deadline_ms: deadline.as_millis() as u64,
        };
    }
    let mut message = match trap {
        Some(Trap::StackOverflow) => {
            format!(
                "stack overflow: the wasm stack cap is {} KiB",
                MAX_WASM_STACK / 1024
            )
        }
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    if let Some(bt) = e.downcast_ref::<wasmtime::WasmBacktrace>()
        && let Some(name) = bt.frames().first().and_then(|f| f.func_name())
    {
        message.push_str(&format!(" (in {})", crate::state::truncate(name, 200)));
    }
    CallError::Trap {
        plugin: plugin.to_owned(),
        message: crate::state::truncate(&message, 1024).to_owned(),
    }
}

impl PluginHost {
    /// A host with its engine, epoch ticker and cache in `cache_dir` (see
    /// [`ComponentCache::new`] for the ownership rules). Load plugins with [`PluginHost::load`].
    pub fn new(cache_dir: impl Into<PathBuf>, services: HostServices) -> Result<Self, HostError> {
        let engine = build_engine()?;
        let linker = build_linker(&engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let cache = ComponentCache::new(cache_dir)?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(PluginHost {
            engine,
            linker,
            cache,
            services,
            plugins: RwLock::new(Arc::default()),
            _ticker: ticker,
        })
    }

    /// The engine (shared by every plugin).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn current(&self) -> Arc<PluginSet> {
        self.plugins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Validates the manifests and loads every plugin. Invalid manifests fail
    /// the whole load (nothing changes); a component that cannot be loaded is
    /// refused alone, with the reason in the summary and in `status()`.
    pub async fn load(&self, manifests: &[PluginManifest]) -> Result<LoadSummary, HostError> {
        self.reload(manifests).await
    }

    /// Replaces the plugin set (for SIGHUP). Plugins whose manifest and wasm
    /// did not change keep their instance and counters; calls in flight finish
    /// on the plugin they started with.
    pub async fn reload(&self, manifests: &[PluginManifest]) -> Result<LoadSummary, HostError> {
        validate_all(manifests).map_err(HostError::Manifest)?;
        let old = self.current();
        let mut set = PluginSet::default();
        let mut summary = LoadSummary::default();
        for m in manifests {
            let wasm = match std::fs::read(&m.path) {
                Ok(w) => w,
                Err(e) => {
                    let why = format!("cannot read `{}`: {e}", m.path.display());
                    refuse(&mut set, &mut summary, m, why);
                    continue;
                }
            };
            let sha: [u8; 32] = Sha256::digest(&wasm).into();
            if let Some(p) = old.plugins.get(&m.name)
                && p.ctx.manifest == *m
                && p.wasm_sha256 == sha
                && !p.disabled.load(Ordering::Acquire)
            {
                set.plugins.insert(m.name.clone(), p.clone());
                summary.loaded.push(m.name.clone());
                continue;
            }
            match self.load_one(m, &wasm, sha).await {
                Ok(p) => {
                    tracing::info!(plugin = m.name, cache = ?p.cache, "plugin loaded");
                    set.plugins.insert(m.name.clone(), Arc::new(p));
                    summary.loaded.push(m.name.clone());
                }
                Err(e) => refuse(&mut set, &mut summary, m, e.to_string()),
            }
        }
        *self
            .plugins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        Ok(summary)
    }

    fn component(&self, wasm: &[u8]) -> Result<(Component, CacheOutcome), HostError> {
        self.cache.load(&self.engine, wasm)
    }

    async fn load_one(
        &self,
        m: &PluginManifest,
        wasm: &[u8],
        sha: [u8; 32],
    ) -> Result<Plugin, HostError> {
        let refused = |problem: String| HostError::Refused {
            plugin: m.name.clone(),
            problem,
        };
        for (i, d) in m.dirs.iter().enumerate() {
            if !d.host.is_dir() {
                return Err(refused(format!(
                    "dirs[{i}].host `{}` is not a directory; create it or fix the path",
                    d.host.display()
                )));
            }
        }
        let (component, cache) = self.component(wasm).map_err(|e| refused(e.to_string()))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            refused(format!(
                "{e:#}; hvisd provides logging, kvp-store, hvsock and WASI cli/clocks/random/filesystem/io, never wasi:sockets"
            ))
        })?;
        let exports = Exports {
            provider: kvp_provider::GuestIndices::new(&pre).ok(),
            hooks: freeze_hooks::GuestIndices::new(&pre).ok(),
            policy: freeze_policy::GuestIndices::new(&pre).ok(),
            hvsock: hvsock_service::GuestIndices::new(&pre).ok(),
        };
        for w in &m.worlds {
            let present = match w {
                World::KvpProvider => exports.provider.is_some(),
                World::FreezeHook => exports.hooks.is_some(),
                World::FreezePolicy => exports.policy.is_some(),
                World::HvsockService => exports.hvsock.is_some(),
            };
            if !present {
                return Err(refused(format!(
                    "the manifest claims world `{w}` but the component does not export `{}` (or exports an incompatible version)",
                    w.export_interface()
                )));
            }
        }
        let plugin = Plugin {
            ctx: Arc::new(PluginContext {
                manifest: m.clone(),
                kvp: self.services.kvp.clone(),
                hvsock: self.services.hvsock.clone(),
            }),
            wasm_sha256: sha,
            pre,
            exports,
            cache,
            provider: tokio::sync::Mutex::new(None),
            provider_keys: Mutex::new(ProviderKeys {
                plugin: m.name.clone(),
                ..ProviderKeys::default()
            }),
            health: Mutex::default(),
            calls: AtomicU64::new(0),
            disabled: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        };
        if m.worlds.contains(&World::KvpProvider) {
            // Instantiating now both proves the component starts and fills the key list.
            let mut slot = plugin.provider.lock().await;
            let inst = self
                .provider_instance(&plugin)
                .await
                .map_err(|e| refused(e.to_string()))?;
            *slot = Some(inst);
        }
        Ok(plugin)
    }

    fn new_store(&self, plugin: &Plugin) -> Result<Store<HostState>, CallError> {
        let m = plugin.manifest();
        let mut b = WasiCtxBuilder::new();
        b.stdout(TracingStdio::new(&m.name, false))
            .stderr(TracingStdio::new(&m.name, true))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for d in &m.dirs {
            let perms = match d.access {
                Access::ReadOnly => FsPerms::ReadOnly,
                Access::ReadWrite => FsPerms::ReadWrite,
            };
            b.preopened_dir(&d.host, &d.guest, perms)
                .map_err(|e| CallError::Instantiate {
                    plugin: m.name.clone(),
                    message: format!("cannot open dir `{}`: {e:#}", d.host.display()),
                })?;
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(m.limits.memory_mib as usize * 1024 * 1024)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .tables(MAX_TABLES)
            .memories(MAX_MEMORIES)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi: b.build(),
                table: wasmtime::component::ResourceTable::new(),
                limits,
                plugin: plugin.ctx.clone(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        plugin.health().instantiations += 1;
        Ok(store)
    }

    /// Runs `fut` (a call into `store`) under both deadlines: the epoch
    /// deadline stops wasm that spins, the wall-clock timeout stops a call
    /// that waits on the host. Either way the instance must be dropped.
    async fn guarded<T>(
        plugin: &Plugin,
        deadline: Duration,
        fut: impl Future<Output = wasmtime::Result<T>>,
    ) -> Result<T, CallError> {
        let start = Instant::now();
        let mut fut = std::pin::pin!(fut);
        // Most calls never wait on the host (a provider answering from memory),
        // so the first poll finishes them and no timer is armed; the epoch
        // deadline bounds the CPU time of that poll.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
        let outcome = match first {
            std::task::Poll::Ready(r) => Ok(r),
            std::task::Poll::Pending => {
                let left = deadline.saturating_sub(start.elapsed());
                tokio::time::timeout(left, fut).await
            }
        };
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(plugin.name(), deadline, e)),
            Err(_) => Err(CallError::Deadline {
                plugin: plugin.name().to_owned(),
                deadline_ms: deadline.as_millis() as u64,
            }),
        }
    }

    async fn instantiate(
        &self,
        plugin: &Plugin,
        deadline: Duration,
    ) -> Result<(Store<HostState>, wasmtime::component::Instance), CallError> {
        let mut store = self.new_store(plugin)?;
        store.set_epoch_deadline(epoch_ticks(deadline));
        let instance = Self::guarded(plugin, deadline, plugin.pre.instantiate_async(&mut store))
            .await
            .map_err(|e| match e {
                CallError::Trap { plugin, message } => CallError::Instantiate { plugin, message },
                other => other,
            })?;
        Ok((store, instance))
    }

    async fn provider_instance(&self, plugin: &Plugin) -> Result<ProviderInstance, CallError> {
        let not_provided = || CallError::NotProvided {
            plugin: plugin.name().to_owned(),
            world: World::KvpProvider,
        };
        let idx = plugin.exports.provider.as_ref().ok_or_else(not_provided)?;
        let deadline = Duration::from_millis(plugin.manifest().limits.call_deadline_ms);
        let (mut store, instance) = self.instantiate(plugin, deadline).await?;
        let guest = idx
            .load(&mut store, &instance)
            .map_err(|e| CallError::Instantiate {
                plugin: plugin.name().to_owned(),
                message: format!("{e:#}"),
            })?;
        store.set_epoch_deadline(epoch_ticks(deadline));
        let info = Self::guarded(plugin, deadline, guest.call_describe(&mut store)).await?;
        let m = plugin.manifest();
        let mut keys = Vec::new();
        if info.owned_keys.len() > MAX_OWNED_KEYS {
            tracing::warn!(
                plugin = m.name,
                "provider claims {} keys; only the first {MAX_OWNED_KEYS} are kept",
                info.owned_keys.len()
            );
        }
        for k in info.owned_keys.into_iter().take(MAX_OWNED_KEYS) {
            let pool = Pool::from(k.pool);
            if k.key.len() > crate::manifest::MAX_KEY_BYTES {
                tracing::warn!(
                    plugin = m.name,
                    "provider claims a {}-byte key; the limit is {} bytes; ignored",
                    k.key.len(),
                    crate::manifest::MAX_KEY_BYTES
                );
            } else if m.kvp_access(pool, &k.key).is_some() {
                keys.push(OwnedKey { pool, key: k.key });
            } else {
                tracing::warn!(
                    plugin = m.name,
                    "provider claims key `{}` in pool {pool} outside its grants; ignored",
                    crate::state::truncate(&k.key, 64)
                );
            }
        }
        keys.sort();
        keys.dedup();
        let mut subscribe = Vec::new();
        for p in info.subscribe.into_iter().map(Pool::from) {
            if m.can_read_pool(p) {
                subscribe.push(p);
            } else {
                tracing::warn!(
                    plugin = m.name,
                    "provider subscribes to pool {p} without a grant there; ignored"
                );
            }
        }
        subscribe.sort();
        subscribe.dedup();
        *plugin
            .provider_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ProviderKeys {
            plugin: m.name.clone(),
            keys,
            subscribe,
        };
        Ok(ProviderInstance {
            store,
            guest,
            calls: 0,
        })
    }

    fn plugin(&self, name: &str) -> Result<Arc<Plugin>, CallError> {
        self.current()
            .plugins
            .get(name)
            .cloned()
            .ok_or_else(|| CallError::NoSuchPlugin(name.to_owned()))
    }

    /// The keys every running KVP provider owns and the pools it listens to.
    pub fn provider_keys(&self) -> Vec<ProviderKeys> {
        self.current()
            .plugins
            .values()
            .filter(|p| p.exports.provider.is_some() && p.check_enabled().is_ok())
            .filter(|p| p.manifest().worlds.contains(&World::KvpProvider))
            .map(|p| {
                p.provider_keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    /// Runs one call on the plugin's long-lived provider instance, creating
    /// or recycling it as needed. Any failure drops the instance.
    async fn with_provider<T>(
        &self,
        plugin: &Plugin,
        call: impl AsyncFnOnce(&mut ProviderInstance) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        plugin.check_enabled()?;
        let deadline = Duration::from_millis(plugin.manifest().limits.call_deadline_ms);
        let mut slot = plugin.provider.lock().await;
        let recycle_after = plugin.manifest().limits.recycle_after_calls;
        if slot.as_ref().is_some_and(|i| i.calls >= recycle_after) {
            *slot = None;
        }
        let result = async {
            if slot.is_none() {
                *slot = Some(self.provider_instance(plugin).await?);
            }
            let inst = slot.as_mut().ok_or_else(|| CallError::Instantiate {
                plugin: plugin.name().to_owned(),
                message: "no instance".into(),
            })?;
            inst.calls += 1;
            inst.store.set_epoch_deadline(epoch_ticks(deadline));
            call(inst).await
        }
        .await;
        match &result {
            Ok(_) => plugin.record_ok(),
            Err(e) => {
                *slot = None;
                plugin.record_trap(e);
            }
        }
        result
    }

    /// Asks provider `plugin` for the value of `key` in `pool`. Returns within
    /// the manifest's call deadline; `Err(CallError::Plugin(..))` is the
    /// provider's own answer (e.g. not found), anything else is a failure.
    pub async fn provider_get(
        &self,
        plugin: &str,
        pool: Pool,
        key: &str,
    ) -> Result<Value, CallError> {
        let p = self.plugin(plugin)?;
        let owned = p
            .provider_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .iter()
            .any(|k| k.pool == pool && k.key == key);
        if !owned {
            return Err(CallError::Plugin(KvpError::NotFound(format!(
                "plugin `{plugin}` does not own key `{}` in pool {pool}",
                crate::state::truncate(key, 64)
            ))));
        }
        let deadline = Duration::from_millis(p.manifest().limits.call_deadline_ms);
        let answer = self
            .with_provider(&p, async |inst: &mut ProviderInstance| {
                Self::guarded(
                    &p,
                    deadline,
                    inst.guest.call_get(&mut inst.store, pool.into(), key),
                )
                .await
            })
            .await?;
        match answer {
            Ok(v) => {
                let v = Value::from(v);
                if let Value::Text(s) = &v
                    && s.len() > 2048
                {
                    return Err(CallError::Plugin(KvpError::Invalid(format!(
                        "plugin `{plugin}` returned a {}-byte value for `{key}`, limit 2048",
                        s.len()
                    ))));
                }
                Ok(v)
            }
            Err(e) => Err(CallError::Plugin(e.into())),
        }
    }

    /// Tells every provider subscribed to `pool` that the host set `key`.
    /// Returns the failures (the plugins are not stopped by a failed notification beyond the trap rules).
    pub async fn notify_host_set(&self, pool: Pool, key: &str, value: &Value) -> Vec<CallError> {
        let mut errors = Vec::new();
        let set = self.current();
        for p in set.plugins.values() {
            let subscribed = p
                .provider_keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .subscribe
                .contains(&pool);
            if !subscribed
                || p.manifest().kvp_access(pool, key).is_none()
                || p.check_enabled().is_err()
            {
                continue;
            }
            let deadline = Duration::from_millis(p.manifest().limits.call_deadline_ms);
            let wit_value = value.clone().into();
            let r = self
                .with_provider(p, async |inst: &mut ProviderInstance| {
                    Self::guarded(
                        p,
                        deadline,
                        inst.guest
                            .call_on_host_set(&mut inst.store, pool.into(), key, &wit_value),
                    )
                    .await
                })
                .await;
            if let Err(e) = r {
                errors.push(e);
            }
        }
        errors
    }

    /// Runs `f` on a fresh instance of `plugin` with a deadline, recording the outcome.
    async fn fresh_call<G, T>(
        &self,
        plugin: &Plugin,
        deadline: Duration,
        load: impl FnOnce(&mut Store<HostState>, &wasmtime::component::Instance) -> wasmtime::Result<G>,
        call: impl AsyncFnOnce(&G, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        plugin.check_enabled()?;
        let result = async {
            let (mut store, instance) = self.instantiate(plugin, deadline).await?;
            let guest = load(&mut store, &instance).map_err(|e| CallError::Instantiate {
                plugin: plugin.name().to_owned(),
                message: format!("{e:#}"),
            })?;
            store.set_epoch_deadline(epoch_ticks(deadline));
            Self::guarded(plugin, deadline, call(&guest, &mut store)).await
        }
        .await;
        match &result {
            Ok(_) => plugin.record_ok(),
            Err(e) => plugin.record_trap(e),
        }
        result
    }

    fn ordered(&self, world: World) -> Vec<Arc<Plugin>> {
        let mut v: Vec<Arc<Plugin>> = self
            .current()
            .plugins
            .values()
            .filter(|p| p.manifest().worlds.contains(&world))
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.manifest().priority, a.name()).cmp(&(b.manifest().priority, b.name())));
        v
    }

    fn hook_deadline(plugin: &Plugin, ctx: &FreezeContext) -> Duration {
        let mine = Duration::from_millis(plugin.manifest().limits.call_deadline_ms);
        mine.min(ctx.deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }

    fn wit_ctx(ctx: &FreezeContext, deadline: Duration) -> freeze_hooks::FreezeContext {
        freeze_hooks::FreezeContext {
            backup_id: ctx.backup_id.clone(),
            mounts: ctx.mounts.clone(),
            time_left_ms: deadline.as_millis() as u64,
        }
    }

    /// Runs every freeze hook's `pre-freeze` in priority order, each in a
    /// fresh instance. The first veto (or failure, or disabled hook) stops the round.
    pub async fn pre_freeze(&self, ctx: &FreezeContext) -> PreFreeze {
        for p in self.ordered(World::FreezeHook) {
            let Some(idx) = &p.exports.hooks else {
                continue;
            };
            let deadline = Self::hook_deadline(&p, ctx);
            let wctx = Self::wit_ctx(ctx, deadline);
            let r = self
                .fresh_call(
                    &p,
                    deadline,
                    |s, i| idx.load(s, i),
                    async |g: &freeze_hooks::Guest, s: &mut Store<HostState>| {
                        g.call_pre_freeze(s, &wctx).await
                    },
                )
                .await;
            let reason = match r {
                Ok(Ok(())) => continue,
                Ok(Err(reason)) => crate::state::truncate(&reason, 1024).to_owned(),
                Err(e) => format!("hook failed: {e}"),
            };
            tracing::warn!(
                plugin = p.name(),
                backup = ctx.backup_id,
                "pre-freeze veto: {reason}"
            );
            return PreFreeze::Veto {
                plugin: p.name().to_owned(),
                reason,
            };
        }
        PreFreeze::Proceed
    }

    /// Runs every freeze hook's `post-thaw`, in reverse priority order, each
    /// in a fresh instance; every hook runs whatever the others do. Returns the failures.
    pub async fn post_thaw(&self, ctx: &FreezeContext, outcome: FreezeOutcome) -> Vec<CallError> {
        let mut errors = Vec::new();
        let wit_outcome = match outcome {
            FreezeOutcome::Thawed => freeze_hooks::FreezeOutcome::Thawed,
            FreezeOutcome::Vetoed => freeze_hooks::FreezeOutcome::Vetoed,
            FreezeOutcome::FreezeFailed => freeze_hooks::FreezeOutcome::FreezeFailed,
            FreezeOutcome::Aborted => freeze_hooks::FreezeOutcome::Aborted,
        };
        for p in self.ordered(World::FreezeHook).into_iter().rev() {
            let Some(idx) = &p.exports.hooks else {
                continue;
            };
            let deadline = Self::hook_deadline(&p, ctx);
            let wctx = Self::wit_ctx(ctx, deadline);
            let r = self
                .fresh_call(
                    &p,
                    deadline,
                    |s, i| idx.load(s, i),
                    async |g: &freeze_hooks::Guest, s: &mut Store<HostState>| {
                        g.call_post_thaw(s, &wctx, wit_outcome).await
                    },
                )
                .await;
            if let Err(e) = r {
                errors.push(e);
            }
        }
        errors
    }

    /// Asks the freeze policy (the loaded policy plugin with the lowest
    /// priority number) what to freeze. A plan naming unknown or duplicate
    /// mounts, or a failed call, is a refusal.
    pub async fn freeze_plan(&self, mounts: &[Mount]) -> FreezePlan {
        let Some(p) = self.ordered(World::FreezePolicy).into_iter().next() else {
            return FreezePlan::Default;
        };
        let Some(idx) = &p.exports.policy else {
            return FreezePlan::Default;
        };
        let deadline = Duration::from_millis(p.manifest().limits.call_deadline_ms);
        let wmounts: Vec<freeze_policy::Mount> = mounts
            .iter()
            .map(|m| freeze_policy::Mount {
                path: m.path.clone(),
                fs_type: m.fs_type.clone(),
                device: m.device.clone(),
            })
            .collect();
        let r = self
            .fresh_call(
                &p,
                deadline,
                |s, i| idx.load(s, i),
                async |g: &freeze_policy::Guest, s: &mut Store<HostState>| {
                    g.call_plan(s, &wmounts).await
                },
            )
            .await;
        let plugin = p.name().to_owned();
        match r {
            Ok(Ok(order)) => {
                for (i, path) in order.iter().enumerate() {
                    if !mounts.iter().any(|m| m.path == *path) || order[..i].contains(path) {
                        return FreezePlan::Refuse {
                            plugin,
                            reason: format!(
                                "policy named `{}`, which is not an offered mount or is named twice",
                                crate::state::truncate(path, 256)
                            ),
                        };
                    }
                }
                FreezePlan::Freeze { plugin, order }
            }
            Ok(Err(reason)) => FreezePlan::Refuse {
                plugin,
                reason: crate::state::truncate(&reason, 1024).to_owned(),
            },
            Err(e) => FreezePlan::Refuse {
                plugin,
                reason: format!("policy failed: {e}"),
            },
        }
    }

    /// hvsock services to listen on, and the plugin serving each.
    pub fn hvsock_services(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for p in self.current().plugins.values() {
            for s in &p.manifest().hvsock.listen {
                v.push((s.clone(), p.name().to_owned()));
            }
        }
        v
    }

    /// Serves one accepted connection on `service` in a fresh instance of the
    /// plugin that listens there; the streams are host-backed wasi:io streams
    /// over `reader` and `writer`. Ends within the manifest's connection deadline.
    pub async fn serve_hvsock(
        &self,
        service: &str,
        reader: BoxedReader,
        writer: BoxedWriter,
    ) -> Result<(), CallError> {
        let p = self
            .current()
            .plugins
            .values()
            .find(|p| p.manifest().hvsock.listen.iter().any(|s| s == service))
            .cloned()
            .ok_or_else(|| CallError::NoSuchPlugin(format!("(listening on `{service}`)")))?;
        let idx = p
            .exports
            .hvsock
            .as_ref()
            .ok_or_else(|| CallError::NotProvided {
                plugin: p.name().to_owned(),
                world: World::HvsockService,
            })?;
        let deadline = Duration::from_millis(p.manifest().limits.connection_deadline_ms);
        let name = p.name().to_owned();
        let r = self
            .fresh_call(
                &p,
                deadline,
                |s, i| idx.load(s, i),
                async |g: &hvsock_service::Guest, s: &mut Store<HostState>| {
                    let (i, o) = push_streams(&mut s.data_mut().table, reader, writer)?;
                    g.call_serve(s, service, i, o).await
                },
            )
            .await?;
        r.map_err(|reason| {
            CallError::Plugin(KvpError::Failed(format!(
                "plugin `{name}` ended the connection with an error: {}",
                crate::state::truncate(&reason, 1024)
            )))
        })
    }

    /// One line per configured plugin.
    pub fn status(&self) -> Vec<PluginStatus> {
        let set = self.current();
        let mut v: Vec<PluginStatus> = set
            .plugins
            .values()
            .map(|p| {
                let h = p.health();
                PluginStatus {
                    name: p.name().to_owned(),
                    state: if h.disabled.is_some() {
                        PluginState::Disabled
                    } else {
                        PluginState::Running
                    },
                    reason: h.disabled.clone(),
                    worlds: p.manifest().worlds.clone(),
                    calls: p.calls.load(Ordering::Relaxed),
                    traps: h.total_traps,
                    instantiations: h.instantiations,
                    last_error: h.last_error.clone(),
                }
            })
            .collect();
        for (name, (m, why)) in &set.refused {
            v.push(PluginStatus {
                name: name.clone(),
                state: PluginState::Refused,
                reason: Some(why.clone()),
                worlds: m.worlds.clone(),
                calls: 0,
                traps: 0,
                instantiations: 0,
                last_error: None,
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        self.cache.dir()
    }
}

fn refuse(set: &mut PluginSet, summary: &mut LoadSummary, m: &PluginManifest, why: String) {
    tracing::error!(plugin = m.name, "plugin refused: {why}");
    summary.refused.push((m.name.clone(), why.clone()));
    set.refused.insert(m.name.clone(), (m.clone(), why));
}
