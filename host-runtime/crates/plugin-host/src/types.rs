//! Plain Rust types of the plugin API, independent of the generated bindings,
//! and the [`KvpStore`] trait the runtime implements for the `kvp-store` import.
//!
//! [`Pool`], [`Value`] and the key and value limits are the protocol crate's:
//! one definition for the KVP service and the plugins, converted only at the
//! WIT edge (`state.rs`).

use std::collections::BTreeMap;
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
