//! The packet wire format: a 16-byte descriptor, the payload padded to 8 bytes, and an
//! 8-byte trailer.

/// `VM_PKT_INVALID`.
pub const PACKET_TYPE_INVALID: u16 = 0;
/// `VM_PKT_SYNCH`.
pub const PACKET_TYPE_SYNCH: u16 = 1;
/// `VM_PKT_ADD_XFER_PAGESET`.
pub const PACKET_TYPE_ADD_TRANSFER_PAGE_SET: u16 = 2;
/// `VM_PKT_RM_XFER_PAGESET`.
pub const PACKET_TYPE_REMOVE_TRANSFER_PAGE_SET: u16 = 3;
/// `VM_PKT_ESTABLISH_GPADL`.
pub const PACKET_TYPE_ESTABLISH_GPADL: u16 = 4;
/// `VM_PKT_TEARDOWN_GPADL`.
pub const PACKET_TYPE_TEARDOWN_GPADL: u16 = 5;
/// `VM_PKT_DATA_INBAND`: the payload follows the descriptor in the ring. Every
/// integration-component and hvsock packet is of this type.
pub const PACKET_TYPE_DATA_INBAND: u16 = 6;
/// `VM_PKT_DATA_USING_XFER_PAGES`.
pub const PACKET_TYPE_DATA_USING_TRANSFER_PAGES: u16 = 7;
/// `VM_PKT_DATA_USING_GPADL`.
pub const PACKET_TYPE_DATA_USING_GPADL: u16 = 8;
/// `VM_PKT_DATA_USING_GPA_DIRECT`.
pub const PACKET_TYPE_DATA_USING_GPA_DIRECT: u16 = 9;
/// `VM_PKT_CANCEL_REQUEST`.
pub const PACKET_TYPE_CANCEL_REQUEST: u16 = 10;
/// `VM_PKT_COMP`: a completion echoing a request's transaction id.
pub const PACKET_TYPE_COMPLETION: u16 = 11;
/// `VM_PKT_DATA_USING_ADDITIONAL_PKT`.
pub const PACKET_TYPE_DATA_USING_ADDITIONAL_PACKET: u16 = 12;
/// `VM_PKT_ADDITIONAL_DATA`.
pub const PACKET_TYPE_ADDITIONAL_DATA: u16 = 13;

/// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`: the sender wants a completion packet.
pub const PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;

/// Bytes of a packet descriptor `{u16 type, u16 offset8, u16 len8, u16 flags, u64 trans_id}`.
pub const DESCRIPTOR_LEN: usize = 16;

/// Bytes of the trailer after each packet (`u64 = start_write_index << 32`).
pub const TRAILER_LEN: usize = 8;

/// Largest `len8` a descriptor can carry; bounds any single packet to 512 KiB - 8.
pub const MAX_PACKET_LEN8: usize = u16::MAX as usize;

/// The descriptor fields a sender chooses (`offset8`/`len8` follow from the payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PacketHeader {
    /// `VM_PKT_*` type; an open set, see the `PACKET_TYPE_*` constants.
    pub packet_type: u16,
    /// Descriptor flags, e.g. [`PACKET_FLAG_COMPLETION_REQUESTED`].
    pub flags: u16,
    /// Transaction id, echoed by the peer in replies and completions.
    pub transaction_id: u64,
}

impl PacketHeader {
    /// An in-band data packet (`VM_PKT_DATA_INBAND`) with no flags.
    pub fn inband(transaction_id: u64) -> Self {
        Self {
            packet_type: PACKET_TYPE_DATA_INBAND,
            flags: 0,
            transaction_id,
        }
    }
}

/// Ring bytes taken by a packet with `payload_len` bytes of payload: descriptor, payload
/// padded to 8, trailer. A write fits only if the ring has MORE free bytes than this
/// (the ring never becomes completely full), and this is the value to give
/// [`crate::RingWriter::set_pending_send_size`].
pub const fn packet_len(payload_len: usize) -> usize {
    DESCRIPTOR_LEN + payload_len.next_multiple_of(8) + TRAILER_LEN
}

/// A descriptor as laid out in the ring (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub packet_type: u16,
    pub offset8: u16,
    pub len8: u16,
    pub flags: u16,
    pub transaction_id: u64,
}

impl Descriptor {
    #[cfg(test)]
    pub fn to_bytes(self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..2].copy_from_slice(&self.packet_type.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset8.to_le_bytes());
        b[4..6].copy_from_slice(&self.len8.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.transaction_id.to_le_bytes());
        b
    }

    /// The descriptor as the two little-endian words the ring holds.
    pub fn to_words(self) -> [u64; 2] {
        [
            u64::from(self.packet_type)
                | u64::from(self.offset8) << 16
                | u64::from(self.len8) << 32
                | u64::from(self.flags) << 48,
            self.transaction_id,
        ]
    }

    /// Parses the two words of a descriptor.
    pub fn from_words(words: [u64; 2]) -> Self {
        let w = words[0];
        Self {
            packet_type: w as u16,
            offset8: (w >> 16) as u16,
            len8: (w >> 32) as u16,
            flags: (w >> 48) as u16,
            transaction_id: words[1],
        }
    }

    #[cfg(test)]
    pub fn from_bytes(b: &[u8; DESCRIPTOR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[8..16]);
        Self {
            packet_type: u16_at(0),
            offset8: u16_at(2),
            len8: u16_at(4),
            flags: u16_at(6),
            transaction_id: u64::from_le_bytes(id),
        }
    }
}

/// The trailer a writer puts after a packet that starts at `start_write_index`.
#[inline]
pub(crate) fn trailer(start_write_index: usize) -> u64 {
    (start_write_index as u64) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_bytes_are_little_endian_in_wire_order() {
        let d = Descriptor {
            packet_type: 6,
            offset8: 2,
            len8: 0x0103,
            flags: 1,
            transaction_id: 0x1122_3344_5566_7788,
        };
        let b = d.to_bytes();
        assert_eq!(
            b,
            [
                6, 0, 2, 0, 3, 1, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
        assert_eq!(Descriptor::from_bytes(&b), d);
        let words = d.to_words();
        let mut from_words = [0u8; 16];
        from_words[..8].copy_from_slice(&words[0].to_le_bytes());
        from_words[8..].copy_from_slice(&words[1].to_le_bytes());
        assert_eq!(from_words, b, "words in memory are the wire bytes");
        assert_eq!(Descriptor::from_words(words), d);
    }

    #[test]
    fn packet_len_counts_descriptor_padding_and_trailer() {
        assert_eq!(packet_len(0), 24);
        assert_eq!(packet_len(1), 32);
        assert_eq!(packet_len(8), 32);
        assert_eq!(packet_len(9), 40);
    }

    #[test]
    fn trailer_holds_start_index_in_high_word() {
        assert_eq!(trailer(0x1238), 0x0000_1238_0000_0000);
    }
}
