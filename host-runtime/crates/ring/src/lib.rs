//! VMBus ring buffers (see `shared/specs/shm-transport.md`).
