//! The shm transport's `offer` file: its format lives in `hvisd-protocol` (pure, fuzzed).

pub use hvisd_protocol::shm_offer::*;

use hvisd_protocol::guid::Guid;

/// A random (version 4) GUID: instance ids of simulated offers, endpoint ids of hvsock connects.
pub fn random_guid() -> Guid {
    let mut bytes = [0u8; 16];
    // getrandom(2) through rustix; without it, fall back to time, pid and a counter, which is
    // unique enough for ids on one root.
    if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).map(|n| n == 16)
        != Ok(true)
    {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes = (nanos ^ (u128::from(std::process::id()) << 64) ^ (u128::from(count) << 96))
            .to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Guid::from_bytes(bytes)
}
