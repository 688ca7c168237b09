//! A mount as the planner sees it, and the one text form of a mount point's name.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use hvisd_protocol::mountinfo::{DeviceNumber, MountInfo};

/// One entry of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// mountinfo's mount ID.
    pub mount_id: u32,
    /// mountinfo's parent ID.
    pub parent_id: u32,
    /// The file system's device number (mountinfo's `major:minor`): two mounts with the same
    /// device are the same file system, which is frozen once.
    pub device: DeviceNumber,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The directory of the file system mounted there (`/` unless a bind mount or subvolume).
    pub root: PathBuf,
    /// File system type (`ext4`, `fuse.sshfs`).
    pub fs_type: OsString,
    /// Mount source (`/dev/sda1`, `tmpfs`, whatever a FUSE user chose).
    pub source: OsString,
    /// The mount or its super block is read-only.
    pub read_only: bool,
    /// The file system sits on a loop device, directly or through device-mapper / md layers.
    /// [`Mount::from_mountinfo`] can only tell a direct loop device (major 7, `/dev/loop*`);
    /// [`crate::system::read_mounts`] also walks sysfs as `hv_vss_daemon` does.
    pub loop_backed: bool,
}

impl Mount {
    /// The mount described by a parsed mountinfo line.
    pub fn from_mountinfo(info: &MountInfo) -> Mount {
        Mount {
            mount_id: info.mount_id,
            parent_id: info.parent_id,
            device: info.device,
            mount_point: info.mount_point.clone(),
            root: info.root.clone(),
            fs_type: info.fs_type.clone(),
            source: info.source.clone(),
            read_only: info.is_read_only(),
            loop_backed: info.device.major == DeviceNumber::LOOP_MAJOR
                || info.source.as_bytes().starts_with(b"/dev/loop"),
        }
    }

    /// True for the mount at `/`.
    pub fn is_root(&self) -> bool {
        self.mount_point.as_os_str().as_bytes() == b"/"
    }

    /// The mount point's name as operators, logs and plugins see it (see [`escape_name`]).
    pub fn name(&self) -> String {
        escape_name(self.mount_point.as_os_str().as_bytes())
    }
}

impl From<&MountInfo> for Mount {
    fn from(info: &MountInfo) -> Mount {
        Mount::from_mountinfo(info)
    }
}

impl serde::Serialize for Mount {
    /// Every name in its [`escape_name`] form, so any mount point serialises (JSON has no
    /// place for bytes that are not UTF-8) and none can forge output.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Mount", 8)?;
        s.serialize_field("mount_point", &self.name())?;
        s.serialize_field("mount_id", &self.mount_id)?;
        s.serialize_field("device", &self.device)?;
        s.serialize_field("fs_type", &escape_name(self.fs_type.as_bytes()))?;
        s.serialize_field("source", &escape_name(self.source.as_bytes()))?;
        s.serialize_field("root", &escape_name(self.root.as_os_str().as_bytes()))?;
        s.serialize_field("read_only", &self.read_only)?;
        s.serialize_field("loop_backed", &self.loop_backed)?;
        s.end()
    }
}

/// The text form of a name from the mount table (mount point, source, fs type): UTF-8 stays as
/// it is, except that a backslash becomes `\\`, control characters and bidirectional-override
/// characters become `\xNN` (ASCII) or `\u{N}`, and bytes that are not UTF-8 become `\xNN`.
///
/// Lossless ([`unescape_name`] reverses it) and safe to print: a user who names a FUSE mount
/// point `"/x\n1. /"` or fills it with terminal escapes cannot forge a line of `hvisd vss plan`.
/// A freeze-policy plugin names mount points in this form.
pub fn escape_name(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_bidi_control(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Reverses [`escape_name`]: `\\`, `\xNN` (a byte) and `\u{N}` (a character) are the only
/// escapes. `None` for any other backslash sequence.
pub fn unescape_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next()? {
            '\\' => out.push(b'\\'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                if hex.len() != 2 {
                    return None;
                }
                out.push(u8::from_str_radix(&hex, 16).ok()?);
            }
            'u' => {
                if chars.next()? != '{' {
                    return None;
                }
                let mut hex = String::new();
                loop {
                    match chars.next()? {
                        '}' => break,
                        h if hex.len() < 6 => hex.push(h),
                        _ => return None,
                    }
                }
                let c = char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The mount point a name in [`escape_name`] form stands for.
pub fn parse_mount_point_name(name: &str) -> Option<PathBuf> {
    unescape_name(name).map(|b| PathBuf::from(OsString::from_vec(b)))
}

/// A path in [`escape_name`] form.
pub fn path_name(path: &Path) -> String {
    escape_name(path.as_os_str().as_bytes())
}

/// Characters that reorder the text around them on a terminal (LRM/RLM, ALM, the embeddings,
/// overrides and isolates): shown escaped so a name cannot make its line read differently.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mount_from_a_real_line() {
        let info = MountInfo::parse_line(
            b"45 27 7:0 / /tmp/.tmpuP675w/mnt rw,relatime - ext4 /dev/loop0 rw",
        )
        .unwrap();
        let m = Mount::from_mountinfo(&info);
        assert!(m.loop_backed);
        assert!(!m.read_only);
        assert!(!m.is_root());
        assert_eq!(m.name(), "/tmp/.tmpuP675w/mnt");
        assert_eq!(m.device.to_string(), "7:0");
    }

    #[test]
    fn names_escape_what_could_forge_output() {
        assert_eq!(escape_name(b"/mnt/caf\xc3\xa9 x"), "/mnt/café x");
        assert_eq!(escape_name(b"/a\\b"), "/a\\\\b");
        assert_eq!(escape_name(b"/x\n1. /"), "/x\\x0a1. /");
        assert_eq!(escape_name(b"/\x1b[31mred"), "/\\x1b[31mred");
        assert_eq!(escape_name(b"/\xff\xfe"), "/\\xff\\xfe");
        assert_eq!(
            escape_name("/\u{202e}txt.exe".as_bytes()),
            "/\\u{202e}txt.exe"
        );
        assert_eq!(escape_name("/\u{85}".as_bytes()), "/\\u{85}");
    }

    #[test]
    fn unescape_refuses_unknown_and_short_escapes() {
        for bad in [
            "\\",
            "\\n",
            "\\x4",
            "\\u{110000}",
            "\\u{1234567}",
            "\\u1",
            "\\u{12",
        ] {
            assert_eq!(unescape_name(bad), None, "{bad}");
        }
        assert_eq!(unescape_name("/a\\x20b").unwrap(), b"/a b");
    }

    #[test]
    fn json_of_a_mount_with_a_non_utf8_point_is_valid() {
        let info = MountInfo::parse_line(b"5 1 8:1 / /m\\012\xff rw - ext4 /dev/sda1 rw").unwrap();
        let json = serde_json::to_value(Mount::from_mountinfo(&info)).unwrap();
        assert_eq!(json["mount_point"], "/m\\x0a\\xff");
        assert_eq!(json["device"], "8:1");
    }

    proptest! {
        #[test]
        fn names_round_trip_and_hold_no_control_characters(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let name = escape_name(&bytes);
            prop_assert!(!name.chars().any(|c| c.is_control() || is_bidi_control(c)));
            prop_assert_eq!(unescape_name(&name).unwrap(), bytes);
        }

        #[test]
        fn unescape_never_panics(s in "\\PC*") {
            let _ = unescape_name(&s);
        }
    }
}
