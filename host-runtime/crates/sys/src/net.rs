//! The three libc calls `hv_kvp_daemon` takes its facts from, wrapped safely: `getifaddrs` (address
//! list and its order), `inet_ntop` (address text) and `getaddrinfo(AI_CANONNAME)` (the FQDN).
//! Using the same functions, not a re-implementation, is what makes the Auto-pool values and
//! GET_IP_INFO answers identical to the C daemon's on the same machine.

use std::ffi::{CStr, CString};

// glibc's inet_ntop(3); the libc crate does not declare it.
unsafe extern "C" {
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

/// One `struct ifaddrs` entry with an AF_INET or AF_INET6 address (other families are dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// `ifa_name` (for IPv4 aliases the label, e.g. `eth0:1`, as glibc reports it).
    pub name: String,
    /// `ifa_flags` (`IFF_*`).
    pub flags: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: i32,
    /// The address as `inet_ntop` writes it.
    pub addr: String,
    /// IPv4: the netmask as `inet_ntop` writes it; IPv6: `None`.
    pub netmask_v4: Option<String>,
    /// IPv6: the netmask's set bits (the prefix length the C daemon computes); IPv4: `None`.
    pub prefix_v6: Option<u32>,
}

/// `AF_INET`.
pub const AF_INET: i32 = libc::AF_INET;
/// `AF_INET6`.
pub const AF_INET6: i32 = libc::AF_INET6;

/// `IFF_LOOPBACK`.
pub const IFF_LOOPBACK: u32 = libc::IFF_LOOPBACK as u32;

/// The machine's addresses in `getifaddrs` order.
pub fn getifaddrs() -> std::io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success glibc stores a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list glibc returned and has not been freed yet.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points to a sockaddr of at least sa_family's size.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family != libc::AF_INET && family != libc::AF_INET6 {
            continue;
        }
        // SAFETY: `ifa_name` is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let Some(addr) = ntop(family, ifa.ifa_addr) else {
            continue;
        };
        let (netmask_v4, prefix_v6) = if ifa.ifa_netmask.is_null() {
            (None, Some(0).filter(|_| family == libc::AF_INET6))
        } else if family == libc::AF_INET {
            (ntop(family, ifa.ifa_netmask), None)
        } else {
            // SAFETY: for AF_INET6 entries glibc's netmask is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
            (
                None,
                Some(sin6.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()),
            )
        };
        out.push(IfAddr {
            name,
            flags: ifa.ifa_flags,
            family,
            addr,
            netmask_v4,
            prefix_v6,
        });
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn ntop(family: i32, sa: *const libc::sockaddr) -> Option<String> {
    let mut buf = [0 as libc::c_char; 64];
    let src: *const libc::c_void = if family == libc::AF_INET {
        // SAFETY: the caller checked the family; the sockaddr is a sockaddr_in.
        unsafe { &(*(sa as *const libc::sockaddr_in)).sin_addr as *const _ as *const libc::c_void }
    } else {
        // SAFETY: as above, a sockaddr_in6.
        unsafe {
            &(*(sa as *const libc::sockaddr_in6)).sin6_addr as *const _ as *const libc::c_void
        }
    };
    // SAFETY: `src` points to an in_addr/in6_addr matching `family`; `buf` has 64 bytes, more
    // than INET6_ADDRSTRLEN.
    let p = unsafe { inet_ntop(family, src, buf.as_mut_ptr(), buf.len() as libc::socklen_t) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success inet_ntop wrote a NUL-terminated string into `buf`.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// `kvp_get_domain_name`: `getaddrinfo(hostname, AF_INET, SOCK_STREAM, AI_CANONNAME)`'s canonical
/// name, or the daemon's failure text `getaddrinfo failed: 0x<code> <message>`.
pub fn canonical_name(hostname: &str) -> String {
    let Ok(node) = CString::new(hostname) else {
        return format!(
            "getaddrinfo failed: 0x{:x} {}",
            libc::EAI_NONAME as u32,
            "Name or service not known"
        );
    };
    // SAFETY: zeroed addrinfo is a valid "no hints" value; we then set the fields we use.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_flags = libc::AI_CANONNAME;
    let mut info: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: `node` is NUL-terminated, `hints` and `info` are valid for the call.
    let rc = unsafe { libc::getaddrinfo(node.as_ptr(), std::ptr::null(), &hints, &mut info) };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }
            .to_string_lossy()
            .into_owned();
        return format!("getaddrinfo failed: 0x{:x} {}", rc as u32, msg);
    }
    // SAFETY: rc == 0, so `info` is a valid list; ai_canonname of the first entry is set when
    // AI_CANONNAME was asked (it may still be null, which we map to the empty string as printf
    // would print "(null)"; keep the daemon's text for that case).
    let name = unsafe {
        let first = &*info;
        if first.ai_canonname.is_null() {
            "(null)".to_string()
        } else {
            CStr::from_ptr(first.ai_canonname)
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: `info` came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(info) };
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getifaddrs_lists_the_loopback_address() {
        let addrs = getifaddrs().unwrap();
        assert!(
            addrs.iter().any(|a| a.addr == "127.0.0.1"
                && a.flags & IFF_LOOPBACK != 0
                && a.netmask_v4.as_deref() == Some("255.0.0.0")),
            "{addrs:?}"
        );
    }

    #[test]
    fn canonical_name_of_localhost_resolves() {
        assert_eq!(canonical_name("localhost"), "localhost");
    }
}
