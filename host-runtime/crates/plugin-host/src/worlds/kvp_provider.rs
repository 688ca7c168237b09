//! The `kvp-provider` world: the keys a provider owns, `get`, and host-set
//! notifications.
//!
//! A provider's keys are decided when it is loaded, in two steps that never
//! fail: [`described_keys`] keeps what its `describe` answer may claim on its
//! own (keys that fit a pool record, inside its grants, at most
//! [`MAX_OWNED_KEYS`]), and [`assign_owners`] gives each key to one provider
//! of the set. Whatever is dropped is logged with the plugin and the key.
//! `describe` is called again after every re-instantiation, as the WIT
//! promises, but its answer is not looked at again until the next reload.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::CallError;
use crate::lifecycle::{Plugin, PluginHost};
use crate::manifest::{PluginManifest, World};
use crate::state::bindings::exports::hyperv::integration::kvp_provider::ProviderInfo;
use crate::text::Escaped;
use crate::types::{KvpError, MAX_VALUE_LEN, Pool, Value, key_problem};

/// Most keys one provider may claim; the claims after these are ignored.
pub const MAX_OWNED_KEYS: usize = 4096;
/// Dropped keys logged one by one per provider; the rest are only counted.
const MAX_KEY_WARNINGS: usize = 16;

/// A KVP key and pool a provider owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OwnedKey {
    /// The pool.
    pub pool: Pool,
    /// The key.
    pub key: String,
}

/// What one provider owns and listens to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProviderKeys {
    /// The plugin.
    pub plugin: String,
    /// Keys it answers for, sorted.
    pub keys: Vec<OwnedKey>,
    /// Pools whose host-set keys it is told about, sorted.
    pub subscribe: Vec<Pool>,
}

impl ProviderKeys {
    /// Whether the provider answers for `key` in `pool`.
    pub fn owns(&self, pool: Pool, key: &str) -> bool {
        self.keys
            .binary_search_by(|k| (k.pool, k.key.as_str()).cmp(&(pool, key)))
            .is_ok()
    }
}

/// Logs the keys dropped from one provider, the first [`MAX_KEY_WARNINGS`]
/// one by one, so a provider claiming thousands of bad keys costs a bounded
/// number of log lines.
struct DroppedKeys<'a> {
    plugin: &'a str,
    count: usize,
}

impl<'a> DroppedKeys<'a> {
    fn new(plugin: &'a str) -> Self {
        DroppedKeys { plugin, count: 0 }
    }

    fn drop_key(&mut self, pool: Pool, key: &str, why: impl fmt::Display) {
        if self.count < MAX_KEY_WARNINGS {
            tracing::warn!(
                plugin = self.plugin,
                "KVP provider key `{}` in pool {pool} dropped: {why}",
                Escaped(key)
            );
        }
        self.count += 1;
    }
}

impl Drop for DroppedKeys<'_> {
    fn drop(&mut self) {
        if self.count > MAX_KEY_WARNINGS {
            tracing::warn!(
                plugin = self.plugin,
                "{} more KVP provider keys dropped (only the first {MAX_KEY_WARNINGS} are named)",
                self.count - MAX_KEY_WARNINGS
            );
        }
    }
}

/// The owned keys and subscriptions of a `describe` answer, in plain types.
pub(crate) fn claims(info: ProviderInfo) -> (Vec<(Pool, String)>, Vec<Pool>) {
    (
        info.owned_keys
            .into_iter()
            .map(|k| (k.pool.into(), k.key))
            .collect(),
        info.subscribe.into_iter().map(Pool::from).collect(),
    )
}

/// What a provider may own on its own, under its manifest `m`: of the first
/// [`MAX_OWNED_KEYS`] claims, the keys that fit a pool record (1 to
/// `MAX_KEY_LEN` bytes without NUL) and that the manifest grants; of the
/// subscriptions, the pools it may read. Everything else is dropped with a
/// warning naming the plugin and the key.
pub fn described_keys(
    m: &PluginManifest,
    owned: Vec<(Pool, String)>,
    subscribe: Vec<Pool>,
) -> ProviderKeys {
    if owned.len() > MAX_OWNED_KEYS {
        tracing::warn!(
            plugin = m.name,
            "KVP provider claims {} keys; only the first {MAX_OWNED_KEYS} are considered",
            owned.len()
        );
    }
    let mut dropped = DroppedKeys::new(&m.name);
    let mut keys = Vec::new();
    for (pool, key) in owned.into_iter().take(MAX_OWNED_KEYS) {
        if let Some(problem) = key_problem(&key) {
            dropped.drop_key(pool, &key, format_args!("the key {problem}"));
        } else if m.kvp_access(pool, &key).is_none() {
            dropped.drop_key(pool, &key, "the manifest grants no access to it");
        } else {
            keys.push(OwnedKey { pool, key });
        }
    }
    keys.sort();
    keys.dedup();
    let mut subscribe = subscribe;
    subscribe.sort();
    subscribe.dedup();
    subscribe.retain(|&p| {
        let granted = m.can_read_pool(p);
        if !granted {
            tracing::warn!(
                plugin = m.name,
                "KVP provider subscribes to pool {p} without a grant there; ignored"
            );
        }
        granted
    });
    ProviderKeys {
        plugin: m.name.clone(),
        keys,
        subscribe,
    }
}

/// Gives every key to one provider. `described` is in plugin-name order; the
/// first provider to claim a key keeps it, and a later claim is dropped with
/// a warning naming both plugins and the key, so the outcome never depends
/// on the order of the config file or of loading.
pub fn assign_owners<'a>(
    described: impl IntoIterator<Item = &'a ProviderKeys>,
) -> Vec<ProviderKeys> {
    let mut owner_of: std::collections::HashMap<&'a OwnedKey, &'a str> =
        std::collections::HashMap::new();
    let mut out = Vec::new();
    for d in described {
        let mut dropped = DroppedKeys::new(&d.plugin);
        let mut keys = Vec::with_capacity(d.keys.len());
        for k in &d.keys {
            match owner_of.get(k) {
                Some(first) => dropped.drop_key(
                    k.pool,
                    &k.key,
                    format_args!("plugin `{first}` owns it (the first by name keeps a key)"),
                ),
                None => {
                    owner_of.insert(k, &d.plugin);
                    keys.push(k.clone());
                }
            }
        }
        out.push(ProviderKeys {
            plugin: d.plugin.clone(),
            keys,
            subscribe: d.subscribe.clone(),
        });
    }
    out
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

/// A KVP provider of one plugin set (prepared or in force): the keys it owns
/// in that set, and the calls into it. Cheap to clone; it keeps the plugin
/// alive, so a key map built from a prepared set calls exactly the plugins
/// that set loaded.
#[derive(Clone)]
pub struct Provider {
    pub(crate) plugin: Arc<Plugin>,
    keys: Arc<ProviderKeys>,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("plugin", &self.name())
            .field("keys", &self.keys.keys.len())
            .finish()
    }
}

impl Provider {
    pub(crate) fn new(plugin: Arc<Plugin>, keys: ProviderKeys) -> Self {
        Provider {
            plugin,
            keys: Arc::new(keys),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.plugin.name()
    }

    /// The keys it owns in its set and the pools it listens to.
    pub fn keys(&self) -> &ProviderKeys {
        &self.keys
    }

    /// Asks the provider for the value of `key` in `pool`. Returns within the
    /// manifest's call deadline; `Err(CallError::Plugin(..))` is the
    /// provider's own answer (e.g. not found), anything else is a failure.
    pub async fn get(&self, pool: Pool, key: &str) -> Result<Value, CallError> {
        if !self.keys.owns(pool, key) {
            return Err(CallError::Plugin(KvpError::NotFound(format!(
                "plugin `{}` does not own key `{}` in pool {pool}",
                self.name(),
                Escaped(key)
            ))));
        }
        let answer = self
            .plugin
            .with_provider(async |guest, store| guest.call_get(store, pool.into(), key).await)
            .await?;
        check_value(
            self.name(),
            key,
            answer.map(Value::from).map_err(KvpError::from),
        )
    }

    /// Tells the provider that the host set `key` in `pool`, if it listens
    /// there and may read the key; `None` if it was not told.
    async fn notify_host_set(
        &self,
        pool: Pool,
        key: &str,
        value: &Value,
    ) -> Option<Result<(), CallError>> {
        if !self.keys.subscribe.contains(&pool)
            || self.plugin.manifest().kvp_access(pool, key).is_none()
            || self.plugin.check_enabled().is_err()
        {
            return None;
        }
        let value = value.clone().into();
        Some(
            self.plugin
                .with_provider(async |guest, store| {
                    guest
                        .call_on_host_set(store, pool.into(), key, &value)
                        .await
                })
                .await,
        )
    }
}

impl PluginHost {
    /// The running (not disabled) KVP providers in force, in name order.
    pub fn providers(&self) -> Vec<Provider> {
        self.current()
            .providers
            .iter()
            .filter(|p| p.plugin.check_enabled().is_ok())
            .cloned()
            .collect()
    }

    /// The keys every running KVP provider owns and the pools it listens to.
    pub fn provider_keys(&self) -> Vec<ProviderKeys> {
        self.providers()
            .into_iter()
            .map(|p| p.keys().clone())
            .collect()
    }

    /// Asks provider `plugin` for the value of `key` in `pool` (see [`Provider::get`]).
    pub async fn provider_get(
        &self,
        plugin: &str,
        pool: Pool,
        key: &str,
    ) -> Result<Value, CallError> {
        let set = self.current();
        let provider = set.providers.iter().find(|p| p.name() == plugin);
        match provider {
            Some(p) => p.get(pool, key).await,
            None if set.plugins.contains_key(plugin) => Err(CallError::NotProvided {
                plugin: plugin.to_owned(),
                world: World::KvpProvider,
            }),
            None => Err(CallError::NoSuchPlugin(plugin.to_owned())),
        }
    }

    /// Tells every provider subscribed to `pool` that the host set `key`.
    /// Returns the failures (the plugins are not stopped by a failed notification beyond the trap rules).
    pub async fn notify_host_set(&self, pool: Pool, key: &str, value: &Value) -> Vec<CallError> {
        let mut errors = Vec::new();
        for p in &self.current().providers {
            if let Some(Err(e)) = p.notify_host_set(pool, key, value).await {
                errors.push(e);
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Access, KvpGrant};

    fn manifest(name: &str, patterns: &[&str]) -> PluginManifest {
        PluginManifest {
            name: name.into(),
            path: "/p/x.wasm".into(),
            worlds: vec![World::KvpProvider],
            priority: 100,
            limits: Default::default(),
            kvp: vec![KvpGrant {
                pool: Pool::Guest,
                keys: patterns.iter().map(|p| p.to_string()).collect(),
                access: Access::ReadOnly,
            }],
            dirs: Vec::new(),
            hvsock: Default::default(),
        }
    }

    fn guest(keys: &[&str]) -> Vec<(Pool, String)> {
        keys.iter().map(|k| (Pool::Guest, k.to_string())).collect()
    }

    fn names(p: &ProviderKeys) -> Vec<&str> {
        p.keys.iter().map(|k| k.key.as_str()).collect()
    }

    #[test]
    fn keys_that_do_not_fit_a_pool_record_or_the_grants_are_dropped() {
        let m = manifest("app", &["app.*"]);
        let fits = format!("app.{}", "x".repeat(507));
        let too_long = format!("app.{}", "x".repeat(508));
        let mut claims = guest(&["", "app.nul\0", "other", "app.b", "app.a", "app.a"]);
        claims.push((Pool::Guest, fits.clone()));
        claims.push((Pool::Guest, too_long));
        claims.push((Pool::External, "app.a".into()));
        let d = described_keys(&m, claims, vec![Pool::Guest, Pool::External, Pool::Guest]);
        assert_eq!(names(&d), ["app.a", "app.b", fits.as_str()]);
        assert!(d.owns(Pool::Guest, "app.a") && !d.owns(Pool::External, "app.a"));
        assert_eq!(d.subscribe, [Pool::Guest]);
    }

    #[test]
    fn only_the_first_claims_up_to_the_bound_are_considered() {
        let m = manifest("app", &["*"]);
        let claims = (0..MAX_OWNED_KEYS + 10)
            .map(|i| (Pool::Guest, format!("k{i:05}")))
            .collect();
        let d = described_keys(&m, claims, Vec::new());
        assert_eq!(d.keys.len(), MAX_OWNED_KEYS);
        assert!(!d.owns(Pool::Guest, &format!("k{:05}", MAX_OWNED_KEYS)));
    }

    #[test]
    fn a_key_claimed_by_two_providers_stays_with_the_first_by_name() {
        let a = described_keys(&manifest("alpha", &["*"]), guest(&["shared", "a"]), vec![]);
        let b = described_keys(&manifest("beta", &["*"]), guest(&["shared", "b"]), vec![]);
        let owned = assign_owners([&a, &b]);
        assert_eq!(names(&owned[0]), ["a", "shared"]);
        assert_eq!(names(&owned[1]), ["b"]);
    }
}
