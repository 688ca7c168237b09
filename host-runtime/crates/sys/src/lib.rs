//! `hvisd-sys`: every `unsafe` block of hvisd, in one small crate.
//!
//! Every other crate of the workspace is `#![forbid(unsafe_code)]` and reaches the operating
//! system through safe APIs (rustix, std, tokio) or through this crate. Each `unsafe` block here
//! carries a `// SAFETY:` note; the modules are small enough to audit in one sitting:
//!
//! - [`mapping`]: `mmap` of ring memory shared with a peer, the `SIGBUS` guard that survives a
//!   peer truncating a mapped file, and copies that never lend a reference into memory the peer
//!   writes.
//! - [`async_fd`]: registering an owned descriptor with tokio's reactor.
//! - [`lock`]: open-file-description (`F_OFD_*`) record locks, with a non-blocking acquire and a
//!   query of the conflicting holder.
//! - [`freeze`]: the `FIFREEZE`/`FITHAW` ioctls.
//! - [`process`]: what a child inherits (only stdio).
//! - [`net`]: `getifaddrs`, `inet_ntop`, `getaddrinfo(AI_CANONNAME)`, as `hv_kvp_daemon` uses them.
//! - `wasm` (feature `wasm`): loading a precompiled plugin component (`.cwasm`), native code
//!   whose provenance the caller proves with a checked file.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod async_fd;
pub mod freeze;
pub mod lock;
pub mod mapping;
pub mod net;
pub mod process;
#[cfg(feature = "wasm")]
pub mod wasm;
