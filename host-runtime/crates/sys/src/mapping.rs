//! Memory shared with a peer that may be hostile: the shm transport's `ring` file, `/dev/uioN`
//! map 0, or an anonymous mapping shared between threads.
//!
//! # Nothing is lent out
//! The peer can write any byte of the mapping at any moment. Rust references to such memory
//! would promise the compiler that the bytes do not change under them, so none is handed out:
//! data moves only through [`SharedMapping::read`] and [`SharedMapping::write`], which copy
//! with an opaque instruction sequence the compiler can neither split, merge nor re-read
//! (`rep movsb` in inline assembly on x86_64; relaxed atomic word copies elsewhere), and the
//! control words are reached only as atomics ([`SharedMapping::control_page`]). Linux copies
//! VMBus packets out of the ring for the same reason since hostile hosts became part of its
//! threat model; OpenVMM's `vmbus_ring` reads guest memory the same way.
//!
//! # Surviving a truncated file (`SIGBUS`)
//! A `MAP_SHARED` mapping of a regular file raises `SIGBUS` when a page past the file's end is
//! touched, which happens as soon as a peer truncates the file we mapped. The shm spec requires
//! each side to survive that: only the channel concerned closes. The choice between the two
//! usual answers:
//!
//! - a sealed memfd (`F_SEAL_SHRINK`) cannot be truncated at all, but the spec makes the host
//!   create `ring` as a regular file in its root, and a guest cannot seal a file it did not
//!   create;
//! - a `SIGBUS` handler that recognises the faulting address as one of our guarded mappings,
//!   maps anonymous zero pages over the whole mapping (`MAP_FIXED`) and marks it broken, as
//!   libwayland's `wl_shm` does. The faulting instruction then re-runs against zeros, and the
//!   channel layer, which checks [`SharedMapping::is_broken`] before acting on anything it read,
//!   closes the channel.
//!
//! The second is the only one that works with the spec, so file mappings are guarded. The
//! handler is installed once, chains to whatever handler was installed before it (wasmtime
//! installs one for its own traps), and for a fault outside our mappings restores the default
//! action so the process dies exactly as it would have without us.

use std::ffi::c_void;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// Size of a page, the granule of mappings and of control pages.
pub const PAGE_SIZE: usize = 4096;

/// How many file mappings can be guarded at once. Each open shm or uio channel holds one; the
/// runtime caps open channels well below this.
pub const MAX_GUARDED_MAPPINGS: usize = 1024;

/// Why a mapping could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A zero-length mapping was asked for.
    #[error("a mapping of 0 bytes was asked for")]
    Empty,
    /// The file is shorter than the mapping (touching the tail would fault).
    #[error("file to map is {file_len} bytes, shorter than the {len} bytes to map")]
    FileTooShort {
        /// Size reported by fstat.
        file_len: u64,
        /// Bytes the caller wanted to map.
        len: usize,
    },
    /// Every guard slot is in use.
    #[error("{MAX_GUARDED_MAPPINGS} file mappings are already open; refusing another")]
    TooManyMappings,
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// Which call.
        call: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
}

/// A `MAP_SHARED` read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
    /// The guard slot of a file mapping (anonymous mappings cannot fault this way).
    guard: Option<usize>,
}

// SAFETY: the mapping is plain memory owned by this value for its whole life; every access goes
// through atomics or opaque copies, whose concurrent use is the ring protocol's business and
// never a Rust reference to non-atomic data.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: `&SharedMapping` only offers copies and atomics.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `[0, len)` of `fd` shared and read-write: the shm transport's `ring` file, or map 0
    /// of `/dev/uioN`. A regular file shorter than `len` is refused; a regular file is guarded
    /// against later truncation (see the module docs).
    pub fn map_file(fd: impl AsFd, len: usize) -> Result<Arc<Self>, MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        let stat = rustix::fs::fstat(&fd).map_err(|source| MapError::Os {
            call: "fstat of the file to map",
            source,
        })?;
        let is_regular = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file();
        if is_regular && (stat.st_size as u64) < len as u64 {
            return Err(MapError::FileTooShort {
                file_len: stat.st_size as u64,
                len,
            });
        }
        // Claim the guard slot first: a mapping that could fault must never exist unguarded.
        let guard = if is_regular {
            install_handler()?;
            Some(claim_slot().ok_or(MapError::TooManyMappings)?)
        } else {
            None
        };
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust object. Its
        // lifetime is tied to the returned value, which unmaps it on drop.
        let mapped = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        };
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(source) => {
                if let Some(slot) = guard {
                    release_slot(slot);
                }
                return Err(MapError::Os {
                    call: "mmap of the ring file",
                    source,
                });
            }
        };
        if let Some(slot) = guard {
            publish_slot(slot, ptr as usize, len);
        }
        Self::from_raw(ptr, len, guard)
    }

    /// A zero-filled `MAP_SHARED | MAP_ANONYMOUS` mapping (tests, benchmarks; shared with
    /// threads, or with children after fork).
    pub fn anonymous(len: usize) -> Result<Arc<Self>, MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        // SAFETY: as in `map_file`: new memory, owned by the returned value.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )
        }
        .map_err(|source| MapError::Os {
            call: "anonymous mmap",
            source,
        })?;
        Self::from_raw(ptr, len, None)
    }

    fn from_raw(ptr: *mut c_void, len: usize, guard: Option<usize>) -> Result<Arc<Self>, MapError> {
        // Without MAP_FIXED the kernel never places a mapping at address 0; should it ever,
        // refusing (and leaking that mapping) beats building a null NonNull.
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            if let Some(slot) = guard {
                release_slot(slot);
            }
            return Err(MapError::Os {
                call: "mmap (returned address 0)",
                source: Errno::FAULT,
            });
        };
        Ok(Arc::new(Self { ptr, len, guard }))
    }

    /// Length of the mapping in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused at creation.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a `SIGBUS` hit this mapping (the peer truncated the file): its memory is now
    /// private zero pages and nothing read from it since means anything. Check it after reading
    /// and before acting on what was read.
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.guard
            .is_some_and(|slot| GUARDS[slot].broken.load(Ordering::Acquire))
    }

    /// The 1024 little-endian `u32` words of the page at `offset` (a ring's control page).
    ///
    /// # Panics
    /// If `offset` is not page-aligned or the page is not inside the mapping: callers compute
    /// offsets from validated ring sizes, so this is a bug of the caller, never peer input.
    #[inline]
    pub fn control_page(&self, offset: usize) -> &[AtomicU32; 1024] {
        if !offset.is_multiple_of(PAGE_SIZE) || offset > self.len || PAGE_SIZE > self.len - offset {
            out_of_range(offset, PAGE_SIZE, self.len);
        }
        // SAFETY: the page is inside the mapping (checked above) and page-aligned, so it is 4096
        // bytes aligned for u32. AtomicU32 has the size and alignment of u32 and every bit
        // pattern is valid, so any bytes the peer writes are valid atomics; the peer uses
        // atomic (aligned word) accesses by protocol, and a peer that does not can only confuse
        // itself. The borrow is tied to `self`, which keeps the mapping alive; after a SIGBUS the
        // addresses stay mapped (zero pages).
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<[AtomicU32; 1024]>() }
    }

    #[inline]
    fn check_range(&self, offset: usize, len: usize) {
        if offset > self.len || len > self.len - offset {
            out_of_range(offset, len, self.len);
        }
    }

    #[inline]
    fn check_word(&self, offset: usize) {
        if !offset.is_multiple_of(8) || offset > self.len || 8 > self.len - offset {
            out_of_range(offset, 8, self.len);
        }
    }

    /// The 8-aligned little-endian `u64` at `offset`, read with one atomic load (ring
    /// descriptors and trailers).
    ///
    /// # Panics
    /// If `offset` is not 8-aligned or the word leaves the mapping.
    #[inline]
    pub fn load_u64(&self, offset: usize) -> u64 {
        self.check_word(offset);
        // SAFETY: inside the mapping and 8-aligned (checked above); an AtomicU64 may alias memory
        // the peer writes, and any bit pattern is a valid u64.
        let word = unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() };
        u64::from_le(word.load(Ordering::Relaxed))
    }

    /// Stores `value` little-endian at the 8-aligned `offset` with one atomic store.
    ///
    /// # Panics
    /// As [`SharedMapping::load_u64`].
    #[inline]
    pub fn store_u64(&self, offset: usize, value: u64) {
        self.check_word(offset);
        // SAFETY: as in `load_u64`.
        let word = unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() };
        word.store(value.to_le(), Ordering::Relaxed);
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping.
    ///
    /// # Panics
    /// If the range leaves the mapping (a caller's bug: the ring code checks every range against
    /// validated indices first).
    #[inline]
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        // SAFETY: the source range is inside the mapping (checked above), which lives as long as
        // `self`; `dst` is a Rust buffer that cannot overlap memory we mapped ourselves (no Rust
        // reference into the mapping is ever created).
        unsafe { copy_from_shared(self.ptr.as_ptr().add(offset), dst) }
    }

    /// Copies `src` into the mapping at `offset`.
    ///
    /// # Panics
    /// If the range leaves the mapping.
    #[inline]
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.check_range(offset, src.len());
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { copy_to_shared(src, self.ptr.as_ptr().add(offset)) }
    }
}

/// The one panic of this module, out of line so the checks on the copy paths stay a compare
/// and a branch: callers compute every range from validated indices, so reaching this is a bug
/// of the caller, never something a peer can cause.
#[cold]
#[inline(never)]
fn out_of_range(offset: usize, len: usize, map_len: usize) -> ! {
    panic!("access [{offset:#x}, +{len:#x}) outside the {map_len:#x}-byte mapping (or misaligned)")
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the addresses may be reused by anything.
        if let Some(slot) = self.guard {
            release_slot(slot);
        }
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else unmaps them; no
        // borrow of the memory outlives `self` (control_page borrows are tied to it).
        let result = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        // munmap of our own valid mapping cannot fail; if it somehow did, leaking the mapping is
        // the only safe outcome.
        let _ = result;
    }
}

/// Copies out of shared memory.
///
/// # Safety
/// `src..src + dst.len()` must be mapped for the duration of the call.
#[inline]
unsafe fn copy_from_shared(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    if len <= SMALL_COPY && (src as usize).is_multiple_of(8) && len.is_multiple_of(8) {
        let out = dst.as_mut_ptr();
        for i in 0..len / 8 {
            // SAFETY: `src + 8i` is inside the source range and 8-aligned (checked above), and an
            // AtomicU64 may alias memory another party writes; `out + 8i` is inside `dst`, a Rust
            // buffer, written unaligned.
            unsafe {
                let word = (*src.add(8 * i).cast::<AtomicU64>()).load(Ordering::Relaxed);
                out.add(8 * i).cast::<u64>().write_unaligned(word);
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller; `dst` is valid for `len` bytes of writes.
    unsafe { opaque_copy(src, dst.as_mut_ptr(), len) }
}

/// Copies into shared memory.
///
/// # Safety
/// `dst..dst + src.len()` must be mapped for the duration of the call.
#[inline]
unsafe fn copy_to_shared(src: &[u8], dst: *mut u8) {
    let len = src.len();
    if len <= SMALL_COPY && (dst as usize).is_multiple_of(8) && len.is_multiple_of(8) {
        let from = src.as_ptr();
        for i in 0..len / 8 {
            // SAFETY: as in `copy_from_shared`, with the roles swapped.
            unsafe {
                let word = from.add(8 * i).cast::<u64>().read_unaligned();
                (*dst.add(8 * i).cast::<AtomicU64>()).store(word, Ordering::Relaxed);
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller; `src` is valid for `len` bytes of reads.
    unsafe { opaque_copy(src.as_ptr(), dst, len) }
}

/// Copies of at most this many bytes (whole, aligned words) use atomic word accesses: a
/// descriptor or trailer costs two or one plain moves instead of a string instruction's start-up.
const SMALL_COPY: usize = 256;

/// A copy the compiler treats as opaque: it cannot assume the source stays unchanged, split the
/// copy, merge it with another access, or read the source twice.
///
/// # Safety
/// Both ranges must be valid for `len` bytes and must not overlap.
#[inline]
unsafe fn opaque_copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rep movsb` copies rcx bytes from [rsi] to [rdi] with the direction flag clear,
    // which the Rust ABI guarantees on entry to any code. Both ranges are valid (caller), it
    // touches no stack and no flags.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::atomic::AtomicU8;
        for i in 0..len {
            // SAFETY: both bytes are inside their ranges (caller); byte atomics may alias
            // memory another party writes.
            unsafe {
                let b = (*src.add(i).cast::<AtomicU8>()).load(Ordering::Relaxed);
                (*dst.add(i).cast::<AtomicU8>()).store(b, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The SIGBUS guard.

struct GuardSlot {
    /// Claimed by a mapping (set before `start`/`len`, cleared after them).
    claimed: AtomicBool,
    start: AtomicUsize,
    /// 0 while the slot holds no live range.
    len: AtomicUsize,
    /// Set by the handler after it replaced the range with zero pages.
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initialiser needs a const item
const EMPTY_SLOT: GuardSlot = GuardSlot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    broken: AtomicBool::new(false),
};

/// The handler reads this table; it takes no lock and allocates nothing (async-signal-safe).
static GUARDS: [GuardSlot; MAX_GUARDED_MAPPINGS] = [EMPTY_SLOT; MAX_GUARDED_MAPPINGS];

fn claim_slot() -> Option<usize> {
    GUARDS
        .iter()
        .position(|s| {
            s.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
        .inspect(|&i| GUARDS[i].broken.store(false, Ordering::Release))
}

fn publish_slot(slot: usize, start: usize, len: usize) {
    let s = &GUARDS[slot];
    s.start.store(start, Ordering::Release);
    // `len` last: the handler ignores a slot until it is non-zero.
    s.len.store(len, Ordering::Release);
}

fn release_slot(slot: usize) {
    let s = &GUARDS[slot];
    s.len.store(0, Ordering::Release);
    s.start.store(0, Ordering::Release);
    s.claimed.store(false, Ordering::Release);
}

/// Number of guarded mappings now (for diagnostics and tests).
pub fn guarded_mappings() -> usize {
    GUARDS
        .iter()
        .filter(|s| s.len.load(Ordering::Acquire) != 0)
        .count()
}

/// The handler that was installed before ours, called for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
static INSTALL_FAILED: AtomicBool = AtomicBool::new(false);

fn install_handler() -> Result<(), MapError> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "default action, empty mask" value; the fields
        // we need are set below before it is installed.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: `sa_mask` is a valid sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: zeroed is a valid out-value for the previous action.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call. The handler is an `extern "C"` function
        // with the SA_SIGINFO signature and only does async-signal-safe work.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) };
        if rc != 0 {
            INSTALL_FAILED.store(true, Ordering::Release);
            return;
        }
        let _ = PREVIOUS.set(previous);
    });
    if INSTALL_FAILED.load(Ordering::Acquire) {
        return Err(MapError::Os {
            call: "sigaction(SIGBUS) for the ring guard",
            source: Errno::INVAL,
        });
    }
    Ok(())
}

/// The slot whose live range contains `addr`, read without locks.
fn find_slot(addr: usize) -> Option<(usize, usize, &'static GuardSlot)> {
    for slot in &GUARDS {
        let len = slot.len.load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        // Re-read `len`: a slot released and re-claimed between the two loads is skipped rather
        // than matched with a stale start.
        if addr.wrapping_sub(start) < len && slot.len.load(Ordering::Acquire) == len {
            return Some((start, len, slot));
        }
    }
    None
}

extern "C" fn on_sigbus(signum: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((start, len, slot)) = find_slot(addr) {
        // SAFETY: `[start, start + len)` is a live mapping of ours (the faulting thread is
        // accessing it, so its owner has not dropped it). Replacing it in place with private
        // anonymous zero pages of the same protection keeps every address valid; no Rust
        // reference to non-atomic data exists into it (see the module docs). mmap is a plain
        // system call, safe to make in a signal handler.
        let p = unsafe {
            libc::mmap(
                start as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            slot.broken.store(true, Ordering::Release);
            // Returning re-runs the faulting access, now against zeros.
            return;
        }
    }
    chain(signum, info, context);
}

/// Not our fault: hand it to the previous handler, or let the default action kill the process.
fn chain(signum: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    if let Some(prev) = PREVIOUS.get() {
        let handler = prev.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; it was installed as one.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(signum, info, context);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(signum);
            }
            return;
        }
    }
    // SAFETY: resetting SIGBUS to its default action with a zeroed (empty-mask) sigaction;
    // sigaction is async-signal-safe. The access faults again on return and the default action
    // (terminate with a core dump) runs, as if we had never been installed.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_mapping_is_shared_with_the_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 2 * PAGE_SIZE]).unwrap();
        let map = SharedMapping::map_file(&file, 2 * PAGE_SIZE).unwrap();
        map.control_page(0)[1].store(0x1122_3344, Ordering::SeqCst);
        map.write(PAGE_SIZE + 8, b"hello, ring");
        let again = SharedMapping::map_file(&file, 2 * PAGE_SIZE).unwrap();
        assert_eq!(again.control_page(0)[1].load(Ordering::SeqCst), 0x1122_3344);
        let mut buf = [0u8; 11];
        again.read(PAGE_SIZE + 8, &mut buf);
        assert_eq!(&buf, b"hello, ring");
    }

    #[test]
    fn copies_of_every_length_and_alignment_round_trip() {
        let map = SharedMapping::anonymous(2 * PAGE_SIZE).unwrap();
        let src: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in [0, 1, 8, 13, 16, 4000] {
            for len in [0, 1, 7, 8, 16, 24, 32, 33, 64, 100, 512, 600] {
                map.write(offset, &src[..len]);
                let mut out = vec![0u8; len];
                map.read(offset, &mut out);
                assert_eq!(out, src[..len], "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn a_short_file_is_refused_before_mapping() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 100]).unwrap();
        let err = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap_err();
        assert!(
            matches!(err, MapError::FileTooShort { file_len: 100, .. }),
            "{err}"
        );
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn an_access_outside_the_mapping_is_a_panic_not_a_wild_write() {
        let map = SharedMapping::anonymous(PAGE_SIZE).unwrap();
        map.write(PAGE_SIZE - 4, &[0u8; 8]);
    }

    #[test]
    fn truncating_the_file_under_the_mapping_breaks_it_instead_of_killing_the_process() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0x5au8; 4 * PAGE_SIZE]).unwrap();
        let map = SharedMapping::map_file(&file, 4 * PAGE_SIZE).unwrap();
        let other_file = {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&vec![0x11u8; PAGE_SIZE]).unwrap();
            f
        };
        let other = SharedMapping::map_file(&other_file, PAGE_SIZE).unwrap();
        assert!(!map.is_broken());
        file.set_len(PAGE_SIZE as u64).unwrap();
        // Page 0 is still backed by the file; page 2 is past its end and would raise SIGBUS.
        let mut buf = [0u8; 16];
        map.read(2 * PAGE_SIZE, &mut buf);
        assert!(map.is_broken());
        assert_eq!(buf, [0u8; 16], "a broken mapping reads zeros");
        map.write(3 * PAGE_SIZE, &[1u8; 64]);
        assert_eq!(map.control_page(0)[0].load(Ordering::Relaxed), 0);
        // Another mapping is untouched.
        assert!(!other.is_broken());
        let mut b = [0u8; 4];
        other.read(0, &mut b);
        assert_eq!(b, [0x11; 4]);
        assert!(guarded_mappings() >= 2);
    }
}
