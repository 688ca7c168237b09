//! One module per plugin world: the calls the runtime makes into plugins of
//! that world, what each passes in and gets out, and the checks on the answer.
//!
//! The instances the calls run on, and their limits, come from
//! [`crate::instance`]; nothing here holds a store across calls.

pub mod freeze_hooks;
pub mod freeze_policy;
pub mod hvsock_service;
pub mod kvp_provider;
