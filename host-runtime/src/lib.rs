//! hvisd: Hyper-V integration services for Linux guests.
//!
//! Where a byte from the host goes: a transport ([`transport`]) maps the ring memory and obtains a
//! doorbell; [`channel`] moves whole packets over `hvisd-ring`; [`services`] hands each packet to the
//! IC framework (`hvisd-ic`) and a service (heartbeat, shutdown, timesync, KVP); replies travel back
//! the same way. hvsock pipes (`pipe=byte` offers) become byte streams ([`hvsock`]) handed to an
//! acceptor. [`sim`] plays the host for tests and demos.
#![forbid(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod channel;
pub mod cli_output;
pub mod config;
pub mod control;
pub mod doorbell;
pub mod fcopy;
pub mod hvsock;
pub mod log_format;
pub mod log_gate;
pub mod offer;
pub mod plugins;
pub mod runtime;
pub mod sd_notify;
pub mod service_kind;
pub mod services;
pub mod sim;
pub mod transport;
pub mod vss;
