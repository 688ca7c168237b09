//! `FIFREEZE` and `FITHAW`: suspend and resume writes to a whole file system, given a descriptor
//! of its mount point (what `fsfreeze(8)` and `hv_vss_daemon` do).

use std::os::fd::{AsFd, AsRawFd};

use rustix::io::Errno;

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

fn ioctl_noarg(fd: impl AsFd, request: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: FIFREEZE and FITHAW take no argument the kernel dereferences (the int argument is
    // ignored); `fd` is live for the call.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), request as _, 0) };
    if rc == -1 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(())
}

/// Freezes the file system that `mount_point` (an open directory) belongs to. `EBUSY`: it is
/// already frozen; `EOPNOTSUPP`: the file system cannot be frozen (tmpfs, ...).
pub fn freeze(mount_point: impl AsFd) -> Result<(), Errno> {
    ioctl_noarg(mount_point, FIFREEZE)
}

/// Thaws it. `EINVAL`: it was not frozen.
pub fn thaw(mount_point: impl AsFd) -> Result<(), Errno> {
    ioctl_noarg(mount_point, FITHAW)
}
