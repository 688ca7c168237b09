//! Store policy: what one plugin instance may see and use (its WASI context,
//! its memory and table limits) and how a call into it is bounded in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::CallError;
use crate::engine::{EpochTicker, MAX_WASM_STACK};
use crate::manifest::Access;
use crate::state::{HostState, PluginContext};
use crate::stdio::TracingStdio;
use crate::text::truncate;

/// Instances, tables and memories a component may create. Rust components use a handful of core
/// instances; a Python component (componentize-py: CPython, its libraries and adapters linked
/// as separate core modules sharing one memory) 38. The count is fixed by the component's
/// structure (nothing instantiates at run time), and memory stays capped by the one memory below.
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
/// One linear memory per instance, so the manifest's memory cap is the plugin's
/// whole heap (Rust wasm32-wasip2 components have exactly one).
const MAX_MEMORIES: usize = 1;
/// Table elements per table.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Live resources (streams, files, pollables) and component handles per instance.
const MAX_RESOURCES: usize = 1024;

/// A fresh store for one instance of the plugin of `ctx`: stdout and stderr
/// go to the log, no network, only the granted directories, the manifest's
/// memory cap, and a trap when the epoch deadline passes.
pub(crate) fn new_store(
    engine: &Engine,
    ctx: &Arc<PluginContext>,
) -> Result<Store<HostState>, CallError> {
    let m = &ctx.manifest;
    let memory_cap = m.limits.memory_mib as usize * 1024 * 1024;
    let mut b = WasiCtxBuilder::new();
    // Random bytes a plugin may ask for in one call: enough for any key, never a host-side
    // allocation its memory cap would not allow.
    b.max_random_size(memory_cap.min(1 << 20) as u64)
        .stdout(TracingStdio::new(&m.name, false))
        .stderr(TracingStdio::new(&m.name, true))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for d in &m.dirs {
        let perms = match d.access {
            Access::ReadOnly => FsPerms::ReadOnly,
            Access::ReadWrite => FsPerms::ReadWrite,
        };
        b.preopened_dir(&d.host, &d.guest, perms)
            .map_err(|e| CallError::Instantiate {
                plugin: m.name.clone(),
                message: format!("cannot open dir `{}`: {e:#}", d.host.display()),
            })?;
    }
    let limits = StoreLimitsBuilder::new()
        .memory_size(memory_cap)
        .table_elements(MAX_TABLE_ELEMENTS)
        .instances(MAX_INSTANCES)
        .tables(MAX_TABLES)
        .memories(MAX_MEMORIES)
        .trap_on_grow_failure(true)
        .build();
    let mut table = wasmtime::component::ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    let mut store = Store::new(
        engine,
        HostState {
            wasi: b.build(),
            table,
            limits,
            plugin: ctx.clone(),
        },
    );
    store.limiter(|s| &mut s.limits);
    // What one host call may make the host lift out of wasm (strings and lists whose entries all
    // alias one buffer count once per entry): never more than the plugin's own memory cap.
    store.set_hostcall_fuel(memory_cap.max(64 * 1024));
    store.set_max_component_handles(MAX_RESOURCES);
    store.epoch_deadline_trap();
    Ok(store)
}

/// Runs `fut` (a call into a store of `plugin`) under both deadlines: the
/// epoch deadline stops wasm that spins, the wall-clock timeout stops a call
/// that waits on the host. Either way the instance must be dropped. The call
/// counts as in flight for `ticker` until it ends or is cancelled.
pub(crate) async fn guarded<T>(
    ticker: &EpochTicker,
    plugin: &str,
    deadline: Duration,
    fut: impl Future<Output = wasmtime::Result<T>>,
) -> Result<T, CallError> {
    let _in_flight = ticker.enter();
    let start = Instant::now();
    let mut fut = std::pin::pin!(fut);
    // Most calls never wait on the host (a provider answering from memory),
    // so the first poll finishes them and no timer is armed; the epoch
    // deadline bounds the CPU time of that poll.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    let outcome = match first {
        std::task::Poll::Ready(r) => Ok(r),
        std::task::Poll::Pending => {
            let left = deadline.saturating_sub(start.elapsed());
            tokio::time::timeout(left, fut).await
        }
    };
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(plugin, deadline, e)),
        Err(_) => Err(CallError::Deadline {
            plugin: plugin.to_owned(),
            deadline_ms: deadline.as_millis() as u64,
        }),
    }
}

/// Turns a wasmtime error from a call into a [`CallError`] with a short,
/// readable message (the trap or root cause, and the innermost wasm function).
fn classify(plugin: &str, deadline: Duration, e: wasmtime::Error) -> CallError {
    let trap = e.downcast_ref::<Trap>().copied();
    if let Some(Trap::Interrupt) = trap {
        return CallError::Deadline {
            plugin: plugin.to_owned(),
            deadline_ms: deadline.as_millis() as u64,
        };
    }
    let mut message = match trap {
        Some(Trap::StackOverflow) => {
            format!(
                "stack overflow: the wasm stack cap is {} KiB",
                MAX_WASM_STACK / 1024
            )
        }
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    if let Some(bt) = e.downcast_ref::<wasmtime::WasmBacktrace>()
        && let Some(name) = bt.frames().first().and_then(|f| f.func_name())
    {
        message.push_str(&format!(" (in {})", truncate(name, 200)));
    }
    CallError::Trap {
        plugin: plugin.to_owned(),
        message: truncate(&message, 1024).to_owned(),
    }
}
