//! Shared by the plugin-host integration tests: builds the real plugins of
//! `plugins/` once per test binary and sets up hosts around them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hvisd_plugin_host::manifest::{Access, DirGrant, KvpGrant, Limits, PluginManifest, World};
use hvisd_plugin_host::{HostServices, KvpStore, MemoryKvpStore, PluginHost, Pool, Value, build};

/// The components, built once (with plain cargo, as CI does).
pub fn plugins() -> &'static BTreeMap<String, PathBuf> {
    static BUILT: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| {
        build::build_plugins(&build::plugins_workspace(), "release")
            .unwrap_or_else(|e| panic!("building the test plugins failed: {e}"))
    })
}

/// The path of one built component.
pub fn wasm(name: &str) -> PathBuf {
    plugins()
        .get(name)
        .unwrap_or_else(|| panic!("plugin `{name}` was not built; have {:?}", plugins().keys()))
        .clone()
}

/// A manifest with defaults and a read-write grant on `keys` in the guest pool.
pub fn manifest(name: &str, component: &str, worlds: &[World], keys: &[&str]) -> PluginManifest {
    PluginManifest {
        name: name.into(),
        path: wasm(component),
        worlds: worlds.to_vec(),
        priority: 100,
        limits: Limits::default(),
        kvp: vec![KvpGrant {
            pool: Pool::Guest,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            access: Access::ReadWrite,
        }],
        dirs: Vec::new(),
        hvsock: Default::default(),
    }
}

/// The well-behaved neighbour every sandbox test keeps an eye on.
pub fn neighbour(app_dir: &Path) -> PluginManifest {
    let mut m = manifest(
        "app-version",
        "app-version",
        &[World::KvpProvider],
        &["app.*"],
    );
    m.dirs.push(DirGrant {
        host: app_dir.to_owned(),
        guest: "/app".into(),
        access: Access::ReadOnly,
    });
    m
}

/// A scratch area: a cache dir, an app dir with VERSION, a data dir with a
/// granted file, and a secret beside it that no plugin may read.
pub struct Scratch {
    pub root: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let p = root.path();
        std::fs::create_dir(p.join("app")).expect("mkdir app");
        std::fs::write(p.join("app/VERSION"), "4.2.0\n").expect("write VERSION");
        std::fs::write(p.join("app/health"), "ok\n").expect("write health");
        std::fs::create_dir(p.join("data")).expect("mkdir data");
        std::fs::write(p.join("data/hello.txt"), "hello from the grant\n").expect("write hello");
        std::fs::write(p.join("secret.txt"), "TOP SECRET\n").expect("write secret");
        std::os::unix::fs::symlink(p.join("secret.txt"), p.join("data/link-to-secret"))
            .expect("symlink");
        Scratch { root }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
}

/// One compiled-artifact cache per test binary, so each component is compiled once.
pub fn shared_cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
}

/// A host with an in-memory KVP store and the shared cache.
pub fn host(_scratch: &Scratch) -> (PluginHost, Arc<MemoryKvpStore>) {
    let kvp = Arc::new(MemoryKvpStore::default());
    let host = PluginHost::new(
        shared_cache(),
        HostServices {
            kvp: kvp.clone(),
            hvsock: None,
        },
    )
    .expect("plugin host");
    (host, kvp)
}

/// Asserts the neighbour still answers with the version from its granted dir.
pub async fn assert_neighbour_answers(host: &PluginHost) {
    let v = host
        .provider_get("app-version", Pool::Guest, "app.version")
        .await
        .expect("the well-behaved neighbour must keep answering");
    assert_eq!(v, Value::Text("4.2.0".into()));
}

/// A provider from the `misbehave` component granted the keys under `bad.`
/// and `ok`; its `describe` claims every kind of bad key once
/// [`describe_mode`] is `bad-keys` (see the plugin's docs).
pub fn bad_keys_provider(name: &str) -> PluginManifest {
    manifest(
        name,
        "misbehave",
        &[World::KvpProvider],
        &["bad.*", "misbehave.describe", "ok"],
    )
}

/// Chooses what `misbehave`'s `describe` claims from then on.
pub async fn describe_mode(kvp: &MemoryKvpStore, mode: &str) {
    kvp.set(
        Pool::Guest,
        "misbehave.describe".into(),
        Value::Text(mode.into()),
    )
    .await
    .expect("set");
}

/// Formatted log lines collected in memory.
///
/// A test capturing logs with `tracing::subscriber::set_default` should be
/// alone in its test binary, or the only one reaching the log lines it looks
/// for: a callsite first hit on another test's thread, which has no
/// subscriber, can be cached as disabled for every thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Sends this thread's log lines at `level` and above here until the guard is dropped.
    pub fn capture(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}
