//! The kernel <-> daemon KVP protocol of Linux's `/dev/vmbus/hv_kvp` (`hv_utils_transport`).
//!
//! Every read and write is one whole `struct hv_kvp_msg` of [`DAEMON_MSG_SIZE`] = 7432 bytes:
//! the packed header (4 bytes) and a body union of 7428 bytes (the union is 4-aligned, so its
//! 7426-byte IP member is padded to 7428). Strings are UTF-8 and NUL-terminated; sizes count the
//! terminator. The daemon answers by overwriting the first 4 bytes (`operation`, `pool`, `pad`)
//! with the `int error` of the union: the status the kernel forwards to the host.
//!
//! Handshake, as `hv_kvp_daemon` and `hv_kvp.c` do it: the daemon opens the device and writes a
//! message with `operation = KVP_OP_REGISTER1` (100); the kernel answers with a message whose
//! operation is `KVP_OP_REGISTER1` and whose body is the version string `"3.1"`. From then on the
//! kernel sends requests and the daemon writes one reply per request.
//!
//! The kernel fills requests as `hv_kvp.c`'s `kvp_send_key` does: GET carries only the key
//! (`value_size` is 0); SET carries key and value as UTF-8 with sizes `len + 1`; numbers arrive
//! already formatted in decimal. No I/O here; nothing panics on any input.

use crate::kvp::{KvpOperation, MAX_KEY_SIZE, MAX_VALUE_SIZE, read_u32, write_u32};

/// Size of every message on the device.
pub const DAEMON_MSG_SIZE: usize = 7432;
/// Size of the daemon-side `adapter_id` field (bytes).
pub const ADAPTER_ID_FIELD: usize = 256;
/// Size of the daemon-side `ip_addr`, `sub_net` and `dns_addr` fields (bytes).
pub const IP_FIELD: usize = 2048;
/// Size of the daemon-side `gate_way` field (bytes).
pub const GATEWAY_FIELD: usize = 1024;

/// Byte offsets inside a daemon message.
pub mod layout {
    use super::*;
    /// `kvp_hdr.operation` (byte 0) / `error` (bytes 0..4).
    pub const OPERATION: usize = 0;
    /// `kvp_hdr.pool`.
    pub const POOL: usize = 1;
    /// Start of the body union.
    pub const BODY: usize = 4;
    /// GET/SET `value_type`.
    pub const SET_VALUE_TYPE: usize = BODY;
    /// GET/SET `key_size`.
    pub const SET_KEY_SIZE: usize = BODY + 4;
    /// GET/SET `value_size`.
    pub const SET_VALUE_SIZE: usize = BODY + 8;
    /// GET/SET `key`.
    pub const SET_KEY: usize = BODY + 12;
    /// GET/SET `value`.
    pub const SET_VALUE: usize = SET_KEY + MAX_KEY_SIZE;
    /// DELETE `key_size`.
    pub const DELETE_KEY_SIZE: usize = BODY;
    /// DELETE `key`.
    pub const DELETE_KEY: usize = BODY + 4;
    /// ENUMERATE `index`.
    pub const ENUM_INDEX: usize = BODY;
    /// ENUMERATE `value_type`.
    pub const ENUM_VALUE_TYPE: usize = BODY + 4;
    /// ENUMERATE `key_size`.
    pub const ENUM_KEY_SIZE: usize = BODY + 8;
    /// ENUMERATE `value_size`.
    pub const ENUM_VALUE_SIZE: usize = BODY + 12;
    /// ENUMERATE `key`.
    pub const ENUM_KEY: usize = BODY + 16;
    /// ENUMERATE `value`.
    pub const ENUM_VALUE: usize = ENUM_KEY + MAX_KEY_SIZE;
    /// IP `adapter_id`.
    pub const IP_ADAPTER_ID: usize = BODY;
    /// IP `addr_family`.
    pub const IP_ADDR_FAMILY: usize = IP_ADAPTER_ID + ADAPTER_ID_FIELD;
    /// IP `dhcp_enabled`.
    pub const IP_DHCP: usize = IP_ADDR_FAMILY + 1;
    /// IP `ip_addr`.
    pub const IP_ADDR: usize = IP_DHCP + 1;
    /// IP `sub_net`.
    pub const IP_SUBNET: usize = IP_ADDR + IP_FIELD;
    /// IP `gate_way`.
    pub const IP_GATEWAY: usize = IP_SUBNET + IP_FIELD;
    /// IP `dns_addr`.
    pub const IP_DNS: usize = IP_GATEWAY + GATEWAY_FIELD;
    /// REGISTER `version`.
    pub const REGISTER_VERSION: usize = BODY;

    const _: () = assert!(IP_DNS + IP_FIELD == 7430);
    const _: () = assert!(ENUM_VALUE + MAX_VALUE_SIZE <= DAEMON_MSG_SIZE);
}

/// A daemon message buffer.
pub type DaemonMessage = [u8; DAEMON_MSG_SIZE];

/// A fresh all-zero message, as the kernel's `kzalloc` gives.
pub fn zeroed() -> Box<DaemonMessage> {
    Box::new([0u8; DAEMON_MSG_SIZE])
}

/// Why bytes read from the device are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaemonWireError {
    /// A read returned a different size (the C daemon reopens the device then).
    #[error("KVP device: read {0} bytes, every message is {DAEMON_MSG_SIZE}")]
    WrongSize(usize),
}

/// A request as the kernel (or a test's fake kernel) sent it. Fields keep their raw bytes where
/// `hv_kvp_daemon` works on raw bytes (`memcmp` of `key_size` bytes, `memcpy` of values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonRequest {
    /// `KVP_OP_REGISTER1` (or the legacy `KVP_OP_REGISTER`, 4 is also GET_IP_INFO: see the
    /// handshake state in the service) with the version string.
    Register {
        /// Version string bytes up to the first NUL of the body.
        version: Vec<u8>,
    },
    /// GET.
    Get {
        /// Pool byte.
        pool: u8,
        /// `key_size` as sent.
        key_size: u32,
        /// The whole 512-byte key field.
        key: Vec<u8>,
        /// `value_size` as sent (the kernel sends 0).
        value_size: u32,
    },
    /// SET.
    Set {
        /// Pool byte.
        pool: u8,
        /// `key_size` as sent.
        key_size: u32,
        /// The whole 512-byte key field.
        key: Vec<u8>,
        /// `value_size` as sent.
        value_size: u32,
        /// The whole 2048-byte value field.
        value: Vec<u8>,
    },
    /// DELETE.
    Delete {
        /// Pool byte.
        pool: u8,
        /// `key_size` as sent.
        key_size: u32,
        /// The whole 512-byte key field.
        key: Vec<u8>,
    },
    /// ENUMERATE.
    Enumerate {
        /// Pool byte.
        pool: u8,
        /// Index as sent.
        index: u32,
    },
    /// GET_IP_INFO.
    GetIpInfo {
        /// `adapter_id` (the MAC) up to its NUL.
        adapter_id: Vec<u8>,
        /// Requested families.
        addr_family: u8,
    },
    /// SET_IP_INFO: each string up to its NUL within its field.
    SetIpInfo(DaemonIpInfo),
    /// Any other operation (the C daemon answers it with error 0 and the message unchanged).
    Other {
        /// Operation byte.
        operation: u8,
        /// Pool byte.
        pool: u8,
    },
}

/// The IP-configuration strings of a daemon message (UTF-8, each cut at its NUL or field end).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DaemonIpInfo {
    /// MAC (GET) or adapter GUID (SET).
    pub adapter_id: Vec<u8>,
    /// `ADDR_FAMILY_*` bits.
    pub addr_family: u8,
    /// DHCP flag.
    pub dhcp_enabled: u8,
    /// `;`-separated addresses.
    pub ip_addr: Vec<u8>,
    /// `;`-separated masks.
    pub sub_net: Vec<u8>,
    /// `;`-separated gateways.
    pub gate_way: Vec<u8>,
    /// `;`-separated DNS servers.
    pub dns_addr: Vec<u8>,
}

impl DaemonRequest {
    /// Parses one message read from the device.
    pub fn parse(msg: &[u8]) -> Result<DaemonRequest, DaemonWireError> {
        let msg: &DaemonMessage = msg
            .try_into()
            .map_err(|_| DaemonWireError::WrongSize(msg.len()))?;
        let op = msg[layout::OPERATION];
        let pool = msg[layout::POOL];
        let key_field = |off: usize| msg[off..off + MAX_KEY_SIZE].to_vec();
        Ok(match KvpOperation(op) {
            KvpOperation::REGISTER1 => DaemonRequest::Register {
                version: cstr(&msg[layout::REGISTER_VERSION..]).to_vec(),
            },
            KvpOperation::GET => DaemonRequest::Get {
                pool,
                key_size: msg_u32::<{ layout::SET_KEY_SIZE }>(msg),
                key: key_field(layout::SET_KEY),
                value_size: msg_u32::<{ layout::SET_VALUE_SIZE }>(msg),
            },
            KvpOperation::SET => DaemonRequest::Set {
                pool,
                key_size: msg_u32::<{ layout::SET_KEY_SIZE }>(msg),
                key: key_field(layout::SET_KEY),
                value_size: msg_u32::<{ layout::SET_VALUE_SIZE }>(msg),
                value: msg[layout::SET_VALUE..layout::SET_VALUE + MAX_VALUE_SIZE].to_vec(),
            },
            KvpOperation::DELETE => DaemonRequest::Delete {
                pool,
                key_size: msg_u32::<{ layout::DELETE_KEY_SIZE }>(msg),
                key: key_field(layout::DELETE_KEY),
            },
            KvpOperation::ENUMERATE => DaemonRequest::Enumerate {
                pool,
                index: msg_u32::<{ layout::ENUM_INDEX }>(msg),
            },
            KvpOperation::GET_IP_INFO => DaemonRequest::GetIpInfo {
                adapter_id: cstr(field(msg, layout::IP_ADAPTER_ID, ADAPTER_ID_FIELD)).to_vec(),
                addr_family: msg[layout::IP_ADDR_FAMILY],
            },
            KvpOperation::SET_IP_INFO => DaemonRequest::SetIpInfo(read_ip_info(msg)),
            _ => DaemonRequest::Other {
                operation: op,
                pool,
            },
        })
    }
}

/// Reads every IP field of a message (daemon side for SET, kernel side for a GET reply).
pub fn read_ip_info(msg: &[u8]) -> DaemonIpInfo {
    let s = |off, len| cstr(field(msg, off, len)).to_vec();
    DaemonIpInfo {
        adapter_id: s(layout::IP_ADAPTER_ID, ADAPTER_ID_FIELD),
        addr_family: msg.get(layout::IP_ADDR_FAMILY).copied().unwrap_or(0),
        dhcp_enabled: msg.get(layout::IP_DHCP).copied().unwrap_or(0),
        ip_addr: s(layout::IP_ADDR, IP_FIELD),
        sub_net: s(layout::IP_SUBNET, IP_FIELD),
        gate_way: s(layout::IP_GATEWAY, GATEWAY_FIELD),
        dns_addr: s(layout::IP_DNS, IP_FIELD),
    }
}

fn field(msg: &[u8], off: usize, len: usize) -> &[u8] {
    msg.get(off..(off + len).min(msg.len())).unwrap_or(&[])
}

/// The bytes of `b` before its first NUL (all of `b` if there is none).
pub fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// `strcpy` into a fixed field: writes `s` and a NUL, leaving the rest of the field as it was.
/// Where `s` would not fit it is cut to `field.len() - 1` bytes (the C daemon would overflow).
/// Returns whether `s` was cut.
pub fn strcpy_field(field: &mut [u8], s: &[u8]) -> bool {
    if field.is_empty() {
        return !s.is_empty();
    }
    let n = s.len().min(field.len() - 1);
    field[..n].copy_from_slice(&s[..n]);
    field[n] = 0;
    n < s.len()
}

/// The `error` field of a reply (bytes 0..4, little-endian as on x86 and arm64); 0 for a buffer
/// too short to hold one, which no daemon message is.
pub fn error(msg: &[u8]) -> u32 {
    read_u32(msg, 0).unwrap_or(0)
}

/// The u32 at the layout offset `OFF` of a whole daemon message: the offset is checked against
/// the message size when this compiles, so the read cannot fail.
pub fn msg_u32<const OFF: usize>(msg: &DaemonMessage) -> u32 {
    const { assert!(OFF + 4 <= DAEMON_MSG_SIZE) };
    let mut b = [0u8; 4];
    b.copy_from_slice(&msg[OFF..OFF + 4]);
    u32::from_le_bytes(b)
}

/// Sets the `error` field, overwriting operation, pool and pad as the C daemon does.
pub fn set_error(msg: &mut [u8], status: u32) {
    write_u32(msg, 0, status);
}

/// Kernel side (the simulator, tests): the register message the daemon writes first.
pub fn build_register1() -> Box<DaemonMessage> {
    let mut m = zeroed();
    m[layout::OPERATION] = KvpOperation::REGISTER1.0;
    m
}

/// Kernel side: the kernel's answer to REGISTER1, carrying `version` (Linux: `"3.1"`).
pub fn build_register_reply(version: &str) -> Box<DaemonMessage> {
    let mut m = zeroed();
    m[layout::OPERATION] = KvpOperation::REGISTER1.0;
    strcpy_field(
        &mut m[layout::REGISTER_VERSION..layout::REGISTER_VERSION + MAX_KEY_SIZE],
        version.as_bytes(),
    );
    m
}

/// Kernel side: a GET as `kvp_send_key` builds it: key and `key_size = len + 1`, value_size 0.
pub fn build_get(pool: u8, key: &[u8]) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::GET, pool);
    put_key(&mut m, layout::SET_KEY_SIZE, layout::SET_KEY, key);
    m
}

/// Kernel side: a SET of a string value (the kernel formats REG_U32/REG_U64 as decimal strings).
pub fn build_set(pool: u8, key: &[u8], value: &[u8]) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::SET, pool);
    put_key(&mut m, layout::SET_KEY_SIZE, layout::SET_KEY, key);
    let n = value.len().min(MAX_VALUE_SIZE - 1);
    m[layout::SET_VALUE..layout::SET_VALUE + n].copy_from_slice(&value[..n]);
    write_u32(&mut m[..], layout::SET_VALUE_SIZE, n as u32 + 1);
    m
}

/// Kernel side: a DELETE.
pub fn build_delete(pool: u8, key: &[u8]) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::DELETE, pool);
    put_key(&mut m, layout::DELETE_KEY_SIZE, layout::DELETE_KEY, key);
    m
}

/// Kernel side: an ENUMERATE.
pub fn build_enumerate(pool: u8, index: u32) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::ENUMERATE, pool);
    write_u32(&mut m[..], layout::ENUM_INDEX, index);
    m
}

/// Kernel side: GET_IP_INFO for a MAC (upper case, `:`-separated as sysfs shows it upper-cased).
pub fn build_get_ip_info(mac: &[u8], addr_family: u8) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::GET_IP_INFO, 0);
    strcpy_field(
        &mut m[layout::IP_ADAPTER_ID..layout::IP_ADAPTER_ID + 128],
        mac,
    );
    m[layout::IP_ADDR_FAMILY] = addr_family;
    m
}

/// Kernel side: SET_IP_INFO. Strings are cut to what the kernel converts (half of each field).
pub fn build_set_ip_info(info: &DaemonIpInfo) -> Box<DaemonMessage> {
    let mut m = header(KvpOperation::SET_IP_INFO, 0);
    let put = |m: &mut DaemonMessage, off: usize, kernel_max: usize, s: &[u8]| {
        strcpy_field(&mut m[off..off + kernel_max], s);
    };
    put(&mut m, layout::IP_ADAPTER_ID, 128, &info.adapter_id);
    m[layout::IP_ADDR_FAMILY] = info.addr_family;
    m[layout::IP_DHCP] = info.dhcp_enabled;
    put(&mut m, layout::IP_ADDR, 1024, &info.ip_addr);
    put(&mut m, layout::IP_SUBNET, 1024, &info.sub_net);
    put(&mut m, layout::IP_GATEWAY, 512, &info.gate_way);
    put(&mut m, layout::IP_DNS, 1024, &info.dns_addr);
    m
}

/// Kernel side: the key of an ENUMERATE reply, up to its NUL.
pub fn enumerate_key(msg: &[u8]) -> &[u8] {
    cstr(field(msg, layout::ENUM_KEY, MAX_KEY_SIZE))
}

/// Kernel side: the value of an ENUMERATE reply, up to its NUL.
pub fn enumerate_value(msg: &[u8]) -> &[u8] {
    cstr(field(msg, layout::ENUM_VALUE, MAX_VALUE_SIZE))
}

/// Kernel side: the value of a GET reply, up to its NUL.
pub fn get_value(msg: &[u8]) -> &[u8] {
    cstr(field(msg, layout::SET_VALUE, MAX_VALUE_SIZE))
}

fn header(op: KvpOperation, pool: u8) -> Box<DaemonMessage> {
    let mut m = zeroed();
    m[layout::OPERATION] = op.0;
    m[layout::POOL] = pool;
    m
}

fn put_key(m: &mut DaemonMessage, size_off: usize, key_off: usize, key: &[u8]) {
    let n = key.len().min(MAX_KEY_SIZE - 1);
    m[key_off..key_off + n].copy_from_slice(&key[..n]);
    write_u32(&mut m[..], size_off, n as u32 + 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_message_carries_sizes_with_the_terminator() {
        let m = build_set(1, b"abc", b"hello");
        assert_eq!(msg_u32::<{ layout::SET_KEY_SIZE }>(&m), 4);
        assert_eq!(msg_u32::<{ layout::SET_VALUE_SIZE }>(&m), 6);
        match DaemonRequest::parse(&m[..]).unwrap() {
            DaemonRequest::Set {
                pool,
                key_size,
                key,
                value_size,
                value,
            } => {
                assert_eq!((pool, key_size, value_size), (1, 4, 6));
                assert_eq!(cstr(&key), b"abc");
                assert_eq!(cstr(&value), b"hello");
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn get_from_the_kernel_has_value_size_zero() {
        let m = build_get(0, b"k");
        assert!(matches!(
            DaemonRequest::parse(&m[..]).unwrap(),
            DaemonRequest::Get {
                value_size: 0,
                key_size: 2,
                ..
            }
        ));
    }

    #[test]
    fn wrong_size_is_an_error() {
        assert_eq!(
            DaemonRequest::parse(&[0u8; 100]),
            Err(DaemonWireError::WrongSize(100))
        );
    }

    #[test]
    fn register_reply_carries_the_version() {
        let m = build_register_reply("3.1");
        assert_eq!(
            DaemonRequest::parse(&m[..]).unwrap(),
            DaemonRequest::Register {
                version: b"3.1".to_vec()
            }
        );
    }

    #[test]
    fn error_overwrites_operation_and_pool() {
        let mut m = build_enumerate(3, 7);
        set_error(&mut m[..], 0x8007_0103);
        assert_eq!(error(&m[..]), 0x8007_0103);
        assert_eq!(msg_u32::<{ layout::ENUM_INDEX }>(&m), 7);
    }

    #[test]
    fn strcpy_field_cuts_and_terminates() {
        let mut f = [0xffu8; 4];
        assert!(strcpy_field(&mut f, b"abcdef"));
        assert_eq!(&f, b"abc\0");
        let mut f = [0xffu8; 6];
        assert!(!strcpy_field(&mut f, b"ab"));
        assert_eq!(&f, b"ab\0\xff\xff\xff");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), DAEMON_MSG_SIZE..=DAEMON_MSG_SIZE)) {
            let _ = DaemonRequest::parse(&bytes);
            let _ = read_ip_info(&bytes);
            let _ = (enumerate_key(&bytes), enumerate_value(&bytes), get_value(&bytes));
        }

        #[test]
        fn ip_info_round_trips(mac in "[0-9A-F:]{0,17}", ip in "[0-9.;]{0,200}", dhcp in 0u8..2) {
            let info = DaemonIpInfo {
                adapter_id: mac.into_bytes(),
                addr_family: 1,
                dhcp_enabled: dhcp,
                ip_addr: ip.into_bytes(),
                ..Default::default()
            };
            let m = build_set_ip_info(&info);
            prop_assert_eq!(DaemonRequest::parse(&m[..]).unwrap(), DaemonRequest::SetIpInfo(info));
        }
    }
}
