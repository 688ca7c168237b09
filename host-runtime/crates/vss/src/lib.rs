//! VSS freeze planning: which file systems a Hyper-V backup freezes, in which order, and why every
//! other mount is left alone. Pure logic over a mount table; the only I/O is [`system`], which
//! reads `/proc/self/mountinfo` and asks sysfs about loop devices.
//!
//! - [`Mount`]: one mount-table entry, built from [`hvisd_protocol::mountinfo::MountInfo`].
//! - [`VssPolicy`]: the `[vss]` configuration section (serde); [`VssPolicy::compile`] checks it.
//! - [`plan()`]: `hv_vss_daemon`'s selection (or none), the policy's include/exclude/order and
//!   `allow_only`, one freeze per file system, `/` last. [`Plan`] prints for operators and
//!   serialises to JSON.
//! - [`narrow`]: a freeze-policy plugin's answer may drop and reorder, never add.
//!
//! Nothing here freezes anything: the service hands the plan's mount points to `FIFREEZE` in
//! `hvisd-sys`, in order, and thaws in reverse.
#![forbid(unsafe_code)]

pub mod mount;
pub mod plan;
pub mod policy;
pub mod system;

pub use mount::Mount;
pub use plan::{Plan, Planned, PolicyPluginError, Selection, SkipReason, Skipped, narrow, plan};
pub use policy::{CompiledPolicy, FreezeOrder, MountSelector, PolicyError, VssPolicy};
