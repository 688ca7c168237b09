//! Guest file copy (fcopy, PowerShell's `Copy-VMFile`) wire formats: the messages a Hyper-V host
//! sends on the fcopy channel, and the shape a guest path from the host must have.
//!
//! On VMBus an fcopy request is one IC packet (see [`crate::ic`]) with `icmsgtype` 7 whose body
//! starts with `hv_fcopy_hdr`; the guest answers with the request's buffer, the status in
//! `icmsg_hdr.status`. A copy is `START_FILE_COPY`, `WRITE_TO_FILE` per fragment,
//! `COMPLETE_FCOPY` (or `CANCEL_FCOPY`):
//!
//! ```text
//! hv_fcopy_hdr (36), packed, little-endian:
//!   0   u32       operation          see FcopyOperation
//!   4   u8[16]    service_id0        unused by hosts and guests
//!   20  u8[16]    service_id1        unused
//!
//! hv_start_fcopy (1088):
//!   0   hv_fcopy_hdr
//!   36  u16[260]  file_name          UTF-16LE, NUL-terminated within the field
//!   556 u16[260]  path_name          the destination directory, same encoding
//!   1076 u32      copy_flags         OVER_WRITE (1), CREATE_PATH (2)
//!   1080 u64      file_size          the whole file's size
//!
//! hv_do_fcopy (6196):
//!   0   hv_fcopy_hdr
//!   36  u32       pad
//!   40  u64       offset
//!   48  u32       size               bytes of data used, at most DATA_FRAGMENT
//!   52  u8[6144]  data
//! ```
//!
//! Facts from Linux `include/uapi/linux/hyperv.h` (the structs, `W_MAX_PATH`, `DATA_FRAGMENT`, the
//! operations and flags), `tools/hv/hv_fcopy_uio_daemon.c` (versions, statuses, the fixed
//! instance id) and the removed `drivers/hv/hv_fcopy.c`. Unlike `hv_fcopy_uio_daemon`, which
//! reads whatever the host's counts say, every length, size and name is checked here; nothing
//! panics on any input. No I/O here.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid::Guid;
use crate::ic::IcVersion;

/// The VMBus interface type (`class_id`) of the fcopy channel,
/// `34d14be3-dee4-41c8-9ae7-6b174977c192` (Linux `HV_FCOPY_GUID`).
pub const CLASS_ID: Guid = crate::guid::class_id::FCOPY;

/// The instance id Hyper-V gives the fcopy device: `hv_fcopy_uio_daemon` looks for exactly
/// `/sys/bus/vmbus/devices/eb765408-105f-49b6-b4aa-c123b64d17d4/uio`. hvisd picks the device by
/// its class id instead, so any instance id works.
pub const HYPERV_INSTANCE_ID: Guid = Guid::new(
    0xeb76_5408,
    0x105f,
    0x49b6,
    [0xb4, 0xaa, 0xc1, 0x23, 0xb6, 0x4d, 0x17, 0xd4],
);

/// Framework versions a Linux guest accepts on the fcopy channel (`fw_versions` of
/// `hv_fcopy_uio_daemon.c` and of the old `hv_fcopy.c`): `UTIL_FW_VERSION` 3.0 only.
pub const FRAMEWORK_VERSIONS: &[IcVersion] = &[IcVersion::new(3, 0)];

/// fcopy message versions a Linux guest accepts (`fcopy_versions`): `WIN8_SRV_VERSION` 1.1 only.
pub const MESSAGE_VERSIONS: &[IcVersion] = &[IcVersion::new(1, 1)];

/// Longest path or file name field in UTF-16 units, terminator included (Linux's `W_MAX_PATH`).
pub const W_MAX_PATH: usize = 260;
/// Largest data fragment in one `WRITE_TO_FILE` (Linux's `DATA_FRAGMENT`).
pub const DATA_FRAGMENT: usize = 6 * 1024;
/// Longest path component in bytes of UTF-8 (Linux's `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// `copy_flags`: replace an existing file.
pub const OVER_WRITE: u32 = 0x1;
/// `copy_flags`: create missing directories of `path_name`.
pub const CREATE_PATH: u32 = 0x2;

/// `struct hv_fcopy_hdr`: the first 36 bytes of every fcopy message body.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct FcopyHeader {
    /// The operation, see [`FcopyOperation`].
    pub operation: U32,
    /// Unused by current hosts (binary GUID).
    pub service_id0: [u8; 16],
    /// Unused by current hosts (binary GUID).
    pub service_id1: [u8; 16],
}

/// `struct hv_start_fcopy`: create the file.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct StartFcopyWire {
    /// The header (`operation` = `START_FILE_COPY`).
    pub header: FcopyHeader,
    /// The file's name, UTF-16LE, NUL-terminated within the field.
    pub file_name: [U16; W_MAX_PATH],
    /// The destination directory (a guest path), UTF-16LE, NUL-terminated within the field.
    pub path_name: [U16; W_MAX_PATH],
    /// [`OVER_WRITE`], [`CREATE_PATH`]; other bits are kept and ignored.
    pub copy_flags: U32,
    /// The size of the whole file, in bytes.
    pub file_size: U64,
}

/// `struct hv_do_fcopy` without its data: one fragment's position and length.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct DoFcopyHeader {
    /// The header (`operation` = `WRITE_TO_FILE`).
    pub header: FcopyHeader,
    /// Padding the host's compiler put before `offset` (Linux added the field in 2015 to match).
    pub pad: U32,
    /// Where the fragment goes in the file.
    pub offset: U64,
    /// Bytes of `data` used.
    pub size: U32,
}

/// Size of `struct hv_fcopy_hdr`.
pub const FCOPY_HEADER_SIZE: usize = size_of::<FcopyHeader>();
/// Size of `struct hv_start_fcopy`.
pub const START_FCOPY_SIZE: usize = size_of::<StartFcopyWire>();
/// Offset of `data` in `struct hv_do_fcopy`.
pub const DO_FCOPY_DATA_OFFSET: usize = size_of::<DoFcopyHeader>();
/// Size of `struct hv_do_fcopy` with its whole data array.
pub const DO_FCOPY_SIZE: usize = DO_FCOPY_DATA_OFFSET + DATA_FRAGMENT;

const _: () = assert!(FCOPY_HEADER_SIZE == 36);
const _: () = assert!(START_FCOPY_SIZE == 1088);
const _: () = assert!(DO_FCOPY_DATA_OFFSET == 52);
const _: () = assert!(DO_FCOPY_SIZE == 6196);
// A whole WRITE_TO_FILE packet fits the IC packet limit and hv_fcopy_uio_daemon's 16 KiB ring.
const _: () = assert!(crate::ic::ICMSG_HDR + DO_FCOPY_SIZE <= crate::ic::MAX_IC_PACKET_SIZE);

/// `hv_fcopy_hdr.operation`: an open enum, so a value this crate does not know is kept and can
/// be reported.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FcopyOperation(pub u32);

impl FcopyOperation {
    /// Create the target file.
    pub const START_FILE_COPY: FcopyOperation = FcopyOperation(0);
    /// Write one fragment.
    pub const WRITE_TO_FILE: FcopyOperation = FcopyOperation(1);
    /// The whole file was sent: close it.
    pub const COMPLETE_FCOPY: FcopyOperation = FcopyOperation(2);
    /// Abandon the copy.
    pub const CANCEL_FCOPY: FcopyOperation = FcopyOperation(3);

    /// The Linux name, e.g. `"START_FILE_COPY"`, or `None` for an unknown value.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::START_FILE_COPY => "START_FILE_COPY",
            Self::WRITE_TO_FILE => "WRITE_TO_FILE",
            Self::COMPLETE_FCOPY => "COMPLETE_FCOPY",
            Self::CANCEL_FCOPY => "CANCEL_FCOPY",
            _ => return None,
        })
    }
}

impl fmt::Debug for FcopyOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

impl fmt::Display for FcopyOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `copy_flags` as an open bit set: unknown bits are kept (and ignored, as Linux does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CopyFlags(pub u32);

impl CopyFlags {
    /// Flags from the two booleans.
    pub fn new(overwrite: bool, create_path: bool) -> Self {
        let mut bits = 0;
        if overwrite {
            bits |= OVER_WRITE;
        }
        if create_path {
            bits |= CREATE_PATH;
        }
        CopyFlags(bits)
    }

    /// [`OVER_WRITE`] is set.
    pub fn overwrite(self) -> bool {
        self.0 & OVER_WRITE != 0
    }

    /// [`CREATE_PATH`] is set.
    pub fn create_path(self) -> bool {
        self.0 & CREATE_PATH != 0
    }
}

/// Which name field of `hv_start_fcopy` an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameField {
    /// `file_name`.
    FileName,
    /// `path_name`.
    PathName,
}

impl fmt::Display for NameField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameField::FileName => "file_name",
            NameField::PathName => "path_name",
        })
    }
}

/// Why bytes are not an fcopy message, or a name not one hvisd will use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FcopyError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {need} bytes, got {got}")]
    Truncated {
        /// The structure being read, e.g. `"hv_start_fcopy"`.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A name field has no NUL within its 260 units.
    #[error("{field} is not NUL-terminated within its {W_MAX_PATH} UTF-16 units")]
    Unterminated {
        /// The field.
        field: NameField,
    },
    /// A name field is not valid UTF-16 (an unpaired surrogate).
    #[error("{field} is not valid UTF-16 (unpaired surrogate at unit {unit})")]
    NotUtf16 {
        /// The field.
        field: NameField,
        /// Index of the offending unit.
        unit: usize,
    },
    /// A name field is empty.
    #[error("{field} is empty")]
    Empty {
        /// The field.
        field: NameField,
    },
    /// A name to send does not fit its field.
    #[error("{field} of {units} UTF-16 units does not fit the field ({} at most)", W_MAX_PATH - 1)]
    NameTooLong {
        /// The field.
        field: NameField,
        /// Units needed without the terminator.
        units: usize,
    },
    /// A fragment larger than `DATA_FRAGMENT`.
    #[error("WRITE_TO_FILE fragment of {size} bytes exceeds DATA_FRAGMENT ({DATA_FRAGMENT})")]
    FragmentTooLarge {
        /// `hv_do_fcopy.size`.
        size: u32,
    },
    /// A fragment whose `size` runs past the end of the message.
    #[error(
        "WRITE_TO_FILE fragment of {size} bytes runs past the message ({available} data bytes)"
    )]
    FragmentPastEnd {
        /// `hv_do_fcopy.size`.
        size: u32,
        /// Data bytes the message carries.
        available: usize,
    },
    /// `offset + size` overflows a u64.
    #[error("WRITE_TO_FILE at offset {offset} of {size} bytes overflows")]
    OffsetOverflow {
        /// `hv_do_fcopy.offset`.
        offset: u64,
        /// `hv_do_fcopy.size`.
        size: u32,
    },
}

/// A `START_FILE_COPY` request, names decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFcopy {
    /// `file_name`: not yet checked to be a single path component (see [`check_file_name`]).
    pub file_name: String,
    /// `path_name`: not yet checked to be an absolute path (see [`GuestDir::parse`]).
    pub path_name: String,
    /// `copy_flags`.
    pub flags: CopyFlags,
    /// `file_size`.
    pub file_size: u64,
}

/// One fcopy request as the host sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcopyRequest<'a> {
    /// `START_FILE_COPY`.
    Start(StartFcopy),
    /// `WRITE_TO_FILE`: `data` goes at `offset`; `offset + data.len()` does not overflow.
    Write {
        /// `hv_do_fcopy.offset`.
        offset: u64,
        /// The fragment, `hv_do_fcopy.size` bytes.
        data: &'a [u8],
    },
    /// `COMPLETE_FCOPY`.
    Complete,
    /// `CANCEL_FCOPY`.
    Cancel,
    /// Any other operation (Linux answers `HV_E_FAIL`).
    Unknown(FcopyOperation),
}

impl<'a> FcopyRequest<'a> {
    /// Reads an fcopy body (everything after `icmsg_hdr`). Bytes past the structure (ring
    /// padding, unused data) are ignored.
    pub fn parse(body: &'a [u8]) -> Result<Self, FcopyError> {
        let (header, _) =
            FcopyHeader::read_from_prefix(body).map_err(|_| FcopyError::Truncated {
                what: "hv_fcopy_hdr",
                need: FCOPY_HEADER_SIZE,
                got: body.len(),
            })?;
        Ok(match FcopyOperation(header.operation.get()) {
            FcopyOperation::START_FILE_COPY => {
                let (start, _) =
                    StartFcopyWire::ref_from_prefix(body).map_err(|_| FcopyError::Truncated {
                        what: "hv_start_fcopy",
                        need: START_FCOPY_SIZE,
                        got: body.len(),
                    })?;
                FcopyRequest::Start(StartFcopy {
                    file_name: decode_name(&start.file_name, NameField::FileName)?,
                    path_name: decode_name(&start.path_name, NameField::PathName)?,
                    flags: CopyFlags(start.copy_flags.get()),
                    file_size: start.file_size.get(),
                })
            }
            FcopyOperation::WRITE_TO_FILE => {
                let (fragment, rest) =
                    DoFcopyHeader::ref_from_prefix(body).map_err(|_| FcopyError::Truncated {
                        what: "hv_do_fcopy",
                        need: DO_FCOPY_DATA_OFFSET,
                        got: body.len(),
                    })?;
                let size = fragment.size.get();
                let offset = fragment.offset.get();
                if size as usize > DATA_FRAGMENT {
                    return Err(FcopyError::FragmentTooLarge { size });
                }
                let data = rest
                    .get(..size as usize)
                    .ok_or(FcopyError::FragmentPastEnd {
                        size,
                        available: rest.len(),
                    })?;
                if offset.checked_add(u64::from(size)).is_none() {
                    return Err(FcopyError::OffsetOverflow { offset, size });
                }
                FcopyRequest::Write { offset, data }
            }
            FcopyOperation::COMPLETE_FCOPY => FcopyRequest::Complete,
            FcopyOperation::CANCEL_FCOPY => FcopyRequest::Cancel,
            other => FcopyRequest::Unknown(other),
        })
    }

    /// The operation.
    pub fn operation(&self) -> FcopyOperation {
        match self {
            FcopyRequest::Start(_) => FcopyOperation::START_FILE_COPY,
            FcopyRequest::Write { .. } => FcopyOperation::WRITE_TO_FILE,
            FcopyRequest::Complete => FcopyOperation::COMPLETE_FCOPY,
            FcopyRequest::Cancel => FcopyOperation::CANCEL_FCOPY,
            FcopyRequest::Unknown(op) => *op,
        }
    }

    /// The body a host sends for this request: [`START_FCOPY_SIZE`] bytes for a start,
    /// [`DO_FCOPY_SIZE`] for a write (as Hyper-V sends the whole struct), the header alone for the
    /// others.
    pub fn build(&self) -> Result<Vec<u8>, FcopyError> {
        let header = FcopyHeader {
            operation: U32::new(self.operation().0),
            ..Default::default()
        };
        match self {
            FcopyRequest::Start(start) => {
                let mut wire = StartFcopyWire {
                    header,
                    file_name: [U16::ZERO; W_MAX_PATH],
                    path_name: [U16::ZERO; W_MAX_PATH],
                    copy_flags: U32::new(start.flags.0),
                    file_size: U64::new(start.file_size),
                };
                encode_name(&start.file_name, &mut wire.file_name, NameField::FileName)?;
                encode_name(&start.path_name, &mut wire.path_name, NameField::PathName)?;
                Ok(wire.as_bytes().to_vec())
            }
            FcopyRequest::Write { offset, data } => {
                let size = u32::try_from(data.len())
                    .ok()
                    .filter(|&s| s as usize <= DATA_FRAGMENT)
                    .ok_or(FcopyError::FragmentTooLarge {
                        size: u32::try_from(data.len()).unwrap_or(u32::MAX),
                    })?;
                let fragment = DoFcopyHeader {
                    header,
                    pad: U32::ZERO,
                    offset: U64::new(*offset),
                    size: U32::new(size),
                };
                let mut out = Vec::with_capacity(DO_FCOPY_SIZE);
                out.extend_from_slice(fragment.as_bytes());
                out.extend_from_slice(data);
                out.resize(DO_FCOPY_SIZE, 0);
                Ok(out)
            }
            _ => Ok(header.as_bytes().to_vec()),
        }
    }
}

/// Decodes one NUL-terminated UTF-16LE name field; the units after the NUL are ignored.
fn decode_name(units: &[U16; W_MAX_PATH], field: NameField) -> Result<String, FcopyError> {
    let len = units
        .iter()
        .position(|u| u.get() == 0)
        .ok_or(FcopyError::Unterminated { field })?;
    if len == 0 {
        return Err(FcopyError::Empty { field });
    }
    let mut out = String::with_capacity(len);
    let mut unit = 0;
    for decoded in char::decode_utf16(units[..len].iter().map(|u| u.get())) {
        match decoded {
            Ok(c) => {
                out.push(c);
                unit += c.len_utf16();
            }
            Err(_) => return Err(FcopyError::NotUtf16 { field, unit }),
        }
    }
    Ok(out)
}

/// Encodes `name` into a field, NUL-terminated, as a host does.
fn encode_name(
    name: &str,
    field_units: &mut [U16; W_MAX_PATH],
    field: NameField,
) -> Result<(), FcopyError> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() >= W_MAX_PATH {
        return Err(FcopyError::NameTooLong {
            field,
            units: units.len(),
        });
    }
    for (slot, u) in field_units.iter_mut().zip(&units) {
        *slot = U16::new(*u);
    }
    Ok(())
}

/// Why a name from the host is not one hvisd will create.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestPathError {
    /// `path_name` does not start with `/` (Copy-VMFile passes the guest path as typed; a
    /// relative or Windows-style path has no meaning in the guest).
    #[error("the destination directory is not an absolute path")]
    NotAbsolute,
    /// A `..` or `.` component.
    #[error("the path has a {0:?} component")]
    DotComponent(&'static str),
    /// A component (or the file name) longer than [`NAME_MAX`] bytes.
    #[error("a path component is {len} bytes long, more than NAME_MAX ({NAME_MAX})")]
    ComponentTooLong {
        /// Its length in bytes of UTF-8.
        len: usize,
    },
    /// A NUL or another control character.
    #[error("the name contains the control character {0:?}")]
    ControlCharacter(char),
    /// The file name contains `/`.
    #[error("the file name contains '/'")]
    SlashInFileName,
    /// The file name is empty.
    #[error("the file name is empty")]
    EmptyFileName,
}

/// Checks one component: not `.`/`..`, at most [`NAME_MAX`] bytes, no control character.
fn check_component(component: &str) -> Result<(), GuestPathError> {
    match component {
        "." => return Err(GuestPathError::DotComponent(".")),
        ".." => return Err(GuestPathError::DotComponent("..")),
        _ => {}
    }
    if component.len() > NAME_MAX {
        return Err(GuestPathError::ComponentTooLong {
            len: component.len(),
        });
    }
    if let Some(c) = component.chars().find(|c| c.is_control()) {
        return Err(GuestPathError::ControlCharacter(c));
    }
    Ok(())
}

/// Checks that `file_name` is one path component hvisd may create: not empty, no `/`, not `.`
/// or `..`, at most [`NAME_MAX`] bytes, no control character.
pub fn check_file_name(file_name: &str) -> Result<(), GuestPathError> {
    if file_name.is_empty() {
        return Err(GuestPathError::EmptyFileName);
    }
    if file_name.contains('/') {
        return Err(GuestPathError::SlashInFileName);
    }
    check_component(file_name)
}

/// A destination directory from the host: an absolute, `/`-separated guest path split into its
/// components (empty ones from `//` or a trailing `/` dropped, as the kernel does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDir<'a> {
    components: Vec<&'a str>,
}

impl<'a> GuestDir<'a> {
    /// Splits and checks `path_name`: it must start with `/`, and no component may be `.`,
    /// `..`, longer than [`NAME_MAX`] or contain a control character.
    pub fn parse(path_name: &'a str) -> Result<Self, GuestPathError> {
        let rest = path_name
            .strip_prefix('/')
            .ok_or(GuestPathError::NotAbsolute)?;
        let components: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
        for c in &components {
            check_component(c)?;
        }
        Ok(GuestDir { components })
    }

    /// The components, root first (`/` itself has none).
    pub fn components(&self) -> &[&'a str] {
        &self.components
    }

    /// The components after `prefix`, if the path is `prefix` or lies beneath it.
    pub fn strip_prefix<S: AsRef<str>>(&self, prefix: &[S]) -> Option<&[&'a str]> {
        if prefix.len() > self.components.len() {
            return None;
        }
        let (head, tail) = self.components.split_at(prefix.len());
        head.iter()
            .zip(prefix)
            .all(|(a, b)| *a == b.as_ref())
            .then_some(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn start(file_name: &str, path_name: &str) -> StartFcopy {
        StartFcopy {
            file_name: file_name.into(),
            path_name: path_name.into(),
            flags: CopyFlags::new(true, false),
            file_size: 12345,
        }
    }

    #[test]
    fn fields_sit_at_linux_offsets() {
        let body = FcopyRequest::Start(start("a.txt", "/tmp")).build().unwrap();
        assert_eq!(body.len(), 1088);
        assert_eq!(&body[0..4], &[0, 0, 0, 0]);
        assert_eq!(&body[36..38], &[b'a', 0]);
        assert_eq!(&body[556..560], &[b'/', 0, b't', 0]);
        assert_eq!(&body[1076..1080], &1u32.to_le_bytes());
        assert_eq!(&body[1080..1088], &12345u64.to_le_bytes());

        let body = FcopyRequest::Write {
            offset: 0x0102_0304_0506_0708,
            data: b"xyz",
        }
        .build()
        .unwrap();
        assert_eq!(body.len(), 6196);
        assert_eq!(&body[0..4], &1u32.to_le_bytes());
        assert_eq!(&body[36..40], &[0; 4], "pad");
        assert_eq!(&body[40..48], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&body[48..52], &3u32.to_le_bytes());
        assert_eq!(&body[52..55], b"xyz");
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            FcopyRequest::Start(start("ü€😀.bin", "/var/lib/hvisd/fcopy/")),
            FcopyRequest::Write {
                offset: 6144,
                data: &[7; DATA_FRAGMENT],
            },
            FcopyRequest::Write {
                offset: 0,
                data: &[],
            },
            FcopyRequest::Complete,
            FcopyRequest::Cancel,
            FcopyRequest::Unknown(FcopyOperation(9)),
        ];
        for r in requests {
            let body = r.build().unwrap();
            assert_eq!(FcopyRequest::parse(&body).unwrap(), r);
        }
    }

    #[test]
    fn short_bodies_are_refused_with_sizes() {
        assert_eq!(
            FcopyRequest::parse(&[0; 35]),
            Err(FcopyError::Truncated {
                what: "hv_fcopy_hdr",
                need: 36,
                got: 35
            })
        );
        let body = FcopyRequest::Start(start("a", "/b")).build().unwrap();
        assert!(matches!(
            FcopyRequest::parse(&body[..1087]),
            Err(FcopyError::Truncated {
                what: "hv_start_fcopy",
                ..
            })
        ));
        let body = FcopyRequest::Write {
            offset: 0,
            data: b"abc",
        }
        .build()
        .unwrap();
        assert!(matches!(
            FcopyRequest::parse(&body[..51]),
            Err(FcopyError::Truncated { .. })
        ));
        // The data may end where `size` says, without the rest of the array.
        assert!(FcopyRequest::parse(&body[..55]).is_ok());
        assert_eq!(
            FcopyRequest::parse(&body[..54]),
            Err(FcopyError::FragmentPastEnd {
                size: 3,
                available: 2
            })
        );
    }

    #[test]
    fn fragment_size_and_offset_are_bounded() {
        let mut body = FcopyRequest::Write {
            offset: 0,
            data: b"",
        }
        .build()
        .unwrap();
        body[48..52].copy_from_slice(&(DATA_FRAGMENT as u32 + 1).to_le_bytes());
        assert_eq!(
            FcopyRequest::parse(&body),
            Err(FcopyError::FragmentTooLarge { size: 6145 })
        );
        body[48..52].copy_from_slice(&2u32.to_le_bytes());
        body[40..48].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(matches!(
            FcopyRequest::parse(&body),
            Err(FcopyError::OffsetOverflow { .. })
        ));
        assert!(
            FcopyRequest::Write {
                offset: 0,
                data: &[0; DATA_FRAGMENT + 1]
            }
            .build()
            .is_err()
        );
    }

    #[test]
    fn names_must_be_terminated_utf16_and_not_empty() {
        let mut body = FcopyRequest::Start(start("a", "/b")).build().unwrap();
        // file_name: 260 units of 'x', no NUL.
        for i in 0..W_MAX_PATH {
            body[36 + 2 * i] = b'x';
        }
        assert_eq!(
            FcopyRequest::parse(&body),
            Err(FcopyError::Unterminated {
                field: NameField::FileName
            })
        );
        let mut body = FcopyRequest::Start(start("ab", "/b")).build().unwrap();
        body[38..40].copy_from_slice(&0xd800u16.to_le_bytes());
        assert_eq!(
            FcopyRequest::parse(&body),
            Err(FcopyError::NotUtf16 {
                field: NameField::FileName,
                unit: 1
            })
        );
        let mut body = FcopyRequest::Start(start("a", "/b")).build().unwrap();
        body[556..558].copy_from_slice(&[0, 0]);
        assert_eq!(
            FcopyRequest::parse(&body),
            Err(FcopyError::Empty {
                field: NameField::PathName
            })
        );
        // 259 units fit with their terminator, 260 do not.
        assert!(
            FcopyRequest::Start(start(&"n".repeat(259), "/"))
                .build()
                .is_ok()
        );
        assert!(matches!(
            FcopyRequest::Start(start(&"n".repeat(260), "/")).build(),
            Err(FcopyError::NameTooLong { units: 260, .. })
        ));
    }

    #[test]
    fn guest_dirs_are_absolute_without_dot_components() {
        let d = GuestDir::parse("/var//lib/hvisd/fcopy/").unwrap();
        assert_eq!(d.components(), ["var", "lib", "hvisd", "fcopy"]);
        assert_eq!(GuestDir::parse("/").unwrap().components().len(), 0);
        assert_eq!(
            d.strip_prefix(&["var", "lib"]),
            Some(&["hvisd", "fcopy"][..])
        );
        assert_eq!(d.strip_prefix(&["var", "li"]), None);
        assert_eq!(GuestDir::parse("tmp/x"), Err(GuestPathError::NotAbsolute));
        assert_eq!(
            GuestDir::parse("C:\\Temp"),
            Err(GuestPathError::NotAbsolute)
        );
        assert_eq!(
            GuestDir::parse("/var/lib/hvisd/fcopy/../../../etc"),
            Err(GuestPathError::DotComponent(".."))
        );
        assert_eq!(
            GuestDir::parse("/a/./b"),
            Err(GuestPathError::DotComponent("."))
        );
        assert_eq!(
            GuestDir::parse("/a/b\u{1b}[31m"),
            Err(GuestPathError::ControlCharacter('\u{1b}'))
        );
        assert!(matches!(
            GuestDir::parse(&format!("/{}", "x".repeat(256))),
            Err(GuestPathError::ComponentTooLong { len: 256 })
        ));
        assert_eq!(check_file_name("a.txt"), Ok(()));
        assert_eq!(check_file_name("a/b"), Err(GuestPathError::SlashInFileName));
        assert_eq!(
            check_file_name(".."),
            Err(GuestPathError::DotComponent(".."))
        );
        assert_eq!(check_file_name(""), Err(GuestPathError::EmptyFileName));
        assert_eq!(
            check_file_name("a\0b"),
            Err(GuestPathError::ControlCharacter('\0'))
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_writes_stay_inside_the_body(
            bytes in proptest::collection::vec(any::<u8>(), 0..7000),
            op in 0u32..5,
        ) {
            let mut bytes = bytes;
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&op.to_le_bytes());
            }
            match FcopyRequest::parse(&bytes) {
                Ok(FcopyRequest::Write { offset, data }) => {
                    prop_assert!(data.len() <= DATA_FRAGMENT);
                    prop_assert!(DO_FCOPY_DATA_OFFSET + data.len() <= bytes.len());
                    prop_assert!(offset.checked_add(data.len() as u64).is_some());
                }
                Ok(FcopyRequest::Start(s)) => {
                    prop_assert!(bytes.len() >= START_FCOPY_SIZE);
                    prop_assert!(!s.file_name.is_empty() && !s.path_name.is_empty());
                    prop_assert!(s.file_name.encode_utf16().count() < W_MAX_PATH);
                    prop_assert!(!s.file_name.contains('\0'));
                }
                Ok(_) | Err(_) => {}
            }
        }

        #[test]
        fn names_round_trip(
            file_name in "[^\u{0}]{1,80}",
            path_name in "/[^\u{0}]{0,80}",
            overwrite in any::<bool>(),
            create_path in any::<bool>(),
            file_size in any::<u64>(),
        ) {
            let s = StartFcopy {
                file_name,
                path_name,
                flags: CopyFlags::new(overwrite, create_path),
                file_size,
            };
            let r = FcopyRequest::Start(s);
            let body = r.build().unwrap();
            prop_assert_eq!(FcopyRequest::parse(&body).unwrap(), r);
        }

        #[test]
        fn checked_guest_dirs_have_only_plain_components(path in "[/a-z.\u{1}]{0,40}") {
            if let Ok(d) = GuestDir::parse(&path) {
                prop_assert!(path.starts_with('/'));
                for c in d.components() {
                    prop_assert!(!c.is_empty() && *c != "." && *c != "..");
                    prop_assert!(!c.contains('/') && !c.contains('\x01'));
                }
            }
        }
    }
}
