//! A freeze hook that does nothing: `pre-freeze` agrees, `post-thaw` returns. What
//! `hvisd bench freeze` measures as "one no-op hook" (the cost of the hook machinery itself).
//!
//! ```toml
//! [[plugin]]
//! name = "noop-hook"
//! path = "plugins/target/wasm32-wasip2/release/noop_hook.wasm"
//! worlds = ["freeze-hook"]
//! ```

use hvisd_sdk::{FreezeContext, FreezeHook, FreezeOutcome};

struct NoopHook;

impl FreezeHook for NoopHook {
    fn pre_freeze(_ctx: &FreezeContext) -> Result<(), String> {
        Ok(())
    }

    fn post_thaw(_ctx: &FreezeContext, _outcome: FreezeOutcome) {}
}

hvisd_sdk::export_freeze_hook!(NoopHook);
