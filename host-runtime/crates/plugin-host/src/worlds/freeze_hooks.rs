//! The `freeze-hook` world: `pre-freeze` (which may veto) and `post-thaw`, in
//! priority order; one instance per hook per backup, from `pre-freeze` to
//! `post-thaw`, so a hook may keep state in its memory across the freeze.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::CallError;
use crate::lifecycle::{Plugin, PluginHost};
use crate::manifest::World;
use crate::state::bindings::exports::hyperv::integration::freeze_hooks;
use crate::text::truncate;

/// Context handed to freeze hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeContext {
    /// The host's backup id.
    pub backup_id: String,
    /// Mount points concerned, in freeze order.
    pub mounts: Vec<String>,
    /// When the whole freeze operation must be over; each hook's deadline is
    /// the smaller of this and its manifest's call deadline.
    pub deadline: Instant,
}

/// How a freeze window ended (told to every post-thaw hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FreezeOutcome {
    /// Frozen and thawed.
    Thawed,
    /// A pre-freeze hook vetoed.
    Vetoed,
    /// Freezing failed.
    FreezeFailed,
    /// The host aborted.
    Aborted,
}

/// Result of the pre-freeze round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PreFreeze {
    /// Every hook agreed.
    Proceed,
    /// A hook vetoed (or failed, which counts as a veto).
    Veto {
        /// The plugin.
        plugin: String,
        /// Its reason, or the failure.
        reason: String,
    },
}

impl From<FreezeOutcome> for freeze_hooks::FreezeOutcome {
    fn from(o: FreezeOutcome) -> Self {
        match o {
            FreezeOutcome::Thawed => freeze_hooks::FreezeOutcome::Thawed,
            FreezeOutcome::Vetoed => freeze_hooks::FreezeOutcome::Vetoed,
            FreezeOutcome::FreezeFailed => freeze_hooks::FreezeOutcome::FreezeFailed,
            FreezeOutcome::Aborted => freeze_hooks::FreezeOutcome::Aborted,
        }
    }
}

/// A hook's deadline: its manifest's call deadline, cut to what is left of the freeze.
fn hook_deadline(plugin: &Plugin, ctx: &FreezeContext) -> Duration {
    plugin
        .call_deadline()
        .min(ctx.deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(1))
}

/// The context as the hook sees it: the time it has left instead of an instant.
fn wit_ctx(ctx: &FreezeContext, deadline: Duration) -> freeze_hooks::FreezeContext {
    freeze_hooks::FreezeContext {
        backup_id: ctx.backup_id.clone(),
        mounts: ctx.mounts.clone(),
        time_left_ms: deadline.as_millis() as u64,
    }
}

/// One hook call: `pre-freeze`, or `post-thaw` with the outcome.
async fn call_hook(
    plugin: &Plugin,
    ctx: &FreezeContext,
    post_thaw: Option<FreezeOutcome>,
) -> Option<Result<Result<(), String>, CallError>> {
    let idx = plugin.exports.hooks.as_ref()?;
    let deadline = hook_deadline(plugin, ctx);
    let wctx = wit_ctx(ctx, deadline);
    Some(
        plugin
            .backup_call(
                &ctx.backup_id,
                deadline,
                post_thaw.is_none(),
                |s, i| idx.load(s, i),
                async |g: &freeze_hooks::Guest, s| match post_thaw {
                    None => g.call_pre_freeze(s, &wctx).await,
                    Some(outcome) => g.call_post_thaw(s, &wctx, outcome.into()).await.map(Ok),
                },
            )
            .await,
    )
}

impl PluginHost {
    /// Runs every freeze hook's `pre-freeze` in priority order, each in a
    /// fresh instance kept for its `post-thaw`. The first veto (or failure, or disabled hook) stops the round.
    pub async fn pre_freeze(&self, ctx: &FreezeContext) -> PreFreeze {
        for p in self.current().ordered(World::FreezeHook) {
            let reason = match call_hook(&p, ctx, None).await {
                None | Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(reason))) => truncate(&reason, 1024).to_owned(),
                Some(Err(e)) => format!("hook failed: {e}"),
            };
            tracing::warn!(
                plugin = p.name(),
                backup = ctx.backup_id,
                "pre-freeze veto: {reason}"
            );
            return PreFreeze::Veto {
                plugin: p.name().to_owned(),
                reason,
            };
        }
        PreFreeze::Proceed
    }

    /// Runs every freeze hook's `post-thaw`, in reverse priority order, each
    /// on the instance its `pre-freeze` left (or a fresh one); every hook runs
    /// whatever the others do. Returns the failures.
    pub async fn post_thaw(&self, ctx: &FreezeContext, outcome: FreezeOutcome) -> Vec<CallError> {
        let mut errors = Vec::new();
        for p in self.current().ordered(World::FreezeHook).into_iter().rev() {
            if let Some(Err(e)) = call_hook(&p, ctx, Some(outcome)).await {
                errors.push(e);
            }
        }
        errors
    }
}
