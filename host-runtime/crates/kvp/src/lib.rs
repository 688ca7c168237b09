//! KVP: key/value exchange with the Hyper-V host.
//!
//! - [`core::KvpCore`]: the one operation core, answering requests in the daemon protocol's form
//!   exactly as `hv_kvp_daemon` does (its differences are listed there).
//! - [`vmbus::KvpService`]: the VMBus codec (an `IcService` for the shm and uio transports).
//! - [`kernel`]: the `/dev/vmbus/hv_kvp` daemon protocol (or a `SOCK_SEQPACKET` socket in tests).
//! - [`pool::PoolStore`]: the `.kvp_pool_N` files, safe alongside cloud-init's appends; [`store`]:
//!   the thread that owns them in the daemon.
//! - [`intrinsic`], [`ipinfo`]: the Auto-pool facts and the IP configuration operations.
//! - [`guest_keys`]: Guest-pool keys owned by plugins, with deadline, cache and last-good value.
//! - [`cli`]: `hvisd kvp list|get|set|delete`; [`bench`](mod@bench): `hvisd bench kvp`.
#![forbid(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
pub mod core;
pub mod guest_keys;
pub mod intrinsic;
pub mod ipinfo;
pub mod kernel;
pub mod pool;
pub mod script;
pub mod store;
pub mod vmbus;

pub use crate::core::{HostKvpEvent, KvpConfig, KvpCore, KvpOutcome};
pub use guest_keys::{GuestKeyOptions, GuestKeyProvider, GuestKeys};
pub use pool::{Change, PoolStore, Record, Records, Released, StoreError, StoreOptions};
pub use store::PoolHandle;
pub use vmbus::KvpService;
