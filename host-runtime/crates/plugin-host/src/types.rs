//! Plain Rust types of the plugin API, independent of the generated bindings,
//! and the [`KvpStore`] trait the runtime implements for the `kvp-store` import.
//!
//! [`Pool`], [`Value`] and the key and value limits are the protocol crate's:
//! one definition for the KVP service and the plugins, converted only at the
//! WIT edge (`state.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use serde::Serialize;

pub use hvisd_protocol::kvp::{MAX_KEY_LEN, MAX_VALUE_LEN, Pool, Value};

/// Why `key` cannot be a KVP key, if it cannot: keys are 1 to [`MAX_KEY_LEN`] bytes of UTF-8
/// without NUL (a pool record's key field is 512 bytes including the terminator). Manifest key
/// patterns obey the same rule.
pub(crate) fn key_problem(key: &str) -> Option<String> {
    if key.is_empty() {
        Some("is empty".into())
    } else if key.len() > MAX_KEY_LEN {
        Some(format!("is {} bytes, limit {MAX_KEY_LEN}", key.len()))
    } else if key.contains('\0') {
        Some("contains NUL".into())
    } else {
        None
    }
}

/// An error from the KVP store, a provider or the sandbox, as a plugin sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum KvpError {
    /// No such key.
    #[error("not found: {0}")]
    NotFound(String),
    /// Outside the plugin's grants.
    #[error("denied: {0}")]
    Denied(String),
    /// Malformed or oversized argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Cannot serve now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("failed: {0}")]
    Failed(String),
}

/// What a [`KvpStore`] call returns: a future that owns everything it needs,
/// so the store may answer from another task or thread.
pub type KvpFuture<T> = Pin<Box<dyn Future<Output = Result<T, KvpError>> + Send + 'static>>;

/// The runtime's KVP pools, as plugins reach them through the `kvp-store` import.
///
/// hvisd checks the caller's grants (pool, key pattern, read/write) and the
/// key and value limits before it calls any method here, so an
/// implementation only stores and fetches. The calls are awaited on the
/// runtime's async workers: an implementation that may block (file locks
/// another process can hold) must do that work elsewhere and only hand back
/// a future.
pub trait KvpStore: Send + Sync + 'static {
    /// The value of `key` in `pool`, if set.
    fn get(&self, pool: Pool, key: String) -> KvpFuture<Option<Value>>;
    /// Sets `key` in `pool`.
    fn set(&self, pool: Pool, key: String, value: Value) -> KvpFuture<()>;
    /// Deletes `key` from `pool`; whether it existed.
    fn delete(&self, pool: Pool, key: String) -> KvpFuture<bool>;
    /// Every key in `pool`.
    fn list(&self, pool: Pool) -> KvpFuture<Vec<String>>;
}

/// A [`KvpStore`] in memory, for tools (`plugin check`, bench) and tests.
#[derive(Default, Debug)]
pub struct MemoryKvpStore {
    entries: Mutex<BTreeMap<(Pool, String), Value>>,
}

impl MemoryKvpStore {
    /// Runs `f` on the map and hands back its (already known) result.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut BTreeMap<(Pool, String), Value>) -> T,
    ) -> KvpFuture<T> {
        // A poisoned map is still a consistent map: every write is a single insert/remove.
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Box::pin(std::future::ready(Ok(f(&mut entries))))
    }
}

impl KvpStore for MemoryKvpStore {
    fn get(&self, pool: Pool, key: String) -> KvpFuture<Option<Value>> {
        self.with(|m| m.get(&(pool, key)).cloned())
    }
    fn set(&self, pool: Pool, key: String, value: Value) -> KvpFuture<()> {
        self.with(|m| {
            m.insert((pool, key), value);
        })
    }
    fn delete(&self, pool: Pool, key: String) -> KvpFuture<bool> {
        self.with(|m| m.remove(&(pool, key)).is_some())
    }
    fn list(&self, pool: Pool) -> KvpFuture<Vec<String>> {
        self.with(|m| {
            m.keys()
                .filter(|(p, _)| *p == pool)
                .map(|(_, k)| k.clone())
                .collect()
        })
    }
}

/// The `kvp-store` operations of one plugin, each checked against its manifest (pool, key pattern,
/// read or read-write access) and the key and value limits before `store` is called. The one
/// place these checks live: the in-process import and the core's answer to a worker's import
/// both go through it (a worker's own checks are not trusted).
pub struct CheckedKvp<'a> {
    /// The plugin's manifest.
    pub manifest: &'a crate::manifest::PluginManifest,
    /// The store behind the checks.
    pub store: &'a dyn KvpStore,
}

impl CheckedKvp<'_> {
    fn check(&self, pool: Pool, key: &str, write: bool) -> Result<(), KvpError> {
        use crate::manifest::Access;
        use crate::text::Escaped;
        if let Some(problem) = key_problem(key) {
            return Err(KvpError::Invalid(format!(
                "key `{}` {problem}; keys are 1 to {MAX_KEY_LEN} bytes without NUL",
                Escaped(key)
            )));
        }
        let m = self.manifest;
        match m.kvp_access(pool, key) {
            Some(Access::ReadWrite) => Ok(()),
            Some(Access::ReadOnly) if !write => Ok(()),
            Some(Access::ReadOnly) => Err(KvpError::Denied(format!(
                "plugin `{}` has read-only access to key `{}` in pool {pool}; grant access = \"read-write\" in its manifest",
                m.name,
                Escaped(key)
            ))),
            None => Err(KvpError::Denied(format!(
                "plugin `{}` has no grant for key `{}` in pool {pool}; add a [[plugin.kvp]] entry",
                m.name,
                Escaped(key)
            ))),
        }
    }

    /// `kvp-store.get`.
    pub async fn get(&self, pool: Pool, key: String) -> Result<Option<Value>, KvpError> {
        self.check(pool, &key, false)?;
        self.store.get(pool, key).await
    }

    /// `kvp-store.set`.
    pub async fn set(&self, pool: Pool, key: String, value: Value) -> Result<(), KvpError> {
        self.check(pool, &key, true)?;
        if let Value::Text(s) = &value
            && s.len() > MAX_VALUE_LEN
        {
            return Err(KvpError::Invalid(format!(
                "value is {} bytes, limit {MAX_VALUE_LEN}",
                s.len()
            )));
        }
        self.store.set(pool, key, value).await
    }

    /// `kvp-store.delete`.
    pub async fn delete(&self, pool: Pool, key: String) -> Result<bool, KvpError> {
        self.check(pool, &key, true)?;
        self.store.delete(pool, key).await
    }

    /// `kvp-store.list`: the keys of `pool` starting with `prefix` that the plugin may read.
    pub async fn list(&self, pool: Pool, prefix: &str) -> Result<Vec<String>, KvpError> {
        let m = self.manifest;
        if !m.can_read_pool(pool) {
            return Err(KvpError::Denied(format!(
                "plugin `{}` has no grant in pool {pool}; add a [[plugin.kvp]] entry",
                m.name
            )));
        }
        Ok(self
            .store
            .list(pool)
            .await?
            .into_iter()
            .filter(|k| k.starts_with(prefix) && m.kvp_access(pool, k).is_some())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_pools_apart() {
        let s = MemoryKvpStore::default();
        let k = || "k".to_string();
        s.set(Pool::Guest, k(), Value::U32(1)).await.expect("set");
        s.set(Pool::External, k(), Value::Text("x".into()))
            .await
            .expect("set");
        assert_eq!(
            s.get(Pool::Guest, k()).await.expect("get"),
            Some(Value::U32(1))
        );
        assert_eq!(s.list(Pool::External).await.expect("list"), vec![k()]);
        assert!(s.delete(Pool::Guest, k()).await.expect("delete"));
        assert!(!s.delete(Pool::Guest, k()).await.expect("delete"));
        assert_eq!(s.get(Pool::Guest, k()).await.expect("get"), None);
    }

    #[test]
    fn keys_are_1_to_511_bytes_without_nul() {
        assert_eq!(key_problem("k"), None);
        assert_eq!(key_problem(&"k".repeat(MAX_KEY_LEN)), None);
        assert_eq!(
            key_problem(&"k".repeat(MAX_KEY_LEN + 1)).as_deref(),
            Some("is 512 bytes, limit 511")
        );
        assert_eq!(key_problem("").as_deref(), Some("is empty"));
        assert_eq!(key_problem("a\0b").as_deref(), Some("contains NUL"));
    }
}
