//! The timesync service: reads the host's time samples and records the host-guest clock offset.
//!
//! hvisd never sets the clock (that is chrony's or the kernel's job on a real guest); it keeps the
//! last sample and the offset so `hvisd status` and logs can show how far the guest has drifted.
//! Replies are the request echoed with `TRANSACTION | RESPONSE`, as Linux sends them.

use crate::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use crate::versions::{TIMESYNC_VERSIONS, UTIL_FRAMEWORK_VERSIONS};
use hvisd_protocol::guid::{Guid, class_id};
use hvisd_protocol::ic::timesync::TimeSample;
use hvisd_protocol::ic::{IcVersion, MessageType, status};
use std::time::{SystemTime, UNIX_EPOCH};

const NAME: &str = "timesync";

/// Where the service reads the guest's wall clock (replaceable so tests can fix it).
pub type Clock = Box<dyn Fn() -> SystemTime + Send>;

/// One recorded sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeRecord {
    /// The sample as the host sent it.
    pub sample: TimeSample,
    /// The guest's wall clock when the sample was handled, ns since the Unix epoch.
    pub guest_time_unix_nanos: i128,
    /// Host time minus guest time, in ns: positive when the guest clock is behind.
    pub offset_nanos: i128,
}

/// The timesync service.
pub struct TimesyncService {
    clock: Clock,
    samples: u64,
    last: Option<TimeRecord>,
}

impl std::fmt::Debug for TimesyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimesyncService")
            .field("samples", &self.samples)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Default for TimesyncService {
    fn default() -> Self {
        Self::new()
    }
}

impl TimesyncService {
    /// A service reading the system clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemTime::now))
    }

    /// A service reading `clock` as the guest's wall clock.
    pub fn with_clock(clock: Clock) -> Self {
        TimesyncService {
            clock,
            samples: 0,
            last: None,
        }
    }

    /// Time messages handled.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The last recorded sample and offset.
    pub fn last(&self) -> Option<TimeRecord> {
        self.last
    }
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

impl IcService for TimesyncService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn class_id(&self) -> Guid {
        class_id::TIMESYNC
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        UTIL_FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        TIMESYNC_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        info.expect_type(NAME, MessageType::TIMESYNC)?;
        let sample = TimeSample::parse(body, info.message_version)
            .map_err(|e| IcServiceError::malformed(NAME, e))?;
        let guest = unix_nanos((self.clock)());
        let offset_nanos = sample.host_time_unix_nanos() - guest;
        let record = TimeRecord {
            sample,
            guest_time_unix_nanos: guest,
            offset_nanos,
        };
        if sample.flags.is_sync() {
            hvisd_protocol::throttled!(
                info,
                offset_ns = %offset_nanos,
                "host requests a clock sync; hvisd records the offset and leaves the clock alone"
            );
        } else {
            tracing::debug!(offset_ns = %offset_nanos, "time sample from host");
        }
        self.samples += 1;
        self.last = Some(record);
        Ok(status::HV_S_OK)
    }
}
