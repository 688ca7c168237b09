//! Example freeze hook: asks an application to flush and hold its writes
//! around the freeze window.
//!
//! Before the freeze it writes the backup id to `/run/app/hold` (the
//! application watches that file, flushes and stops writing while it exists)
//! and records `app.backup.state = held` in the guest pool; after the thaw,
//! whatever the outcome, it removes the file and records `released`. If the
//! hold file cannot be written the backup is vetoed, since the application's
//! data would not be consistent.
//!
//! Manifest:
//!
//! ```toml
//! [[plugin]]
//! name = "flush-hold"
//! path = "/usr/lib/hvisd/plugins/flush_hold.wasm"
//! worlds = ["freeze-hook"]
//! [[plugin.dirs]]
//! host = "/run/myapp"
//! guest = "/run/app"
//! access = "read-write"
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["app.backup.*"]
//! access = "read-write"
//! ```

use hvisd_sdk::{FreezeContext, FreezeHook, FreezeOutcome, Pool, Value, kvp, log};

const HOLD: &str = "/run/app/hold";

struct FlushHold;

fn record(state: &str) {
    // The state key is informative; a store without a grant must not stop the backup.
    if let Err(e) = kvp::set(Pool::Guest, "app.backup.state", &Value::Text(state.into())) {
        log::debug(&format!("not recording backup state: {e:?}"));
    }
}

impl FreezeHook for FlushHold {
    fn pre_freeze(ctx: &FreezeContext) -> Result<(), String> {
        std::fs::write(HOLD, &ctx.backup_id)
            .map_err(|e| format!("cannot ask the application to hold ({HOLD}): {e}"))?;
        record("held");
        log::info(&format!(
            "holding the application for backup {} ({} mounts, {} ms left)",
            ctx.backup_id,
            ctx.mounts.len(),
            ctx.time_left_ms
        ));
        Ok(())
    }

    fn post_thaw(ctx: &FreezeContext, outcome: FreezeOutcome) {
        match std::fs::remove_file(HOLD) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::error(&format!("cannot release the application ({HOLD}): {e}")),
        }
        record("released");
        log::info(&format!(
            "released after backup {}: {outcome:?}",
            ctx.backup_id
        ));
    }
}

hvisd_sdk::export_freeze_hook!(FlushHold);
