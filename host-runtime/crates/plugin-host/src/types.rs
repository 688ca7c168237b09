//! Plain Rust types of the plugin API, independent of the generated bindings,
//! and the [`KvpStore`] trait the runtime implements for the `kvp-store` import.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A KVP pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// Pool 0: set by the host.
    External,
    /// Pool 1: published by the guest.
    Guest,
    /// Pool 2: published automatically by the guest's integration services.
    Auto,
    /// Pool 3: published by the host about itself.
    AutoExternal,
    /// Pool 4: Hyper-V's own.
    Internal,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pool::External => "external",
            Pool::Guest => "guest",
            Pool::Auto => "auto",
            Pool::AutoExternal => "auto-external",
            Pool::Internal => "internal",
        })
    }
}

/// A KVP value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// A string.
    Text(String),
    /// A 32-bit integer.
    U32(u32),
    /// A 64-bit integer.
    U64(u64),
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

/// The runtime's KVP pools, as plugins reach them through the `kvp-store` import.
///
/// hvisd checks the caller's grants (pool, key pattern, read/write) before it
/// calls any method here, so an implementation only stores and fetches.
pub trait KvpStore: Send + Sync + 'static {
    /// The value of `key` in `pool`, if set.
    fn get(&self, pool: Pool, key: &str) -> Result<Option<Value>, KvpError>;
    /// Sets `key` in `pool`.
    fn set(&self, pool: Pool, key: &str, value: &Value) -> Result<(), KvpError>;
    /// Deletes `key` from `pool`; whether it existed.
    fn delete(&self, pool: Pool, key: &str) -> Result<bool, KvpError>;
    /// Every key in `pool`.
    fn list(&self, pool: Pool) -> Result<Vec<String>, KvpError>;
}

/// A [`KvpStore`] in memory, for tools (`plugin check`, bench) and tests.
#[derive(Default, Debug)]
pub struct MemoryKvpStore {
    entries: Mutex<BTreeMap<(Pool, String), Value>>,
}

impl MemoryKvpStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Pool, String), Value>> {
        // A poisoned map is still a consistent map: every write is a single insert/remove.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl KvpStore for MemoryKvpStore {
    fn get(&self, pool: Pool, key: &str) -> Result<Option<Value>, KvpError> {
        Ok(self.lock().get(&(pool, key.to_owned())).cloned())
    }
    fn set(&self, pool: Pool, key: &str, value: &Value) -> Result<(), KvpError> {
        self.lock().insert((pool, key.to_owned()), value.clone());
        Ok(())
    }
    fn delete(&self, pool: Pool, key: &str) -> Result<bool, KvpError> {
        Ok(self.lock().remove(&(pool, key.to_owned())).is_some())
    }
    fn list(&self, pool: Pool) -> Result<Vec<String>, KvpError> {
        Ok(self
            .lock()
            .keys()
            .filter(|(p, _)| *p == pool)
            .map(|(_, k)| k.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_keeps_pools_apart() {
        let s = MemoryKvpStore::default();
        s.set(Pool::Guest, "k", &Value::U32(1)).expect("set");
        s.set(Pool::External, "k", &Value::Text("x".into()))
            .expect("set");
        assert_eq!(s.get(Pool::Guest, "k").expect("get"), Some(Value::U32(1)));
        assert_eq!(s.list(Pool::External).expect("list"), vec!["k".to_string()]);
        assert!(s.delete(Pool::Guest, "k").expect("delete"));
        assert!(!s.delete(Pool::Guest, "k").expect("delete"));
        assert_eq!(s.get(Pool::Guest, "k").expect("get"), None);
    }
}
