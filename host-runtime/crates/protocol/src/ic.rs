//! `vmbuspipe_hdr`, `icmsg_hdr` and version negotiation messages.
//!
//! Every integration-component packet (heartbeat, shutdown, timesync, KVP, VSS, fcopy) is the
//! payload of one `VM_PKT_DATA_INBAND` VMBus packet laid out as:
//!
//! ```text
//! vmbuspipe_hdr (8) | icmsg_hdr (20) | body (icmsgsize bytes, then ring padding)
//! ```
//!
//! The first message on a channel is a version negotiation (`icmsgtype` 0) whose body is an
//! [`NegotiateHeader`] followed by the host's framework versions, then its message versions. The
//! service messages are in the submodules (VSS, with its daemon protocol, in [`crate::vss`]; fcopy
//! in [`crate::fcopy`]).
//! Everything here is plain data: parse and build, no I/O.
//! All integers are little-endian on the wire, which the `zerocopy::little_endian` field types make
//! explicit (and which keeps every struct free of alignment requirements).

pub mod heartbeat;
pub mod shutdown;
pub mod timesync;

use std::fmt;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// An IC version: `{u16 major, u16 minor}` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IcVersion {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

impl IcVersion {
    /// Builds `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        IcVersion { major, minor }
    }

    /// Unpacks Linux's `major << 16 | minor` form.
    pub const fn from_packed(packed: u32) -> Self {
        IcVersion {
            major: (packed >> 16) as u16,
            minor: packed as u16,
        }
    }

    /// Packs into Linux's `major << 16 | minor` form (what Linux compares versions by).
    pub const fn to_packed(self) -> u32 {
        (self.major as u32) << 16 | self.minor as u32
    }
}

impl fmt::Display for IcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl serde::Serialize for IcVersion {
    /// Serialised as `"major.minor"`, the form logs and `hvisd status` show.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `struct ic_version` as it sits in a packet.
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
pub struct IcVersionWire {
    /// Major version.
    pub major: U16,
    /// Minor version.
    pub minor: U16,
}

impl From<IcVersion> for IcVersionWire {
    fn from(v: IcVersion) -> Self {
        IcVersionWire {
            major: v.major.into(),
            minor: v.minor.into(),
        }
    }
}

impl From<IcVersionWire> for IcVersion {
    fn from(v: IcVersionWire) -> Self {
        IcVersion::new(v.major.get(), v.minor.get())
    }
}

/// `struct vmbuspipe_hdr`: the message-pipe header in front of every IC message.
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
pub struct PipeHeader {
    /// Pipe packet type; Hyper-V's message pipes send [`PipeHeader::DATA`]. Linux never reads it
    /// and echoes it back unchanged in replies.
    pub flags: U32,
    /// Size of the IC message that follows (`icmsg_hdr` + body), as the sender counted it.
    pub msgsize: U32,
}

impl PipeHeader {
    /// `flags` value of a data packet on a Hyper-V message pipe.
    pub const DATA: u32 = 1;
}

/// `struct icmsg_hdr`: the common header of all IC messages.
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
pub struct IcMsgHdr {
    /// Framework version the sender uses (the negotiated one after negotiation).
    pub icverframe: IcVersionWire,
    /// Message type, see [`MessageType`].
    pub icmsgtype: U16,
    /// Message (service) version the sender uses.
    pub icvermsg: IcVersionWire,
    /// Size of the body after this header. Linux ignores it on receive; the body is bounded by
    /// the packet length instead.
    pub icmsgsize: U16,
    /// HRESULT-style status, see [`status`]; set by the responder.
    pub status: U32,
    /// Transaction id chosen by the requester, echoed in the response.
    pub ictransaction_id: u8,
    /// Flags, see [`IcFlags`].
    pub icflags: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

impl IcMsgHdr {
    /// The message type as an open enum.
    pub fn message_type(&self) -> MessageType {
        MessageType(self.icmsgtype.get())
    }

    /// The flags as an open bit set.
    pub fn flags(&self) -> IcFlags {
        IcFlags(self.icflags)
    }

    /// The framework version field.
    pub fn framework_version(&self) -> IcVersion {
        self.icverframe.into()
    }

    /// The message version field.
    pub fn message_version(&self) -> IcVersion {
        self.icvermsg.into()
    }
}

/// Size of `vmbuspipe_hdr`.
pub const PIPE_HEADER_SIZE: usize = size_of::<PipeHeader>();
/// Size of `icmsg_hdr`.
pub const IC_HEADER_SIZE: usize = size_of::<IcMsgHdr>();
/// Offset of an IC message body in a packet payload (Linux's `ICMSG_HDR`).
pub const ICMSG_HDR: usize = PIPE_HEADER_SIZE + IC_HEADER_SIZE;
/// Largest IC packet hvisd accepts or builds: four 4 KiB pages, the receive buffer Linux's KVP
/// driver uses (the largest of the IC drivers). Anything longer is rejected before it is copied.
pub const MAX_IC_PACKET_SIZE: usize = 4 * 4096;

const _: () = assert!(size_of::<IcVersionWire>() == 4);
const _: () = assert!(PIPE_HEADER_SIZE == 8);
const _: () = assert!(IC_HEADER_SIZE == 20);
const _: () = assert!(ICMSG_HDR == 28);

/// `icmsgtype`: an open enum, so a type this crate does not know is kept and can be reported.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageType(pub u16);

impl MessageType {
    /// Version negotiation (answered by the IC framework itself).
    pub const NEGOTIATE: MessageType = MessageType(0);
    /// Heartbeat.
    pub const HEARTBEAT: MessageType = MessageType(1);
    /// KVP exchange.
    pub const KVP_EXCHANGE: MessageType = MessageType(2);
    /// Shutdown request.
    pub const SHUTDOWN: MessageType = MessageType(3);
    /// Time sample or sync.
    pub const TIMESYNC: MessageType = MessageType(4);
    /// VSS (backup) request.
    pub const VSS: MessageType = MessageType(5);
    /// Guest file copy.
    pub const FCOPY: MessageType = MessageType(7);

    /// The Linux name of a known type, e.g. `"heartbeat"`.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::NEGOTIATE => "negotiate",
            Self::HEARTBEAT => "heartbeat",
            Self::KVP_EXCHANGE => "kvp",
            Self::SHUTDOWN => "shutdown",
            Self::TIMESYNC => "timesync",
            Self::VSS => "vss",
            Self::FCOPY => "fcopy",
            _ => return None,
        })
    }
}

impl fmt::Debug for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `icflags`: an open bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IcFlags(pub u8);

impl IcFlags {
    /// The message is part of a request/response transaction.
    pub const TRANSACTION: IcFlags = IcFlags(1);
    /// The message is a request.
    pub const REQUEST: IcFlags = IcFlags(2);
    /// The message is a response.
    pub const RESPONSE: IcFlags = IcFlags(4);

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: IcFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for IcFlags {
    type Output = IcFlags;
    fn bitor(self, rhs: IcFlags) -> IcFlags {
        IcFlags(self.0 | rhs.0)
    }
}

/// `icmsg_hdr.status` values (HRESULTs) as Linux's `include/uapi/linux/hyperv.h` defines them.
pub mod status {
    /// Success.
    pub const HV_S_OK: u32 = 0x0000_0000;
    /// Generic failure.
    pub const HV_E_FAIL: u32 = 0x8000_4005;
    /// More data follows (KVP enumerate).
    pub const HV_S_CONT: u32 = 0x8007_0103;
    /// The object already exists (fcopy without overwrite).
    pub const HV_ERROR_ALREADY_EXISTS: u32 = 0x8007_0050;
    /// The disk is full (fcopy write).
    pub const HV_ERROR_DISK_FULL: u32 = 0x8007_0070;
    /// Access denied: Windows' `E_ACCESSDENIED`, not in Linux's header. hvisd answers an fcopy
    /// whose destination its policy refuses with it (Linux would try and answer `HV_E_FAIL`).
    pub const HV_E_ACCESSDENIED: u32 = 0x8007_0005;
    /// The request is not supported.
    pub const HV_ERROR_NOT_SUPPORTED: u32 = 0x8007_0032;
    /// The machine is locked.
    pub const HV_ERROR_MACHINE_LOCKED: u32 = 0x8007_04f7;
    /// The device is not connected.
    pub const HV_ERROR_DEVICE_NOT_CONNECTED: u32 = 0x8007_048f;
    /// An argument is invalid.
    pub const HV_INVALIDARG: u32 = 0x8007_0057;
    /// The key or GUID was not found (KVP get/enumerate past the end).
    pub const HV_GUID_NOTFOUND: u32 = 0x8004_1002;

    /// The Linux name of a known status, e.g. `"HV_E_FAIL"`.
    pub fn name(code: u32) -> Option<&'static str> {
        Some(match code {
            HV_S_OK => "HV_S_OK",
            HV_E_FAIL => "HV_E_FAIL",
            HV_S_CONT => "HV_S_CONT",
            HV_ERROR_ALREADY_EXISTS => "HV_ERROR_ALREADY_EXISTS",
            HV_ERROR_DISK_FULL => "HV_ERROR_DISK_FULL",
            HV_E_ACCESSDENIED => "HV_E_ACCESSDENIED",
            HV_ERROR_NOT_SUPPORTED => "HV_ERROR_NOT_SUPPORTED",
            HV_ERROR_MACHINE_LOCKED => "HV_ERROR_MACHINE_LOCKED",
            HV_ERROR_DEVICE_NOT_CONNECTED => "HV_ERROR_DEVICE_NOT_CONNECTED",
            HV_INVALIDARG => "HV_INVALIDARG",
            HV_GUID_NOTFOUND => "HV_GUID_NOTFOUND",
            _ => return None,
        })
    }
}

/// Why bytes are not a valid IC packet or message. Each variant says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IcParseError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {need} bytes, got {got}")]
    Truncated {
        /// The structure being read, e.g. `"vmbuspipe_hdr + icmsg_hdr"`.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// The packet is longer than any IC message may be.
    #[error("IC packet of {len} bytes exceeds the {max}-byte limit")]
    Oversized {
        /// Packet length.
        len: usize,
        /// [`MAX_IC_PACKET_SIZE`].
        max: usize,
    },
    /// A negotiate message claims more versions than Linux accepts.
    #[error(
        "negotiate message offers {framework} framework and {message} message versions, \
         more than the {max} allowed"
    )]
    TooManyVersions {
        /// `icframe_vercnt`.
        framework: u16,
        /// `icmsg_vercnt`.
        message: u16,
        /// [`MAX_NEGOTIATE_VERSION_COUNT`].
        max: u16,
    },
    /// A negotiate message's version table runs past the end of the packet.
    #[error(
        "negotiate message offers {framework} framework and {message} message versions, \
         which need {need} body bytes, but the body has {got}"
    )]
    VersionsPastEnd {
        /// `icframe_vercnt`.
        framework: u16,
        /// `icmsg_vercnt`.
        message: u16,
        /// Body bytes the counts imply.
        need: usize,
        /// Body bytes present.
        got: usize,
    },
    /// A body to send does not fit the packet limit or the 16-bit `icmsgsize`.
    #[error("IC message body of {len} bytes is too large to send (limit {max})")]
    BodyTooLarge {
        /// Body length.
        len: usize,
        /// Largest body that fits.
        max: usize,
    },
}

/// A parsed view of one IC packet payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcPacket<'a> {
    /// The `vmbuspipe_hdr`.
    pub pipe: PipeHeader,
    /// The `icmsg_hdr`.
    pub header: IcMsgHdr,
    /// Everything after the headers: the body and any ring padding, as Linux hands it to a service.
    pub body: &'a [u8],
}

/// Reads the headers of an IC packet payload (`vmbuspipe_hdr` + `icmsg_hdr` + body).
///
/// The body is everything after the headers: like Linux, `icmsgsize` is not trusted for bounds.
pub fn parse_packet(payload: &[u8]) -> Result<IcPacket<'_>, IcParseError> {
    if payload.len() > MAX_IC_PACKET_SIZE {
        return Err(IcParseError::Oversized {
            len: payload.len(),
            max: MAX_IC_PACKET_SIZE,
        });
    }
    let truncated = IcParseError::Truncated {
        what: "vmbuspipe_hdr + icmsg_hdr",
        need: ICMSG_HDR,
        got: payload.len(),
    };
    let (pipe, rest) = PipeHeader::read_from_prefix(payload).map_err(|_| truncated.clone())?;
    let (header, body) = IcMsgHdr::read_from_prefix(rest).map_err(|_| truncated)?;
    Ok(IcPacket { pipe, header, body })
}

/// Overwrites the `icmsg_hdr` of a packet payload in place (for building a reply in the request's
/// buffer, as Linux does).
pub fn write_header(payload: &mut [u8], header: &IcMsgHdr) -> Result<(), IcParseError> {
    let got = payload.len();
    payload
        .get_mut(PIPE_HEADER_SIZE..ICMSG_HDR)
        .and_then(|slot| header.write_to(slot).ok())
        .ok_or(IcParseError::Truncated {
            what: "vmbuspipe_hdr + icmsg_hdr",
            need: ICMSG_HDR,
            got,
        })
}

/// Builds a packet payload: a data `vmbuspipe_hdr`, `header` with `icmsgsize` set to the body's
/// length, then `body`.
pub fn build_packet(header: &IcMsgHdr, body: &[u8]) -> Result<Vec<u8>, IcParseError> {
    let max = (MAX_IC_PACKET_SIZE - ICMSG_HDR).min(u16::MAX as usize);
    if body.len() > max {
        return Err(IcParseError::BodyTooLarge {
            len: body.len(),
            max,
        });
    }
    let mut header = *header;
    // The bound above keeps both conversions lossless.
    header.icmsgsize = U16::new(body.len() as u16);
    let pipe = PipeHeader {
        flags: U32::new(PipeHeader::DATA),
        msgsize: U32::new((IC_HEADER_SIZE + body.len()) as u32),
    };
    let mut out = Vec::with_capacity(ICMSG_HDR + body.len());
    out.extend_from_slice(pipe.as_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// `struct icmsg_negotiate` without its trailing version table.
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
pub struct NegotiateHeader {
    /// Number of framework versions that follow.
    pub icframe_vercnt: U16,
    /// Number of message versions that follow the framework versions.
    pub icmsg_vercnt: U16,
    /// Reserved, zero.
    pub reserved: U32,
}

const _: () = assert!(size_of::<NegotiateHeader>() == 8);

/// Most versions of each kind a negotiate message may carry (Linux's
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const MAX_NEGOTIATE_VERSION_COUNT: u16 = 100;

/// `icmsgsize` Linux puts in every negotiate response: the header plus two versions.
pub const NEGOTIATE_RESPONSE_SIZE: u16 = 0x10;

/// A negotiate message body: the versions offered (by the host) or chosen (by the guest).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NegotiateMessage {
    /// Framework versions, in the sender's order.
    pub framework_versions: Vec<IcVersion>,
    /// Message versions, in the sender's order.
    pub message_versions: Vec<IcVersion>,
}

impl NegotiateMessage {
    /// Parses a negotiate body. Rejects counts above [`MAX_NEGOTIATE_VERSION_COUNT`] and tables
    /// that run past the body, so at most 200 versions are ever allocated.
    pub fn parse(body: &[u8]) -> Result<Self, IcParseError> {
        let (hdr, table) =
            NegotiateHeader::read_from_prefix(body).map_err(|_| IcParseError::Truncated {
                what: "icmsg_negotiate",
                need: size_of::<NegotiateHeader>(),
                got: body.len(),
            })?;
        let framework = hdr.icframe_vercnt.get();
        let message = hdr.icmsg_vercnt.get();
        if framework > MAX_NEGOTIATE_VERSION_COUNT || message > MAX_NEGOTIATE_VERSION_COUNT {
            return Err(IcParseError::TooManyVersions {
                framework,
                message,
                max: MAX_NEGOTIATE_VERSION_COUNT,
            });
        }
        let count = framework as usize + message as usize;
        let need = size_of::<NegotiateHeader>() + count * size_of::<IcVersionWire>();
        let (versions, _) =
            <[IcVersionWire]>::ref_from_prefix_with_elems(table, count).map_err(|_| {
                IcParseError::VersionsPastEnd {
                    framework,
                    message,
                    need,
                    got: body.len(),
                }
            })?;
        let (fw, msg) = versions.split_at(framework as usize);
        Ok(NegotiateMessage {
            framework_versions: fw.iter().map(|&v| v.into()).collect(),
            message_versions: msg.iter().map(|&v| v.into()).collect(),
        })
    }

    /// Builds the body bytes: header, framework versions, then message versions.
    pub fn build(&self) -> Result<Vec<u8>, IcParseError> {
        let framework = self.framework_versions.len();
        let message = self.message_versions.len();
        let max = MAX_NEGOTIATE_VERSION_COUNT as usize;
        if framework > max || message > max {
            return Err(IcParseError::TooManyVersions {
                framework: framework.min(u16::MAX as usize) as u16,
                message: message.min(u16::MAX as usize) as u16,
                max: MAX_NEGOTIATE_VERSION_COUNT,
            });
        }
        let hdr = NegotiateHeader {
            icframe_vercnt: U16::new(framework as u16),
            icmsg_vercnt: U16::new(message as u16),
            reserved: U32::new(0),
        };
        let mut out = Vec::with_capacity(
            size_of::<NegotiateHeader>() + (framework + message) * size_of::<IcVersionWire>(),
        );
        out.extend_from_slice(hdr.as_bytes());
        for &v in self.framework_versions.iter().chain(&self.message_versions) {
            out.extend_from_slice(IcVersionWire::from(v).as_bytes());
        }
        Ok(out)
    }
}

/// Writes a negotiate response into `body` in place, as Linux's `vmbus_prep_negotiate_resp`
/// leaves it: the two counts, then `versions[0]` (framework) and `versions[1]` (message).
///
/// A version that does not fit in `body` is left out, as Linux's reply (sent with the request's
/// length) would cut it off; only the 4-byte counts are required.
pub fn write_negotiate_response(
    body: &mut [u8],
    framework_count: u16,
    message_count: u16,
    versions: [IcVersion; 2],
) -> Result<(), IcParseError> {
    let got = body.len();
    let counts = body.get_mut(..4).ok_or(IcParseError::Truncated {
        what: "icmsg_negotiate counts",
        need: 4,
        got,
    })?;
    counts[..2].copy_from_slice(&framework_count.to_le_bytes());
    counts[2..].copy_from_slice(&message_count.to_le_bytes());
    let table_start = size_of::<NegotiateHeader>();
    for (i, v) in versions.into_iter().enumerate() {
        let at = table_start + i * size_of::<IcVersionWire>();
        if let Some(slot) = body.get_mut(at..at + size_of::<IcVersionWire>()) {
            slot.copy_from_slice(IcVersionWire::from(v).as_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(message_type: MessageType) -> IcMsgHdr {
        IcMsgHdr {
            icverframe: IcVersion::new(3, 0).into(),
            icmsgtype: U16::new(message_type.0),
            icvermsg: IcVersion::new(4, 0).into(),
            ictransaction_id: 7,
            icflags: (IcFlags::TRANSACTION | IcFlags::REQUEST).0,
            ..Default::default()
        }
    }

    #[test]
    fn header_fields_sit_at_linux_offsets() {
        let mut h = header(MessageType::TIMESYNC);
        h.status = U32::new(status::HV_E_FAIL);
        h.icmsgsize = U16::new(0x1234);
        let b = h.as_bytes();
        assert_eq!(&b[0..4], &[3, 0, 0, 0]); // icverframe
        assert_eq!(&b[4..6], &[4, 0]); // icmsgtype
        assert_eq!(&b[6..10], &[4, 0, 0, 0]); // icvermsg
        assert_eq!(&b[10..12], &[0x34, 0x12]); // icmsgsize
        assert_eq!(&b[12..16], &0x8000_4005u32.to_le_bytes()); // status
        assert_eq!(b[16], 7); // ictransaction_id
        assert_eq!(b[17], 3); // icflags
    }

    #[test]
    fn build_then_parse_round_trips_and_sets_sizes() {
        let body = [1u8, 2, 3, 4, 5];
        let packet = build_packet(&header(MessageType::HEARTBEAT), &body).unwrap();
        assert_eq!(packet.len(), ICMSG_HDR + body.len());
        let parsed = parse_packet(&packet).unwrap();
        assert_eq!(parsed.pipe.flags.get(), PipeHeader::DATA);
        assert_eq!(
            parsed.pipe.msgsize.get() as usize,
            IC_HEADER_SIZE + body.len()
        );
        assert_eq!(parsed.header.icmsgsize.get() as usize, body.len());
        assert_eq!(parsed.header.message_type(), MessageType::HEARTBEAT);
        assert_eq!(parsed.header.framework_version(), IcVersion::new(3, 0));
        assert_eq!(parsed.body, &body);
    }

    #[test]
    fn parse_rejects_short_and_oversized_packets_with_sizes() {
        assert_eq!(
            parse_packet(&[0; 27]),
            Err(IcParseError::Truncated {
                what: "vmbuspipe_hdr + icmsg_hdr",
                need: 28,
                got: 27
            })
        );
        let big = vec![0; MAX_IC_PACKET_SIZE + 1];
        assert!(matches!(
            parse_packet(&big),
            Err(IcParseError::Oversized { len, .. }) if len == MAX_IC_PACKET_SIZE + 1
        ));
        assert!(parse_packet(&[0; ICMSG_HDR]).unwrap().body.is_empty());
    }

    #[test]
    fn build_rejects_bodies_past_the_packet_limit() {
        let body = vec![0; MAX_IC_PACKET_SIZE];
        assert!(matches!(
            build_packet(&header(MessageType::KVP_EXCHANGE), &body),
            Err(IcParseError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn write_header_replaces_only_the_icmsg_hdr() {
        let mut packet = build_packet(&header(MessageType::HEARTBEAT), &[9; 8]).unwrap();
        let mut h = parse_packet(&packet).unwrap().header;
        h.icflags = (IcFlags::TRANSACTION | IcFlags::RESPONSE).0;
        write_header(&mut packet, &h).unwrap();
        let again = parse_packet(&packet).unwrap();
        assert_eq!(again.header.flags(), IcFlags(5));
        assert_eq!(again.pipe.flags.get(), PipeHeader::DATA);
        assert_eq!(again.body, &[9; 8]);
        assert!(write_header(&mut [0; 10], &h).is_err());
    }

    #[test]
    fn negotiate_message_round_trips() {
        let msg = NegotiateMessage {
            framework_versions: vec![IcVersion::new(1, 0), IcVersion::new(3, 0)],
            message_versions: vec![IcVersion::new(3, 2), IcVersion::new(1, 0)],
        };
        let body = msg.build().unwrap();
        assert_eq!(body.len(), 8 + 4 * 4);
        assert_eq!(&body[..4], &[2, 0, 2, 0]);
        assert_eq!(NegotiateMessage::parse(&body).unwrap(), msg);
    }

    #[test]
    fn negotiate_parse_rejects_counts_past_the_body() {
        let mut body = NegotiateMessage {
            framework_versions: vec![IcVersion::new(3, 0)],
            message_versions: vec![IcVersion::new(1, 0)],
        }
        .build()
        .unwrap();
        body[2] = 2; // claims two message versions, carries one
        assert_eq!(
            NegotiateMessage::parse(&body),
            Err(IcParseError::VersionsPastEnd {
                framework: 1,
                message: 2,
                need: 20,
                got: 16
            })
        );
    }

    #[test]
    fn negotiate_parse_rejects_more_than_100_versions() {
        let mut body = vec![0u8; 8 + 202 * 4];
        body[..2].copy_from_slice(&101u16.to_le_bytes());
        assert!(matches!(
            NegotiateMessage::parse(&body),
            Err(IcParseError::TooManyVersions { framework: 101, .. })
        ));
        let too_many = NegotiateMessage {
            framework_versions: vec![IcVersion::new(1, 0); 101],
            message_versions: vec![],
        };
        assert!(too_many.build().is_err());
    }

    #[test]
    fn negotiate_response_writes_counts_and_what_fits() {
        let mut body = [0xffu8; 16];
        write_negotiate_response(
            &mut body,
            1,
            1,
            [IcVersion::new(3, 0), IcVersion::new(4, 0)],
        )
        .unwrap();
        assert_eq!(
            body,
            [1, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 3, 0, 0, 0, 4, 0, 0, 0]
        );

        let mut short = [0xffu8; 12];
        write_negotiate_response(
            &mut short,
            0,
            0,
            [IcVersion::new(3, 0), IcVersion::new(4, 0)],
        )
        .unwrap();
        assert_eq!(short, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 3, 0, 0, 0]);
        assert!(write_negotiate_response(&mut [0; 3], 0, 0, [IcVersion::new(1, 0); 2]).is_err());
    }

    #[test]
    fn names_of_open_enums_cover_known_values_and_keep_unknown_ones() {
        assert_eq!(format!("{:?}", MessageType::FCOPY), "fcopy(7)");
        assert_eq!(format!("{}", MessageType(6)), "unknown(6)");
        assert_eq!(
            status::name(status::HV_GUID_NOTFOUND),
            Some("HV_GUID_NOTFOUND")
        );
        assert_eq!(status::name(1), None);
        assert_eq!(IcVersion::from_packed(3 << 16 | 2), IcVersion::new(3, 2));
        assert_eq!(IcVersion::new(4, 0).to_packed(), 0x0004_0000);
        assert!(IcVersion::new(3, 2) > IcVersion::new(3, 1));
    }

    proptest! {
        #[test]
        fn parse_packet_never_panics_and_body_is_the_tail(
            bytes in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            match parse_packet(&bytes) {
                Ok(p) => prop_assert_eq!(p.body, &bytes[ICMSG_HDR..]),
                Err(e) => prop_assert!(bytes.len() < ICMSG_HDR, "unexpected {e}"),
            }
        }

        #[test]
        fn negotiate_parse_never_panics_and_respects_the_bound(
            bytes in proptest::collection::vec(any::<u8>(), 0..128)
        ) {
            if let Ok(m) = NegotiateMessage::parse(&bytes) {
                let n = m.framework_versions.len() + m.message_versions.len();
                prop_assert!(8 + 4 * n <= bytes.len());
                prop_assert!(m.framework_versions.len() <= 100);
                prop_assert!(m.message_versions.len() <= 100);
            }
        }

        #[test]
        fn negotiate_build_parse_round_trip(
            fw in proptest::collection::vec((any::<u16>(), any::<u16>()), 0..=100),
            msg in proptest::collection::vec((any::<u16>(), any::<u16>()), 0..=100),
        ) {
            let m = NegotiateMessage {
                framework_versions: fw.iter().map(|&(a, b)| IcVersion::new(a, b)).collect(),
                message_versions: msg.iter().map(|&(a, b)| IcVersion::new(a, b)).collect(),
            };
            prop_assert_eq!(NegotiateMessage::parse(&m.build().unwrap()).unwrap(), m);
        }
    }
}
