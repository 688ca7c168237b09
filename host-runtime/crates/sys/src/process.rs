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
