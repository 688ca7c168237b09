//! VSS (backup freeze/thaw) wire formats: the message a Hyper-V host sends on the VSS channel,
//! what a Linux guest answers to each operation, and (in [`daemon`]) the kernel <-> daemon
//! protocol of `/dev/vmbus/hv_vss`.
//!
//! On VMBus a VSS request is one IC packet (see [`crate::ic`]) with `icmsgtype` 5:
//!
//! ```text
//! vmbuspipe_hdr (8) | icmsg_hdr (20) | hv_vss_msg (12) | host data Linux never reads
//!
//! hv_vss_msg, packed, little-endian:
//!   0   u8      operation         hv_vss_hdr.operation, see VssOperation
//!   1   u8[7]   reserved
//!   8   u32     flags             vss_cf.flags (HOT_BACKUP) or dm_info.flags (GET_DM_INFO)
//! ```
//!
//! The host appends more than the 12 bytes to some operations (a FREEZE carries LUN information
//! and may be [`HOST_FREEZE_MAX_SIZE`] bytes long); Linux reads only `hv_vss_msg` and answers
//! by sending the whole received packet back with `icmsg_hdr.status` and `icflags` set, having
//! edited at most the `flags` word. [`linux_guest_answer`] says, per operation, what goes back.
//!
//! Facts taken from Linux `drivers/hv/hv_snapshot.c` (`hv_vss_onchannelcallback`,
//! `vss_handle_request`, `vss_on_msg`, `vss_send_op`), `include/uapi/linux/hyperv.h`
//! (`enum hv_vss_op`, `struct hv_vss_msg`) and `tools/hv/hv_vss_daemon.c`. No I/O here; nothing
//! panics on any input.

pub mod daemon;

use std::fmt;
use std::time::Duration;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid::Guid;
use crate::ic::{ICMSG_HDR, IcVersion, status};

/// The VMBus interface type (`class_id`) of the VSS channel,
/// `35fa2e29-ea23-4236-96ae-3a6ebacba440` (Linux `HV_VSS_GUID`).
pub const CLASS_ID: Guid = crate::guid::class_id::VSS;

/// Framework versions a Linux guest accepts on the VSS channel (`fw_versions` of
/// `hv_snapshot.c`): `UTIL_FW_VERSION` 3.0 only.
pub const FRAMEWORK_VERSIONS: &[IcVersion] = &[IcVersion::new(3, 0)];

/// VSS message versions a Linux guest accepts (`vss_versions` of `hv_snapshot.c`): 5.0 only,
/// the first version with FREEZE and THAW.
pub const MESSAGE_VERSIONS: &[IcVersion] = &[IcVersion::new(5, 0)];

/// `struct hv_vss_hdr`: the first 8 bytes of every VSS message.
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
pub struct VssHeader {
    /// The operation, see [`VssOperation`].
    pub operation: u8,
    /// Reserved. Linux neither reads nor clears it (it echoes what the host sent).
    pub reserved: [u8; 7],
}

/// `struct hv_vss_msg`: the part of a VSS message Linux reads and writes, on VMBus and (with
/// bytes 0..4 doubling as `int error` in replies) on the daemon device.
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
pub struct VssMsg {
    /// The header.
    pub header: VssHeader,
    /// The one 32-bit member of the operation union: `hv_vss_check_feature.flags` for
    /// HOT_BACKUP, `hv_vss_check_dm_info.flags` for GET_DM_INFO, unused otherwise.
    pub flags: U32,
}

/// Size of `struct hv_vss_msg`: what Linux reads of a VSS body and the size of every daemon
/// message but the kernel's version reply.
pub const VSS_MSG_SIZE: usize = size_of::<VssMsg>();

/// Offset of the `flags` word in a VSS body.
pub const FLAGS_OFFSET: usize = size_of::<VssHeader>();

const _: () = assert!(size_of::<VssHeader>() == 8);
const _: () = assert!(VSS_MSG_SIZE == 12);
const _: () = assert!(FLAGS_OFFSET == 8);

/// Shortest VSS packet a current Linux guest handles (pipe header, IC header, `hv_vss_msg`):
/// shorter ones are dropped without an answer (`hv_vss_onchannelcallback`, since it was
/// hardened against hostile hosts; older kernels read past the end).
pub const MIN_PACKET_SIZE: usize = ICMSG_HDR + VSS_MSG_SIZE;

/// Longest packet a Linux guest receives on the VSS channel: `VSS_MAX_PKT_SIZE`, two 4 KiB
/// Hyper-V pages. A longer packet fails `vmbus_recvpacket` and is never answered.
pub const LINUX_MAX_PACKET_SIZE: usize = 2 * 4096;

/// Longest VSS body hvisd parses: the body of a [`LINUX_MAX_PACKET_SIZE`] packet.
pub const MAX_BODY_SIZE: usize = LINUX_MAX_PACKET_SIZE - ICMSG_HDR;

/// How large a FREEZE message from Hyper-V can be (LUN information follows `hv_vss_msg`), per
/// the comment on `struct hv_vss_msg` in Linux's uapi `hyperv.h`.
pub const HOST_FREEZE_MAX_SIZE: usize = 6260;

/// How large an AUTO_RECOVER message from Hyper-V can be (same source). It exceeds
/// [`LINUX_MAX_PACKET_SIZE`]: Linux relies on the host never sending one to a guest that
/// answered HOT_BACKUP with [`VSS_HBU_NO_AUTO_RECOVERY`].
pub const HOST_AUTO_RECOVER_MAX_SIZE: usize = 12_500;

// A FREEZE fits Linux's receive buffer; an AUTO_RECOVER would not.
const _: () = assert!(HOST_FREEZE_MAX_SIZE <= MAX_BODY_SIZE);
const _: () = assert!(HOST_AUTO_RECOVER_MAX_SIZE > LINUX_MAX_PACKET_SIZE);

/// `hv_vss_check_feature.flags` value meaning "no auto-recovery", the only feature value Linux
/// ever answers HOT_BACKUP with.
pub const VSS_HBU_NO_AUTO_RECOVERY: u32 = 0x0000_0005;

/// How long the Linux kernel waits for the daemon's answer to FREEZE before it answers the host
/// with `HV_E_FAIL` itself (`VSS_FREEZE_TIMEOUT`, 15 minutes).
pub const LINUX_FREEZE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long the Linux kernel waits for the daemon's answer to THAW and HOT_BACKUP
/// (`HV_UTIL_TIMEOUT`, 30 seconds).
pub const LINUX_DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// `hv_vss_hdr.operation`: an open enum, so a value this crate does not know is kept and can be
/// reported. The numbering is Linux's `enum hv_vss_op` plus the two registration codes, which
/// only the daemon protocol uses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VssOperation(pub u8);

impl VssOperation {
    /// 0: create a shadow copy (pre-5.0 message versions; Linux answers success and does
    /// nothing).
    pub const CREATE: VssOperation = VssOperation(0);
    /// 1: delete a shadow copy (Linux answers success and does nothing).
    pub const DELETE: VssOperation = VssOperation(1);
    /// 2: "check hot backup": the host asks which backup features the guest has.
    pub const HOT_BACKUP: VssOperation = VssOperation(2);
    /// 3: dynamic-memory info query.
    pub const GET_DM_INFO: VssOperation = VssOperation(3);
    /// 4: backup complete (Linux answers success and does nothing).
    pub const BU_COMPLETE: VssOperation = VssOperation(4);
    /// 5: freeze the guest's file systems (message version 5.0 and later).
    pub const FREEZE: VssOperation = VssOperation(5);
    /// 6: thaw them.
    pub const THAW: VssOperation = VssOperation(6);
    /// 7: auto-recover (not expected: Linux says it has no auto-recovery).
    pub const AUTO_RECOVER: VssOperation = VssOperation(7);
    /// 8: `VSS_OP_COUNT`, the number of host operations; not an operation. A host sending it
    /// gets the answer of any unknown operation.
    pub const COUNT: VssOperation = VssOperation(8);
    /// 128: legacy daemon registration (daemon protocol only; the kernel does not answer it).
    pub const REGISTER: VssOperation = VssOperation(128);
    /// 129: daemon registration with a version handshake (daemon protocol only; the kernel
    /// answers with its version, see [`daemon`]).
    pub const REGISTER1: VssOperation = VssOperation(129);

    /// The Linux name, e.g. `"VSS_OP_FREEZE"`, or `None` for an unknown value.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::CREATE => "VSS_OP_CREATE",
            Self::DELETE => "VSS_OP_DELETE",
            Self::HOT_BACKUP => "VSS_OP_HOT_BACKUP",
            Self::GET_DM_INFO => "VSS_OP_GET_DM_INFO",
            Self::BU_COMPLETE => "VSS_OP_BU_COMPLETE",
            Self::FREEZE => "VSS_OP_FREEZE",
            Self::THAW => "VSS_OP_THAW",
            Self::AUTO_RECOVER => "VSS_OP_AUTO_RECOVER",
            Self::COUNT => "VSS_OP_COUNT",
            Self::REGISTER => "VSS_OP_REGISTER",
            Self::REGISTER1 => "VSS_OP_REGISTER1",
            _ => return None,
        })
    }
}

impl fmt::Debug for VssOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

impl fmt::Display for VssOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why bytes are not a VSS message (VMBus body or daemon message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VssError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {need} bytes, got {got}")]
    Truncated {
        /// The structure being read, e.g. `"hv_vss_msg"`.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A body longer than any packet Linux receives on the VSS channel.
    #[error("VSS body of {len} bytes exceeds the {max}-byte limit of Linux's VSS channel")]
    Oversized {
        /// Body length.
        len: usize,
        /// [`MAX_BODY_SIZE`].
        max: usize,
    },
    /// A daemon-device message of the wrong size (the kernel and `hv_vss_daemon` both refuse
    /// every size but the expected one).
    #[error("{what}: every message is {expected} bytes, got {got}")]
    WrongSize {
        /// The message being read.
        what: &'static str,
        /// The only size accepted.
        expected: usize,
        /// Bytes read.
        got: usize,
    },
    /// A daemon reply whose `error` the kernel would misread: `error` overlays the operation
    /// byte, and a low byte of 128 or 129 makes the kernel take the reply for a registration.
    #[error(
        "VSS daemon reply error {error:#010x} is ambiguous: its low byte reads as \
         VSS_OP_REGISTER/REGISTER1 to the kernel"
    )]
    AmbiguousError {
        /// The error value.
        error: u32,
    },
}

/// A VSS request as the host sent it, viewed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VssRequest<'a> {
    /// `hv_vss_hdr.operation`.
    pub operation: VssOperation,
    /// `hv_vss_hdr.reserved`, as sent.
    pub reserved: [u8; 7],
    /// The `flags` word, as sent.
    pub flags: u32,
    /// Whatever follows `hv_vss_msg` (LUN information on FREEZE). Linux never reads it and sends
    /// it back unchanged.
    pub host_data: &'a [u8],
}

impl<'a> VssRequest<'a> {
    /// Reads a VSS body (everything after `icmsg_hdr`). Needs the 12 bytes Linux reads and
    /// refuses bodies longer than [`MAX_BODY_SIZE`].
    pub fn parse(body: &'a [u8]) -> Result<Self, VssError> {
        if body.len() > MAX_BODY_SIZE {
            return Err(VssError::Oversized {
                len: body.len(),
                max: MAX_BODY_SIZE,
            });
        }
        let (msg, host_data) = VssMsg::read_from_prefix(body).map_err(|_| VssError::Truncated {
            what: "hv_vss_msg",
            need: VSS_MSG_SIZE,
            got: body.len(),
        })?;
        Ok(VssRequest {
            operation: VssOperation(msg.header.operation),
            reserved: msg.header.reserved,
            flags: msg.flags.get(),
            host_data,
        })
    }
}

/// Builds the 12-byte `hv_vss_msg` of a request (the host side: simulator, tests).
pub fn build_message(operation: VssOperation, flags: u32) -> [u8; VSS_MSG_SIZE] {
    let msg = VssMsg {
        header: VssHeader {
            operation: operation.0,
            reserved: [0; 7],
        },
        flags: U32::new(flags),
    };
    let mut out = [0u8; VSS_MSG_SIZE];
    out.copy_from_slice(msg.as_bytes());
    out
}

/// Writes `flags` into the `flags` word of a body in place, the only body edit Linux makes in
/// an answer.
pub fn write_flags(body: &mut [u8], flags: u32) -> Result<(), VssError> {
    let got = body.len();
    let slot = body
        .get_mut(FLAGS_OFFSET..VSS_MSG_SIZE)
        .ok_or(VssError::Truncated {
            what: "hv_vss_msg",
            need: VSS_MSG_SIZE,
            got,
        })?;
    slot.copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

/// What a Linux guest does to the `flags` word of the body it sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagsAnswer {
    /// Left as the host sent it.
    Unchanged,
    /// Overwritten with this value.
    Set(u32),
}

/// How a Linux guest answers one VSS operation on VMBus. Every answer is the received packet,
/// same length, with `icflags = TRANSACTION | RESPONSE`, the given `status` and the body edited
/// as [`FlagsAnswer`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxAnswer {
    /// The kernel answers at once, without asking the daemon.
    Kernel {
        /// `icmsg_hdr.status`.
        status: u32,
        /// The body's `flags` word.
        flags: FlagsAnswer,
    },
    /// The kernel hands the operation to the daemon and answers with the daemon's `error` as
    /// `icmsg_hdr.status` (see [`daemon::c_daemon_error`] for what `hv_vss_daemon` sends).
    Daemon {
        /// How long the kernel waits for the daemon before answering `status_on_timeout`.
        timeout: Duration,
        /// The answer without a registered daemon, or when the daemon does not answer in time
        /// or cannot be reached: `HV_E_FAIL`.
        status_on_timeout: u32,
        /// The body's `flags` word.
        flags: FlagsAnswer,
    },
}

/// What a Linux guest answers to `operation` (current `hv_snapshot.c`, `vss_handle_request`):
///
/// | operation | who answers | status | `flags` |
/// |---|---|---|---|
/// | FREEZE | daemon, 15 min timeout | daemon's `error` (`HV_E_FAIL` on timeout / no daemon) | unchanged |
/// | THAW | daemon, 30 s timeout | same | unchanged |
/// | HOT_BACKUP | daemon, 30 s timeout | same (`hv_vss_daemon` always says `HV_S_OK`) | [`VSS_HBU_NO_AUTO_RECOVERY`] (see below) |
/// | GET_DM_INFO | kernel | `HV_S_OK` | 0 |
/// | CREATE, DELETE, BU_COMPLETE, AUTO_RECOVER, any other value | kernel | `HV_S_OK` | unchanged |
///
/// Unknown operations succeed: Linux answers `HV_S_OK` to anything it does not know, never
/// `HV_ERROR_NOT_SUPPORTED`.
///
/// HOT_BACKUP's flags are what Linux means to send (older kernels answered HOT_BACKUP
/// themselves with exactly this, and uapi `hyperv.h` relies on it to keep AUTO_RECOVER away).
/// A current kernel sets them only when the daemon's reply still has operation byte 2, but the
/// daemon's `error` overlays that byte, so with `hv_vss_daemon` (error 0) the host gets its
/// own flags back. [`daemon::DaemonWrite::Reply`] reproduces that for the kernel path.
pub fn linux_guest_answer(operation: VssOperation) -> LinuxAnswer {
    let daemon = |timeout, flags| LinuxAnswer::Daemon {
        timeout,
        status_on_timeout: status::HV_E_FAIL,
        flags,
    };
    match operation {
        VssOperation::FREEZE => daemon(LINUX_FREEZE_TIMEOUT, FlagsAnswer::Unchanged),
        VssOperation::THAW => daemon(LINUX_DAEMON_TIMEOUT, FlagsAnswer::Unchanged),
        VssOperation::HOT_BACKUP => daemon(
            LINUX_DAEMON_TIMEOUT,
            FlagsAnswer::Set(VSS_HBU_NO_AUTO_RECOVERY),
        ),
        VssOperation::GET_DM_INFO => LinuxAnswer::Kernel {
            status: status::HV_S_OK,
            flags: FlagsAnswer::Set(0),
        },
        _ => LinuxAnswer::Kernel {
            status: status::HV_S_OK,
            flags: FlagsAnswer::Unchanged,
        },
    }
}

/// Applies a [`FlagsAnswer`] to a body in place.
pub fn apply_flags_answer(body: &mut [u8], answer: FlagsAnswer) -> Result<(), VssError> {
    match answer {
        FlagsAnswer::Unchanged => {
            // Still refuse a body Linux would not have answered at all.
            VssRequest::parse(body).map(|_| ())
        }
        FlagsAnswer::Set(flags) => write_flags(body, flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn operations_have_linux_numbers() {
        let expected = [
            (VssOperation::CREATE, 0),
            (VssOperation::DELETE, 1),
            (VssOperation::HOT_BACKUP, 2),
            (VssOperation::GET_DM_INFO, 3),
            (VssOperation::BU_COMPLETE, 4),
            (VssOperation::FREEZE, 5),
            (VssOperation::THAW, 6),
            (VssOperation::AUTO_RECOVER, 7),
            (VssOperation::COUNT, 8),
            (VssOperation::REGISTER, 128),
            (VssOperation::REGISTER1, 129),
        ];
        for (op, n) in expected {
            assert_eq!(op.0, n);
            assert!(op.name().is_some());
        }
        assert_eq!(format!("{}", VssOperation::FREEZE), "VSS_OP_FREEZE(5)");
        assert_eq!(format!("{:?}", VssOperation(9)), "unknown(9)");
    }

    #[test]
    fn freeze_body_with_lun_data_parses_and_keeps_the_tail() {
        // operation 5, reserved 1..7, flags 0x0403_0201, then 4 bytes of host data.
        let body = [5, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 0xaa, 0xbb, 0xcc, 0xdd];
        let req = VssRequest::parse(&body).unwrap();
        assert_eq!(req.operation, VssOperation::FREEZE);
        assert_eq!(req.reserved, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(req.flags, 0x0403_0201);
        assert_eq!(req.host_data, &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn build_message_lays_out_operation_then_flags_at_8() {
        assert_eq!(
            build_message(VssOperation::HOT_BACKUP, VSS_HBU_NO_AUTO_RECOVERY),
            [2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]
        );
    }

    #[test]
    fn short_and_oversized_bodies_are_refused_with_sizes() {
        assert_eq!(
            VssRequest::parse(&[5; 11]),
            Err(VssError::Truncated {
                what: "hv_vss_msg",
                need: 12,
                got: 11
            })
        );
        let big = vec![0u8; MAX_BODY_SIZE + 1];
        assert_eq!(
            VssRequest::parse(&big),
            Err(VssError::Oversized {
                len: MAX_BODY_SIZE + 1,
                max: MAX_BODY_SIZE
            })
        );
        assert!(VssRequest::parse(&vec![0u8; MAX_BODY_SIZE]).is_ok());
        assert_eq!(MIN_PACKET_SIZE, 40);
    }

    #[test]
    fn linux_answers_per_operation() {
        assert_eq!(
            linux_guest_answer(VssOperation::GET_DM_INFO),
            LinuxAnswer::Kernel {
                status: 0,
                flags: FlagsAnswer::Set(0)
            }
        );
        assert_eq!(
            linux_guest_answer(VssOperation::FREEZE),
            LinuxAnswer::Daemon {
                timeout: Duration::from_secs(900),
                status_on_timeout: 0x8000_4005,
                flags: FlagsAnswer::Unchanged
            }
        );
        assert!(matches!(
            linux_guest_answer(VssOperation::HOT_BACKUP),
            LinuxAnswer::Daemon {
                flags: FlagsAnswer::Set(5),
                ..
            }
        ));
        assert!(matches!(
            linux_guest_answer(VssOperation::THAW),
            LinuxAnswer::Daemon { timeout, .. } if timeout == Duration::from_secs(30)
        ));
        for op in [0u8, 1, 4, 7, 8, 9, 128, 129, 255] {
            assert_eq!(
                linux_guest_answer(VssOperation(op)),
                LinuxAnswer::Kernel {
                    status: status::HV_S_OK,
                    flags: FlagsAnswer::Unchanged
                },
                "operation {op}"
            );
        }
    }

    #[test]
    fn flags_answer_edits_only_the_flags_word() {
        let mut body = [3, 9, 9, 9, 9, 9, 9, 9, 0xff, 0xff, 0xff, 0xff, 7];
        apply_flags_answer(&mut body, FlagsAnswer::Set(0)).unwrap();
        assert_eq!(body, [3, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 7]);
        let before = body;
        apply_flags_answer(&mut body, FlagsAnswer::Unchanged).unwrap();
        assert_eq!(body, before);
        assert!(apply_flags_answer(&mut [0; 11], FlagsAnswer::Set(1)).is_err());
        assert!(apply_flags_answer(&mut [0; 11], FlagsAnswer::Unchanged).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_keeps_every_byte(
            body in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            match VssRequest::parse(&body) {
                Ok(req) => {
                    prop_assert_eq!(req.operation.0, body[0]);
                    prop_assert_eq!(&req.reserved[..], &body[1..8]);
                    prop_assert_eq!(req.flags.to_le_bytes(), [body[8], body[9], body[10], body[11]]);
                    prop_assert_eq!(req.host_data, &body[12..]);
                }
                Err(_) => prop_assert!(body.len() < VSS_MSG_SIZE),
            }
        }

        #[test]
        fn build_then_parse_round_trips(op in any::<u8>(), flags in any::<u32>()) {
            let msg = build_message(VssOperation(op), flags);
            let req = VssRequest::parse(&msg).unwrap();
            prop_assert_eq!(req.operation, VssOperation(op));
            prop_assert_eq!(req.flags, flags);
            prop_assert!(req.host_data.is_empty());
        }
    }
}
