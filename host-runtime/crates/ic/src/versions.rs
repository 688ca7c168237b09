//! The version tables Linux guests answer negotiations with, most preferred first.
//!
//! Taken from Linux `drivers/hv/hv_util.c` (`fw_versions`, `hb_versions`, `sd_versions`,
//! `ts_versions`), `hv_kvp.c`, `hv_snapshot.c` and `tools/hv/hv_fcopy_uio_daemon.c`. A guest that
//! answers with the same tables looks to Hyper-V exactly like a Linux guest.

use hvisd_protocol::ic::IcVersion;

const fn v(major: u16, minor: u16) -> IcVersion {
    IcVersion::new(major, minor)
}

/// Framework versions of the util services (heartbeat, shutdown, timesync) and KVP:
/// `UTIL_FW_VERSION` 3.0, then `UTIL_WS2K8_FW_VERSION` 1.0.
pub const UTIL_FRAMEWORK_VERSIONS: &[IcVersion] = &[v(3, 0), v(1, 0)];

/// Framework versions of services that only speak the current framework (VSS, fcopy): 3.0.
pub const CURRENT_FRAMEWORK_VERSIONS: &[IcVersion] = &[v(3, 0)];

/// Heartbeat message versions: 3.0, 1.0.
pub const HEARTBEAT_VERSIONS: &[IcVersion] = &[v(3, 0), v(1, 0)];

/// Shutdown message versions: 3.2 (hibernate), 3.1 (restart), 3.0, 1.0.
pub const SHUTDOWN_VERSIONS: &[IcVersion] = &[v(3, 2), v(3, 1), v(3, 0), v(1, 0)];

/// Timesync message versions: 4.0 (reference-time samples), 3.0, 1.0.
pub const TIMESYNC_VERSIONS: &[IcVersion] = &[v(4, 0), v(3, 0), v(1, 0)];

/// KVP framework versions (`hv_kvp.c`): 3.0, 1.0.
pub const KVP_FRAMEWORK_VERSIONS: &[IcVersion] = UTIL_FRAMEWORK_VERSIONS;

/// KVP message versions (`hv_kvp.c`): 4.0 (Windows 8), 3.0 (Windows 7), 1.0 (WS2008).
pub const KVP_VERSIONS: &[IcVersion] = &[v(4, 0), v(3, 0), v(1, 0)];

/// VSS framework versions (`hv_snapshot.c`): 3.0 only.
pub const VSS_FRAMEWORK_VERSIONS: &[IcVersion] = hvisd_protocol::vss::FRAMEWORK_VERSIONS;

/// VSS message versions (`hv_snapshot.c`): 5.0 only (freeze/thaw operations).
pub const VSS_VERSIONS: &[IcVersion] = hvisd_protocol::vss::MESSAGE_VERSIONS;

/// fcopy framework versions (`hv_fcopy_uio_daemon.c`): 3.0 only.
pub const FCOPY_FRAMEWORK_VERSIONS: &[IcVersion] = hvisd_protocol::fcopy::FRAMEWORK_VERSIONS;

/// fcopy message versions (`hv_fcopy_uio_daemon.c`): 1.1 only.
pub const FCOPY_VERSIONS: &[IcVersion] = hvisd_protocol::fcopy::MESSAGE_VERSIONS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_lists_the_most_preferred_version_first() {
        for table in [
            UTIL_FRAMEWORK_VERSIONS,
            HEARTBEAT_VERSIONS,
            SHUTDOWN_VERSIONS,
            TIMESYNC_VERSIONS,
            KVP_VERSIONS,
            VSS_VERSIONS,
            FCOPY_VERSIONS,
        ] {
            assert!(table.windows(2).all(|w| w[0] > w[1]), "{table:?}");
        }
    }
}
