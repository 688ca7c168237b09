//! # hvisd-sdk: write hvisd plugins in Rust
//!
//! hvisd runs plugins as sandboxed WebAssembly components. With this crate a
//! plugin is one small library crate: implement a trait, invoke one macro,
//! build with plain cargo.
//!
//! | kind | trait | macro | manifest `worlds` |
//! |---|---|---|---|
//! | KVP provider | [`KvpProvider`] | [`export_kvp_provider!`] | `kvp-provider` |
//! | freeze hook | [`FreezeHook`] | [`export_freeze_hook!`] | `freeze-hook` |
//! | freeze policy | [`FreezePolicy`] | [`export_freeze_policy!`] | `freeze-policy` |
//! | hvsock service | [`HvsockService`] | [`export_hvsock_service!`] | `hvsock-service` |
//! | all four | all four | [`export_full_plugin!`] | any of them |
//!
//! ## A complete KVP provider
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "app-version"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! hvisd-sdk = "0.1"
//! ```
//!
//! `src/lib.rs`:
//!
//! ```ignore
//! use hvisd_sdk::{Error, KvpProvider, Pool, PoolKey, ProviderInfo, Value};
//!
//! struct AppVersion;
//!
//! impl KvpProvider for AppVersion {
//!     fn describe() -> ProviderInfo {
//!         ProviderInfo::owning([(Pool::Guest, "app.version")])
//!     }
//!     fn get(pool: Pool, key: &str) -> Result<Value, Error> {
//!         match (pool, key) {
//!             (Pool::Guest, "app.version") => Ok(Value::Text("1.2.3".into())),
//!             _ => Err(Error::NotFound(key.into())),
//!         }
//!     }
//! }
//!
//! hvisd_sdk::export_kvp_provider!(AppVersion);
//! ```
//!
//! Build it (once: `rustup target add wasm32-wasip2`):
//!
//! ```text
//! cargo build --target wasm32-wasip2 --release
//! ```
//!
//! and declare `target/wasm32-wasip2/release/app_version.wasm` in hvisd's config:
//!
//! ```toml
//! [[plugin]]
//! name = "app-version"
//! path = "/usr/lib/hvisd/plugins/app_version.wasm"
//! worlds = ["kvp-provider"]
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["app.*"]
//! ```
//!
//! `hvisd plugin check app_version.wasm` tells what the component implements
//! and imports. The examples in the repository's `plugins/examples/` show a
//! freeze hook and an hvsock service.
//!
//! ## The sandbox
//!
//! A plugin has no network, no environment variables, no filesystem beyond
//! the directories its manifest grants, a memory cap (16 MiB by default) and a
//! deadline on every call (50 ms by default). `println!` and `eprintln!` go to
//! hvisd's log, tagged with the plugin's name; prefer [`log`]. State kept in a
//! `static` lives as long as the instance: provider instances are long-lived
//! (recycled after many calls or any trap), hooks and hvsock connections get a
//! fresh instance per call.

#![deny(missing_docs)]

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Raw bindings of the imports (generated from the WIT package).
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "hyperv:integration/host",
        generate_all,
    });
}

include!(concat!(env!("OUT_DIR"), "/generate.rs"));

pub use bindings::hyperv::integration::types::{Error, Pool, PoolKey, Value};
use bindings::wasi::io::streams::{InputStream, OutputStream, StreamError};

/// Logging into hvisd's log, tagged with the plugin's name.
pub mod log {
    use crate::bindings::hyperv::integration::logging::{Level, log};

    /// Logs at trace level.
    pub fn trace(msg: &str) {
        log(Level::Trace, msg)
    }
    /// Logs at debug level.
    pub fn debug(msg: &str) {
        log(Level::Debug, msg)
    }
    /// Logs at info level.
    pub fn info(msg: &str) {
        log(Level::Info, msg)
    }
    /// Logs at warn level.
    pub fn warn(msg: &str) {
        log(Level::Warn, msg)
    }
    /// Logs at error level.
    pub fn error(msg: &str) {
        log(Level::Error, msg)
    }
}

/// The KVP store, within the pools and key patterns the manifest grants.
pub mod kvp {
    use crate::bindings::hyperv::integration::kvp_store;
    use crate::{Error, Pool, Value};

    /// The value of `key` in `pool`, or `None`.
    pub fn get(pool: Pool, key: &str) -> Result<Option<Value>, Error> {
        kvp_store::get(pool, key)
    }
    /// Sets `key` in `pool` (needs read-write).
    pub fn set(pool: Pool, key: &str, value: &Value) -> Result<(), Error> {
        kvp_store::set(pool, key, value)
    }
    /// Deletes `key`; whether it existed (needs read-write).
    pub fn delete(pool: Pool, key: &str) -> Result<bool, Error> {
        kvp_store::delete(pool, key)
    }
    /// Keys in `pool` starting with `prefix` that the plugin may read.
    pub fn list(pool: Pool, prefix: &str) -> Result<Vec<String>, Error> {
        kvp_store::list(pool, prefix)
    }
}

/// One hvsock connection: a byte stream each way. Implements
/// [`std::io::Read`] and [`std::io::Write`].
pub struct Connection {
    input: InputStream,
    output: OutputStream,
}

impl Connection {
    /// Wraps the two halves of a connection.
    pub fn new(input: InputStream, output: OutputStream) -> Self {
        Connection { input, output }
    }

    /// The raw `wasi:io` streams (for code that manages write permits and polling itself).
    pub fn streams(&self) -> (&InputStream, &OutputStream) {
        (&self.input, &self.output)
    }

    /// Reads up to `max` bytes, waiting for at least one; `Ok(empty)` at end of stream.
    pub fn read_some(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        match self.input.blocking_read(max as u64) {
            Ok(b) => Ok(b),
            Err(StreamError::Closed) => Ok(Vec::new()),
            Err(StreamError::LastOperationFailed(e)) => {
                Err(std::io::Error::other(e.to_debug_string()))
            }
        }
    }
}

impl std::io::Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let b = self.read_some(buf.len())?;
        let n = b.len().min(buf.len());
        buf[..n].copy_from_slice(&b[..n]);
        Ok(n)
    }
}

impl Drop for Connection {
    /// Waits until what was written has left: the plugin's instance (and with it anything
    /// still buffered) goes away when `serve` returns.
    fn drop(&mut self) {
        let _ = self.output.blocking_flush();
    }
}

fn stream_error(e: StreamError) -> std::io::Error {
    match e {
        StreamError::Closed => std::io::ErrorKind::BrokenPipe.into(),
        StreamError::LastOperationFailed(e) => std::io::Error::other(e.to_debug_string()),
    }
}

impl std::io::Write for Connection {
    /// Writes as much of `buf` as the host's write permit allows now (waiting until it allows
    /// at least one byte); the bytes leave without a flush, so writes pipeline.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let permit = self.output.check_write().map_err(stream_error)?;
            if permit == 0 {
                self.output.subscribe().block();
                continue;
            }
            let n = buf.len().min(permit as usize);
            self.output.write(&buf[..n]).map_err(stream_error)?;
            return Ok(n);
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.output.blocking_flush() {
            Ok(()) => Ok(()),
            Err(StreamError::Closed) => Err(std::io::ErrorKind::BrokenPipe.into()),
            Err(StreamError::LastOperationFailed(e)) => {
                Err(std::io::Error::other(e.to_debug_string()))
            }
        }
    }
}

/// Outbound hvsock connections to services the manifest grants.
pub mod hvsock {
    use crate::{Connection, Error};

    /// Connects to the named service.
    pub fn connect(service: &str) -> Result<Connection, Error> {
        let (i, o) = crate::bindings::hyperv::integration::hvsock::connect(service)?;
        Ok(Connection::new(i, o))
    }
}

/// What a KVP provider owns and listens to.
#[derive(Clone, Debug, Default)]
pub struct ProviderInfo {
    /// Keys the provider answers for (must be granted by the manifest).
    pub owned_keys: Vec<PoolKey>,
    /// Pools whose host-set keys the provider is told about.
    pub subscribe: Vec<Pool>,
}

impl ProviderInfo {
    /// Owns the given keys, subscribes to nothing.
    pub fn owning<'a>(keys: impl IntoIterator<Item = (Pool, &'a str)>) -> Self {
        ProviderInfo {
            owned_keys: keys
                .into_iter()
                .map(|(pool, key)| PoolKey {
                    pool,
                    key: key.to_owned(),
                })
                .collect(),
            subscribe: Vec::new(),
        }
    }
}

/// A plugin that owns KVP keys and answers their values on demand.
pub trait KvpProvider {
    /// The keys owned and pools subscribed to; called once per instance.
    fn describe() -> ProviderInfo;
    /// The current value of an owned key. Keep it quick: calls have a deadline.
    fn get(pool: Pool, key: &str) -> Result<Value, Error>;
    /// The host set `key` in a subscribed pool. Does nothing by default.
    fn on_host_set(pool: Pool, key: &str, value: Value) {
        let _ = (pool, key, value);
    }
}

/// What a freeze hook is told.
#[derive(Clone, Debug)]
pub struct FreezeContext {
    /// The host's backup id.
    pub backup_id: String,
    /// Mount points concerned, in freeze order.
    pub mounts: Vec<String>,
    /// Milliseconds before hvisd stops this call.
    pub time_left_ms: u64,
}

/// How the freeze window ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// Frozen and thawed; the snapshot was taken.
    Thawed,
    /// A pre-freeze hook vetoed.
    Vetoed,
    /// Freezing failed; everything was thawed.
    FreezeFailed,
    /// The host aborted the backup.
    Aborted,
}

/// Code that runs around a VSS freeze.
pub trait FreezeHook {
    /// Before the freeze; `Err(reason)` vetoes the backup.
    fn pre_freeze(ctx: &FreezeContext) -> Result<(), String>;
    /// After the thaw; always called.
    fn post_thaw(ctx: &FreezeContext, outcome: FreezeOutcome);
}

/// A freezable mount.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Mount point.
    pub path: String,
    /// File system type.
    pub fs_type: String,
    /// Device.
    pub device: String,
}

/// Decides what to freeze and in which order.
pub trait FreezePolicy {
    /// The mount points to freeze, in order, or `Err(reason)` to refuse.
    fn plan(mounts: &[Mount]) -> Result<Vec<String>, String>;
}

/// Serves hvsock connections; called once per connection, in a fresh instance.
pub trait HvsockService {
    /// Serves `conn` until done.
    fn serve(service: &str, conn: Connection) -> Result<(), String>;
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hvisd_impl_kvp_provider {
    ($adapter:ident, $impl:ty) => {
        impl exports::hyperv::integration::kvp_provider::Guest for $adapter {
            fn describe() -> exports::hyperv::integration::kvp_provider::ProviderInfo {
                let info = <$impl as $crate::KvpProvider>::describe();
                exports::hyperv::integration::kvp_provider::ProviderInfo {
                    owned_keys: info.owned_keys,
                    subscribe: info.subscribe,
                }
            }
            fn get(pool: $crate::Pool, key: String) -> Result<$crate::Value, $crate::Error> {
                <$impl as $crate::KvpProvider>::get(pool, &key)
            }
            fn on_host_set(pool: $crate::Pool, key: String, value: $crate::Value) {
                <$impl as $crate::KvpProvider>::on_host_set(pool, &key, value)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hvisd_impl_freeze_hook {
    ($adapter:ident, $impl:ty) => {
        impl exports::hyperv::integration::freeze_hooks::Guest for $adapter {
            fn pre_freeze(
                ctx: exports::hyperv::integration::freeze_hooks::FreezeContext,
            ) -> Result<(), String> {
                <$impl as $crate::FreezeHook>::pre_freeze(&$crate::FreezeContext {
                    backup_id: ctx.backup_id,
                    mounts: ctx.mounts,
                    time_left_ms: ctx.time_left_ms,
                })
            }
            fn post_thaw(
                ctx: exports::hyperv::integration::freeze_hooks::FreezeContext,
                outcome: exports::hyperv::integration::freeze_hooks::FreezeOutcome,
            ) {
                use exports::hyperv::integration::freeze_hooks::FreezeOutcome as W;
                let outcome = match outcome {
                    W::Thawed => $crate::FreezeOutcome::Thawed,
                    W::Vetoed => $crate::FreezeOutcome::Vetoed,
                    W::FreezeFailed => $crate::FreezeOutcome::FreezeFailed,
                    W::Aborted => $crate::FreezeOutcome::Aborted,
                };
                let ctx = $crate::FreezeContext {
                    backup_id: ctx.backup_id,
                    mounts: ctx.mounts,
                    time_left_ms: ctx.time_left_ms,
                };
                <$impl as $crate::FreezeHook>::post_thaw(&ctx, outcome)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hvisd_impl_freeze_policy {
    ($adapter:ident, $impl:ty) => {
        impl exports::hyperv::integration::freeze_policy::Guest for $adapter {
            fn plan(
                mounts: Vec<exports::hyperv::integration::freeze_policy::Mount>,
            ) -> Result<Vec<String>, String> {
                let mounts: Vec<$crate::Mount> = mounts
                    .into_iter()
                    .map(|m| $crate::Mount {
                        path: m.path,
                        fs_type: m.fs_type,
                        device: m.device,
                    })
                    .collect();
                <$impl as $crate::FreezePolicy>::plan(&mounts)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hvisd_impl_hvsock_service {
    ($adapter:ident, $impl:ty) => {
        impl exports::hyperv::integration::hvsock_service::Guest for $adapter {
            fn serve(
                service: String,
                input: $crate::bindings::wasi::io::streams::InputStream,
                output: $crate::bindings::wasi::io::streams::OutputStream,
            ) -> Result<(), String> {
                <$impl as $crate::HvsockService>::serve(
                    &service,
                    $crate::Connection::new(input, output),
                )
            }
        }
    };
}

/// Exports a [`KvpProvider`] as the plugin's component (world `kvp-provider-plugin`).
#[macro_export]
macro_rules! export_kvp_provider {
    ($impl:ty) => {
        type __HvisdKvpProvider = $impl;
        #[doc(hidden)]
        mod __hvisd_export {
            $crate::__hvisd_generate!(basic "kvp-provider-plugin");
            struct Adapter;
            $crate::__hvisd_impl_kvp_provider!(Adapter, super::__HvisdKvpProvider);
            export!(Adapter);
        }
    };
}

/// Exports a [`FreezeHook`] as the plugin's component (world `freeze-hook-plugin`).
#[macro_export]
macro_rules! export_freeze_hook {
    ($impl:ty) => {
        type __HvisdFreezeHook = $impl;
        #[doc(hidden)]
        mod __hvisd_export {
            $crate::__hvisd_generate!(basic "freeze-hook-plugin");
            struct Adapter;
            $crate::__hvisd_impl_freeze_hook!(Adapter, super::__HvisdFreezeHook);
            export!(Adapter);
        }
    };
}

/// Exports a [`FreezePolicy`] as the plugin's component (world `freeze-policy-plugin`).
#[macro_export]
macro_rules! export_freeze_policy {
    ($impl:ty) => {
        type __HvisdFreezePolicy = $impl;
        #[doc(hidden)]
        mod __hvisd_export {
            $crate::__hvisd_generate!(basic "freeze-policy-plugin");
            struct Adapter;
            $crate::__hvisd_impl_freeze_policy!(Adapter, super::__HvisdFreezePolicy);
            export!(Adapter);
        }
    };
}

/// Exports an [`HvsockService`] as the plugin's component (world `hvsock-service-plugin`).
#[macro_export]
macro_rules! export_hvsock_service {
    ($impl:ty) => {
        type __HvisdHvsockService = $impl;
        #[doc(hidden)]
        mod __hvisd_export {
            $crate::__hvisd_generate!(streams "hvsock-service-plugin");
            struct Adapter;
            $crate::__hvisd_impl_hvsock_service!(Adapter, super::__HvisdHvsockService);
            export!(Adapter);
        }
    };
}

/// Exports a type implementing all four traits (world `full-plugin`).
#[macro_export]
macro_rules! export_full_plugin {
    ($impl:ty) => {
        type __HvisdFullPlugin = $impl;
        #[doc(hidden)]
        mod __hvisd_export {
            $crate::__hvisd_generate!(streams "full-plugin");
            struct Adapter;
            $crate::__hvisd_impl_kvp_provider!(Adapter, super::__HvisdFullPlugin);
            $crate::__hvisd_impl_freeze_hook!(Adapter, super::__HvisdFullPlugin);
            $crate::__hvisd_impl_freeze_policy!(Adapter, super::__HvisdFullPlugin);
            $crate::__hvisd_impl_hvsock_service!(Adapter, super::__HvisdFullPlugin);
            export!(Adapter);
        }
    };
}
