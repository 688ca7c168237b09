//! The wasmtime host for hvisd plugins.
//!
//! Plugins are WebAssembly components built against the WIT package
//! `hyperv:integration@0.1.0` (in `wit/` at the repository root). This crate
//! loads them under the limits of their manifests and exposes the calls the
//! runtime's services make into them:
//!
//! - [`manifest`]: the `[[plugin]]` config tables and their validation;
//! - [`PluginHost`]: the `.cwasm` cache, the plugin set, load and reload
//!   ([`PluginHost::prepare`] then [`PluginHost::commit`], so a reload is all
//!   or nothing), health and status (`lifecycle`), on one engine whose epoch
//!   ticker gives every call its CPU deadline and idles between calls
//!   (`engine`);
//! - `store`: what one instance may see and use (WASI context, memory and
//!   table limits) and how a call into it is bounded in time; `instance`:
//!   which instance a call runs on (fresh, or a provider's long-lived one)
//!   and the trap accounting of its outcome;
//! - `worlds`: one module per world (KVP provider, freeze hooks, freeze
//!   policy, hvsock service) with what each call passes in and out, and the
//!   checks on the answers (a provider's keys: [`Provider`], [`ProviderKeys`]);
//! - [`KvpStore`] and [`HvsockConnector`]: what the runtime implements for
//!   the plugins' imports (grants are checked here first);
//! - [`check()`]: what `hvisd plugin check` prints;
//! - [`bench`](mod@bench): what `hvisd bench plugin` prints;
//! - [`build`]: builds the plugins of `plugins/` for wasm32-wasip2.
#![forbid(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "build")]
pub mod build;
mod cache;
mod check;
mod engine;
mod instance;
mod lifecycle;
pub mod manifest;
mod state;
mod stdio;
mod store;
mod text;
mod types;
pub mod worker;
mod worlds;

pub use cache::{CacheOutcome, ComponentCache};
pub use check::{CheckReport, ManifestVerdict, check};
pub use engine::{EPOCH_TICK, build_engine};
pub use lifecycle::{HostServices, LoadSummary, PluginHost, PluginState, PluginStatus, Prepared};
pub use manifest::{ManifestError, PluginManifest, World};
pub use state::{BoxedReader, BoxedWriter, ConnectFuture, HvsockConnector};
pub use types::{
    CheckedKvp, KvpError, KvpFuture, KvpStore, MAX_KEY_LEN, MAX_VALUE_LEN, MemoryKvpStore, Pool,
    Value,
};
pub use wasmtime::Engine;
pub use worlds::freeze_hooks::{FreezeContext, FreezeOutcome, PreFreeze};
pub use worlds::freeze_policy::{FreezePlan, Mount};
pub use worlds::kvp_provider::{
    MAX_OWNED_KEYS, OwnedKey, Provider, ProviderKeys, assign_owners, described_keys,
};

/// Errors from setting up the host or loading plugins.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The engine could not be configured.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// The cache directory is unusable.
    #[error("plugin cache dir `{}`: {problem}", dir.display())]
    Cache {
        /// The directory.
        dir: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A component failed to compile.
    #[error("compiling the component failed: {0}")]
    Compile(String),
    /// The file is not a WebAssembly component at all.
    #[error("{}: not a WebAssembly component: {why}", path.display())]
    NotAComponent {
        /// The file.
        path: std::path::PathBuf,
        /// What it is instead.
        why: &'static str,
    },
    /// One or more manifests are invalid; nothing was loaded.
    #[error("invalid plugin config:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Manifest(Vec<ManifestError>),
    /// A plugin was refused at load.
    #[error("plugin `{plugin}` refused: {problem}")]
    Refused {
        /// The plugin.
        plugin: String,
        /// Why.
        problem: String,
    },
    /// Reading a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Errors from a call into a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum CallError {
    /// No such plugin is loaded.
    #[error("no plugin `{0}` is loaded")]
    NoSuchPlugin(String),
    /// The plugin does not implement the world this call needs.
    #[error("plugin `{plugin}` does not implement `{world}`")]
    NotProvided {
        /// The plugin.
        plugin: String,
        /// The world.
        world: World,
    },
    /// The plugin is disabled after repeated traps.
    #[error("plugin `{plugin}` is disabled: {reason}")]
    Disabled {
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// The call ran past its deadline and was stopped.
    #[error("plugin `{plugin}` ran past its {deadline_ms} ms deadline and was stopped")]
    Deadline {
        /// The plugin.
        plugin: String,
        /// The deadline.
        deadline_ms: u64,
    },
    /// The plugin trapped (out of memory, stack overflow, panic, ...).
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap, with wasm backtrace where available.
        message: String,
    },
    /// A fresh instance could not be created.
    #[error("plugin `{plugin}` could not be instantiated: {message}")]
    Instantiate {
        /// The plugin.
        plugin: String,
        /// Why.
        message: String,
    },
    /// The plugin answered with an error of its own.
    #[error("{0}")]
    Plugin(KvpError),
}
