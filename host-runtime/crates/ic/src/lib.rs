//! The integration-component framework and the small IC services.
#![forbid(unsafe_code)]

pub mod service;
