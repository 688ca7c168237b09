//! The kernel <-> daemon VSS protocol of Linux's `/dev/vmbus/hv_vss` (`hv_utils_transport`), as
//! `tools/hv/hv_vss_daemon.c` and `drivers/hv/hv_snapshot.c` speak it.
//!
//! Every message is one whole packed `struct hv_vss_msg` of [`VSS_MSG_SIZE`] = 12 bytes, whose
//! first union is `{ hv_vss_hdr, int error }`, except the kernel's answer to REGISTER1, a bare
//! 4-byte `u32`:
//!
//! 1. The daemon opens the device and writes a message with operation REGISTER1 (129), the rest
//!    zero ([`build_register1`]).
//! 2. The kernel answers with the 4 bytes of the `u32` 129 (`VSS_OP_REGISTER1`, which it calls
//!    its version; [`parse_version_reply`]). `hv_vss_daemon` exits unless that read returns
//!    exactly 4 bytes. A legacy daemon writes REGISTER (128) instead and gets no answer.
//! 3. The kernel sends one request at a time: 12 freshly zeroed bytes with only the operation set
//!    (FREEZE, THAW or HOT_BACKUP): the host's flags and LUN data are not passed on.
//! 4. The daemon writes the same 12 bytes back with `int error` over bytes 0..4 (so the operation
//!    byte is overwritten): `HV_S_OK` (0), or `HV_E_FAIL` (0x80004005) when a FREEZE or THAW
//!    failed ([`c_daemon_error`]). The kernel forwards any value to the host unchanged as
//!    `icmsg_hdr.status`.
//!
//! What the kernel accepts from the daemon (`vss_on_msg`): a write of any other length fails
//! with `EINVAL`; operation byte 128 or 129 is a registration (refused with `EINVAL` while a
//! request is in flight); anything else is a reply, accepted only while the kernel waits for one
//! (else `EINVAL`, e.g. after its timeout). Before hibernation the kernel sends the daemon a
//! fabricated THAW and makes its reply fail with `EINVAL`; `hv_vss_daemon` then thaws what it
//! froze and reopens the device. A read into a buffer shorter than the pending message fails with
//! `EINVAL` (`hvt_op_read`), so one 12-byte buffer reads both the version and the requests.
//!
//! `int error` is in the machine's byte order; Hyper-V guests (x86-64, arm64) are little-endian,
//! which is what this module writes. No I/O here; nothing panics on any input.

use super::{VSS_MSG_SIZE, VssError, VssOperation};
use crate::ic::status;

/// One daemon-device message.
pub type DaemonMessage = [u8; VSS_MSG_SIZE];

/// Size of the kernel's answer to REGISTER1.
pub const VERSION_REPLY_SIZE: usize = 4;

/// The "version" the kernel answers REGISTER1 with: the value of `VSS_OP_REGISTER1`.
pub const KERNEL_VERSION: u32 = VssOperation::REGISTER1.0 as u32;

/// Daemon side: the registration message `hv_vss_daemon` writes after opening the device.
pub fn build_register1() -> DaemonMessage {
    let mut m = [0u8; VSS_MSG_SIZE];
    m[0] = VssOperation::REGISTER1.0;
    m
}

/// Daemon side: reads the kernel's answer to REGISTER1, which must be exactly 4 bytes (as
/// `hv_vss_daemon` demands). Returns the version (129 on every Linux so far).
pub fn parse_version_reply(bytes: &[u8]) -> Result<u32, VssError> {
    let b: [u8; VERSION_REPLY_SIZE] = bytes.try_into().map_err(|_| VssError::WrongSize {
        what: "VSS kernel version reply",
        expected: VERSION_REPLY_SIZE,
        got: bytes.len(),
    })?;
    Ok(u32::from_le_bytes(b))
}

/// A request read from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonRequest {
    /// The operation (the kernel sends FREEZE, THAW and HOT_BACKUP; any value is kept).
    pub operation: VssOperation,
    /// The `flags` word (zero from the kernel).
    pub flags: u32,
}

/// Daemon side: reads one request; anything but exactly 12 bytes is an error (`hv_vss_daemon`
/// reopens the device then).
pub fn parse_request(bytes: &[u8]) -> Result<DaemonRequest, VssError> {
    let msg = whole_message(bytes, "VSS daemon request")?;
    Ok(DaemonRequest {
        operation: VssOperation(msg[0]),
        flags: u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]),
    })
}

/// Daemon side: the reply to `request`: the request's bytes with `error` written over bytes
/// 0..4, as `hv_vss_daemon` sends it. Refuses an `error` whose low byte the kernel would read as
/// a registration ([`VssError::AmbiguousError`]); no `HV_*` status has such a low byte.
pub fn build_reply(request: &DaemonMessage, error: u32) -> Result<DaemonMessage, VssError> {
    let low = error.to_le_bytes()[0];
    if low == VssOperation::REGISTER.0 || low == VssOperation::REGISTER1.0 {
        return Err(VssError::AmbiguousError { error });
    }
    let mut reply = *request;
    reply[..4].copy_from_slice(&error.to_le_bytes());
    Ok(reply)
}

/// The `error` `hv_vss_daemon` replies with: for FREEZE and THAW `HV_S_OK` if every file system
/// was frozen (thawed) and `HV_E_FAIL` otherwise; for HOT_BACKUP and any other operation
/// (which it logs as illegal) always `HV_S_OK`.
pub fn c_daemon_error(operation: VssOperation, succeeded: bool) -> u32 {
    match operation {
        VssOperation::FREEZE | VssOperation::THAW if !succeeded => status::HV_E_FAIL,
        _ => status::HV_S_OK,
    }
}

/// Kernel side (simulator, tests): a request as `vss_send_op` builds it.
pub fn build_request(operation: VssOperation) -> DaemonMessage {
    let mut m = [0u8; VSS_MSG_SIZE];
    m[0] = operation.0;
    m
}

/// Kernel side: the answer to REGISTER1.
pub fn build_version_reply() -> [u8; VERSION_REPLY_SIZE] {
    KERNEL_VERSION.to_le_bytes()
}

/// A message the daemon wrote, read as the kernel's `vss_on_msg` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonWrite {
    /// REGISTER (no answer) or REGISTER1 (answered with [`build_version_reply`]).
    Register(VssOperation),
    /// The answer to the pending request.
    Reply {
        /// `error`, forwarded to the host as `icmsg_hdr.status`.
        error: u32,
        /// Whether the kernel writes [`super::VSS_HBU_NO_AUTO_RECOVERY`] into the host's
        /// `flags`: only when byte 0 of the reply reads as HOT_BACKUP, i.e. the low byte of
        /// `error` is 2. With `hv_vss_daemon`'s `error` 0 this is never the case.
        sets_no_auto_recovery: bool,
    },
}

/// Kernel side: reads a daemon write as `vss_on_msg` does (exactly 12 bytes).
pub fn parse_daemon_write(bytes: &[u8]) -> Result<DaemonWrite, VssError> {
    let msg = whole_message(bytes, "VSS daemon write")?;
    let op = VssOperation(msg[0]);
    if op == VssOperation::REGISTER || op == VssOperation::REGISTER1 {
        return Ok(DaemonWrite::Register(op));
    }
    Ok(DaemonWrite::Reply {
        error: u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]),
        sets_no_auto_recovery: op == VssOperation::HOT_BACKUP,
    })
}

fn whole_message<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a DaemonMessage, VssError> {
    bytes.try_into().map_err(|_| VssError::WrongSize {
        what,
        expected: VSS_MSG_SIZE,
        got: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn handshake_bytes_are_register1_then_a_bare_u32() {
        assert_eq!(build_register1(), [129, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(build_version_reply(), [129, 0, 0, 0]);
        assert_eq!(parse_version_reply(&[129, 0, 0, 0]), Ok(129));
        assert_eq!(
            parse_version_reply(&build_register1()),
            Err(VssError::WrongSize {
                what: "VSS kernel version reply",
                expected: 4,
                got: 12
            })
        );
        assert_eq!(
            parse_daemon_write(&build_register1()),
            Ok(DaemonWrite::Register(VssOperation::REGISTER1))
        );
        let mut legacy = build_register1();
        legacy[0] = 128;
        assert_eq!(
            parse_daemon_write(&legacy),
            Ok(DaemonWrite::Register(VssOperation::REGISTER))
        );
    }

    #[test]
    fn freeze_failure_reply_carries_hv_e_fail_over_the_operation_byte() {
        let req = build_request(VssOperation::FREEZE);
        assert_eq!(req, [5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_request(&req),
            Ok(DaemonRequest {
                operation: VssOperation::FREEZE,
                flags: 0
            })
        );
        let err = c_daemon_error(VssOperation::FREEZE, false);
        assert_eq!(err, 0x8000_4005);
        let reply = build_reply(&req, err).unwrap();
        assert_eq!(reply, [0x05, 0x40, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_daemon_write(&reply),
            Ok(DaemonWrite::Reply {
                error: 0x8000_4005,
                sets_no_auto_recovery: false
            })
        );
    }

    #[test]
    fn hot_backup_success_reply_does_not_get_the_kernel_to_set_flags() {
        let req = build_request(VssOperation::HOT_BACKUP);
        let reply = build_reply(&req, c_daemon_error(VssOperation::HOT_BACKUP, true)).unwrap();
        assert_eq!(reply, [0; 12]);
        assert_eq!(
            parse_daemon_write(&reply),
            Ok(DaemonWrite::Reply {
                error: 0,
                sets_no_auto_recovery: false
            })
        );
    }

    #[test]
    fn c_daemon_errors() {
        assert_eq!(c_daemon_error(VssOperation::THAW, true), 0);
        assert_eq!(c_daemon_error(VssOperation::THAW, false), status::HV_E_FAIL);
        assert_eq!(c_daemon_error(VssOperation::HOT_BACKUP, false), 0);
        assert_eq!(c_daemon_error(VssOperation(42), false), 0);
    }

    #[test]
    fn replies_the_kernel_would_take_for_registrations_are_refused() {
        let req = build_request(VssOperation::THAW);
        assert_eq!(
            build_reply(&req, 0x8007_0081),
            Err(VssError::AmbiguousError { error: 0x8007_0081 })
        );
        assert!(build_reply(&req, 0x80).is_err());
        for s in [
            status::HV_S_OK,
            status::HV_E_FAIL,
            status::HV_ERROR_NOT_SUPPORTED,
            status::HV_INVALIDARG,
        ] {
            assert!(build_reply(&req, s).is_ok(), "{s:#x}");
        }
    }

    #[test]
    fn wrong_sizes_are_refused_both_ways() {
        assert!(parse_request(&[5; 11]).is_err());
        assert!(parse_request(&[5; 13]).is_err());
        assert!(parse_daemon_write(&[0; 4]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = parse_version_reply(&bytes);
            let parsed = parse_request(&bytes);
            prop_assert_eq!(parsed.is_ok(), bytes.len() == VSS_MSG_SIZE);
            let _ = parse_daemon_write(&bytes);
        }

        #[test]
        fn reply_round_trips_through_the_kernel_reader(op in any::<u8>(), error in any::<u32>()) {
            let req = build_request(VssOperation(op));
            prop_assert_eq!(parse_request(&req).unwrap().operation, VssOperation(op));
            match build_reply(&req, error) {
                Ok(reply) => {
                    let expected = DaemonWrite::Reply {
                        error,
                        sets_no_auto_recovery: error & 0xff == 2,
                    };
                    prop_assert_eq!(parse_daemon_write(&reply).unwrap(), expected);
                }
                Err(VssError::AmbiguousError { .. }) => {
                    prop_assert!(matches!(error & 0xff, 128 | 129));
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
