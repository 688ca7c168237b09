//! What a plugin's store holds, the host side of every import, and the
//! linker that decides which imports exist at all.
//!
//! This is where a plugin's call reaches the runtime: every `kvp-store` and
//! `hvsock` call is checked against the manifest here before the runtime's
//! [`KvpStore`] or [`HvsockConnector`] is called.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use wasmtime::component::{HasData, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, StoreLimits};
use wasmtime_wasi::p2::pipe::{AsyncReadStream, AsyncWriteStream};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::manifest::PluginManifest;
use crate::text::{Escaped, truncate};
use crate::types::{CheckedKvp, KvpError, KvpStore, Pool, Value};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "hyperv:integration/full-plugin",
        imports: {
            "hyperv:integration/hvsock.connect": async,
            // The runtime's store answers through a future (see `KvpStore`).
            "hyperv:integration/kvp-store": async | tracing,
            default: tracing,
        },
        exports: { default: async },
        with: {
            "wasi:io": wasmtime_wasi::p2::bindings::io,
        },
        require_store_data_send: true,
    });
}

use bindings::hyperv::integration as wit;

/// A boxed reader half handed to or from a plugin.
pub type BoxedReader = Pin<Box<dyn tokio::io::AsyncRead + Send + Sync>>;
/// A boxed writer half handed to or from a plugin.
pub type BoxedWriter = Pin<Box<dyn tokio::io::AsyncWrite + Send + Sync>>;

/// What [`HvsockConnector::connect`] returns: a future of the connection's two halves.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(BoxedReader, BoxedWriter), KvpError>> + Send + 'a>>;

/// How the runtime opens an outbound hvsock connection for a plugin's
/// `hvsock.connect` (called only for services the manifest grants).
pub trait HvsockConnector: Send + Sync + 'static {
    /// Connects to `service`; returns the read and write halves.
    fn connect(&self, service: &str) -> ConnectFuture<'_>;
}

/// What every store of one plugin shares.
pub(crate) struct PluginContext {
    pub manifest: PluginManifest,
    pub kvp: Arc<dyn KvpStore>,
    pub hvsock: Option<Arc<dyn HvsockConnector>>,
}

/// The data of one plugin instance's store.
pub(crate) struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    pub plugin: Arc<PluginContext>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Longest log line kept from a plugin.
const MAX_LOG_BYTES: usize = 4096;

impl wit::types::Host for HostState {}

impl wit::logging::Host for HostState {
    fn log(&mut self, level: wit::logging::Level, message: String) {
        let plugin = self.plugin.manifest.name.as_str();
        let message = truncate(&message, MAX_LOG_BYTES);
        use wit::logging::Level;
        match level {
            Level::Trace => tracing::trace!(target: "hvisd::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "hvisd::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "hvisd::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "hvisd::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "hvisd::plugin", plugin, "{message}"),
        }
    }
}

impl From<wit::types::Pool> for Pool {
    fn from(p: wit::types::Pool) -> Self {
        use wit::types::Pool as W;
        match p {
            W::External => Pool::External,
            W::Guest => Pool::Guest,
            W::Auto => Pool::Auto,
            W::AutoExternal => Pool::AutoExternal,
            W::Internal => Pool::AutoInternal,
        }
    }
}

impl From<Pool> for wit::types::Pool {
    fn from(p: Pool) -> Self {
        use wit::types::Pool as W;
        match p {
            Pool::External => W::External,
            Pool::Guest => W::Guest,
            Pool::Auto => W::Auto,
            Pool::AutoExternal => W::AutoExternal,
            Pool::AutoInternal => W::Internal,
        }
    }
}

impl From<wit::types::Value> for Value {
    fn from(v: wit::types::Value) -> Self {
        match v {
            wit::types::Value::Text(s) => Value::Text(s),
            wit::types::Value::U32(n) => Value::U32(n),
            wit::types::Value::U64(n) => Value::U64(n),
        }
    }
}

impl From<Value> for wit::types::Value {
    fn from(v: Value) -> Self {
        match v {
            Value::Text(s) => wit::types::Value::Text(s),
            Value::U32(n) => wit::types::Value::U32(n),
            Value::U64(n) => wit::types::Value::U64(n),
        }
    }
}

impl From<wit::types::Error> for KvpError {
    fn from(e: wit::types::Error) -> Self {
        use wit::types::Error as W;
        match e {
            W::NotFound(s) => KvpError::NotFound(s),
            W::Denied(s) => KvpError::Denied(s),
            W::Invalid(s) => KvpError::Invalid(s),
            W::Unavailable(s) => KvpError::Unavailable(s),
            W::Failed(s) => KvpError::Failed(s),
        }
    }
}

impl From<KvpError> for wit::types::Error {
    fn from(e: KvpError) -> Self {
        use wit::types::Error as W;
        match e {
            KvpError::NotFound(s) => W::NotFound(s),
            KvpError::Denied(s) => W::Denied(s),
            KvpError::Invalid(s) => W::Invalid(s),
            KvpError::Unavailable(s) => W::Unavailable(s),
            KvpError::Failed(s) => W::Failed(s),
        }
    }
}

impl HostState {
    fn kvp(&self) -> CheckedKvp<'_> {
        CheckedKvp {
            manifest: &self.plugin.manifest,
            store: &*self.plugin.kvp,
        }
    }
}

impl wit::kvp_store::Host for HostState {
    async fn get(
        &mut self,
        pool: wit::types::Pool,
        key: String,
    ) -> Result<Option<wit::types::Value>, wit::types::Error> {
        Ok(self.kvp().get(pool.into(), key).await?.map(Into::into))
    }

    async fn set(
        &mut self,
        pool: wit::types::Pool,
        key: String,
        value: wit::types::Value,
    ) -> Result<(), wit::types::Error> {
        Ok(self.kvp().set(pool.into(), key, value.into()).await?)
    }

    async fn delete(
        &mut self,
        pool: wit::types::Pool,
        key: String,
    ) -> Result<bool, wit::types::Error> {
        Ok(self.kvp().delete(pool.into(), key).await?)
    }

    async fn list(
        &mut self,
        pool: wit::types::Pool,
        prefix: String,
    ) -> Result<Vec<String>, wit::types::Error> {
        Ok(self.kvp().list(pool.into(), &prefix).await?)
    }
}

impl wit::hvsock::Host for HostState {
    async fn connect(
        &mut self,
        service: String,
    ) -> Result<(Resource<DynInputStream>, Resource<DynOutputStream>), wit::types::Error> {
        let m = &self.plugin.manifest;
        if !m.hvsock.connect.contains(&service) {
            return Err(KvpError::Denied(format!(
                "plugin `{}` may not connect to hvsock service `{}`; add it to hvsock.connect",
                m.name,
                Escaped(&service)
            ))
            .into());
        }
        let Some(connector) = self.plugin.hvsock.clone() else {
            return Err(
                KvpError::Unavailable("hvsock is not available in this runtime".into()).into(),
            );
        };
        let (r, w) = connector.connect(&service).await?;
        push_streams(&mut self.table, r, w)
            .map_err(|e| KvpError::Failed(format!("resource table: {e}")).into())
    }
}

/// Puts a connection's halves into the table as wasi:io streams.
pub(crate) fn push_streams(
    table: &mut ResourceTable,
    r: BoxedReader,
    w: BoxedWriter,
) -> Result<
    (Resource<DynInputStream>, Resource<DynOutputStream>),
    wasmtime::component::ResourceTableError,
> {
    let input: DynInputStream = Box::new(AsyncReadStream::new(r));
    let output: DynOutputStream = Box::new(AsyncWriteStream::new(64 * 1024, w));
    let input = table.push(input)?;
    let output = table.push(output)?;
    Ok((input, output))
}

struct Io;
impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

/// The one linker: the hvisd imports plus the WASI interfaces a sandboxed
/// plugin may use. `wasi:sockets` is deliberately absent, so a component that
/// imports it is refused at load.
pub(crate) fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::clocks::WasiClocks;
    use wasmtime_wasi::filesystem::WasiFilesystem;
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, io, random};
    use wasmtime_wasi::random::WasiRandom;

    let mut l = Linker::<HostState>::new(engine);
    io::error::add_to_linker::<HostState, Io>(&mut l, |t| &mut t.table)?;
    io::poll::add_to_linker::<HostState, Io>(&mut l, |t| &mut t.table)?;
    io::streams::add_to_linker::<HostState, Io>(&mut l, |t| &mut t.table)?;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(&mut l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, WasiClocks>(&mut l, HostState::clocks)?;
    random::random::add_to_linker::<HostState, WasiRandom>(&mut l, |t| t.wasi.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(&mut l, |t| t.wasi.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(&mut l, |t| t.wasi.random())?;
    cli::exit::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
    filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(
        &mut l,
        HostState::filesystem,
    )?;
    filesystem::types::add_to_linker::<HostState, WasiFilesystem>(&mut l, HostState::filesystem)?;
    wit::types::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    wit::logging::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    wit::kvp_store::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    wit::hvsock::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    Ok(l)
}

use wasmtime_wasi::cli::WasiCliView as _;
use wasmtime_wasi::clocks::WasiClocksView as _;
use wasmtime_wasi::filesystem::WasiFilesystemView as _;
