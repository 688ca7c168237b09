//! The one wasmtime [`Engine`] every plugin runs in, and the epoch ticker that
//! gives every call its CPU deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine};

use crate::HostError;

/// How often the epoch advances; the unit of every CPU deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Wasm stack cap: deep recursion traps with a stack overflow well before the host's stack.
pub(crate) const MAX_WASM_STACK: usize = 512 * 1024;

/// Builds the one engine every plugin runs in.
pub fn build_engine() -> Result<Engine, HostError> {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + 1024 * 1024)
        .concurrency_support(false)
        .parallel_compilation(true);
    Engine::new(&c).map_err(|e| HostError::Engine(format!("{e:#}")))
}

/// The epoch deadline, in ticks, of a call allowed to run for `d`. One tick
/// more than `d` holds, since the first tick may come right after the call starts.
pub(crate) fn epoch_ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// The engine and its ticker: what every plugin's stores are made from.
pub(crate) struct Sandbox {
    pub engine: Engine,
    _ticker: EpochTicker,
}

impl Sandbox {
    /// Builds the engine and starts its ticker.
    pub fn new() -> Result<Self, HostError> {
        let engine = build_engine()?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Sandbox {
            engine,
            _ticker: ticker,
        })
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<Self, HostError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hvisd-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| HostError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
