//! The guest side of one IC channel: framing, version negotiation, and dispatch to a service.
//!
//! Like Linux's `hv_util.c`, every reply is the request buffer edited in place and sent back with
//! the request's length: the framework answers negotiations itself, hands other messages to the
//! service, then sets `icflags = TRANSACTION | RESPONSE` and the status.

use crate::negotiate::{self, NegotiateOutcome, Negotiated};
use crate::service::{IcMessageInfo, IcService, IcServiceError};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::ic::{
    ICMSG_HDR, IcFlags, IcParseError, MAX_IC_PACKET_SIZE, MessageType, NEGOTIATE_RESPONSE_SIZE,
    parse_packet, status, write_header,
};
use zerocopy::little_endian::{U16, U32};

/// Why a packet could not be handled at all. Nothing is sent back for it; the channel stays usable.
#[derive(Debug, thiserror::Error)]
pub enum IcError {
    /// The payload is not an IC packet (too short for the headers, or too long for any IC message).
    #[error("{service} IC: packet from host dropped: {source}")]
    Malformed {
        /// Service name.
        service: &'static str,
        /// What was wrong.
        #[source]
        source: IcParseError,
    },
    /// A negotiate request whose version table does not fit the packet or is too long.
    #[error("{service} IC: version negotiation from host dropped: {source}")]
    MalformedNegotiate {
        /// Service name.
        service: &'static str,
        /// What was wrong.
        #[source]
        source: IcParseError,
    },
}

/// A snapshot of one channel's state, for logs and `hvisd status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IcGuestStatus {
    /// Service name.
    pub service: &'static str,
    /// The service's interface type.
    pub class_id: Guid,
    /// Versions agreed in the last successful negotiation.
    pub negotiated: Option<Negotiated>,
    /// Negotiate requests answered (including "no common version" answers).
    pub negotiations: u64,
    /// Messages handed to the service and answered (whatever the status).
    pub messages: u64,
    /// Packets answered with a failure status or dropped.
    pub failures: u64,
    /// Status of the last reply sent.
    pub last_status: Option<u32>,
    /// The last error, as a sentence.
    pub last_error: Option<String>,
}

/// The guest side of one IC channel, driving service `S`.
pub struct IcGuest<S: IcService> {
    service: S,
    status: IcGuestStatus,
}

impl<S: IcService> IcGuest<S> {
    /// A channel that has not negotiated yet.
    pub fn new(service: S) -> Self {
        let status = IcGuestStatus {
            service: service.name(),
            class_id: service.class_id(),
            negotiated: None,
            negotiations: 0,
            messages: 0,
            failures: 0,
            last_status: None,
            last_error: None,
        };
        IcGuest { service, status }
    }

    /// The service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The service, mutably (e.g. to change its configuration).
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Gives the service back.
    pub fn into_service(self) -> S {
        self.service
    }

    /// The versions agreed in the last successful negotiation.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.status.negotiated
    }

    /// The channel's status snapshot.
    pub fn status(&self) -> &IcGuestStatus {
        &self.status
    }

    /// Handles one inband packet payload (`vmbuspipe_hdr` + `icmsg_hdr` + body, possibly followed
    /// by ring padding) and returns the reply to send with the same VMBus transaction id.
    ///
    /// - `Ok(Some(reply))`: send `reply`; it has the request's length.
    /// - `Ok(None)`: the service rejected the body as malformed; like Linux, nothing is sent.
    ///   The reason is logged and kept in [`IcGuestStatus::last_error`].
    /// - `Err(_)`: the packet is not a valid IC packet or negotiation; nothing is sent.
    ///
    /// A service message before any successful negotiation is answered with `HV_E_FAIL` without
    /// reaching the service, which only ever sees negotiated versions.
    pub async fn on_packet(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>, IcError> {
        let service = self.status.service;
        if payload.len() > MAX_IC_PACKET_SIZE {
            let source = IcParseError::Oversized {
                len: payload.len(),
                max: MAX_IC_PACKET_SIZE,
            };
            return Err(self.dropped(IcError::Malformed { service, source }));
        }
        // Work on one private copy from here on, so every field is read exactly once from
        // memory the host cannot change under us, and the copy becomes the reply.
        let mut reply = payload.to_vec();
        let mut header = match parse_packet(&reply) {
            Ok(packet) => packet.header,
            Err(source) => return Err(self.dropped(IcError::Malformed { service, source })),
        };
        let message_type = header.message_type();
        // parse_packet accepted the payload, so it holds at least ICMSG_HDR bytes.
        let body = &mut reply[ICMSG_HDR..];

        let status = if message_type == MessageType::NEGOTIATE {
            let outcome = negotiate::respond_in_place(
                body,
                self.service.framework_versions(),
                self.service.message_versions(),
            )
            .map_err(|source| self.dropped(IcError::MalformedNegotiate { service, source }))?;
            header.icmsgsize = U16::new(NEGOTIATE_RESPONSE_SIZE);
            self.status.negotiations += 1;
            // The kernel drivers leave the host's status in negotiate replies; Linux's newest
            // userspace responder (hv_fcopy_uio_daemon) sets it by the outcome, which tells the
            // host the same thing as the counts and does not depend on what the host sent.
            match outcome {
                NegotiateOutcome::Negotiated(n) => {
                    // Once per channel normally; a host that renegotiates in a loop gets a budget.
                    // Both versions in the text, named: a log view that shows only the message
                    // (the journal's MESSAGE) still tells them apart.
                    hvisd_protocol::throttled!(
                        info,
                        service,
                        "IC versions negotiated: framework {}, message {}",
                        n.framework,
                        n.message
                    );
                    self.status.negotiated = Some(n);
                    status::HV_S_OK
                }
                NegotiateOutcome::NoCommonVersion => {
                    hvisd_protocol::throttled!(
                        warn,
                        service,
                        "host offered no IC version this guest supports"
                    );
                    self.status.negotiated = None;
                    self.note_failure("host offered no supported framework or message version");
                    status::HV_E_FAIL
                }
            }
        } else if let Some(versions) = self.status.negotiated {
            let info = IcMessageInfo {
                message_type: message_type.0,
                framework_version: versions.framework,
                message_version: versions.message,
            };
            match self.service.handle(info, body).await {
                Ok(status) => {
                    self.status.messages += 1;
                    status
                }
                Err(err @ IcServiceError::Malformed { .. }) => {
                    hvisd_protocol::throttled!(warn, service, error = %err, "IC message dropped");
                    self.note_failure(&err.to_string());
                    return Ok(None);
                }
                Err(err) => {
                    hvisd_protocol::throttled!(warn, service, error = %err, "IC message failed");
                    self.status.messages += 1;
                    self.note_failure(&err.to_string());
                    status::HV_E_FAIL
                }
            }
        } else {
            let reason = format!(
                "{service} IC: host sent message type {message_type} before version negotiation"
            );
            hvisd_protocol::throttled!(warn, service, %message_type, "IC message before version negotiation");
            self.note_failure(&reason);
            status::HV_E_FAIL
        };

        header.status = U32::new(status);
        header.icflags = (IcFlags::TRANSACTION | IcFlags::RESPONSE).0;
        write_header(&mut reply, &header)
            .map_err(|source| self.dropped(IcError::Malformed { service, source }))?;
        self.status.last_status = Some(status);
        Ok(Some(reply))
    }

    fn note_failure(&mut self, reason: &str) {
        self.status.failures += 1;
        self.status.last_error = Some(reason.to_owned());
    }

    fn dropped(&mut self, err: IcError) -> IcError {
        self.note_failure(&err.to_string());
        err
    }
}
