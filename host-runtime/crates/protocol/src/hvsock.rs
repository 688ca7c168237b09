//! hvsock framing: the `vmpipe_proto_header` in front of every byte-pipe packet, and the messages
//! of the shm transport's `ROOT/control` socket (see `shared/specs/shm-transport.md`).

use crate::guid::{GUID_SIZE, Guid};
use zerocopy::little_endian::{I32, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct vmpipe_proto_header`: in front of the data of every packet on an hvsock channel.
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
pub struct VmpipeProtoHeader {
    /// Packet type; only [`VMPIPE_PKT_TYPE_DATA`] is defined.
    pub pkt_type: U32,
    /// Bytes of stream data after this header; 0 means the sender shut down its direction.
    pub data_size: U32,
}

const _: () = assert!(size_of::<VmpipeProtoHeader>() == 8);

/// Size of [`VmpipeProtoHeader`].
pub const VMPIPE_HEADER_SIZE: usize = size_of::<VmpipeProtoHeader>();
/// `pkt_type` of a data packet (Linux's `VMPIPE_PKT_TYPE_DATA`).
pub const VMPIPE_PKT_TYPE_DATA: u32 = 1;

/// Most stream bytes one packet may carry: Linux's `HVS_MTU_SIZE` ("the MTU is 16KB per the host
/// side's design"). Linux's `hvs_update_recv_data` refuses a packet whose `data_size` is larger
/// (`-EIO`), and so does [`parse_pipe_header`]; no sender here builds one.
pub const HVS_MTU_SIZE: usize = 16 * 1024;

/// Most stream bytes Linux's guest puts in one packet: `HVS_SEND_BUF_SIZE`, one 4 KiB page less the
/// header, chosen "to maximize concurrency between the guest and the host processing as one VMBUS
/// packet is the smallest processing unit". Any size up to [`HVS_MTU_SIZE`] is valid on the wire.
pub const LINUX_SEND_BUF_SIZE: usize = 4096 - VMPIPE_HEADER_SIZE;

/// Why bytes are not a valid hvsock packet or control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvsockParseError {
    /// The packet is shorter than its header.
    #[error("hvsock packet of {got} bytes is shorter than the {need}-byte vmpipe_proto_header")]
    Truncated {
        /// Header size.
        need: usize,
        /// Packet length.
        got: usize,
    },
    /// `pkt_type` is not `VMPIPE_PKT_TYPE_DATA`.
    #[error("hvsock packet type {0}, only 1 (data) is defined")]
    UnknownPacketType(u32),
    /// `data_size` is above [`HVS_MTU_SIZE`] (Linux refuses such a packet too).
    #[error("hvsock packet claims {data_size} data bytes, more than the {HVS_MTU_SIZE}-byte MTU")]
    DataOverMtu {
        /// `data_size`.
        data_size: u32,
    },
    /// `data_size` claims more bytes than the packet carries.
    #[error("hvsock packet claims {data_size} data bytes but carries only {available}")]
    DataPastEnd {
        /// `data_size`.
        data_size: u32,
        /// Bytes after the header.
        available: usize,
    },
    /// Data to send is larger than one packet may carry ([`HVS_MTU_SIZE`]).
    #[error("hvsock data of {len} bytes does not fit one packet (at most {HVS_MTU_SIZE})")]
    DataTooLarge {
        /// Data length.
        len: usize,
    },
    /// A control message has the wrong size (they are fixed-size datagrams).
    #[error("{what}: expected exactly {expected} bytes, got {got}")]
    WrongLength {
        /// Which message.
        what: &'static str,
        /// Its fixed size.
        expected: usize,
        /// Size received.
        got: usize,
    },
}

/// What one hvsock packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipePacket<'a> {
    /// Stream bytes (never empty).
    Data(&'a [u8]),
    /// The sender shut down its sending direction (`data_size` 0).
    Shutdown,
}

/// What a packet's `vmpipe_proto_header` announces, checked against the packet's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeFrame {
    /// `len` stream bytes follow the header (`1..=HVS_MTU_SIZE`, and inside the packet).
    Data {
        /// Bytes of stream data right after the header.
        len: usize,
    },
    /// The sender shut down its sending direction (`data_size` 0).
    Shutdown,
}

/// Parses the header of an hvsock packet whose payload (what follows the VMBus descriptor) is
/// `payload_len` bytes long and starts with `head` (its first bytes: at least
/// [`VMPIPE_HEADER_SIZE`] of them if the payload has that many; more are ignored).
///
/// The checks are Linux's `hvs_update_recv_data` plus the packet type: the header must fit the
/// packet, `pkt_type` must be 1, and `data_size` must be at most [`HVS_MTU_SIZE`] and fit in the
/// payload after the header. Bytes after `data_size` are ring padding.
pub fn parse_pipe_header(head: &[u8], payload_len: usize) -> Result<PipeFrame, HvsockParseError> {
    let truncated = HvsockParseError::Truncated {
        need: VMPIPE_HEADER_SIZE,
        got: payload_len.min(head.len()),
    };
    if payload_len < VMPIPE_HEADER_SIZE {
        return Err(truncated);
    }
    let (hdr, _) = VmpipeProtoHeader::read_from_prefix(head).map_err(|_| truncated)?;
    let pkt_type = hdr.pkt_type.get();
    if pkt_type != VMPIPE_PKT_TYPE_DATA {
        return Err(HvsockParseError::UnknownPacketType(pkt_type));
    }
    let data_size = hdr.data_size.get();
    if data_size == 0 {
        return Ok(PipeFrame::Shutdown);
    }
    let available = payload_len - VMPIPE_HEADER_SIZE;
    // u32 -> usize is lossless on every target hvisd builds for (64-bit Linux).
    let len = data_size as usize;
    if len > HVS_MTU_SIZE {
        return Err(HvsockParseError::DataOverMtu { data_size });
    }
    if len > available {
        return Err(HvsockParseError::DataPastEnd {
            data_size,
            available,
        });
    }
    Ok(PipeFrame::Data { len })
}

/// Parses one whole hvsock packet payload. Bytes after `data_size` are ring padding and are ignored.
pub fn parse_pipe_packet(payload: &[u8]) -> Result<PipePacket<'_>, HvsockParseError> {
    match parse_pipe_header(payload, payload.len())? {
        PipeFrame::Shutdown => Ok(PipePacket::Shutdown),
        // parse_pipe_header checked that `len` bytes follow the header.
        PipeFrame::Data { len } => Ok(PipePacket::Data(
            &payload[VMPIPE_HEADER_SIZE..VMPIPE_HEADER_SIZE + len],
        )),
    }
}

/// The header for a data packet of `data_len` bytes (0 announces a shutdown); at most
/// [`HVS_MTU_SIZE`].
pub fn pipe_header(data_len: usize) -> Result<VmpipeProtoHeader, HvsockParseError> {
    if data_len > HVS_MTU_SIZE {
        return Err(HvsockParseError::DataTooLarge { len: data_len });
    }
    Ok(VmpipeProtoHeader {
        pkt_type: U32::new(VMPIPE_PKT_TYPE_DATA),
        // At most HVS_MTU_SIZE: fits.
        data_size: U32::new(data_len as u32),
    })
}

/// Builds a whole packet payload: header then `data` (empty `data` builds a shutdown packet).
pub fn build_pipe_packet(data: &[u8]) -> Result<Vec<u8>, HvsockParseError> {
    let hdr = pipe_header(data.len())?;
    let mut out = Vec::with_capacity(VMPIPE_HEADER_SIZE + data.len());
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// The guest's connect request on `ROOT/control`, as laid out on the socket.
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
pub struct ConnectRequestWire {
    /// Endpoint (connection instance) GUID chosen by the guest, binary layout.
    pub endpoint_id: [u8; GUID_SIZE],
    /// Service GUID the guest connects to, binary layout.
    pub service_id: [u8; GUID_SIZE],
}

/// The host's answer on `ROOT/control`, as laid out on the socket.
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
pub struct ConnectReplyWire {
    /// Echo of the request's endpoint GUID.
    pub endpoint_id: [u8; GUID_SIZE],
    /// Echo of the request's service GUID.
    pub service_id: [u8; GUID_SIZE],
    /// 0: an offer for this connection follows; anything else refuses it.
    pub status: I32,
}

/// Size of a connect request.
pub const CONNECT_REQUEST_SIZE: usize = size_of::<ConnectRequestWire>();
/// Size of a connect reply.
pub const CONNECT_REPLY_SIZE: usize = size_of::<ConnectReplyWire>();

const _: () = assert!(CONNECT_REQUEST_SIZE == 32);
const _: () = assert!(CONNECT_REPLY_SIZE == 36);

/// A guest-initiated hvsock connection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectRequest {
    /// The connection's endpoint GUID (becomes the offer's `instance_id`).
    pub endpoint_id: Guid,
    /// The service GUID (becomes the offer's `class_id`).
    pub service_id: Guid,
}

impl ConnectRequest {
    /// Parses one control datagram; it must be exactly 32 bytes.
    pub fn parse(msg: &[u8]) -> Result<Self, HvsockParseError> {
        let wire = ConnectRequestWire::read_from_bytes(msg).map_err(|_| {
            HvsockParseError::WrongLength {
                what: "hvsock connect request",
                expected: CONNECT_REQUEST_SIZE,
                got: msg.len(),
            }
        })?;
        Ok(ConnectRequest {
            endpoint_id: Guid::from_bytes(wire.endpoint_id),
            service_id: Guid::from_bytes(wire.service_id),
        })
    }

    /// The 32-byte datagram.
    pub fn to_bytes(&self) -> [u8; CONNECT_REQUEST_SIZE] {
        let wire = ConnectRequestWire {
            endpoint_id: self.endpoint_id.to_bytes(),
            service_id: self.service_id.to_bytes(),
        };
        let mut out = [0; CONNECT_REQUEST_SIZE];
        out.copy_from_slice(wire.as_bytes());
        out
    }
}

/// The host's answer to a [`ConnectRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectReply {
    /// Echo of the request's endpoint GUID.
    pub endpoint_id: Guid,
    /// Echo of the request's service GUID.
    pub service_id: Guid,
    /// 0 accepts (an offer follows); any other value refuses.
    pub status: i32,
}

impl ConnectReply {
    /// Parses one control datagram; it must be exactly 36 bytes.
    pub fn parse(msg: &[u8]) -> Result<Self, HvsockParseError> {
        let wire =
            ConnectReplyWire::read_from_bytes(msg).map_err(|_| HvsockParseError::WrongLength {
                what: "hvsock connect reply",
                expected: CONNECT_REPLY_SIZE,
                got: msg.len(),
            })?;
        Ok(ConnectReply {
            endpoint_id: Guid::from_bytes(wire.endpoint_id),
            service_id: Guid::from_bytes(wire.service_id),
            status: wire.status.get(),
        })
    }

    /// The 36-byte datagram.
    pub fn to_bytes(&self) -> [u8; CONNECT_REPLY_SIZE] {
        let wire = ConnectReplyWire {
            endpoint_id: self.endpoint_id.to_bytes(),
            service_id: self.service_id.to_bytes(),
            status: I32::new(self.status),
        };
        let mut out = [0; CONNECT_REPLY_SIZE];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// True if the host accepted the connection.
    pub fn accepted(&self) -> bool {
        self.status == 0
    }

    /// True if this reply answers `request` (both GUIDs echoed).
    pub fn answers(&self, request: &ConnectRequest) -> bool {
        self.endpoint_id == request.endpoint_id && self.service_id == request.service_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guid::class_id;
    use proptest::prelude::*;

    #[test]
    fn data_packet_round_trips_and_ignores_padding() {
        let mut packet = build_pipe_packet(b"hello").unwrap();
        assert_eq!(&packet[..8], &[1, 0, 0, 0, 5, 0, 0, 0]);
        packet.extend_from_slice(&[0xee; 3]); // ring padding
        assert_eq!(parse_pipe_packet(&packet), Ok(PipePacket::Data(b"hello")));
    }

    #[test]
    fn zero_data_size_is_a_shutdown() {
        let packet = build_pipe_packet(&[]).unwrap();
        assert_eq!(parse_pipe_packet(&packet), Ok(PipePacket::Shutdown));
    }

    #[test]
    fn bad_packets_are_rejected_with_reasons() {
        assert_eq!(
            parse_pipe_packet(&[1, 0, 0]),
            Err(HvsockParseError::Truncated { need: 8, got: 3 })
        );
        assert_eq!(
            parse_pipe_packet(&[2, 0, 0, 0, 0, 0, 0, 0]),
            Err(HvsockParseError::UnknownPacketType(2))
        );
        assert_eq!(
            parse_pipe_packet(&[1, 0, 0, 0, 9, 0, 0, 0, 1, 2]),
            Err(HvsockParseError::DataPastEnd {
                data_size: 9,
                available: 2
            })
        );
    }

    #[test]
    fn control_messages_have_the_spec_layout() {
        let req = ConnectRequest {
            endpoint_id: Guid::for_vsock_port(0x1234),
            service_id: class_id::KVP,
        };
        let bytes = req.to_bytes();
        assert_eq!(&bytes[..4], &[0x34, 0x12, 0, 0]);
        assert_eq!(&bytes[16..32], &class_id::KVP.to_bytes());
        assert_eq!(ConnectRequest::parse(&bytes), Ok(req));

        let reply = ConnectReply {
            endpoint_id: req.endpoint_id,
            service_id: req.service_id,
            status: -5,
        };
        let bytes = reply.to_bytes();
        assert_eq!(&bytes[32..], &(-5i32).to_le_bytes());
        let back = ConnectReply::parse(&bytes).unwrap();
        assert_eq!(back, reply);
        assert!(back.answers(&req));
        assert!(!back.accepted());
    }

    #[test]
    fn control_messages_must_have_exact_sizes() {
        assert!(matches!(
            ConnectRequest::parse(&[0; 33]),
            Err(HvsockParseError::WrongLength {
                expected: 32,
                got: 33,
                ..
            })
        ));
        assert!(matches!(
            ConnectReply::parse(&[0; 32]),
            Err(HvsockParseError::WrongLength {
                expected: 36,
                got: 32,
                ..
            })
        ));
    }

    #[test]
    fn data_over_the_mtu_is_refused_as_linux_does() {
        let mut packet = vec![1, 0, 0, 0];
        packet.extend_from_slice(&(HVS_MTU_SIZE as u32 + 1).to_le_bytes());
        packet.resize(8 + HVS_MTU_SIZE + 8, 0);
        assert_eq!(
            parse_pipe_packet(&packet),
            Err(HvsockParseError::DataOverMtu {
                data_size: HVS_MTU_SIZE as u32 + 1
            })
        );
        let full = build_pipe_packet(&vec![7; HVS_MTU_SIZE]).unwrap();
        assert!(
            matches!(parse_pipe_packet(&full), Ok(PipePacket::Data(d)) if d.len() == HVS_MTU_SIZE)
        );
        assert_eq!(
            build_pipe_packet(&vec![7; HVS_MTU_SIZE + 1]),
            Err(HvsockParseError::DataTooLarge {
                len: HVS_MTU_SIZE + 1
            })
        );
    }

    #[test]
    fn header_is_checked_against_the_payload_length_not_the_bytes_given() {
        let head = [1, 0, 0, 0, 100, 0, 0, 0];
        assert_eq!(
            parse_pipe_header(&head, 108),
            Ok(PipeFrame::Data { len: 100 })
        );
        assert_eq!(
            parse_pipe_header(&head, 107),
            Err(HvsockParseError::DataPastEnd {
                data_size: 100,
                available: 99
            })
        );
        assert_eq!(
            parse_pipe_header(&head[..4], 4),
            Err(HvsockParseError::Truncated { need: 8, got: 4 })
        );
    }

    proptest! {
        #[test]
        fn pipe_parser_never_panics_and_data_is_inside_the_packet(
            bytes in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            if let Ok(PipePacket::Data(d)) = parse_pipe_packet(&bytes) {
                prop_assert!(!d.is_empty());
                prop_assert_eq!(d, &bytes[8..8 + d.len()]);
            }
        }

        #[test]
        fn header_parse_agrees_with_packet_parse(
            head in any::<[u8; 8]>(),
            payload_len in 0usize..20_000,
        ) {
            match parse_pipe_header(&head, payload_len) {
                Ok(PipeFrame::Data { len }) => {
                    prop_assert!((1..=HVS_MTU_SIZE).contains(&len));
                    prop_assert!(VMPIPE_HEADER_SIZE + len <= payload_len);
                    let mut packet = head.to_vec();
                    packet.resize(payload_len, 0);
                    prop_assert!(matches!(parse_pipe_packet(&packet), Ok(PipePacket::Data(d)) if d.len() == len));
                }
                Ok(PipeFrame::Shutdown) => prop_assert!(payload_len >= VMPIPE_HEADER_SIZE),
                Err(_) => {}
            }
        }

        #[test]
        fn built_packets_parse_back(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let packet = build_pipe_packet(&data).unwrap();
            match parse_pipe_packet(&packet).unwrap() {
                PipePacket::Data(d) => prop_assert_eq!(d, &data[..]),
                PipePacket::Shutdown => prop_assert!(data.is_empty()),
            }
        }

        #[test]
        fn control_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            prop_assert_eq!(ConnectRequest::parse(&bytes).is_ok(), bytes.len() == 32);
            prop_assert_eq!(ConnectReply::parse(&bytes).is_ok(), bytes.len() == 36);
        }
    }
}
