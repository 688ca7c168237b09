//! Hyper-V integration-component wire formats. No I/O here.
#![forbid(unsafe_code)]

pub mod fcopy;
pub mod guid;
pub mod hvsock;
pub mod ic;
pub mod kvp;
pub mod kvp_daemon;
pub mod mountinfo;
pub mod shm_offer;
pub mod text;
pub mod uio_sysfs;
pub mod vss;
pub mod worker;
