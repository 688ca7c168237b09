//! Guest file copy IC message header (`struct hv_fcopy_hdr`) and its operations.
//!
//! Only the framing; the sizes of the two large messages are pinned for a future service.

use super::IcParseError;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Longest path or file name in UTF-16 units (Linux's `W_MAX_PATH`).
pub const W_MAX_PATH: usize = 260;
/// Largest data fragment in one `WRITE_TO_FILE` (Linux's `DATA_FRAGMENT`).
pub const DATA_FRAGMENT: usize = 6 * 1024;

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

const _: () = assert!(size_of::<FcopyHeader>() == 36);

/// Size of `struct hv_start_fcopy`: header, two UTF-16 names, `u32 copy_flags`, `u64 file_size`.
pub const START_FCOPY_SIZE: usize = size_of::<FcopyHeader>() + 2 * 2 * W_MAX_PATH + 4 + 8;
/// Size of `struct hv_do_fcopy`: header, `u64 offset`, `u32 size`, then the data fragment.
pub const DO_FCOPY_SIZE: usize = size_of::<FcopyHeader>() + 8 + 4 + DATA_FRAGMENT;

const _: () = assert!(START_FCOPY_SIZE == 1088);
const _: () = assert!(DO_FCOPY_SIZE == 6192);

/// `hv_fcopy_hdr.operation`: an open enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FcopyOperation(pub u32);

impl FcopyOperation {
    /// Create the target file.
    pub const START_FILE_COPY: FcopyOperation = FcopyOperation(0);
    /// Write one fragment.
    pub const WRITE_TO_FILE: FcopyOperation = FcopyOperation(1);
    /// Close the file.
    pub const COMPLETE_FCOPY: FcopyOperation = FcopyOperation(2);
    /// Abandon the copy.
    pub const CANCEL_FCOPY: FcopyOperation = FcopyOperation(3);
}

/// `copy_flags`: overwrite an existing file.
pub const OVER_WRITE: u32 = 0x1;
/// `copy_flags`: create missing directories.
pub const CREATE_PATH: u32 = 0x2;

/// Reads the fcopy header from a message body.
pub fn parse_header(body: &[u8]) -> Result<FcopyHeader, IcParseError> {
    FcopyHeader::read_from_prefix(body)
        .map(|(h, _)| h)
        .map_err(|_| IcParseError::Truncated {
            what: "hv_fcopy_hdr",
            need: size_of::<FcopyHeader>(),
            got: body.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_operation_is_a_little_endian_u32() {
        let mut body = [0u8; 40];
        body[0] = 2;
        let h = parse_header(&body).unwrap();
        assert_eq!(
            FcopyOperation(h.operation.get()),
            FcopyOperation::COMPLETE_FCOPY
        );
        assert!(parse_header(&body[..35]).is_err());
    }
}
