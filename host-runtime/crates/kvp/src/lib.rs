//! KVP: key/value exchange with the host.
#![forbid(unsafe_code)]
