//! VSS over a VMBus channel (`shm`, `uio`): the IC framework does the framing and negotiation;
//! this adapter reads the operation, lets [`VssCore`] answer it, and edits the `flags` word as a
//! Linux guest does (see `hvisd_protocol::vss::linux_guest_answer`).

use std::sync::Arc;

use hvisd_ic::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::ic::{IcVersion, MessageType};
use hvisd_protocol::vss::{self, FlagsAnswer, LinuxAnswer, VssRequest};

use super::VssCore;

/// The VSS integration service on one channel.
pub struct VssService {
    core: Arc<VssCore>,
}

impl VssService {
    /// Serves `core` on a channel.
    pub fn new(core: Arc<VssCore>) -> VssService {
        VssService { core }
    }
}

impl IcService for VssService {
    fn name(&self) -> &'static str {
        "vss"
    }

    fn class_id(&self) -> Guid {
        vss::CLASS_ID
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        vss::FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        vss::MESSAGE_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        info.expect_type("vss", MessageType::VSS)?;
        // A body too short (or too long) for `hv_vss_msg` is dropped without a reply, as Linux
        // drops it.
        let operation = VssRequest::parse(body)
            .map_err(|e| IcServiceError::malformed("vss", e))?
            .operation;
        let status = self.core.handle(operation).await;
        let flags = match vss::linux_guest_answer(operation) {
            LinuxAnswer::Kernel { flags, .. } | LinuxAnswer::Daemon { flags, .. } => flags,
        };
        if flags != FlagsAnswer::Unchanged {
            vss::apply_flags_answer(body, flags)
                .map_err(|e| IcServiceError::malformed("vss", e))?;
        }
        Ok(status)
    }
}
