//! Lines of `/proc/self/mountinfo` (proc(5)), the mount table the VSS freeze planner reads.
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2) (3)   (4)     (5)        (6)        (7)   (8) (9)     (10)        (11)
//! ```
//!
//! mount ID, parent ID, `major:minor` of the file system's device, root of the mount within
//! the file system, mount point, per-mount options, zero or more optional fields (`shared:N`,
//! `master:N`, `propagate_from:N`, `unbindable`), the separator `-`, file system type (with a
//! FUSE subtype: `fuse.sshfs`), mount source, super-block options.
//!
//! The kernel (`show_mountinfo` in `fs/proc_namespace.c`) writes every path and name with space,
//! tab, newline and backslash as three-digit octal escapes (`\040`, `\011`, `\012`, `\134`), so
//! fields are separated by exactly one space. A field can be empty: a mount whose source is the
//! empty string shows as two spaces in a row, so splitting on runs of whitespace would be wrong.
//!
//! The text is hostile: an unprivileged user chooses FUSE mount points, sources and subtypes (and
//! whole mount tables in a user namespace). Paths are kept as bytes (`PathBuf` / `OsString`,
//! since a mount point need not be UTF-8), lines and field counts are bounded, and a malformed
//! line is an error naming the line, never a panic. No I/O here.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Longest line accepted. A path is at most 4096 bytes, 16 KiB escaped; super-block options of
/// overlay mounts with many layers are the longest real fields.
pub const MAX_LINE_LEN: usize = 256 * 1024;

/// Most optional fields accepted on one line (the kernel writes at most four kinds).
pub const MAX_OPTIONAL_FIELDS: usize = 64;

/// A device number as `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceNumber {
    /// Major number (7 is the loop driver, 0 anonymous devices of virtual file systems, btrfs).
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceNumber {
    /// The loop driver's major number (`LOOP_MAJOR`).
    pub const LOOP_MAJOR: u32 = 7;
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl serde::Serialize for DeviceNumber {
    /// Serialised as `"major:minor"`, as mountinfo and `/sys/dev/block` name it.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One mountinfo line, fields unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// (1) Unique id of the mount (may be reused after an unmount).
    pub mount_id: u32,
    /// (2) Id of the parent mount (of itself for the root of the namespace's tree).
    pub parent_id: u32,
    /// (3) Device number of the file system (`st_dev` of its files; for btrfs an anonymous
    /// device, not the block device's number).
    pub device: DeviceNumber,
    /// (4) The directory of the file system that is mounted here (`/` unless a bind mount or
    /// a btrfs subvolume; `net:[4026531840]` for namespace files).
    pub root: PathBuf,
    /// (5) The mount point, relative to the process's root.
    pub mount_point: PathBuf,
    /// (6) Per-mount options (`rw` or `ro` first, then `nosuid`, `relatime`...).
    pub mount_options: Vec<OsString>,
    /// (7) Optional fields (`shared:1`, `master:2`, ...).
    pub optional_fields: Vec<OsString>,
    /// (9) File system type, with a FUSE subtype after a dot.
    pub fs_type: OsString,
    /// (10) Mount source (`/dev/sda1`, `tmpfs`, `none`, anything a FUSE user chose; may be
    /// empty).
    pub source: OsString,
    /// (11) Super-block options (`rw` or `ro` first).
    pub super_options: Vec<OsString>,
}

impl MountInfo {
    /// True if writes through this mount are refused: the mount or its super block is
    /// read-only (what `/proc/mounts` shows as `ro`, which is what `hv_vss_daemon` tests).
    pub fn is_read_only(&self) -> bool {
        let ro = |opts: &[OsString]| opts.iter().any(|o| o.as_bytes() == b"ro");
        ro(&self.mount_options) || ro(&self.super_options)
    }

    /// Parses one line (without its newline).
    pub fn parse_line(line: &[u8]) -> Result<MountInfo, LineError> {
        if line.len() > MAX_LINE_LEN {
            return Err(LineError::TooLong {
                len: line.len(),
                max: MAX_LINE_LEN,
            });
        }
        let mut fields = line.split(|&b| b == b' ');
        let mut take = |name: &'static str| fields.next().ok_or(LineError::MissingField(name));
        let mount_id = number(take("mount ID")?, "mount ID")?;
        let parent_id = number(take("parent ID")?, "parent ID")?;
        let device = device(take("major:minor")?)?;
        let root = non_empty(unescape_field(take("root")?, "root")?, "root")?;
        let mount_point = unescape_field(take("mount point")?, "mount point")?;
        if mount_point.first() != Some(&b'/') {
            return Err(LineError::RelativeMountPoint);
        }
        let mount_options = options(take("mount options")?, "mount options")?;
        let mut optional_fields = Vec::new();
        loop {
            let f = fields.next().ok_or(LineError::NoSeparator)?;
            if f == b"-" {
                break;
            }
            if optional_fields.len() == MAX_OPTIONAL_FIELDS {
                return Err(LineError::TooManyOptionalFields {
                    max: MAX_OPTIONAL_FIELDS,
                });
            }
            let f = non_empty(unescape_field(f, "optional field")?, "optional field")?;
            optional_fields.push(OsString::from_vec(f));
        }
        let mut take = |name: &'static str| fields.next().ok_or(LineError::MissingField(name));
        let fs_type = non_empty(unescape_field(take("fs type")?, "fs type")?, "fs type")?;
        let source = unescape_field(take("mount source")?, "mount source")?;
        let super_options = options(take("super options")?, "super options")?;
        if fields.next().is_some() {
            return Err(LineError::ExtraFields);
        }
        Ok(MountInfo {
            mount_id,
            parent_id,
            device,
            root: PathBuf::from(OsString::from_vec(root)),
            mount_point: PathBuf::from(OsString::from_vec(mount_point)),
            mount_options,
            optional_fields,
            fs_type: OsString::from_vec(fs_type),
            source: OsString::from_vec(source),
            super_options,
        })
    }

    /// The line as the kernel would write it (without newline): paths and names escaped,
    /// options joined with commas (a comma inside an option escaped as `\054`).
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(
            format!("{} {} {} ", self.mount_id, self.parent_id, self.device).as_bytes(),
        );
        out.extend(escape(self.root.as_os_str().as_bytes()));
        out.push(b' ');
        out.extend(escape(self.mount_point.as_os_str().as_bytes()));
        out.push(b' ');
        join_options(&mut out, &self.mount_options);
        for f in &self.optional_fields {
            out.push(b' ');
            if f.as_bytes() == b"-" {
                // A lone "-" would read as the separator (the kernel never writes such a field).
                out.extend_from_slice(b"\\055");
            } else {
                out.extend(escape(f.as_bytes()));
            }
        }
        out.extend_from_slice(b" - ");
        out.extend(escape(self.fs_type.as_bytes()));
        out.push(b' ');
        out.extend(escape(self.source.as_bytes()));
        out.push(b' ');
        join_options(&mut out, &self.super_options);
        out
    }
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is longer than [`MAX_LINE_LEN`].
    #[error("line is {len} bytes, the limit is {max}")]
    TooLong {
        /// Line length.
        len: usize,
        /// [`MAX_LINE_LEN`].
        max: usize,
    },
    /// The line ends before a field.
    #[error("line ends before the {0} field")]
    MissingField(&'static str),
    /// A number field is not a decimal `u32`.
    #[error("{0} is not a decimal number")]
    BadNumber(&'static str),
    /// The device field is not `major:minor`.
    #[error("major:minor is not two decimal numbers separated by ':'")]
    BadDevice,
    /// A backslash that does not start a three-digit octal escape of a byte 1-255.
    #[error(
        "{field} has a bad escape at byte {at} (expected \\ooo, three octal digits, not \\000)"
    )]
    BadEscape {
        /// The field.
        field: &'static str,
        /// Offset of the backslash within the field.
        at: usize,
    },
    /// A field that is never empty is empty.
    #[error("{0} is empty")]
    EmptyField(&'static str),
    /// The mount point is not an absolute path.
    #[error("mount point does not start with '/'")]
    RelativeMountPoint,
    /// No `-` after the optional fields.
    #[error("no \"-\" separator after the optional fields")]
    NoSeparator,
    /// More optional fields than [`MAX_OPTIONAL_FIELDS`].
    #[error("more than {max} optional fields")]
    TooManyOptionalFields {
        /// [`MAX_OPTIONAL_FIELDS`].
        max: usize,
    },
    /// Something after the super-block options.
    #[error("fields after the super options (expected exactly three after \"-\")")]
    ExtraFields,
}

/// A malformed line of a mountinfo text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {error} (line starts \"{excerpt}\")")]
pub struct MountInfoError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub error: LineError,
    /// The start of the line, escaped for a log or a terminal.
    pub excerpt: String,
}

/// Characters of the line shown in a [`MountInfoError`].
const EXCERPT_CHARS: usize = 100;

/// The entries of a mountinfo text, one `Result` per line, in order (a final newline ends the
/// last line; it does not start an empty one).
pub fn entries(text: &[u8]) -> impl Iterator<Item = Result<MountInfo, MountInfoError>> + '_ {
    let lines = (!text.is_empty()).then(|| {
        text.strip_suffix(b"\n")
            .unwrap_or(text)
            .split(|&b| b == b'\n')
    });
    lines.into_iter().flatten().enumerate().map(|(i, line)| {
        MountInfo::parse_line(line).map_err(|error| MountInfoError {
            line: i + 1,
            error,
            excerpt: crate::text::escape_bytes(line, EXCERPT_CHARS),
        })
    })
}

/// Parses a whole mountinfo text; the first malformed line is the error. The kernel writes no
/// malformed lines whatever names users choose (it escapes them), so a caller that gets an
/// error is not reading what it thinks it reads and should not act on a partial table.
pub fn parse(text: &[u8]) -> Result<Vec<MountInfo>, MountInfoError> {
    entries(text).collect()
}

/// A backslash at this offset does not start a valid escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad escape at byte {at}")]
pub struct EscapeError {
    /// Offset of the backslash.
    pub at: usize,
}

/// Decodes the kernel's octal escapes (`\040` -> space). A backslash must start exactly three
/// octal digits of a byte 1-255 (the kernel escapes every backslash, and no path holds a NUL).
pub fn unescape(field: &[u8]) -> Result<Vec<u8>, EscapeError> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let digits = field.get(i + 1..i + 4).ok_or(EscapeError { at: i })?;
        let mut value: u32 = 0;
        for &d in digits {
            if !(b'0'..=b'7').contains(&d) {
                return Err(EscapeError { at: i });
            }
            value = value * 8 + u32::from(d - b'0');
        }
        match u8::try_from(value) {
            Ok(byte) if byte != 0 => out.push(byte),
            _ => return Err(EscapeError { at: i }),
        }
        i += 4;
    }
    Ok(out)
}

/// Escapes as the kernel does for paths: space, tab, newline and backslash become `\ooo`.
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    escape_set(bytes, b" \t\n\\")
}

fn escape_set(bytes: &[u8], set: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if set.contains(&b) {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

fn join_options(out: &mut Vec<u8>, options: &[OsString]) {
    for (i, o) in options.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(escape_set(o.as_bytes(), b" \t\n\\,"));
    }
}

fn unescape_field(field: &[u8], name: &'static str) -> Result<Vec<u8>, LineError> {
    unescape(field).map_err(|e| LineError::BadEscape {
        field: name,
        at: e.at,
    })
}

fn non_empty(field: Vec<u8>, name: &'static str) -> Result<Vec<u8>, LineError> {
    if field.is_empty() {
        return Err(LineError::EmptyField(name));
    }
    Ok(field)
}

fn number(field: &[u8], name: &'static str) -> Result<u32, LineError> {
    if field.is_empty() || field.len() > 10 || !field.iter().all(u8::is_ascii_digit) {
        return Err(LineError::BadNumber(name));
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(LineError::BadNumber(name))
}

fn device(field: &[u8]) -> Result<DeviceNumber, LineError> {
    let colon = field
        .iter()
        .position(|&b| b == b':')
        .ok_or(LineError::BadDevice)?;
    let (major, minor) = (&field[..colon], &field[colon + 1..]);
    Ok(DeviceNumber {
        major: number(major, "major").map_err(|_| LineError::BadDevice)?,
        minor: number(minor, "minor").map_err(|_| LineError::BadDevice)?,
    })
}

fn options(field: &[u8], name: &'static str) -> Result<Vec<OsString>, LineError> {
    if field.is_empty() {
        return Err(LineError::EmptyField(name));
    }
    field
        .split(|&b| b == b',')
        .map(|o| unescape_field(o, name).map(OsString::from_vec))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    /// Lines from a development VM's `/proc/self/mountinfo`, plus typical systemd-host lines.
    const REAL: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334792k,nr_inodes=3083698,mode=755
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
28 27 0:25 / /mnt/sandboxing/model_tools_env/v1/python ro,nosuid,nodev,relatime - tmpfs model_tools_unavailable ro,size=4k,mode=755
45 27 7:0 / /tmp/.tmpuP675w/mnt rw,relatime - ext4 /dev/loop0 rw
61 29 0:33 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
75 29 259:2 / /boot/efi rw,relatime shared:31 - vfat /dev/nvme0n1p1 rw,fmask=0077,dmask=0077,codepage=437,iocharset=ascii,shortname=mixed,utf8,errors=remount-ro
80 29 0:40 /@home /home rw,relatime shared:33 - btrfs /dev/nvme0n1p2 rw,ssd,space_cache=v2,subvolid=257,subvol=/@home
812 27 0:4 net:[4026532281] /run/netns/blue rw shared:340 - nsfs nsfs rw
913 29 0:58 / /home/ann/My\\040Drive rw,nosuid,nodev,relatime shared:500 - fuse.rclone gdrive: rw,user_id=1000,group_id=1000
";

    #[test]
    fn real_lines_parse_with_every_field() {
        let all = parse(REAL.as_bytes()).unwrap();
        assert_eq!(all.len(), 10);

        let root = &all[2];
        assert_eq!((root.mount_id, root.parent_id), (27, 1));
        assert_eq!(
            root.device,
            DeviceNumber {
                major: 254,
                minor: 0
            }
        );
        assert_eq!(root.root, Path::new("/"));
        assert_eq!(root.mount_point, Path::new("/"));
        assert_eq!(root.mount_options, ["rw", "relatime"]);
        assert!(root.optional_fields.is_empty());
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.source, "/dev/vda");
        assert_eq!(root.super_options.len(), 5);
        assert!(!root.is_read_only());

        assert!(all[3].is_read_only());
        assert_eq!(all[5].optional_fields, ["shared:9"]);
        assert_eq!(all[7].root, Path::new("/@home"));
        assert_eq!(all[7].device.to_string(), "0:40");
        assert_eq!(all[8].root, Path::new("net:[4026532281]"));
        assert_eq!(all[9].mount_point, Path::new("/home/ann/My Drive"));
        assert_eq!(all[9].fs_type, "fuse.rclone");
        assert_eq!(all[9].source, "gdrive:");
    }

    #[test]
    fn empty_source_is_two_spaces_and_parses() {
        let m = MountInfo::parse_line(b"30 25 0:27 / /x rw - tmpfs  rw").unwrap();
        assert_eq!(m.source, "");
        assert_eq!(m.super_options, ["rw"]);
    }

    #[test]
    fn escapes_decode_to_space_tab_newline_backslash_and_raw_bytes() {
        let m = MountInfo::parse_line(
            b"1 1 8:1 / /a\\040b\\011c\\012d\\134e\\377 rw - ext4 /dev/sd\\134a rw,x=\\054y",
        )
        .unwrap();
        assert_eq!(m.mount_point.as_os_str().as_bytes(), b"/a b\tc\nd\\e\xff");
        assert_eq!(m.source, "/dev/sd\\a");
        assert_eq!(m.super_options, ["rw", "x=,y"]);
    }

    #[test]
    fn superblock_read_only_counts_as_read_only() {
        let m = MountInfo::parse_line(b"1 1 8:1 / /a rw - ext4 /dev/sda1 ro").unwrap();
        assert!(m.is_read_only());
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let text = b"22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                     23 27 0:22 / /sys rw,relatime proc sysfs rw\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.error, LineError::NoSeparator);
        assert!(err.to_string().starts_with("mountinfo line 2: no \"-\""));

        let cases: &[(&[u8], LineError)] = &[
            (b"", LineError::BadNumber("mount ID")),
            (
                b"x 1 8:1 / /a rw - e s rw",
                LineError::BadNumber("mount ID"),
            ),
            (
                b"+1 1 8:1 / /a rw - e s rw",
                LineError::BadNumber("mount ID"),
            ),
            (
                b"1 99999999999 8:1 / /a rw - e s rw",
                LineError::BadNumber("parent ID"),
            ),
            (b"1 1 81 / /a rw - e s rw", LineError::BadDevice),
            (b"1 1 8: / /a rw - e s rw", LineError::BadDevice),
            (b"1 1 8:1 / a rw - e s rw", LineError::RelativeMountPoint),
            (b"1 1 8:1  /a rw - e s rw", LineError::EmptyField("root")),
            (
                b"1 1 8:1 / /a rw - e s",
                LineError::MissingField("super options"),
            ),
            (b"1 1 8:1 / /a rw - e s rw x", LineError::ExtraFields),
            (b"1 1 8:1 / /a rw -  s rw", LineError::EmptyField("fs type")),
            (
                b"1 1 8:1 / /a  - e s rw",
                LineError::EmptyField("mount options"),
            ),
            (
                b"1 1 8:1 / /a rw  - e s rw",
                LineError::EmptyField("optional field"),
            ),
            (b"1 1 8:1", LineError::MissingField("root")),
            (
                b"1 1 8:1 / /a\\04 rw - e s rw",
                LineError::BadEscape {
                    field: "mount point",
                    at: 2,
                },
            ),
            (
                b"1 1 8:1 / /a\\000 rw - e s rw",
                LineError::BadEscape {
                    field: "mount point",
                    at: 2,
                },
            ),
            (
                b"1 1 8:1 / /a\\400 rw - e s rw",
                LineError::BadEscape {
                    field: "mount point",
                    at: 2,
                },
            ),
            (
                b"1 1 8:1 / /a rw - e s\\9 rw",
                LineError::BadEscape {
                    field: "mount source",
                    at: 1,
                },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(
                MountInfo::parse_line(line).as_ref().err(),
                Some(expected),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long = vec![b'1'; MAX_LINE_LEN + 1];
        assert!(matches!(
            MountInfo::parse_line(&long),
            Err(LineError::TooLong { .. })
        ));
        let mut many = b"1 1 8:1 / /a rw".to_vec();
        for _ in 0..=MAX_OPTIONAL_FIELDS {
            many.extend_from_slice(b" shared:1");
        }
        many.extend_from_slice(b" - e s rw");
        assert!(matches!(
            MountInfo::parse_line(&many),
            Err(LineError::TooManyOptionalFields { .. })
        ));
    }

    #[test]
    fn error_excerpt_is_escaped_and_cut() {
        let mut line = b"1 1 8:1 / \x1b[31mred rw".to_vec();
        line.extend(vec![b'x'; 500]);
        let err = parse(&line).unwrap_err();
        assert!(!err.excerpt.contains('\x1b'));
        assert!(err.excerpt.len() < 200);
    }

    #[test]
    fn text_without_final_newline_and_empty_text() {
        assert!(parse(b"").unwrap().is_empty());
        assert_eq!(parse(b"1 1 8:1 / /a rw - e s rw").unwrap().len(), 1);
        assert_eq!(parse(b"\n").unwrap_err().line, 1);
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 0..max)
    }

    fn arb_info() -> impl Strategy<Value = MountInfo> {
        let os = |max| arb_bytes(max).prop_map(OsString::from_vec);
        let opts = || {
            proptest::collection::vec(arb_bytes(12).prop_map(OsString::from_vec), 1..4)
                // A list of one empty option is written as an empty field.
                .prop_filter("non-empty list", |v| v.len() > 1 || !v[0].is_empty())
        };
        (
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            arb_bytes(20).prop_filter("root", |r| !r.is_empty()),
            arb_bytes(30),
            opts(),
            proptest::collection::vec(
                prop_oneof![
                    Just(b"-".to_vec()),
                    arb_bytes(10).prop_filter("non-empty", |f| !f.is_empty()),
                ],
                0..3,
            ),
            arb_bytes(10).prop_filter("fs type", |f| !f.is_empty()),
            os(20),
            opts(),
        )
            .prop_map(
                |((id, parent, major, minor), root, mp, mo, opt, fs, source, so)| MountInfo {
                    mount_id: id,
                    parent_id: parent,
                    device: DeviceNumber { major, minor },
                    root: PathBuf::from(OsString::from_vec(root)),
                    mount_point: PathBuf::from(OsString::from_vec([b"/".as_slice(), &mp].concat())),
                    mount_options: mo,
                    optional_fields: opt.into_iter().map(OsString::from_vec).collect(),
                    fs_type: OsString::from_vec(fs),
                    source,
                    super_options: so,
                },
            )
    }

    proptest! {
        #[test]
        fn escape_round_trips(bytes in arb_bytes(64)) {
            let escaped = escape(&bytes);
            prop_assert!(!escaped.iter().any(|b| b" \t\n".contains(b)));
            prop_assert_eq!(unescape(&escaped).unwrap(), bytes);
        }

        #[test]
        fn line_round_trips(info in arb_info()) {
            let line = info.to_line();
            prop_assert_eq!(MountInfo::parse_line(&line).unwrap(), info);
        }

        #[test]
        fn any_bytes_parse_or_fail_with_a_line_number(
            text in proptest::collection::vec(
                prop_oneof![Just(b' '), Just(b'\n'), Just(b'\\'), Just(b'-'), Just(b':'), b'0'..=b'9', any::<u8>()],
                0..200,
            )
        ) {
            let lines = text.iter().filter(|&&b| b == b'\n').count() + 1;
            for entry in entries(&text) {
                if let Err(e) = entry {
                    prop_assert!(e.line >= 1 && e.line <= lines);
                }
            }
        }
    }
}
