//! Guest-pool keys owned by KVP-provider plugins.
//!
//! A provider (the runtime implements [`GuestKeyProvider`] over the plugin host, one per plugin) owns
//! the keys it declares; a key has one owner. Keys that cannot be in a pool record, and keys an
//! earlier provider already owns, are dropped with a warning: one bad provider never costs the others
//! their keys, and building the registry cannot fail.
//!
//! When the host enumerates or gets the Guest pool, owned keys appear after the file's records (a
//! file record with an owned key is hidden). Values are fetched concurrently under **one** deadline
//! per host request, cached for `cache_ttl`, and a provider that fails or misses the deadline yields
//! its last good value (or the key is left out) and a log line. The host's request is never failed,
//! and never waits past the deadline: a late answer is kept (in the background) for the next
//! request, and at most one fetch per key is in flight.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvisd_protocol::kvp::{MAX_KEY_LEN, MAX_VALUE_SIZE};

/// The future a provider returns for one value: the value, or why not (logged).
pub type ValueFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'static>>;

/// A source of Guest-pool values, e.g. one KVP-provider plugin.
pub trait GuestKeyProvider: Send + Sync + 'static {
    /// Name for logs and conflicts, e.g. the plugin id.
    fn name(&self) -> &str;
    /// The keys it owns (from its manifest), in the order they are enumerated.
    fn keys(&self) -> Vec<String>;
    /// Starts computing the value of one owned key. hvisd bounds the wait; the future may be
    /// dropped unfinished only if the runtime shuts down.
    fn value(&self, key: &str) -> ValueFuture;
}

/// Timing of plugin-provided keys.
#[derive(Debug, Clone, Copy)]
pub struct GuestKeyOptions {
    /// How long one host request may wait for provider values in total.
    pub deadline: Duration,
    /// How long a value is served without asking the provider again.
    pub cache_ttl: Duration,
}

impl Default for GuestKeyOptions {
    fn default() -> Self {
        GuestKeyOptions {
            deadline: Duration::from_millis(100),
            cache_ttl: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct Entry {
    last_good: Option<String>,
    fetched_at: Option<Instant>,
    in_flight: bool,
}

/// Owned keys, their providers and the value cache.
pub struct GuestKeys {
    keys: Vec<(String, Arc<dyn GuestKeyProvider>)>,
    cache: Arc<Mutex<HashMap<String, Entry>>>,
    options: GuestKeyOptions,
}

impl std::fmt::Debug for GuestKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestKeys")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|(k, p)| (k, p.name()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Resets a key's in-flight mark even if the provider's future panics.
struct InFlight {
    cache: Arc<Mutex<HashMap<String, Entry>>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut c) = self.cache.lock()
            && let Some(e) = c.get_mut(&self.key)
        {
            e.in_flight = false;
        }
    }
}

impl GuestKeys {
    /// Builds the registry: each provider's keys in order, except keys that are empty, longer than
    /// [`MAX_KEY_LEN`] bytes or contain NUL, and keys an earlier provider already owns (the first
    /// provider in `providers` keeps a key). Each dropped key is logged with its provider.
    pub fn new(providers: Vec<Arc<dyn GuestKeyProvider>>, options: GuestKeyOptions) -> GuestKeys {
        let mut keys: Vec<(String, Arc<dyn GuestKeyProvider>)> = Vec::new();
        let mut owner: HashMap<String, usize> = HashMap::new();
        for p in providers {
            for key in p.keys() {
                let problem = if key.is_empty() {
                    Some("it is empty".to_string())
                } else if key.len() > MAX_KEY_LEN {
                    Some(format!("it is {} bytes, limit {MAX_KEY_LEN}", key.len()))
                } else if key.contains('\0') {
                    Some("it contains NUL".to_string())
                } else {
                    owner
                        .get(&key)
                        .map(|&i| format!("{} owns it", keys[i].1.name()))
                };
                if let Some(problem) = problem {
                    let shown: String = key
                        .chars()
                        .take(64)
                        .flat_map(char::escape_default)
                        .collect();
                    tracing::warn!(provider = p.name(), key = %shown, "KVP plugin key dropped: {problem}");
                    continue;
                }
                owner.insert(key.clone(), keys.len());
                keys.push((key, p.clone()));
            }
        }
        GuestKeys {
            keys,
            cache: Arc::new(Mutex::new(HashMap::new())),
            options,
        }
    }

    /// Whether `key` is owned by a provider.
    pub fn owns(&self, key: &[u8]) -> bool {
        self.keys.iter().any(|(k, _)| k.as_bytes() == key)
    }

    /// The owned keys in enumeration order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.as_str())
    }

    /// Values of all owned keys that have one (fresh, or last good), in order, waiting at most
    /// the deadline.
    pub async fn snapshot(&self) -> Vec<(String, String)> {
        let all: Vec<usize> = (0..self.keys.len()).collect();
        self.refresh(&all).await;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        self.keys
            .iter()
            .filter_map(|(k, _)| Some((k.clone(), cache.get(k)?.last_good.clone()?)))
            .collect()
    }

    /// The value of one owned key (fresh or last good), `None` if it is not owned or has none.
    pub async fn value(&self, key: &[u8]) -> Option<String> {
        let i = self.keys.iter().position(|(k, _)| k.as_bytes() == key)?;
        self.refresh(&[i]).await;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&self.keys[i].0)?.last_good.clone()
    }

    async fn refresh(&self, which: &[usize]) {
        let deadline = tokio::time::Instant::now() + self.options.deadline;
        let mut waits = Vec::new();
        {
            let now = Instant::now();
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for &i in which {
                let (key, provider) = &self.keys[i];
                let e = cache.entry(key.clone()).or_default();
                let fresh = e
                    .fetched_at
                    .is_some_and(|t| now.duration_since(t) < self.options.cache_ttl);
                if fresh || e.in_flight {
                    continue;
                }
                e.in_flight = true;
                let fut = provider.value(key);
                let guard = InFlight {
                    cache: self.cache.clone(),
                    key: key.clone(),
                };
                let provider_name = provider.name().to_string();
                let key = key.clone();
                waits.push((
                    key.clone(),
                    provider_name.clone(),
                    tokio::spawn(async move {
                        let result = fut.await;
                        let mut cache = guard.cache.lock().unwrap_or_else(|p| p.into_inner());
                        let e = cache.entry(key.clone()).or_default();
                        e.fetched_at = Some(Instant::now());
                        match result {
                            Ok(mut v) => {
                                if v.len() >= MAX_VALUE_SIZE {
                                    let mut cut = MAX_VALUE_SIZE - 1;
                                    while !v.is_char_boundary(cut) {
                                        cut -= 1;
                                    }
                                    tracing::warn!(provider = %provider_name, key = %key, len = v.len(), "KVP plugin value longer than 2047 bytes was cut");
                                    v.truncate(cut);
                                }
                                e.last_good = Some(v.replace('\0', ""));
                            }
                            Err(reason) => tracing::warn!(
                                provider = %provider_name, key = %key, %reason,
                                served = if e.last_good.is_some() { "last good value" } else { "nothing (key skipped)" },
                                "KVP plugin failed to provide a value"
                            ),
                        }
                        drop(cache);
                        drop(guard);
                    }),
                ));
            }
        }
        for (key, provider, handle) in waits {
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(())) => {}
                Ok(Err(join)) => {
                    tracing::warn!(provider = %provider, key = %key, error = %join, "KVP plugin value task failed")
                }
                Err(_) => tracing::warn!(
                    provider = %provider, key = %key, deadline_ms = self.options.deadline.as_millis() as u64,
                    "KVP plugin missed the deadline; serving its last good value if any (a late answer is kept)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A small in-test provider; the end-to-end test with real wasm plugins comes with the
    /// lead's integration of the plugin host.
    struct Fake {
        name: &'static str,
        keys: Vec<&'static str>,
        delay: Duration,
        fail: bool,
        calls: Arc<AtomicU32>,
    }

    impl GuestKeyProvider for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn keys(&self) -> Vec<String> {
            self.keys.iter().map(|k| k.to_string()).collect()
        }
        fn value(&self, key: &str) -> ValueFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let (delay, fail, key) = (self.delay, self.fail, key.to_string());
            Box::pin(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if fail {
                    Err("trap: unreachable".into())
                } else {
                    Ok(format!("{key}-{n}"))
                }
            })
        }
    }

    fn fake(
        name: &'static str,
        keys: Vec<&'static str>,
        delay_ms: u64,
        fail: bool,
    ) -> (Arc<dyn GuestKeyProvider>, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        (
            Arc::new(Fake {
                name,
                keys,
                delay: Duration::from_millis(delay_ms),
                fail,
                calls: calls.clone(),
            }),
            calls,
        )
    }

    fn opts() -> GuestKeyOptions {
        GuestKeyOptions {
            deadline: Duration::from_millis(200),
            cache_ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_key_claimed_by_two_providers_stays_with_the_first() {
        let (a, _) = fake("a", vec!["k", "a"], 0, false);
        let (b, _) = fake("b", vec!["b", "k"], 0, false);
        let keys = GuestKeys::new(vec![a, b], opts());
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["k", "a", "b"]);
        assert_eq!(
            format!("{keys:?}"),
            r#"GuestKeys { keys: [("k", "a"), ("a", "a"), ("b", "b")] }"#
        );
    }

    #[test]
    fn keys_that_do_not_fit_a_pool_record_are_dropped_and_the_rest_kept() {
        let longest: &'static str = "k".repeat(MAX_KEY_LEN).leak();
        let too_long: &'static str = "k".repeat(MAX_KEY_LEN + 1).leak();
        let (a, _) = fake("a", vec!["", "nul\0", too_long, "good", longest], 0, false);
        let keys = GuestKeys::new(vec![a], opts());
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["good", longest]);
        assert!(!keys.owns(too_long.as_bytes()));
    }

    #[tokio::test]
    async fn values_are_cached_for_the_ttl() {
        let (a, calls) = fake("a", vec!["k1", "k2"], 0, false);
        let keys = GuestKeys::new(vec![a], opts());
        assert_eq!(
            keys.snapshot().await,
            vec![("k1".into(), "k1-0".into()), ("k2".into(), "k2-1".into())]
        );
        keys.snapshot().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_slow_provider_is_skipped_within_the_deadline_and_its_late_value_is_kept() {
        let (slow, _) = fake("slow", vec!["s"], 1000, false);
        let (good, _) = fake("good", vec!["g"], 0, false);
        let keys = GuestKeys::new(vec![slow, good], opts());
        let t = Instant::now();
        assert_eq!(keys.snapshot().await, vec![("g".into(), "g-0".into())]);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(keys.value(b"s").await.as_deref(), Some("s-0"));
    }

    #[tokio::test]
    async fn a_failing_provider_yields_its_last_good_value() {
        let calls = Arc::new(AtomicU32::new(0));
        struct Flaky(Arc<AtomicU32>);
        impl GuestKeyProvider for Flaky {
            fn name(&self) -> &str {
                "flaky"
            }
            fn keys(&self) -> Vec<String> {
                vec!["f".into()]
            }
            fn value(&self, _: &str) -> ValueFuture {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        Ok("good".into())
                    } else {
                        Err("trapped".into())
                    }
                })
            }
        }
        let keys = GuestKeys::new(
            vec![Arc::new(Flaky(calls.clone()))],
            GuestKeyOptions {
                deadline: Duration::from_millis(50),
                cache_ttl: Duration::ZERO,
            },
        );
        assert_eq!(keys.value(b"f").await.as_deref(), Some("good"));
        assert_eq!(keys.value(b"f").await.as_deref(), Some("good"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_provider_that_always_fails_is_left_out() {
        let (bad, _) = fake("bad", vec!["b"], 0, true);
        let keys = GuestKeys::new(vec![bad], opts());
        assert!(keys.snapshot().await.is_empty());
        assert!(keys.owns(b"b"));
    }
}
