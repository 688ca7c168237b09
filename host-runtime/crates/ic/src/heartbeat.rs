//! The heartbeat service: answers each heartbeat with the sequence number plus one.

use crate::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use crate::versions::{HEARTBEAT_VERSIONS, UTIL_FRAMEWORK_VERSIONS};
use hvisd_protocol::guid::{Guid, class_id};
use hvisd_protocol::ic::heartbeat::{read_seq_num, write_seq_num};
use hvisd_protocol::ic::{IcVersion, MessageType, status};

const NAME: &str = "heartbeat";

/// The heartbeat service.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatService {
    beats: u64,
    last_seq_num: Option<u64>,
}

impl HeartbeatService {
    /// A service that has seen no heartbeat yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Heartbeats answered.
    pub fn beats(&self) -> u64 {
        self.beats
    }

    /// The sequence number of the last heartbeat (as the host sent it).
    pub fn last_seq_num(&self) -> Option<u64> {
        self.last_seq_num
    }
}

impl IcService for HeartbeatService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn class_id(&self) -> Guid {
        class_id::HEARTBEAT
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        UTIL_FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        HEARTBEAT_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        info.expect_type(NAME, MessageType::HEARTBEAT)?;
        let malformed = |e| IcServiceError::malformed(NAME, e);
        let seq = read_seq_num(body).map_err(malformed)?;
        // The host's counter may start anywhere; wrap rather than fail at u64::MAX.
        write_seq_num(body, seq.wrapping_add(1)).map_err(malformed)?;
        self.beats += 1;
        self.last_seq_num = Some(seq);
        tracing::trace!(seq, "heartbeat answered");
        Ok(status::HV_S_OK)
    }
}
