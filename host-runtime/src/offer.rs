//! The shm transport's `offer` file: its format lives in `hvisd-protocol` (pure, fuzzed).

pub use hvisd_protocol::shm_offer::*;
