//! The integration-component framework and the small IC services.
//!
//! - [`guest::IcGuest`] drives one channel from the guest side: framing, version negotiation
//!   ([`negotiate`]) and dispatch to an [`service::IcService`].
//! - [`host`] plays Hyper-V's side for the simulator and tests.
//! - [`heartbeat`], [`shutdown`] and [`timesync`] are the small services; KVP and VSS live in their
//!   own crates and implement the same trait.
//! - [`versions`] holds the version tables Linux guests negotiate with.
#![forbid(unsafe_code)]

pub mod guest;
pub mod heartbeat;
pub mod host;
pub mod negotiate;
pub mod service;
pub mod shutdown;
pub mod timesync;
pub mod versions;

pub use guest::{IcError, IcGuest, IcGuestStatus};
pub use negotiate::{NegotiateOutcome, Negotiated};
pub use service::{IcMessageInfo, IcService, IcServiceError, IcStatus};

#[cfg(test)]
mod tests;
