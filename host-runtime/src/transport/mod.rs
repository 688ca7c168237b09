//! Transports: where channels come from. They map ring memory and obtain a doorbell; services never
//! see which transport carries them.

pub mod shm;
pub mod shm_host;
pub mod uio;
