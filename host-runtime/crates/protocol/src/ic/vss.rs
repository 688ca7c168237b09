//! VSS (backup) IC message header (`struct hv_vss_hdr`) and its operations.
//!
//! Only the framing every VSS message shares; the VSS service itself lives elsewhere.

use super::IcParseError;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct hv_vss_hdr`: the first 8 bytes of every VSS message body.
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
pub struct VssHeader {
    /// The operation, see [`VssOperation`].
    pub operation: u8,
    /// Reserved.
    pub reserved: [u8; 7],
}

/// `struct hv_vss_msg` as the host sends it: the header, then one `u32` of operation data
/// (`hv_vss_check_feature.flags` or `hv_vss_check_dm_info.flags`).
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
pub struct VssMsg {
    /// Header.
    pub header: VssHeader,
    /// Operation-specific flags.
    pub flags: U32,
}

const _: () = assert!(size_of::<VssHeader>() == 8);
const _: () = assert!(size_of::<VssMsg>() == 12);

/// `hv_vss_hdr.operation`: an open enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VssOperation(pub u8);

impl VssOperation {
    /// Create a snapshot (pre-5.0 hosts).
    pub const CREATE: VssOperation = VssOperation(0);
    /// Delete a snapshot.
    pub const DELETE: VssOperation = VssOperation(1);
    /// Hot backup feature query.
    pub const HOT_BACKUP: VssOperation = VssOperation(2);
    /// Dynamic-memory info query.
    pub const GET_DM_INFO: VssOperation = VssOperation(3);
    /// Backup complete.
    pub const BU_COMPLETE: VssOperation = VssOperation(4);
    /// Freeze file systems (message version 5.0+).
    pub const FREEZE: VssOperation = VssOperation(5);
    /// Thaw file systems.
    pub const THAW: VssOperation = VssOperation(6);
    /// Auto-recover.
    pub const AUTO_RECOVER: VssOperation = VssOperation(7);
}

/// `hv_vss_check_feature.flags` Linux answers `HOT_BACKUP` with.
pub const VSS_HBU_NO_AUTO_RECOVERY: u32 = 0x0000_0005;

/// Reads the VSS header from a message body.
pub fn parse_header(body: &[u8]) -> Result<VssHeader, IcParseError> {
    VssHeader::read_from_prefix(body)
        .map(|(h, _)| h)
        .map_err(|_| IcParseError::Truncated {
            what: "hv_vss_hdr",
            need: size_of::<VssHeader>(),
            got: body.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_operation_is_the_first_byte() {
        let h = parse_header(&[5, 0, 0, 0, 0, 0, 0, 0, 9]).unwrap();
        assert_eq!(VssOperation(h.operation), VssOperation::FREEZE);
        assert!(parse_header(&[5; 7]).is_err());
    }
}
