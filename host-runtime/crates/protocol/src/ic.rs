//! `vmbuspipe_hdr`, `icmsg_hdr` and version negotiation messages.

/// An IC version: `{u16 major, u16 minor}` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IcVersion {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}
