//! Open-file-description record locks (`F_OFD_SETLK`, `F_OFD_GETLK`) on whole files.
//!
//! Classic POSIX record locks (`F_SETLK`) belong to the process and are all dropped when the
//! process closes *any* descriptor of the file, which a multi-threaded daemon cannot rule out.
//! OFD locks belong to the open file description: only closing that description releases them.
//! They conflict with classic locks taken by other processes, so `hv_kvp_daemon`-style writers
//! (classic `F_SETLKW`) and hvisd still exclude each other.

use std::os::fd::{AsFd, AsRawFd};

use rustix::io::Errno;

/// Shared (read) or exclusive (write) lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `F_RDLCK`.
    Shared,
    /// `F_WRLCK`.
    Exclusive,
}

/// A lock that stands in the way of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockHolder {
    /// Whether the conflicting lock is exclusive.
    pub exclusive: bool,
    /// The holder's pid for a classic POSIX lock; `None` for an OFD lock (the kernel does not
    /// say whose it is).
    pub pid: Option<i32>,
}

fn whole_file(l_type: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is plain integers; all-zero is a valid value (offset 0, length 0 = whole
    // file, pid 0 as F_OFD_* requires).
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = l_type;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

fn fcntl_flock(fd: impl AsFd, cmd: libc::c_int, l: &mut libc::flock) -> Result<(), Errno> {
    // SAFETY: `fd` is a live descriptor for the call; `l` is a valid flock the kernel reads (and
    // for F_OFD_GETLK writes). F_OFD_SETLK never blocks.
    let rc = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, l as *mut libc::flock) };
    if rc == -1 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(())
}

/// Tries to take `kind` on the whole file without waiting. `Ok(false)`: another lock conflicts.
pub fn try_lock(fd: impl AsFd, kind: LockKind) -> Result<bool, Errno> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    match fcntl_flock(
        fd,
        libc::F_OFD_SETLK,
        &mut whole_file(l_type as libc::c_short),
    ) {
        Ok(()) => Ok(true),
        Err(Errno::AGAIN) | Err(Errno::ACCESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases this description's lock on the whole file.
pub fn unlock(fd: impl AsFd) -> Result<(), Errno> {
    fcntl_flock(
        fd,
        libc::F_OFD_SETLK,
        &mut whole_file(libc::F_UNLCK as libc::c_short),
    )
}

/// The lock that would stop us taking `kind`, if any.
pub fn holder(fd: impl AsFd, kind: LockKind) -> Result<Option<LockHolder>, Errno> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    let mut l = whole_file(l_type as libc::c_short);
    fcntl_flock(fd, libc::F_OFD_GETLK, &mut l)?;
    if l.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(LockHolder {
        exclusive: l.l_type == libc::F_WRLCK as libc::c_short,
        pid: (l.l_pid > 0).then_some(l.l_pid),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptions_exclude_each_other_and_unlock_frees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(try_lock(&a, LockKind::Exclusive).unwrap());
        assert!(!try_lock(&b, LockKind::Shared).unwrap());
        let h = holder(&b, LockKind::Shared).unwrap().unwrap();
        assert!(h.exclusive);
        assert_eq!(h.pid, None, "an OFD holder has no pid");
        unlock(&a).unwrap();
        assert!(try_lock(&b, LockKind::Shared).unwrap());
        assert!(
            try_lock(&a, LockKind::Shared).unwrap(),
            "shared locks coexist"
        );
        assert_eq!(holder(&b, LockKind::Shared).unwrap(), None);
    }
}
