//! GUIDs as Hyper-V writes them: text 8-4-4-4-12 and Microsoft's mixed-endian binary layout.

/// A GUID in its logical fields (data1..data4), converted to/from text and the wire layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid {
    /// First group (stored little-endian on the wire).
    pub data1: u32,
    /// Second group (little-endian on the wire).
    pub data2: u16,
    /// Third group (little-endian on the wire).
    pub data3: u16,
    /// Last 8 bytes, in order.
    pub data4: [u8; 8],
}
