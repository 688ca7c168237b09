//! hvisd: Hyper-V integration services for Linux guests.
