//! What a worker does to itself before it reads a byte of plugin code, in this order:
//!
//! 1. resource limits: no core dumps, a small descriptor table, an address-space cap, a task cap;
//! 2. a private network namespace (while still root: it needs `CAP_SYS_ADMIN`);
//! 3. `PR_SET_NO_NEW_PRIVS`;
//! 4. the unprivileged user and group, with no supplementary groups; switching every uid away
//!    from 0 clears the capability sets (checked);
//! 5. death with the core (`PR_SET_PDEATHSIG`, set after the switch, which clears it);
//! 6. Landlock: file-system access only beneath the granted directories (read-only or
//!    read-write as granted), no signals or abstract sockets outside the sandbox where the kernel
//!    supports scoping; a kernel without Landlock is reported (and refused if the core asks);
//! 7. seccomp: an allow-list of the system calls wasmtime, WASI and the worker loop use; anything
//!    else fails with `EPERM` (process creation, `execve`, `ptrace`, `kill`, sockets, `ioctl`...).
//!
//! The worker is single-threaded until all of this is done (checked), so the per-thread calls
//! (credentials, seccomp) cover the whole process and every thread started later inherits them.

use std::collections::BTreeMap;

use hvisd_protocol::worker::Init;
use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use rustix::process::{Resource, Rlimit};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// Descriptors a worker may hold beyond its grants: stdio, the control socket, the runtime's few,
/// and the files its plugin opens at once.
const BASE_NOFILE: u64 = 64;
/// Address space beyond the plugin's memory: the binary, its libraries, the runtime, thread and
/// fiber stacks, the loaded component's code.
const BASE_ADDRESS_SPACE: u64 = 1 << 30;
/// Address space of one hvsock connection's instance beyond its linear memory: its fiber stack.
const CONNECTION_STACK: u64 = 4 << 20;
/// Tasks of the worker user (threads count): a cap, not a budget; process creation is refused by
/// the seccomp filter anyway.
const MAX_TASKS: u64 = 512;

fn limit(resource: Resource, value: u64) -> Result<(), String> {
    rustix::process::setrlimit(
        resource,
        Rlimit {
            current: Some(value),
            maximum: Some(value),
        },
    )
    .map_err(|e| format!("setrlimit({resource:?}, {value}): {e}"))
}

/// Applies the whole confinement; returns a one-line account for the core's log and status, and
/// the grant descriptors (adopted here; they must stay open: the plugin reaches its directories
/// through them).
pub(super) fn confine(
    init: &Init,
    memory_mib: u32,
    connections: u32,
) -> Result<(String, Vec<std::os::fd::OwnedFd>), String> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .map_err(|e| format!("/proc/self/task: {e}"))?;
    if tasks != 1 {
        return Err(format!(
            "{tasks} threads before confinement; the worker must confine itself single-threaded"
        ));
    }
    let parent = rustix::process::getppid();
    let mut report = Vec::new();

    limit(Resource::Core, 0)?;
    // Each hvsock connection is one socket end in the worker, served by an instance of its own
    // (its linear memory and its fiber stack).
    limit(
        Resource::Nofile,
        BASE_NOFILE + init.dirs.len() as u64 + 2 * u64::from(connections),
    )?;
    limit(
        Resource::As,
        BASE_ADDRESS_SPACE
            + (4 + u64::from(connections)) * (u64::from(memory_mib) << 20)
            + u64::from(connections) * CONNECTION_STACK,
    )?;
    limit(Resource::Nproc, MAX_TASKS)?;

    let root = rustix::process::geteuid().is_root();
    if root {
        hvisd_sys::process::unshare_network()
            .map_err(|e| format!("a private network namespace: {e}"))?;
        report.push("network: private namespace".to_owned());
    } else {
        report.push("network: shared (the worker was not started as root)".to_owned());
    }

    rustix::thread::set_no_new_privs(true).map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;

    if root {
        if init.uid == 0 || init.gid == 0 {
            return Err("the worker user must not be root".into());
        }
        // The kernel's per-thread calls: this process has one thread (checked above).
        rustix::thread::set_thread_groups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        let gid = rustix::process::Gid::from_raw(init.gid);
        rustix::thread::set_thread_res_gid(gid, gid, gid)
            .map_err(|e| format!("setresgid({}): {e}", init.gid))?;
        let uid = rustix::process::Uid::from_raw(init.uid);
        rustix::thread::set_thread_res_uid(uid, uid, uid)
            .map_err(|e| format!("setresuid({}): {e}", init.uid))?;
        let effective = capabilities("CapEff")?;
        let permitted = capabilities("CapPrm")?;
        if effective != 0 || permitted != 0 {
            return Err(format!(
                "capabilities left after the switch to uid {}: effective {effective:#x}, permitted {permitted:#x}",
                init.uid
            ));
        }
        report.push(format!(
            "user: uid {} gid {}, no capabilities",
            init.uid, init.gid
        ));
    }

    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if rustix::process::getppid() != parent {
        return Err("the core exited while the worker started".into());
    }

    let mut grants = Vec::with_capacity(init.dirs.len());
    for d in &init.dirs {
        grants.push(
            hvisd_sys::process::adopt_inherited_fd(d.fd)
                .map_err(|e| format!("grant {}: descriptor {}: {e}", d.guest, d.fd))?,
        );
    }
    report.push(landlock(init, &grants)?);
    seccomp()?;
    report.push("seccomp: allow-list".to_owned());
    Ok((report.join("; "), grants))
}

/// A capability set of this process, from `/proc/self/status`.
fn capabilities(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}

fn landlock(init: &Init, grants: &[std::os::fd::OwnedFd]) -> Result<String, String> {
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| format!("landlock: {e}"))?;
    ruleset = ruleset
        .scope(Scope::from_all(abi))
        .map_err(|e| format!("landlock scopes: {e}"))?;
    let mut created = ruleset.create().map_err(|e| format!("landlock: {e}"))?;
    for (d, fd) in init.dirs.iter().zip(grants) {
        let access = if d.writable {
            AccessFs::from_all(abi)
        } else {
            AccessFs::from_read(abi)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| format!("landlock rule for {}: {e}", d.guest))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| format!("landlock: {e}"))?;
    let state = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)",
        RulesetStatus::NotEnforced => {
            if init.require_landlock {
                return Err("Landlock is not available on this kernel and is required".into());
            }
            "NOT ENFORCED: this kernel lacks Landlock; only seccomp and the user limit file access"
        }
    };
    Ok(format!("landlock: {state}"))
}

#[cfg(not(target_arch = "x86_64"))]
fn seccomp() -> Result<(), String> {
    Err("the worker's seccomp allow-list is written for x86_64 only".into())
}

/// The system calls a worker makes (wasmtime's runtime, WASI's files and clocks, the tokio
/// runtime, the control socket, thread creation).
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    // The FIN of an hvsock connection's stream (its socket end, from the core).
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_membarrier,
    libc::SYS_uname,
    // More filters (which can only narrow what is allowed): the clone3 filter below.
    libc::SYS_seccomp,
    // WASI files below the grants (Landlock decides which paths).
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_dup,
    libc::SYS_dup3,
    // wasmtime's copy-on-write memory images.
    libc::SYS_memfd_create,
];

#[cfg(target_arch = "x86_64")]
fn seccomp() -> Result<(), String> {
    let arg = |index, op, value| {
        SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
            .map_err(|e| format!("seccomp condition: {e}"))
    };
    let rule = |conditions: Vec<SeccompCondition>| {
        SeccompRule::new(conditions).map_err(|e| format!("seccomp rule: {e}"))
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Threads only: clone must carry CLONE_THREAD (a new process cannot be made). clone3 passes
    // its flags in memory, which a filter cannot read: it fails with EPERM and the C library
    // falls back to clone.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![arg(0, SeccompCmpOp::MaskedEq(thread), thread)?])?],
    );
    // fcntl for descriptor and status flags only (no locks on files it can reach, no
    // ownership tricks).
    rules.insert(
        libc::SYS_fcntl,
        [
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
            // Sealing wasmtime's memory images.
            libc::F_ADD_SEALS,
            libc::F_GET_SEALS,
        ]
        .iter()
        .map(|&cmd| rule(vec![arg(1, SeccompCmpOp::Eq, cmd as u64)?]))
        .collect::<Result<_, _>>()?,
    );
    // ioctl for non-blocking and close-on-exec flags only (the standard library's
    // `set_nonblocking`); FIFREEZE, terminal and device requests fail.
    rules.insert(
        libc::SYS_ioctl,
        [libc::FIONBIO, libc::FIOCLEX]
            .iter()
            .map(|&req| rule(vec![arg(1, SeccompCmpOp::Eq, req)?]))
            .collect::<Result<_, _>>()?,
    );
    // Signals to itself only (abort, wasmtime's trap handling): tgkill with our own tgid.
    let me = rustix::process::getpid().as_raw_nonzero().get() as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![arg(0, SeccompCmpOp::Eq, me)?])?],
    );
    // Thread names, and no-new-privileges (already set; installing a filter sets it again).
    rules.insert(
        libc::SYS_prctl,
        [
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_SET_NO_NEW_PRIVS,
        ]
        .iter()
        .map(|&op| rule(vec![arg(0, SeccompCmpOp::Eq, op as u64)?]))
        .collect::<Result<_, _>>()?,
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))?;
    // clone3 must fail with ENOSYS, not EPERM, for the C library to fall back to clone (which
    // the filter above can inspect). Filters stack and, between two errno results, the one
    // installed last decides: this second filter turns clone3's EPERM into ENOSYS.
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = clone3
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}
