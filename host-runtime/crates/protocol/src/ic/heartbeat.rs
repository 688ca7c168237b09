//! Heartbeat IC message (`struct heartbeat_msg_data`).
//!
//! Hyper-V sends one every few seconds; the guest answers with the sequence number plus one.

use super::IcParseError;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct heartbeat_msg_data`.
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
pub struct HeartbeatMsg {
    /// Sequence number from the host; the reply carries it plus one.
    pub seq_num: U64,
    /// Reserved. Hosts may send fewer of these bytes, so Linux only requires `seq_num`.
    pub reserved: [U32; 8],
}

const _: () = assert!(size_of::<HeartbeatMsg>() == 40);

/// Bytes of a heartbeat body Linux requires: just `seq_num`.
pub const HEARTBEAT_MIN_BODY: usize = size_of::<u64>();

/// Reads `seq_num` from a heartbeat body.
pub fn read_seq_num(body: &[u8]) -> Result<u64, IcParseError> {
    U64::read_from_prefix(body)
        .map(|(seq, _)| seq.get())
        .map_err(|_| IcParseError::Truncated {
            what: "heartbeat seq_num",
            need: HEARTBEAT_MIN_BODY,
            got: body.len(),
        })
}

/// Writes `seq_num` into a heartbeat body in place.
pub fn write_seq_num(body: &mut [u8], seq_num: u64) -> Result<(), IcParseError> {
    let got = body.len();
    body.get_mut(..HEARTBEAT_MIN_BODY)
        .ok_or(IcParseError::Truncated {
            what: "heartbeat seq_num",
            need: HEARTBEAT_MIN_BODY,
            got,
        })?
        .copy_from_slice(&seq_num.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seq_num_is_the_first_eight_little_endian_bytes() {
        let mut body = HeartbeatMsg {
            seq_num: U64::new(0x0102_0304_0506_0708),
            ..Default::default()
        }
        .as_bytes()
        .to_vec();
        assert_eq!(body[0], 0x08);
        assert_eq!(read_seq_num(&body), Ok(0x0102_0304_0506_0708));
        write_seq_num(&mut body, 9).unwrap();
        assert_eq!(&body[..8], &9u64.to_le_bytes());
        assert!(body[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn short_body_is_rejected_with_its_length() {
        assert_eq!(
            read_seq_num(&[1, 2, 3]),
            Err(IcParseError::Truncated {
                what: "heartbeat seq_num",
                need: 8,
                got: 3
            })
        );
        assert!(write_seq_num(&mut [0; 7], 1).is_err());
    }

    proptest! {
        #[test]
        fn read_seq_num_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(read_seq_num(&bytes).is_ok(), bytes.len() >= 8);
        }
    }
}
