//! Shutdown IC message (`struct shutdown_msg_data`).

use super::IcParseError;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of `display_message`.
pub const DISPLAY_MESSAGE_SIZE: usize = 2048;

/// `struct shutdown_msg_data`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct ShutdownMsg {
    /// Windows shutdown reason code (`SHTDN_REASON_*`), informational.
    pub reason_code: U32,
    /// Seconds the host allows the guest before it acts itself.
    pub timeout_seconds: U32,
    /// What to do, see [`ShutdownFlags`].
    pub flags: U32,
    /// Text for the user, NUL-terminated if shorter than the field.
    pub display_message: [u8; DISPLAY_MESSAGE_SIZE],
}

const _: () = assert!(size_of::<ShutdownMsg>() == 2060);

/// `shutdown_msg_data.flags`: an open bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ShutdownFlags(pub u32);

impl ShutdownFlags {
    /// Perform the action by force (Linux always does).
    pub const FORCE: ShutdownFlags = ShutdownFlags(1);
    /// Restart instead of powering off.
    pub const RESTART: ShutdownFlags = ShutdownFlags(2);
    /// Hibernate instead of powering off.
    pub const HIBERNATE: ShutdownFlags = ShutdownFlags(4);

    /// The action the flags ask for, by Linux's `hv_util.c` table: 0/1 power off, 2/3 restart,
    /// 4/5 hibernate, anything else invalid.
    pub fn kind(self) -> ShutdownKind {
        match self.0 & !Self::FORCE.0 {
            0 => ShutdownKind::PowerOff,
            2 => ShutdownKind::Restart,
            4 => ShutdownKind::Hibernate,
            _ => ShutdownKind::Invalid(self.0),
        }
    }

    /// True if the force bit is set.
    pub fn force(self) -> bool {
        self.0 & Self::FORCE.0 != 0
    }
}

/// What a shutdown request asks the guest to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownKind {
    /// Power off.
    PowerOff,
    /// Restart.
    Restart,
    /// Hibernate.
    Hibernate,
    /// A flag combination Linux refuses with `HV_E_FAIL`; the raw flags are kept.
    Invalid(u32),
}

impl ShutdownKind {
    /// A short word for logs and the environment of a shutdown command.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownKind::PowerOff => "poweroff",
            ShutdownKind::Restart => "restart",
            ShutdownKind::Hibernate => "hibernate",
            ShutdownKind::Invalid(_) => "invalid",
        }
    }
}

/// A parsed shutdown request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShutdownRequest {
    /// `reason_code`.
    pub reason_code: u32,
    /// `timeout_seconds`.
    pub timeout_seconds: u32,
    /// Raw `flags`.
    pub flags: u32,
    /// The action the flags select.
    pub kind: ShutdownKind,
    /// Whether the force bit is set.
    pub force: bool,
    /// `display_message` up to its first NUL, decoded as UTF-8 (invalid bytes replaced).
    pub message: String,
}

impl ShutdownRequest {
    /// Parses a shutdown body. Like Linux, the whole 2060-byte structure must be present.
    pub fn parse(body: &[u8]) -> Result<Self, IcParseError> {
        let (msg, _) =
            ShutdownMsg::read_from_prefix(body).map_err(|_| IcParseError::Truncated {
                what: "shutdown_msg_data",
                need: size_of::<ShutdownMsg>(),
                got: body.len(),
            })?;
        let text = &msg.display_message;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let flags = ShutdownFlags(msg.flags.get());
        Ok(ShutdownRequest {
            reason_code: msg.reason_code.get(),
            timeout_seconds: msg.timeout_seconds.get(),
            flags: flags.0,
            kind: flags.kind(),
            force: flags.force(),
            message: String::from_utf8_lossy(&text[..end]).into_owned(),
        })
    }

    /// Builds the 2060-byte body for this request (what the host sends). The message is cut to
    /// 2047 bytes so a NUL always ends it.
    pub fn build(&self) -> Vec<u8> {
        let mut msg = ShutdownMsg {
            reason_code: U32::new(self.reason_code),
            timeout_seconds: U32::new(self.timeout_seconds),
            flags: U32::new(self.flags),
            display_message: [0; DISPLAY_MESSAGE_SIZE],
        };
        let text = self.message.as_bytes();
        let n = text.len().min(DISPLAY_MESSAGE_SIZE - 1);
        msg.display_message[..n].copy_from_slice(&text[..n]);
        msg.as_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(flags: u32) -> ShutdownRequest {
        ShutdownRequest {
            reason_code: 0x8000_0000,
            timeout_seconds: 30,
            flags,
            kind: ShutdownFlags(flags).kind(),
            force: flags & 1 != 0,
            message: "planned maintenance".into(),
        }
    }

    #[test]
    fn flags_map_to_actions_as_linux_does() {
        let table = [
            (0, ShutdownKind::PowerOff),
            (1, ShutdownKind::PowerOff),
            (2, ShutdownKind::Restart),
            (3, ShutdownKind::Restart),
            (4, ShutdownKind::Hibernate),
            (5, ShutdownKind::Hibernate),
            (6, ShutdownKind::Invalid(6)),
            (8, ShutdownKind::Invalid(8)),
        ];
        for (flags, kind) in table {
            assert_eq!(ShutdownFlags(flags).kind(), kind, "flags {flags}");
        }
    }

    #[test]
    fn request_round_trips_through_the_wire_layout() {
        let req = request(3);
        let body = req.build();
        assert_eq!(body.len(), 2060);
        assert_eq!(&body[8..12], &3u32.to_le_bytes());
        assert_eq!(ShutdownRequest::parse(&body).unwrap(), req);
    }

    #[test]
    fn short_body_is_rejected_like_linux() {
        let body = request(0).build();
        assert_eq!(
            ShutdownRequest::parse(&body[..2059]),
            Err(IcParseError::Truncated {
                what: "shutdown_msg_data",
                need: 2060,
                got: 2059
            })
        );
    }

    #[test]
    fn message_without_nul_uses_the_whole_field_and_invalid_utf8_is_replaced() {
        let mut body = request(0).build();
        body[12..].fill(b'x');
        body[12] = 0xff;
        let parsed = ShutdownRequest::parse(&body).unwrap();
        assert_eq!(parsed.message.chars().count(), 2048);
        assert!(parsed.message.starts_with('\u{fffd}'));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2100)) {
            prop_assert_eq!(ShutdownRequest::parse(&bytes).is_ok(), bytes.len() >= 2060);
        }
    }
}
