//! The one wasmtime [`Engine`] every plugin runs in, and the epoch ticker that
//! gives every call its CPU deadline.
//!
//! The ticker advances the epoch only while a call (or an instantiation) is
//! in flight and sleeps parked otherwise, so an idle runtime spends no CPU on
//! it. That is enough for the deadlines: a store's deadline is set, in ticks
//! from the current epoch, just before each call, and wasm only runs inside
//! a call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine};

use crate::HostError;

/// How often the epoch advances while a call is in flight; the unit of every CPU deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Wasm stack cap: deep recursion traps with a stack overflow well before the host's stack.
pub(crate) const MAX_WASM_STACK: usize = 512 * 1024;

/// Builds the one engine every plugin runs in. The core compiles with it and the workers run with
/// it; any setting here that changes compiled code changes the artifacts' cache key.
///
/// Linear memories reserve no address space beyond what they use (explicit bounds checks instead
/// of multi-GiB guard reservations), so a worker's address space, which `RLIMIT_AS` caps, stays
/// close to what its plugin really uses.
pub fn build_engine() -> Result<Engine, HostError> {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + 1024 * 1024)
        .concurrency_support(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_reservation_for_growth(1 << 20)
        .guard_before_linear_memory(false)
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
    pub ticker: EpochTicker,
}

impl Sandbox {
    /// Builds the engine and starts its ticker.
    pub fn new() -> Result<Self, HostError> {
        let engine = build_engine()?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Sandbox { engine, ticker })
    }
}

/// Ticks the ticker goes on after the last call before it parks: back-to-back calls then find it
/// running instead of waking a thread each (about 100 wake-ups at the end of a burst, none while
/// idle).
const LINGER_TICKS: u32 = 100;

/// What the ticker thread and the calls share.
#[derive(Default)]
struct TickerState {
    /// Calls and instantiations running now.
    in_flight: AtomicUsize,
    /// Epoch increments so far.
    ticks: AtomicU64,
    stop: AtomicBool,
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while a call is in
/// flight (see [`EpochTicker::enter`]), until dropped.
pub(crate) struct EpochTicker {
    state: Arc<TickerState>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> Result<Self, HostError> {
        let state = Arc::new(TickerState::default());
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("hvisd-epoch".into())
            .spawn(move || {
                // Ticks in a row with no call in flight (it starts parked).
                let mut idle = LINGER_TICKS;
                while !shared.stop.load(Ordering::SeqCst) {
                    if shared.in_flight.load(Ordering::SeqCst) == 0 {
                        idle += 1;
                        if idle > LINGER_TICKS {
                            // `enter` unparks after making `in_flight` non-zero; an unpark that
                            // comes between the load and here makes this park return at once.
                            std::thread::park();
                            idle = 0;
                            continue;
                        }
                    } else {
                        idle = 0;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    shared.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| HostError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            state,
            thread: Some(thread),
        })
    }

    /// Marks a call in flight until the guard is dropped; the epoch advances
    /// while any guard lives. Cheap when the ticker is already running: one
    /// atomic increment (and a wake-up of the ticker when it was the first).
    pub fn enter(&self) -> InFlight<'_> {
        if self.state.in_flight.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(t) = &self.thread
        {
            t.thread().unpark();
        }
        InFlight(&self.state)
    }

    /// Epoch increments since the ticker started.
    pub fn ticks(&self) -> u64 {
        self.state.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A call in flight (see [`EpochTicker::enter`]).
pub(crate) struct InFlight<'a>(&'a TickerState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    #[test]
    fn the_ticker_ticks_only_while_a_call_is_in_flight() {
        let ticker = EpochTicker::start(build_engine().expect("engine")).expect("ticker");
        sleep(Duration::from_millis(20));
        let idle = ticker.ticks();
        sleep(Duration::from_millis(100));
        assert_eq!(
            ticker.ticks(),
            idle,
            "the epoch moved with no call in flight"
        );
        {
            let _one = ticker.enter();
            let _two = ticker.enter();
            // At least 5 ticks while calls are in flight (waiting longer on a loaded machine,
            // where the ticker thread may not be scheduled every millisecond).
            let started = std::time::Instant::now();
            while ticker.ticks() < idle + 5 && started.elapsed() < Duration::from_secs(5) {
                sleep(Duration::from_millis(10));
            }
        }
        let busy = ticker.ticks();
        assert!(
            busy >= idle + 5,
            "only {} ticks with calls in flight",
            busy - idle
        );
        // The ticker lingers for at most LINGER_TICKS, then parks: the count settles.
        let started = std::time::Instant::now();
        let mut after = ticker.ticks();
        loop {
            sleep(EPOCH_TICK * (LINGER_TICKS + 50));
            let now = ticker.ticks();
            if now == after || started.elapsed() > Duration::from_secs(10) {
                break;
            }
            after = now;
        }
        assert!(after <= busy + u64::from(LINGER_TICKS) + 2);
        sleep(Duration::from_millis(100));
        assert_eq!(
            ticker.ticks(),
            after,
            "the epoch moved after the calls ended"
        );
        // And it wakes again for the next call.
        let _again = ticker.enter();
        sleep(Duration::from_millis(20));
        assert!(ticker.ticks() > after);
    }
}
