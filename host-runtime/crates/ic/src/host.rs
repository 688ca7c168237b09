//! The host side of an IC channel, for the simulator that plays Hyper-V and for tests.
//!
//! The host opens with a negotiate request listing every version it speaks, reads the guest's
//! choice, then sends service messages flagged `TRANSACTION | REQUEST` and checks that each reply
//! is a `RESPONSE` of the same type echoing the transaction id.

use crate::negotiate::{NegotiateOutcome, Negotiated};
use hvisd_protocol::ic::{
    IcFlags, IcMsgHdr, IcParseError, IcVersion, IcVersionWire, MessageType, NegotiateHeader,
    NegotiateMessage, build_packet, parse_packet,
};
use zerocopy::FromBytes;
use zerocopy::little_endian::U16;

/// Version lists the simulator offers by default: every version a Linux guest knows, lowest
/// first (the order OpenVMM's host uses).
pub mod offers {
    use hvisd_protocol::ic::IcVersion;

    const fn v(major: u16, minor: u16) -> IcVersion {
        IcVersion::new(major, minor)
    }

    /// Framework versions: 1.0, 3.0.
    pub const FRAMEWORK: &[IcVersion] = &[v(1, 0), v(3, 0)];
    /// Heartbeat: 1.0, 3.0.
    pub const HEARTBEAT: &[IcVersion] = &[v(1, 0), v(3, 0)];
    /// Shutdown: 1.0, 3.0, 3.1, 3.2.
    pub const SHUTDOWN: &[IcVersion] = &[v(1, 0), v(3, 0), v(3, 1), v(3, 2)];
    /// Timesync: 1.0, 3.0, 4.0.
    pub const TIMESYNC: &[IcVersion] = &[v(1, 0), v(3, 0), v(4, 0)];
    /// KVP: 1.0, 3.0, 4.0.
    pub const KVP: &[IcVersion] = &[v(1, 0), v(3, 0), v(4, 0)];
    /// VSS: 5.0.
    pub const VSS: &[IcVersion] = &[v(5, 0)];
    /// fcopy: 1.1.
    pub const FCOPY: &[IcVersion] = &[v(1, 1)];

    /// The default message-version offer for services of `message_type`.
    pub fn for_message_type(
        message_type: hvisd_protocol::ic::MessageType,
    ) -> Option<&'static [IcVersion]> {
        use hvisd_protocol::ic::MessageType;
        Some(match message_type {
            MessageType::HEARTBEAT => HEARTBEAT,
            MessageType::SHUTDOWN => SHUTDOWN,
            MessageType::TIMESYNC => TIMESYNC,
            MessageType::KVP_EXCHANGE => KVP,
            MessageType::VSS => VSS,
            MessageType::FCOPY => FCOPY,
            _ => return None,
        })
    }
}

/// Why a guest reply is not acceptable to the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The bytes are not an IC packet, or a message to send is too large.
    #[error("IC reply from guest: {0}")]
    Parse(#[from] IcParseError),
    /// The reply lacks `TRANSACTION | RESPONSE`.
    #[error("IC reply from guest has icflags {flags:#x}, expected TRANSACTION|RESPONSE (0x5)")]
    NotAResponse {
        /// `icflags` received.
        flags: u8,
    },
    /// The reply is of another message type than the request.
    #[error("IC reply from guest is of type {got}, the request was {expected}")]
    WrongType {
        /// Request type.
        expected: MessageType,
        /// Reply type.
        got: MessageType,
    },
    /// The reply does not echo the request's transaction id.
    #[error("IC reply from guest has transaction id {got}, the request had {expected}")]
    TransactionMismatch {
        /// Request id.
        expected: u8,
        /// Reply id.
        got: u8,
    },
    /// A negotiate reply must carry counts (1, 1) or (0, 0).
    #[error(
        "negotiate reply from guest has counts ({framework}, {message}), expected (1, 1) or (0, 0)"
    )]
    BadNegotiateCounts {
        /// Framework count.
        framework: u16,
        /// Message count.
        message: u16,
    },
    /// A reply arrived while no request was outstanding.
    #[error("IC reply from guest arrived with no request outstanding")]
    Unsolicited,
    /// The guest chose a version the host did not offer.
    #[error(
        "negotiate reply from guest chose {kind} version {version}, which the host did not offer"
    )]
    VersionNotOffered {
        /// `"framework"` or `"message"`.
        kind: &'static str,
        /// The version chosen.
        version: IcVersion,
    },
}

/// A checked reply to a host request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The reply's header.
    pub header: IcMsgHdr,
    /// `header.status`.
    pub status: u32,
    /// The body after the header (the request's body as the guest edited it, plus padding).
    pub body: &'a [u8],
}

fn request_header(
    message_type: MessageType,
    versions: Option<Negotiated>,
    transaction_id: u8,
) -> IcMsgHdr {
    let (framework, message) = versions
        .map(|n| (n.framework, n.message))
        .unwrap_or((IcVersion::new(0, 0), IcVersion::new(0, 0)));
    IcMsgHdr {
        icverframe: framework.into(),
        icmsgtype: U16::new(message_type.0),
        icvermsg: message.into(),
        ictransaction_id: transaction_id,
        icflags: (IcFlags::TRANSACTION | IcFlags::REQUEST).0,
        ..Default::default()
    }
}

/// Builds a negotiate request offering `framework` and `message` versions (at most 100 each).
/// The header's version fields are zero, as OpenVMM's host sends them.
pub fn negotiate_request(
    framework: &[IcVersion],
    message: &[IcVersion],
    transaction_id: u8,
) -> Result<Vec<u8>, HostError> {
    let body = NegotiateMessage {
        framework_versions: framework.to_vec(),
        message_versions: message.to_vec(),
    }
    .build()?;
    Ok(build_packet(
        &request_header(MessageType::NEGOTIATE, None, transaction_id),
        &body,
    )?)
}

/// Checks the guest's answer to [`negotiate_request`] against what was offered.
pub fn parse_negotiate_response(
    reply: &[u8],
    offered_framework: &[IcVersion],
    offered_message: &[IcVersion],
    transaction_id: u8,
) -> Result<NegotiateOutcome, HostError> {
    let reply = parse_reply(reply, MessageType::NEGOTIATE, transaction_id)?;
    let (counts, table) =
        NegotiateHeader::read_from_prefix(reply.body).map_err(|_| IcParseError::Truncated {
            what: "icmsg_negotiate",
            need: size_of::<NegotiateHeader>(),
            got: reply.body.len(),
        })?;
    match (counts.icframe_vercnt.get(), counts.icmsg_vercnt.get()) {
        (0, 0) => Ok(NegotiateOutcome::NoCommonVersion),
        (1, 1) => {
            let ([framework, message], _) =
                <[IcVersionWire; 2]>::read_from_prefix(table).map_err(|_| {
                    IcParseError::Truncated {
                        what: "negotiate reply versions",
                        need: size_of::<NegotiateHeader>() + 8,
                        got: reply.body.len(),
                    }
                })?;
            let (framework, message) = (IcVersion::from(framework), IcVersion::from(message));
            if !offered_framework.contains(&framework) {
                return Err(HostError::VersionNotOffered {
                    kind: "framework",
                    version: framework,
                });
            }
            if !offered_message.contains(&message) {
                return Err(HostError::VersionNotOffered {
                    kind: "message",
                    version: message,
                });
            }
            Ok(NegotiateOutcome::Negotiated(Negotiated {
                framework,
                message,
            }))
        }
        (framework, message) => Err(HostError::BadNegotiateCounts { framework, message }),
    }
}

/// Builds a service message of `message_type` with the negotiated versions, flagged
/// `TRANSACTION | REQUEST`.
pub fn message(
    message_type: MessageType,
    versions: Negotiated,
    body: &[u8],
    transaction_id: u8,
) -> Result<Vec<u8>, HostError> {
    Ok(build_packet(
        &request_header(message_type, Some(versions), transaction_id),
        body,
    )?)
}

/// Checks a guest reply: an IC packet of `expected_type`, flagged `TRANSACTION | RESPONSE`,
/// echoing `transaction_id`.
pub fn parse_reply(
    reply: &[u8],
    expected_type: MessageType,
    transaction_id: u8,
) -> Result<Reply<'_>, HostError> {
    let packet = parse_packet(reply)?;
    let header = packet.header;
    if !header
        .flags()
        .contains(IcFlags::TRANSACTION | IcFlags::RESPONSE)
    {
        return Err(HostError::NotAResponse {
            flags: header.icflags,
        });
    }
    if header.message_type() != expected_type {
        return Err(HostError::WrongType {
            expected: expected_type,
            got: header.message_type(),
        });
    }
    if header.ictransaction_id != transaction_id {
        return Err(HostError::TransactionMismatch {
            expected: transaction_id,
            got: header.ictransaction_id,
        });
    }
    Ok(Reply {
        header,
        status: header.status.get(),
        body: packet.body,
    })
}

/// One host channel end: offers, negotiated versions, and transaction ids.
///
/// Each request takes the next transaction id (wrapping); a reply must echo the id of the request
/// it answers, and only one request is outstanding at a time (as with Hyper-V).
#[derive(Debug, Clone)]
pub struct IcHost {
    message_type: MessageType,
    framework_offer: Vec<IcVersion>,
    message_offer: Vec<IcVersion>,
    negotiated: Option<Negotiated>,
    next_transaction: u8,
    pending: Option<u8>,
}

impl IcHost {
    /// A host end for service messages of `message_type`, offering these versions.
    pub fn new(
        message_type: MessageType,
        framework_offer: &[IcVersion],
        message_offer: &[IcVersion],
    ) -> Self {
        IcHost {
            message_type,
            framework_offer: framework_offer.to_vec(),
            message_offer: message_offer.to_vec(),
            negotiated: None,
            next_transaction: 0,
            pending: None,
        }
    }

    /// The versions agreed, once negotiated.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    fn take_transaction(&mut self) -> u8 {
        let id = self.next_transaction;
        self.next_transaction = id.wrapping_add(1);
        self.pending = Some(id);
        id
    }

    /// The negotiate request to send first.
    pub fn negotiate_request(&mut self) -> Result<Vec<u8>, HostError> {
        let id = self.take_transaction();
        negotiate_request(&self.framework_offer, &self.message_offer, id)
    }

    /// Reads the guest's answer to the last negotiate request.
    pub fn on_negotiate_response(&mut self, reply: &[u8]) -> Result<NegotiateOutcome, HostError> {
        let id = self.pending.ok_or(HostError::Unsolicited)?;
        let outcome =
            parse_negotiate_response(reply, &self.framework_offer, &self.message_offer, id)?;
        self.negotiated = match outcome {
            NegotiateOutcome::Negotiated(n) => Some(n),
            NegotiateOutcome::NoCommonVersion => None,
        };
        self.pending = None;
        Ok(outcome)
    }

    /// A service message with `body`. Before negotiation the version fields are zero (a host
    /// that does this is misbehaving; the simulator uses it to test the guest).
    pub fn request(&mut self, body: &[u8]) -> Result<Vec<u8>, HostError> {
        let id = self.take_transaction();
        let header = request_header(self.message_type, self.negotiated, id);
        Ok(build_packet(&header, body)?)
    }

    /// Checks the guest's reply to the last [`IcHost::request`].
    pub fn on_reply<'a>(&mut self, reply: &'a [u8]) -> Result<Reply<'a>, HostError> {
        let id = self.pending.ok_or(HostError::Unsolicited)?;
        let checked = parse_reply(reply, self.message_type, id)?;
        self.pending = None;
        Ok(checked)
    }
}
