//! The `kvp-provider` world: the keys a provider owns (its `describe`
//! answer, filtered by its grants), `get`, and host-set notifications.

use serde::Serialize;

use crate::CallError;
use crate::lifecycle::{Plugin, PluginHost};
use crate::manifest::{PluginManifest, World};
use crate::state::bindings::exports::hyperv::integration::kvp_provider::ProviderInfo;
use crate::text::Escaped;
use crate::types::{KvpError, MAX_VALUE_LEN, Pool, Value, key_problem};

/// Most keys one provider may own; more are ignored with a warning.
const MAX_OWNED_KEYS: usize = 4096;

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

/// What `describe` may claim under manifest `m`: keys it grants, pools it may read.
pub(crate) fn described_keys(m: &PluginManifest, info: ProviderInfo) -> ProviderKeys {
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
        if let Some(problem) = key_problem(&k.key) {
            tracing::warn!(
                plugin = m.name,
                "provider claims key `{}`, which {problem}; ignored",
                Escaped(&k.key)
            );
        } else if m.kvp_access(pool, &k.key).is_some() {
            keys.push(OwnedKey { pool, key: k.key });
        } else {
            tracing::warn!(
                plugin = m.name,
                "provider claims key `{}` in pool {pool} outside its grants; ignored",
                Escaped(&k.key)
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
    ProviderKeys {
        plugin: m.name.clone(),
        keys,
        subscribe,
    }
}

/// Checks a provider's answer for `key` against the value limit.
fn check_value(
    plugin: &str,
    key: &str,
    answer: Result<Value, KvpError>,
) -> Result<Value, CallError> {
    match answer {
        Ok(Value::Text(s)) if s.len() > MAX_VALUE_LEN => {
            Err(CallError::Plugin(KvpError::Invalid(format!(
                "plugin `{plugin}` returned a {}-byte value for `{}`, limit {MAX_VALUE_LEN}",
                s.len(),
                Escaped(key)
            ))))
        }
        Ok(v) => Ok(v),
        Err(e) => Err(CallError::Plugin(e)),
    }
}

impl Plugin {
    /// Records what the provider's `describe` claims.
    pub(crate) fn set_described(&self, info: ProviderInfo) {
        *self
            .provider_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            described_keys(self.manifest(), info);
    }

    fn provider_keys(&self) -> ProviderKeys {
        self.provider_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl PluginHost {
    /// The keys every running KVP provider owns and the pools it listens to.
    pub fn provider_keys(&self) -> Vec<ProviderKeys> {
        self.current()
            .plugins
            .values()
            .filter(|p| p.exports.provider.is_some() && p.check_enabled().is_ok())
            .filter(|p| p.manifest().worlds.contains(&World::KvpProvider))
            .map(|p| p.provider_keys())
            .collect()
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
            .provider_keys()
            .keys
            .iter()
            .any(|k| k.pool == pool && k.key == key);
        if !owned {
            return Err(CallError::Plugin(KvpError::NotFound(format!(
                "plugin `{plugin}` does not own key `{}` in pool {pool}",
                Escaped(key)
            ))));
        }
        let answer = p
            .with_provider(async |guest, store| guest.call_get(store, pool.into(), key).await)
            .await?;
        check_value(plugin, key, answer.map(Value::from).map_err(KvpError::from))
    }

    /// Tells every provider subscribed to `pool` that the host set `key`.
    /// Returns the failures (the plugins are not stopped by a failed notification beyond the trap rules).
    pub async fn notify_host_set(&self, pool: Pool, key: &str, value: &Value) -> Vec<CallError> {
        let mut errors = Vec::new();
        let set = self.current();
        for p in set.plugins.values() {
            if !p.provider_keys().subscribe.contains(&pool)
                || p.manifest().kvp_access(pool, key).is_none()
                || p.check_enabled().is_err()
            {
                continue;
            }
            let wit_value = value.clone().into();
            let r = p
                .with_provider(async |guest, store| {
                    guest
                        .call_on_host_set(store, pool.into(), key, &wit_value)
                        .await
                })
                .await;
            if let Err(e) = r {
                errors.push(e);
            }
        }
        errors
    }
}
