//! Which instance a call runs on, and the accounting of its outcome.
//!
//! The freeze policy and hvsock services get a fresh instance per call; a
//! KVP provider keeps one long-lived instance, replaced after
//! `recycle_after_calls` calls and dropped after any failure; a freeze hook
//! gets one instance per backup, from its `pre-freeze` to its `post-thaw`
//! (so it can keep state across the freeze in its own memory). Every call,
//! instantiation included, runs under [`guarded`] and ends in
//! [`Plugin::record_ok`] or [`Plugin::record_trap`].

use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::Instance;

use crate::CallError;
use crate::engine::epoch_ticks;
use crate::lifecycle::Plugin;
use crate::manifest::World;
use crate::state::HostState;
use crate::state::bindings::exports::hyperv::integration::{freeze_hooks, kvp_provider};
use crate::store::{guarded, new_store};

/// A KVP provider's long-lived instance.
pub(crate) struct ProviderInstance {
    store: Store<HostState>,
    guest: kvp_provider::Guest,
    /// Calls made on this instance (it is replaced after `recycle_after_calls`).
    calls: u64,
}

/// A freeze hook's instance for one backup: made for `pre-freeze`, used again by `post-thaw`
/// of the same backup id, then dropped.
pub(crate) struct BackupInstance {
    backup_id: String,
    store: Store<HostState>,
    guest: freeze_hooks::Guest,
}

impl Plugin {
    /// The manifest's deadline for one call.
    pub(crate) fn call_deadline(&self) -> Duration {
        Duration::from_millis(self.manifest().limits.call_deadline_ms)
    }

    /// Runs `fut`, a call into one of this plugin's stores, under [`guarded`].
    async fn guarded<T>(
        &self,
        deadline: Duration,
        fut: impl Future<Output = wasmtime::Result<T>>,
    ) -> Result<T, CallError> {
        guarded(&self.sandbox.ticker, self.name(), deadline, fut).await
    }

    /// A fresh store and instance, the component's start-up bounded by
    /// `deadline`, with the export `load` picks, ready for a call within `deadline`.
    async fn instantiate<G>(
        &self,
        deadline: Duration,
        load: impl FnOnce(&mut Store<HostState>, &Instance) -> wasmtime::Result<G>,
    ) -> Result<(Store<HostState>, G), CallError> {
        let mut store = new_store(&self.sandbox.engine, &self.ctx)?;
        self.health().instantiations += 1;
        store.set_epoch_deadline(epoch_ticks(deadline));
        let instance = self
            .guarded(deadline, self.pre.instantiate_async(&mut store))
            .await
            .map_err(|e| match e {
                CallError::Trap { plugin, message } => CallError::Instantiate { plugin, message },
                other => other,
            })?;
        let guest = load(&mut store, &instance).map_err(|e| CallError::Instantiate {
            plugin: self.name().to_owned(),
            message: format!("{e:#}"),
        })?;
        store.set_epoch_deadline(epoch_ticks(deadline));
        Ok((store, guest))
    }

    /// A new provider instance and its answer to `describe` (which the WIT
    /// promises is called once after each instantiation).
    pub(crate) async fn provider_instance(
        &self,
    ) -> Result<(ProviderInstance, kvp_provider::ProviderInfo), CallError> {
        let idx = self
            .exports
            .provider
            .as_ref()
            .ok_or_else(|| CallError::NotProvided {
                plugin: self.name().to_owned(),
                world: World::KvpProvider,
            })?;
        let deadline = self.call_deadline();
        let (mut store, guest) = self.instantiate(deadline, |s, i| idx.load(s, i)).await?;
        let info = self
            .guarded(deadline, guest.call_describe(&mut store))
            .await?;
        Ok((
            ProviderInstance {
                store,
                guest,
                calls: 0,
            },
            info,
        ))
    }

    /// Runs `call` on the provider's long-lived instance under the manifest's
    /// call deadline, creating or recycling the instance as needed. Any
    /// failure drops the instance.
    pub(crate) async fn with_provider<T>(
        &self,
        call: impl AsyncFnOnce(&kvp_provider::Guest, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        self.check_enabled()?;
        let deadline = self.call_deadline();
        let mut slot = self.provider.lock().await;
        let recycle_after = self.manifest().limits.recycle_after_calls;
        if slot.as_ref().is_some_and(|i| i.calls >= recycle_after) {
            *slot = None;
        }
        let result = async {
            let inst = match &mut *slot {
                Some(inst) => inst,
                None => {
                    // The keys were settled at load (see `worlds::kvp_provider`).
                    let (inst, _describe) = self.provider_instance().await?;
                    slot.insert(inst)
                }
            };
            inst.calls += 1;
            inst.store.set_epoch_deadline(epoch_ticks(deadline));
            self.guarded(deadline, call(&inst.guest, &mut inst.store))
                .await
        }
        .await;
        match &result {
            Ok(_) => self.record_ok(),
            Err(e) => {
                *slot = None;
                self.record_trap(e);
            }
        }
        result
    }

    /// Runs a freeze hook call for `backup_id` under `deadline`: `pre-freeze` (`keep` true) on a
    /// fresh instance that is then kept; `post-thaw` (`keep` false) on the instance the same
    /// backup's `pre-freeze` left (a fresh one if there is none: a vetoed round, a worker that
    /// was replaced, another backup in between), which is then dropped. A failure drops it too.
    pub(crate) async fn backup_call<T>(
        &self,
        backup_id: &str,
        deadline: Duration,
        keep: bool,
        load: impl FnOnce(&mut Store<HostState>, &Instance) -> wasmtime::Result<freeze_hooks::Guest>,
        call: impl AsyncFnOnce(&freeze_hooks::Guest, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        self.check_enabled()?;
        let mut slot = self.backup.lock().await;
        let kept = slot.take().filter(|b| !keep && b.backup_id == backup_id);
        let result = async {
            let mut inst = match kept {
                Some(inst) => inst,
                None => {
                    let (store, guest) = self.instantiate(deadline, load).await?;
                    BackupInstance {
                        backup_id: backup_id.to_owned(),
                        store,
                        guest,
                    }
                }
            };
            inst.store.set_epoch_deadline(epoch_ticks(deadline));
            let out = self
                .guarded(deadline, call(&inst.guest, &mut inst.store))
                .await?;
            Ok((out, inst))
        }
        .await;
        match result {
            Ok((out, inst)) => {
                if keep {
                    *slot = Some(inst);
                }
                self.record_ok();
                Ok(out)
            }
            Err(e) => {
                self.record_trap(&e);
                Err(e)
            }
        }
    }

    /// Runs `call` on a fresh instance (its export loaded by `load`) under
    /// `deadline`, recording the outcome.
    pub(crate) async fn fresh_call<G, T>(
        &self,
        deadline: Duration,
        load: impl FnOnce(&mut Store<HostState>, &Instance) -> wasmtime::Result<G>,
        call: impl AsyncFnOnce(&G, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        self.check_enabled()?;
        let result = async {
            let (mut store, guest) = self.instantiate(deadline, load).await?;
            self.guarded(deadline, call(&guest, &mut store)).await
        }
        .await;
        match &result {
            Ok(_) => self.record_ok(),
            Err(e) => self.record_trap(e),
        }
        result
    }
}
