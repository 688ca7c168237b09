//! The plugin set: loading and reloading plugins, their health (trap
//! accounting, disabling), and `status()`.
//!
//! Which instance a call runs on is [`crate::instance`]'s business; what a
//! call passes in and out is each world's (see [`crate::worlds`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{InstancePre, Linker};

use crate::cache::{CacheOutcome, ComponentCache};
use crate::engine::Sandbox;
use crate::instance::{BackupInstance, ProviderInstance};
use crate::manifest::{PluginManifest, World, validate_all};
use crate::state::bindings::exports::hyperv::integration::{
    freeze_hooks, freeze_policy, hvsock_service, kvp_provider,
};
use crate::state::{HostState, HvsockConnector, PluginContext, build_linker};
use crate::types::KvpStore;
use crate::worlds::kvp_provider::{Provider, ProviderKeys, assign_owners, claims, described_keys};
use crate::{CallError, HostError};

/// Runtime services the plugins' imports reach.
#[derive(Clone)]
pub struct HostServices {
    /// Backs the `kvp-store` import.
    pub kvp: Arc<dyn KvpStore>,
    /// Backs the `hvsock` import (`None`: connects fail with `unavailable`).
    pub hvsock: Option<Arc<dyn HvsockConnector>>,
}

/// The plugin host: the engine, the component cache and the current plugin set.
pub struct PluginHost {
    pub(crate) sandbox: Arc<Sandbox>,
    linker: Linker<HostState>,
    /// Where components come from: the cache (an in-process host), or nothing (a worker, whose
    /// one component the core hands over as an artifact).
    cache: Option<ComponentCache>,
    services: HostServices,
    plugins: RwLock<Arc<PluginSet>>,
}

/// Which plugin exports the component provides, resolved once at load.
#[derive(Default)]
pub(crate) struct Exports {
    pub provider: Option<kvp_provider::GuestIndices>,
    pub hooks: Option<freeze_hooks::GuestIndices>,
    pub policy: Option<freeze_policy::GuestIndices>,
    pub hvsock: Option<hvsock_service::GuestIndices>,
}

/// The slow-changing part of a plugin's health (the counters on the hot path are atomics).
#[derive(Default)]
pub(crate) struct Health {
    consecutive_traps: u32,
    total_traps: u64,
    pub instantiations: u64,
    disabled: Option<String>,
    last_error: Option<String>,
}

/// A loaded plugin.
pub(crate) struct Plugin {
    pub sandbox: Arc<Sandbox>,
    pub ctx: Arc<PluginContext>,
    wasm_sha256: [u8; 32],
    pub pre: InstancePre<HostState>,
    pub exports: Exports,
    cache: CacheOutcome,
    /// The long-lived instance of a KVP provider.
    pub provider: tokio::sync::Mutex<Option<ProviderInstance>>,
    /// A freeze hook's instance between its `pre-freeze` and `post-thaw` of one backup.
    pub backup: tokio::sync::Mutex<Option<BackupInstance>>,
    /// What a KVP provider's `describe` claimed at load, as far as its own
    /// manifest allows (which of these keys it owns depends on its set).
    described: ProviderKeys,
    health: Mutex<Health>,
    /// Calls made (successful or not).
    calls: AtomicU64,
    /// Mirrors `health.disabled.is_some()` for the lock-free check on every call.
    disabled: AtomicBool,
    /// Mirrors `health.consecutive_traps != 0`, so a successful call only locks after a failure.
    failing: AtomicBool,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.ctx.manifest.name
    }

    pub fn manifest(&self) -> &PluginManifest {
        &self.ctx.manifest
    }

    pub fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn check_enabled(&self) -> Result<(), CallError> {
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

    pub fn record_ok(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            self.health().consecutive_traps = 0;
            self.failing.store(false, Ordering::Relaxed);
        }
    }

    /// Counts a trap or deadline; disables the plugin after too many in a row.
    pub fn record_trap(&self, err: &CallError) {
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

    /// The plugin's line in `status()`.
    fn status(&self) -> PluginStatus {
        let h = self.health();
        PluginStatus {
            name: self.name().to_owned(),
            state: if h.disabled.is_some() {
                PluginState::Disabled
            } else {
                PluginState::Running
            },
            reason: h.disabled.clone(),
            worlds: self.manifest().worlds.clone(),
            calls: self.calls.load(Ordering::Relaxed),
            traps: h.total_traps,
            instantiations: h.instantiations,
            last_error: h.last_error.clone(),
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

/// The plugins of one configuration.
#[derive(Default)]
pub(crate) struct PluginSet {
    /// Loaded plugins by name (so every walk over them is in name order).
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    refused: BTreeMap<String, (PluginManifest, String)>,
    /// The KVP providers among `plugins`, in name order, each with the keys it owns in this set.
    pub providers: Vec<Provider>,
}

/// A plugin set that is loaded and whose key ownership is settled, but that
/// is not in force: [`PluginHost::commit`] puts it in force, and dropping it
/// changes nothing. Build everything that depends on the new set (the KVP
/// service's key map) from it before committing, so a reload is all or nothing.
pub struct Prepared {
    set: PluginSet,
    summary: LoadSummary,
}

impl Prepared {
    /// Which plugins the set loads and which it refuses.
    pub fn summary(&self) -> &LoadSummary {
        &self.summary
    }

    /// The set's KVP providers, in name order, each with the keys it owns in this set.
    pub fn providers(&self) -> &[Provider] {
        &self.set.providers
    }
}

impl PluginSet {
    fn refuse(&mut self, summary: &mut LoadSummary, m: &PluginManifest, why: String) {
        tracing::error!(plugin = m.name, "plugin refused: {why}");
        summary.refused.push((m.name.clone(), why.clone()));
        self.refused.insert(m.name.clone(), (m.clone(), why));
    }

    /// The loaded plugins claiming `world`, in hook order (priority, then name).
    pub fn ordered(&self, world: World) -> Vec<Arc<Plugin>> {
        let mut v: Vec<Arc<Plugin>> = self
            .plugins
            .values()
            .filter(|p| p.manifest().worlds.contains(&world))
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.manifest().priority, a.name()).cmp(&(b.manifest().priority, b.name())));
        v
    }
}

impl PluginHost {
    /// A host with its engine, epoch ticker and cache in `cache_dir` (see
    /// [`ComponentCache::new`] for the ownership rules). Load plugins with [`PluginHost::load`].
    pub fn new(cache_dir: impl Into<PathBuf>, services: HostServices) -> Result<Self, HostError> {
        let sandbox = Arc::new(Sandbox::new()?);
        let linker =
            build_linker(&sandbox.engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let cache = ComponentCache::new(cache_dir)?;
        Ok(PluginHost {
            sandbox,
            linker,
            cache: Some(cache),
            services,
            plugins: RwLock::new(Arc::default()),
        })
    }

    /// A host for a plugin worker: no cache of its own; its one plugin is loaded from an
    /// artifact the core compiled ([`PluginHost::load_artifact`]).
    pub fn for_worker(services: HostServices) -> Result<Self, HostError> {
        let sandbox = Arc::new(Sandbox::new()?);
        let linker =
            build_linker(&sandbox.engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        Ok(PluginHost {
            sandbox,
            linker,
            cache: None,
            services,
            plugins: RwLock::new(Arc::default()),
        })
    }

    /// Loads the one plugin of a worker from its checked artifact and puts it in force.
    pub async fn load_artifact(
        &self,
        manifest: &PluginManifest,
        artifact: &hvisd_sys::wasm::TrustedArtifact,
    ) -> Result<LoadSummary, HostError> {
        let refused = |problem: String| HostError::Refused {
            plugin: manifest.name.clone(),
            problem,
        };
        let component = hvisd_sys::wasm::load_component(&self.sandbox.engine, artifact)
            .map_err(|e| refused(format!("the artifact does not load: {e:#}")))?;
        let plugin = self
            .load_component(manifest, component, CacheOutcome::Hit, [0; 32])
            .await?;
        let mut set = PluginSet::default();
        set.plugins.insert(manifest.name.clone(), Arc::new(plugin));
        let providers: Vec<&Arc<Plugin>> = set
            .plugins
            .values()
            .filter(|p| p.manifest().worlds.contains(&World::KvpProvider))
            .collect();
        let owned = assign_owners(providers.iter().map(|p| &p.described));
        set.providers = providers
            .into_iter()
            .zip(owned)
            .map(|(p, keys)| Provider::new(p.clone(), keys))
            .collect();
        Ok(self.commit(Prepared {
            set,
            summary: LoadSummary {
                loaded: vec![manifest.name.clone()],
                refused: Vec::new(),
            },
        }))
    }

    /// The engine (shared by every plugin).
    pub fn engine(&self) -> &Engine {
        &self.sandbox.engine
    }

    /// How many times the engine's epoch has advanced since the host
    /// started. It advances every [`crate::EPOCH_TICK`] while a call into a
    /// plugin is in flight, and stands still while none is.
    pub fn epoch_ticks(&self) -> u64 {
        self.sandbox.ticker.ticks()
    }

    /// The cache directory (`None` in a worker).
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_ref().map(ComponentCache::dir)
    }

    /// The plugin set now in force. Calls keep the set they started with.
    pub(crate) fn current(&self) -> Arc<PluginSet> {
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

    /// Replaces the plugin set (for SIGHUP): [`PluginHost::prepare`], then
    /// [`PluginHost::commit`].
    pub async fn reload(&self, manifests: &[PluginManifest]) -> Result<LoadSummary, HostError> {
        Ok(self.commit(self.prepare(manifests).await?))
    }

    /// Loads the plugin set of `manifests` beside the one in force, which
    /// keeps serving. Invalid manifests fail it as a whole; a component that
    /// cannot be loaded is refused alone. Plugins whose manifest and wasm did
    /// not change (and that are not disabled) are carried over with their
    /// instance and counters. Each KVP provider's keys are settled here and
    /// never fail the set: a key that is bad, not granted, or already owned
    /// by a provider earlier by name is dropped with a warning.
    pub async fn prepare(&self, manifests: &[PluginManifest]) -> Result<Prepared, HostError> {
        validate_all(manifests).map_err(HostError::Manifest)?;
        let old = self.current();
        let mut set = PluginSet::default();
        let mut summary = LoadSummary::default();
        for m in manifests {
            let wasm = match std::fs::read(&m.path) {
                Ok(w) => w,
                Err(e) => {
                    let why = format!("cannot read `{}`: {e}", m.path.display());
                    set.refuse(&mut summary, m, why);
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
                Err(e) => set.refuse(&mut summary, m, e.to_string()),
            }
        }
        let providers: Vec<&Arc<Plugin>> = set
            .plugins
            .values()
            .filter(|p| p.manifest().worlds.contains(&World::KvpProvider))
            .collect();
        let owned = assign_owners(providers.iter().map(|p| &p.described));
        set.providers = providers
            .into_iter()
            .zip(owned)
            .map(|(p, keys)| Provider::new(p.clone(), keys))
            .collect();
        Ok(Prepared { set, summary })
    }

    /// Puts a prepared set in force. Calls in flight finish on the plugins
    /// they started with; plugins left out of the set are dropped when their
    /// last call ends.
    pub fn commit(&self, prepared: Prepared) -> LoadSummary {
        *self
            .plugins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(prepared.set);
        prepared.summary
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
        let Some(cache) = &self.cache else {
            return Err(refused("a worker loads its plugin from an artifact".into()));
        };
        let (component, cache) = cache
            .load(&self.sandbox.engine, wasm)
            .map_err(|e| refused(e.to_string()))?;
        self.load_component(m, component, cache, sha).await
    }

    async fn load_component(
        &self,
        m: &PluginManifest,
        component: wasmtime::component::Component,
        cache: CacheOutcome,
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
        let mut plugin = Plugin {
            sandbox: self.sandbox.clone(),
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
            backup: tokio::sync::Mutex::new(None),
            described: ProviderKeys {
                plugin: m.name.clone(),
                ..ProviderKeys::default()
            },
            health: Mutex::default(),
            calls: AtomicU64::new(0),
            disabled: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        };
        if m.worlds.contains(&World::KvpProvider) {
            // Instantiating now both proves the component starts and learns its keys.
            let (inst, info) = plugin
                .provider_instance()
                .await
                .map_err(|e| refused(e.to_string()))?;
            let (owned, subscribe) = claims(info);
            plugin.described = described_keys(m, owned, subscribe);
            *plugin.provider.get_mut() = Some(inst);
        }
        Ok(plugin)
    }

    /// One line per configured plugin.
    pub fn status(&self) -> Vec<PluginStatus> {
        let set = self.current();
        let mut v: Vec<PluginStatus> = set.plugins.values().map(|p| p.status()).collect();
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
}
