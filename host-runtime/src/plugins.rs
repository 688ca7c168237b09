//! Plugins in the runtime: loading the `[[plugin]]` tables, giving KVP providers their Guest-pool
//! keys, backing the plugins' `kvp-store` import with the pool files, telling subscribers what the
//! host set, and reloading on SIGHUP.

use crate::config::Config;
use crate::services::Services;
use hvisd_kvp::guest_keys::ValueFuture;
use hvisd_kvp::{GuestKeyProvider, GuestKeys, KvpCore, PoolHandle};
use hvisd_plugin_host::{HostServices, KvpError, KvpFuture, KvpStore, PluginHost, Provider};
use hvisd_protocol::kvp::{Pool, Value};
use std::sync::Arc;

/// The plugins' `kvp-store` import over the real pool files (the same store the KVP service uses, so
/// a plugin's write is what the host enumerates next). Grants are checked by the plugin host first.
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

/// One KVP-provider plugin as a source of Guest-pool values.
struct PluginKeys {
    provider: Provider,
    keys: Vec<String>,
}

impl GuestKeyProvider for PluginKeys {
    fn name(&self) -> &str {
        self.provider.name()
    }
    fn keys(&self) -> Vec<String> {
        self.keys.clone()
    }
    fn value(&self, key: &str) -> ValueFuture {
        let provider = self.provider.clone();
        let key = key.to_owned();
        Box::pin(async move {
            provider
                .get(Pool::Guest, &key)
                .await
                .map(Value::into_text)
                .map_err(|e| e.to_string())
        })
    }
}

/// One Guest-pool key source per provider, with the Guest-pool keys it owns in its plugin set.
pub fn guest_key_providers(providers: &[Provider]) -> Vec<Arc<dyn GuestKeyProvider>> {
    providers
        .iter()
        .map(|p| {
            let keys = p
                .keys()
                .keys
                .iter()
                .filter(|k| k.pool == Pool::Guest)
                .map(|k| k.key.clone())
                .collect();
            Arc::new(PluginKeys {
                provider: p.clone(),
                keys,
            }) as Arc<dyn GuestKeyProvider>
        })
        .collect()
}

/// One Guest-pool key source per KVP-provider plugin the host runs now.
pub fn providers(host: &PluginHost) -> Vec<Arc<dyn GuestKeyProvider>> {
    guest_key_providers(&host.providers())
}

/// Why plugins could not start.
#[derive(Debug, thiserror::Error)]
pub enum PluginSetupError {
    /// The plugin host could not start or the manifests are invalid.
    #[error(transparent)]
    Host(#[from] hvisd_plugin_host::HostError),
    /// Plugins need the KVP store.
    #[error(
        "plugins are configured but [services] kvp = false; the kvp-store import needs the pools"
    )]
    NoKvp,
}

/// The running plugin host and what the runtime wired to it.
pub struct Plugins {
    /// The host.
    pub host: Arc<PluginHost>,
    kvp: Arc<KvpCore>,
}

impl Plugins {
    /// Starts the plugin host for `config.plugin` (None when there are none), loads every plugin,
    /// installs the providers' keys in the KVP service, and forwards host-set keys to subscribers.
    pub async fn start(
        config: &Config,
        services: &Services,
    ) -> Result<Option<Self>, PluginSetupError> {
        if config.plugin.is_empty() {
            return Ok(None);
        }
        let kvp = services
            .kvp_core()
            .cloned()
            .ok_or(PluginSetupError::NoKvp)?;
        let store = kvp.store();
        let host = Arc::new(PluginHost::new(
            &config.plugins.cache_dir,
            HostServices {
                kvp: Arc::new(PoolKvpStore::new(store)),
                hvsock: None,
            },
        )?);
        let plugins = Self { host, kvp };
        plugins.apply(config).await?;
        plugins.forward_host_sets().await;
        Ok(Some(plugins))
    }

    /// Loads (or reloads) the plugins of `config` and refreshes the Guest-pool keys, all or nothing:
    /// the new plugin set and its key map are both built before either replaces the running ones,
    /// so a reload that fails (invalid manifests) changes nothing. A provider's bad or contested keys
    /// are dropped with a warning, never failing the reload. In-flight calls finish on the
    /// instances they started on.
    pub async fn apply(&self, config: &Config) -> Result<(), PluginSetupError> {
        let prepared = self.host.prepare(&config.plugin).await?;
        let keys = GuestKeys::new(
            guest_key_providers(prepared.providers()),
            config.kvp.guest_key_options(),
        );
        // The keys first: they call the prepared providers directly, so from this moment host
        // requests see the new key map and its plugins, and the commit only publishes the set.
        self.kvp.set_guest_keys(keys);
        let summary = self.host.commit(prepared);
        for name in &summary.loaded {
            tracing::info!(plugin = %name, "plugin loaded");
        }
        for (name, why) in &summary.refused {
            tracing::error!(plugin = %name, "plugin refused: {why}");
        }
        Ok(())
    }

    async fn forward_host_sets(&self) {
        // Subscribed before `start` returns, so no host SET after start is missed.
        let mut events = self.kvp.subscribe();
        let host = self.host.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let Some(value) = event.value else { continue };
                        for e in host
                            .notify_host_set(event.pool, &event.key, &Value::Text(value))
                            .await
                        {
                            tracing::warn!("host-set notification: {e}");
                        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_kvp::StoreOptions;

    #[tokio::test(flavor = "current_thread")]
    async fn the_kvp_store_import_reaches_the_pool_files_off_the_async_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pools = hvisd_kvp::PoolStore::open(dir.path(), StoreOptions::default()).expect("pools");
        let store = PoolKvpStore::new(PoolHandle::spawn(pools).expect("pool thread"));
        store
            .set(Pool::Guest, "app.count".into(), Value::U32(7))
            .await
            .expect("set");
        // Numbers are stored in decimal, as hv_kvp_daemon stores the host's REG_U32 values.
        let mut check =
            hvisd_kvp::PoolStore::open(dir.path(), StoreOptions::default()).expect("pools");
        assert_eq!(
            check
                .get(Pool::Guest, "app.count")
                .expect("read the pool file"),
            Some("7".into())
        );
        assert_eq!(
            store
                .get(Pool::Guest, "app.count".into())
                .await
                .expect("get"),
            Some(Value::Text("7".into()))
        );
    }
}
