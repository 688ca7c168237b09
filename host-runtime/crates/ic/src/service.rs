//! The contract between the IC framework and one integration service.
//!
//! Hyper-V integration components (heartbeat, shutdown, timesync, KVP, VSS, fcopy) share one
//! framing: `vmbuspipe_hdr` + `icmsg_hdr`, a version negotiation, then service messages. The
//! framework (`hvisd_ic::guest`) owns framing and negotiation; a service only sees its own
//! messages. Like Linux's `hv_util.c`, a reply is the request buffer modified in place and sent
//! back with the same length and transaction id, so the service gets the message body as
//! `&mut [u8]` and edits it.

use hvisd_protocol::guid::Guid;
use hvisd_protocol::ic::{IcVersion, MessageType};
use std::future::Future;

/// What the framework tells a service about one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcMessageInfo {
    /// `icmsg_hdr.icmsgtype` as sent by the host (never `NEGOTIATE`: the framework answers those).
    pub message_type: u16,
    /// The framework version agreed in negotiation.
    pub framework_version: IcVersion,
    /// The message version agreed in negotiation.
    pub message_version: IcVersion,
}

impl IcMessageInfo {
    /// `Ok` if the message is of type `expected`, else the [`IcServiceError::UnexpectedType`]
    /// that `service` should return (the framework then answers `HV_E_FAIL`, as Linux does).
    pub fn expect_type(
        &self,
        service: &'static str,
        expected: MessageType,
    ) -> Result<(), IcServiceError> {
        if MessageType(self.message_type) == expected {
            Ok(())
        } else {
            Err(IcServiceError::UnexpectedType {
                service,
                message_type: self.message_type,
            })
        }
    }
}

/// The outcome of handling one message: the status the framework puts in `icmsg_hdr.status`.
///
/// The values are HRESULT-style codes as Linux uses them (`HV_S_OK` = 0, `HV_E_FAIL` = 0x80004005,
/// `HV_S_CONT` = 0x80070103, ...), defined in `hvisd_protocol::ic::status`.
pub type IcStatus = u32;

/// One integration service, written once and driven by any transport.
pub trait IcService: Send {
    /// Short name for logs and status output, e.g. `"heartbeat"`.
    fn name(&self) -> &'static str;

    /// The VMBus interface type (`class_id`) this service answers.
    fn class_id(&self) -> Guid;

    /// Framework versions this guest accepts, most preferred first (as Linux lists them).
    fn framework_versions(&self) -> &'static [IcVersion];

    /// Message versions this guest accepts, most preferred first.
    fn message_versions(&self) -> &'static [IcVersion];

    /// Handles one service message. `body` is the bytes after `icmsg_hdr`, limited to what the
    /// packet carries; the service edits it in place to form the reply (e.g. heartbeat adds 1 to
    /// the sequence number). Errors are logged with the service name and the channel stays open;
    /// what the host sees follows Linux's `hv_util.c`:
    /// - [`IcServiceError::Malformed`]: the packet is dropped without a reply (Linux drops bodies
    ///   too short for their structure);
    /// - [`IcServiceError::UnexpectedType`] and [`IcServiceError::Failed`]: the framework replies
    ///   with `HV_E_FAIL`.
    ///
    /// Must never panic on host input.
    fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> impl Future<Output = Result<IcStatus, IcServiceError>> + Send;
}

/// Why a service could not handle a message; logged with the service name.
#[derive(Debug, thiserror::Error)]
pub enum IcServiceError {
    /// The host's message was malformed (too short, bad field). Says what and why.
    #[error("malformed {service} message from host: {reason}")]
    Malformed {
        /// The service that rejected the message.
        service: &'static str,
        /// What was wrong, for a person.
        reason: String,
    },
    /// The message type is not one this service handles.
    #[error("{service}: unexpected IC message type {message_type}")]
    UnexpectedType {
        /// The service that got the message.
        service: &'static str,
        /// The `icmsgtype` value.
        message_type: u16,
    },
    /// The service failed for a local reason (I/O, a plugin). Says what.
    #[error("{service}: {reason}")]
    Failed {
        /// The service that failed.
        service: &'static str,
        /// What went wrong, for a person.
        reason: String,
    },
}

impl IcServiceError {
    /// A [`IcServiceError::Malformed`] for `service` whose reason is `err`'s message.
    pub fn malformed(service: &'static str, err: impl std::fmt::Display) -> Self {
        IcServiceError::Malformed {
            service,
            reason: err.to_string(),
        }
    }
}
