//! The Auto pool's ten intrinsic keys, from the sources `hv_kvp_daemon` uses: `uname`, the
//! hostname resolved with `getaddrinfo(AI_CANONNAME)`, `/etc/os-release` (else the first lines of
//! `/etc/SuSE-release` or `/etc/redhat-release`), `getifaddrs`, and the version string the kernel
//! registered.

use std::io::BufRead;
use std::path::PathBuf;

/// The intrinsic key names in index order (the host enumerates index 0..=9).
pub const INTRINSIC_KEYS: [&str; 10] = [
    "FullyQualifiedDomainName",
    "IntegrationServicesVersion",
    "NetworkAddressIPv4",
    "NetworkAddressIPv6",
    "OSBuildNumber",
    "OSName",
    "OSMajorVersion",
    "OSMinorVersion",
    "OSVersion",
    "ProcessorArchitecture",
];

/// Where OS facts are read from (tests point these at temporary files).
#[derive(Debug, Clone)]
pub struct OsInfoSources {
    /// Default `/etc/os-release`.
    pub os_release: PathBuf,
    /// Fallbacks read as the C daemon does (up to three lines: name, major, minor).
    pub fallback_release_files: Vec<PathBuf>,
}

impl Default for OsInfoSources {
    fn default() -> Self {
        OsInfoSources {
            os_release: "/etc/os-release".into(),
            fallback_release_files: vec!["/etc/SuSE-release".into(), "/etc/redhat-release".into()],
        }
    }
}

/// The OS values of the Auto pool, computed once at start like the C daemon's globals.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OsInfo {
    /// `OSName`: os-release `NAME`, else uname sysname.
    pub os_name: String,
    /// `OSMajorVersion`: os-release `VERSION_ID`.
    pub os_major: String,
    /// `OSMinorVersion`: only from the fallback files' third line.
    pub os_minor: String,
    /// `OSBuildNumber`: the full uname release.
    pub os_build: String,
    /// `OSVersion`: the uname release up to its first `-`.
    pub os_version: String,
    /// `ProcessorArchitecture`: uname machine.
    pub processor_arch: String,
}

impl OsInfo {
    /// Reads the facts as `kvp_get_os_info` does.
    pub fn read(sources: &OsInfoSources) -> OsInfo {
        let uts = rustix::system::uname();
        let lossy = |c: &std::ffi::CStr| c.to_string_lossy().into_owned();
        let release = lossy(uts.release());
        let mut info = OsInfo {
            os_name: lossy(uts.sysname()),
            os_major: String::new(),
            os_minor: String::new(),
            os_build: release.clone(),
            os_version: release.split('-').next().unwrap_or_default().to_string(),
            processor_arch: lossy(uts.machine()),
        };
        if let Ok(f) = std::fs::File::open(&sources.os_release) {
            for line in fgets_lines(f, 512) {
                if line.first() == Some(&b'#') {
                    continue;
                }
                let Some(eq) = line.iter().position(|&c| c == b'=') else {
                    continue;
                };
                let (name, raw) = (&line[..eq], &line[eq + 1..]);
                let value = unquote(raw);
                match name {
                    b"NAME" => info.os_name = value,
                    b"VERSION_ID" => info.os_major = value,
                    _ => {}
                }
            }
            return info;
        }
        for path in &sources.fallback_release_files {
            let Ok(f) = std::fs::File::open(path) else {
                continue;
            };
            let mut lines = fgets_lines(f, 512).into_iter().map(|l| {
                let end = l.iter().position(|&c| c == b'\n').unwrap_or(l.len());
                String::from_utf8_lossy(&l[..end]).into_owned()
            });
            if let Some(l) = lines.next() {
                info.os_name = l;
            }
            if let Some(l) = lines.next() {
                info.os_major = l;
            }
            if let Some(l) = lines.next() {
                info.os_minor = l;
            }
            break;
        }
        info
    }
}

/// Lines as C's `fgets(buf, size, f)` returns them: at most `size - 1` bytes each, newline kept.
fn fgets_lines(f: std::fs::File, size: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    // os-release files are small; bound the total so a huge file cannot exhaust memory.
    let mut total = 0usize;
    while let Ok(n) = reader.read_until(b'\n', &mut line) {
        if n == 0 || total > 1 << 20 {
            break;
        }
        total += n;
        for chunk in line.chunks(size - 1) {
            out.push(chunk.to_vec());
        }
        line.clear();
    }
    out
}

/// The C daemon's un-quoting: drops every `'`, `"` and newline, and keeps the byte after `\`.
fn unquote(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\\' => {
                i += 1;
                if i >= raw.len() {
                    break;
                }
                out.push(raw[i]);
                i += 1;
            }
            b'\'' | b'"' | b'\n' => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `FullyQualifiedDomainName`: the hostname's canonical name (computed once at start, as the C
/// daemon caches it because `getaddrinfo` can be slow). Cut to 2047 bytes.
pub fn fully_qualified_domain_name() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let mut name = hvisd_sys::net::canonical_name(&host);
    if name.len() > 2047 {
        let mut cut = 2047;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_name_and_version_id_are_unquoted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("os-release");
        std::fs::write(
            &p,
            "# comment\nNAME=\"Debian GNU/Linux\"\nVERSION_ID='12'\nID=debian\nX=a\\\"b\n",
        )
        .unwrap();
        let info = OsInfo::read(&OsInfoSources {
            os_release: p,
            fallback_release_files: vec![],
        });
        assert_eq!(info.os_name, "Debian GNU/Linux");
        assert_eq!(info.os_major, "12");
        assert_eq!(info.os_minor, "");
        assert!(info.os_build.starts_with(&info.os_version));
        assert!(!info.os_version.contains('-'));
    }

    #[test]
    fn redhat_release_fallback_gives_three_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("redhat-release");
        std::fs::write(&p, "Red Hat\n7\n9\nignored\n").unwrap();
        let info = OsInfo::read(&OsInfoSources {
            os_release: d.path().join("missing"),
            fallback_release_files: vec![p],
        });
        assert_eq!(
            (
                info.os_name.as_str(),
                info.os_major.as_str(),
                info.os_minor.as_str()
            ),
            ("Red Hat", "7", "9")
        );
    }

    #[test]
    fn no_release_file_leaves_uname_sysname() {
        let d = tempfile::tempdir().unwrap();
        let info = OsInfo::read(&OsInfoSources {
            os_release: d.path().join("x"),
            fallback_release_files: vec![],
        });
        assert_eq!(info.os_name, "Linux");
        assert_eq!(info.processor_arch, std::env::consts::ARCH);
    }
}
