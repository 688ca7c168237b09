//! What a child process inherits from hvisd.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes every descriptor above 2 close-on-exec in the child just before it executes, so the
/// program starts with stdin, stdout and stderr only, whatever the daemon inherited from its own
/// parent without close-on-exec. (`CLOSE_RANGE_CLOEXEC` marks instead of closing, which keeps the
/// standard library's exec-error pipe working until the exec.)
pub fn inherit_only_stdio(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes one system call (close_range) and touches no lock, allocation or
    // Rust object shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let rc = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            // Kernels before 5.11 lack the flag (EINVAL) or the call (ENOSYS): the child then
            // inherits what the parent leaked, as before; nothing hvisd opens itself is leaked.
            let _ = rc;
            Ok(())
        });
    }
}

/// Gives the child exactly `fds` at the descriptor numbers paired with them (besides stdio), all
/// without close-on-exec; every other descriptor above 2 is close-on-exec in the child. The
/// descriptors are kept alive by the command until it is spawned.
pub fn inherit_fds(cmd: &mut Command, fds: Vec<(std::os::fd::OwnedFd, i32)>) {
    use std::os::fd::AsRawFd;
    let max_target = fds.iter().map(|(_, t)| *t).max().unwrap_or(2).max(2);
    let pairs: Vec<(i32, i32)> = fds.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (fcntl, dup2, close_range) on descriptor numbers computed
    // before the fork; it allocates nothing (`pairs` was built in the parent) and takes no lock.
    // `fds` moves into the closure, so the parent's descriptors stay open until the spawn.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_alive = &fds;
            // First lift every source above the targets, so that no dup2 below overwrites a
            // source another pair still needs.
            let mut lifted = [0i32; 64];
            if pairs.len() > lifted.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
            }
            for (i, &(src, _)) in pairs.iter().enumerate() {
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, max_target + 1);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lifted[i] = fd;
            }
            for (i, &(_, target)) in pairs.iter().enumerate() {
                // dup2 leaves the new descriptor without close-on-exec.
                if libc::dup2(lifted[i], target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let _ = libc::syscall(
                libc::SYS_close_range,
                (max_target + 1) as u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Takes ownership of a descriptor this process inherited at exec (a plugin worker's control
/// socket, artifact and grants), once per number, and makes it close-on-exec.
pub fn adopt_inherited_fd(fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    static ADOPTED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let mut adopted = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if fd < 3 || adopted.contains(&fd) {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only asks whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    adopted.push(fd);
    // SAFETY: the descriptor is open (checked above) and was inherited at exec: nothing else in
    // this process opened it, and the ADOPTED list makes sure it is adopted (owned) only once.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// The uid and gid of a user, from the system's user database (`getpwnam_r`).
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed passwd is a valid out-value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the out struct, the
    // buffer with its true length, and the result pointer. getpwnam_r is thread-safe.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

/// Moves the calling thread (the worker calls it while still single-threaded, so the process)
/// into a new, empty network namespace: no interface but a down loopback. Needs `CAP_SYS_ADMIN`.
pub fn unshare_network() -> std::io::Result<()> {
    // SAFETY: only CLONE_NEWNET: the descriptor table, memory and credentials are untouched, so
    // no Rust invariant about descriptors shared between threads can break (unshare_unsafe's
    // caveat concerns CLONE_FILES).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(std::io::Error::from)
}

/// Moves the calling process (it must still be single-threaded: the kernel refuses a new mount
/// namespace to a thread that shares its file-system context) into a private copy of the mount
/// namespace, with every mount's propagation made private: mounts made from now on by this
/// process and its children are invisible outside, and vanish with the last of them. Needs
/// `CAP_SYS_ADMIN`. For `hvisd sim` and `hvisd bench freeze`, which loop-mount images of their own.
pub fn unshare_mount_namespace() -> std::io::Result<()> {
    // SAFETY: only CLONE_NEWNS (which implies CLONE_FS): the descriptor table, memory and
    // credentials are untouched, so no Rust invariant about shared descriptors can break.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(std::io::Error::from)?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .map_err(std::io::Error::from)
}

/// Debug builds only (the compromised-worker test): `ptrace(PTRACE_ATTACH, pid)`.
#[cfg(debug_assertions)]
pub fn ptrace_attach(pid: rustix::process::Pid) -> std::io::Result<()> {
    // SAFETY: PTRACE_ATTACH takes no pointer arguments; it changes nothing in this process.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid.as_raw_nonzero().get(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Debug builds only (the compromised-worker test): creates a process with a plain `fork`, whose
/// child exits at once.
#[cfg(debug_assertions)]
pub fn fork_and_exit_child() -> std::io::Result<()> {
    // SAFETY: the child runs only `_exit`, which is async-signal-safe; nothing of the parent's
    // state (locks, allocator) is touched in it.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe { libc::_exit(0) },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_gets_exactly_the_descriptors_given_at_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::File::create(dir.path().join("a")).unwrap();
        let b = std::fs::File::create(dir.path().join("b")).unwrap();
        let _not_given = std::fs::File::create(dir.path().join("c")).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "ls -l /proc/self/fd"]);
        inherit_fds(&mut cmd, vec![(b.into(), 3), (a.into(), 4)]);
        let out = cmd.output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let target = |n: u32| {
            listing
                .lines()
                .find(|l| l.contains(&format!(" {n} -> ")))
                .map(|l| l.rsplit(" -> ").next().unwrap_or("").to_owned())
        };
        assert!(target(3).unwrap().ends_with("/b"), "{listing}");
        assert!(target(4).unwrap().ends_with("/a"), "{listing}");
        assert!(!listing.contains("/c"), "{listing}");
    }

    #[test]
    fn root_and_nobody_are_found() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-hvisd"), None);
    }
}
