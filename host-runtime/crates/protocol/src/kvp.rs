//! KVP exchange on VMBus: the `hv_kvp_msg` body the Hyper-V host sends after `icmsg_hdr`.
//!
//! Layout per Linux `include/uapi/linux/hyperv.h` (all packed, little-endian). Strings travel as
//! UTF-16LE with sizes in bytes *including* the terminator. The body is
//!
//! ```text
//! hv_kvp_hdr { u8 operation, u8 pool, u16 pad }            offset 0
//! GET/SET:    hv_kvp_exchg_msg_value                        offset 4
//! DELETE:     { u32 key_size, u16 key[256] }                offset 4
//! ENUMERATE:  { u32 index, hv_kvp_exchg_msg_value }         offset 4
//! hv_kvp_exchg_msg_value { u32 value_type, u32 key_size, u32 value_size,
//!                          u8 key[512], u8 value[2048] (or u32 / u64) }
//! ```
//!
//! IP-info messages use `hv_kvp_ip_msg`, which has *no* pad after operation and pool: the
//! `hv_kvp_ipaddr_value` starts at offset 2.
//!
//! The Linux kernel converts between this format and the daemon format (see [`crate::kvp_daemon`])
//! with its own `utf16s_to_utf8s` / `utf8s_to_utf16s`, whose quirks (a character that does not fit
//! is skipped, unpaired surrogates are dropped) decide what the daemon sees. [`utf16_to_utf8_linux`]
//! and [`utf8_to_utf16_linux`] reproduce them so hvisd's VMBus path stores exactly the bytes the
//! kernel would hand to `hv_kvp_daemon`. Nothing here does I/O; nothing panics on any input.

use crate::ic::status;

/// Largest key, in bytes including the terminator (both encodings).
pub const MAX_KEY_SIZE: usize = 512;
/// Largest value, in bytes including the terminator (both encodings).
pub const MAX_VALUE_SIZE: usize = 2048;
/// Longest key a service, a plugin or a manifest may name, in bytes of UTF-8 without the
/// terminator: a pool record's key field is [`MAX_KEY_SIZE`] bytes including the NUL.
pub const MAX_KEY_LEN: usize = MAX_KEY_SIZE - 1;
/// Longest text value, in bytes of UTF-8 without the terminator: a pool record's value field is
/// [`MAX_VALUE_SIZE`] bytes including the NUL.
pub const MAX_VALUE_LEN: usize = MAX_VALUE_SIZE - 1;
/// `adapter_id` capacity in UTF-16 units.
pub const MAX_ADAPTER_ID_SIZE: usize = 128;
/// `ip_addr`, `sub_net` and `dns_addr` capacity in UTF-16 units.
pub const MAX_IP_ADDR_SIZE: usize = 1024;
/// `gate_way` capacity in UTF-16 units.
pub const MAX_GATEWAY_SIZE: usize = 512;

/// Value type: a string (UTF-16 on VMBus).
pub const REG_SZ: u32 = 1;
/// Value type: a 32-bit number.
pub const REG_U32: u32 = 4;
/// Value type: a 64-bit number, as Linux's `hyperv.h` numbers it.
pub const REG_U64: u32 = 8;
/// Value type: a 64-bit number, as Windows' registry numbers it (`REG_QWORD`). OpenVMM's host
/// side sends this for the same thing Linux calls [`REG_U64`], so a SET carrying it is read as
/// [`KvpValue::U64`] (and built back as `REG_U64`, the only 64-bit type Linux knows).
pub const REG_QWORD: u32 = 11;

/// `addr_family`: nothing.
pub const ADDR_FAMILY_NONE: u8 = 0;
/// `addr_family` bit: IPv4.
pub const ADDR_FAMILY_IPV4: u8 = 1;
/// `addr_family` bit: IPv6.
pub const ADDR_FAMILY_IPV6: u8 = 2;

/// The string Linux's `hv_kvp.c` registers with the daemon (`HV_DRV_VERSION`); the daemon reports
/// it as the Auto-pool key `IntegrationServicesVersion`.
pub const HV_DRV_VERSION: &str = "3.1";

/// `hv_kvp_hdr.operation`: an open enum so an unknown value is kept and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvpOperation(pub u8);

impl KvpOperation {
    /// Read one key's value.
    pub const GET: KvpOperation = KvpOperation(0);
    /// Create or replace one key.
    pub const SET: KvpOperation = KvpOperation(1);
    /// Remove one key.
    pub const DELETE: KvpOperation = KvpOperation(2);
    /// Return the key/value at an index of a pool.
    pub const ENUMERATE: KvpOperation = KvpOperation(3);
    /// Read an adapter's IP configuration.
    pub const GET_IP_INFO: KvpOperation = KvpOperation(4);
    /// Write an adapter's IP configuration.
    pub const SET_IP_INFO: KvpOperation = KvpOperation(5);
    /// Daemon registration with IP injection support (daemon protocol only).
    pub const REGISTER1: KvpOperation = KvpOperation(100);

    /// The Linux name, e.g. `"KVP_OP_ENUMERATE"`, or `None` for an unknown value.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "KVP_OP_GET",
            1 => "KVP_OP_SET",
            2 => "KVP_OP_DELETE",
            3 => "KVP_OP_ENUMERATE",
            4 => "KVP_OP_GET_IP_INFO",
            5 => "KVP_OP_SET_IP_INFO",
            100 => "KVP_OP_REGISTER1",
            _ => return None,
        })
    }
}

impl std::fmt::Display for KvpOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "operation {}", self.0),
        }
    }
}

/// The five KVP pools (`enum hv_kvp_exchg_pool`), file `.kvp_pool_<n>` each.
///
/// In configuration files a pool is named as [`Pool::name`] gives it (`auto-internal`); pool 4 is
/// also accepted as `internal`, the name the plugin WIT package gives it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// 0: values the host pushes to the guest.
    External = 0,
    /// 1: values guest software publishes to the host.
    Guest = 1,
    /// 2: the guest's intrinsic facts (FQDN, OS, addresses).
    Auto = 2,
    /// 3: values the host pushes automatically (host name, VM id).
    AutoExternal = 3,
    /// 4: internal values.
    #[serde(alias = "internal")]
    AutoInternal = 4,
}

impl Pool {
    /// All pools in number order.
    pub const ALL: [Pool; 5] = [
        Pool::External,
        Pool::Guest,
        Pool::Auto,
        Pool::AutoExternal,
        Pool::AutoInternal,
    ];

    /// The pool with wire number `n`, `None` for `n >= 5`.
    pub fn from_number(n: u8) -> Option<Pool> {
        Pool::ALL.get(usize::from(n)).copied()
    }

    /// The wire number.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The operator's name: `external`, `guest`, `auto`, `auto-external`, `auto-internal`.
    pub fn name(self) -> &'static str {
        match self {
            Pool::External => "external",
            Pool::Guest => "guest",
            Pool::Auto => "auto",
            Pool::AutoExternal => "auto-external",
            Pool::AutoInternal => "auto-internal",
        }
    }

    /// Parses an operator's name (case-insensitive, `_` or `-`) or a number 0-4.
    pub fn parse(s: &str) -> Option<Pool> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        if let Ok(n) = norm.parse::<u8>() {
            return Pool::from_number(n);
        }
        Pool::ALL
            .into_iter()
            .find(|p| p.name() == norm || p.name().replace('-', "") == norm)
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A KVP value as services and plugins handle it: text or a number. ([`KvpValue`] is the form a
/// host's SET carries on VMBus.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// `REG_SZ`: a UTF-8 string (at most [`MAX_VALUE_LEN`] bytes in a pool record).
    Text(String),
    /// `REG_U32`.
    U32(u32),
    /// `REG_U64`.
    U64(u64),
}

impl Value {
    /// The text a pool record holds for this value: numbers in decimal, as `hv_kvp_daemon` stores
    /// the REG_U32/REG_U64 values the host sends.
    pub fn into_text(self) -> String {
        match self {
            Value::Text(s) => s,
            Value::U32(n) => n.to_string(),
            Value::U64(n) => n.to_string(),
        }
    }
}

/// Byte offsets inside the VMBus `hv_kvp_msg` body.
pub mod layout {
    /// `hv_kvp_hdr` size (operation, pool, pad).
    pub const HDR: usize = 4;
    /// Size of `hv_kvp_exchg_msg_value`.
    pub const EXCHG_VALUE: usize = 12 + super::MAX_KEY_SIZE + super::MAX_VALUE_SIZE;
    /// GET/SET: `value_type`.
    pub const GETSET_VALUE_TYPE: usize = HDR;
    /// GET/SET: `key_size`.
    pub const GETSET_KEY_SIZE: usize = HDR + 4;
    /// GET/SET: `value_size`.
    pub const GETSET_VALUE_SIZE: usize = HDR + 8;
    /// GET/SET: `key`.
    pub const GETSET_KEY: usize = HDR + 12;
    /// GET/SET: `value`.
    pub const GETSET_VALUE: usize = GETSET_KEY + super::MAX_KEY_SIZE;
    /// Bytes a GET or SET body must have.
    pub const GETSET_LEN: usize = HDR + EXCHG_VALUE;
    /// DELETE: `key_size`.
    pub const DELETE_KEY_SIZE: usize = HDR;
    /// DELETE: `key`.
    pub const DELETE_KEY: usize = HDR + 4;
    /// Bytes a DELETE body must have.
    pub const DELETE_LEN: usize = DELETE_KEY + super::MAX_KEY_SIZE;
    /// ENUMERATE: `index`.
    pub const ENUM_INDEX: usize = HDR;
    /// ENUMERATE: `value_type`.
    pub const ENUM_VALUE_TYPE: usize = HDR + 4;
    /// ENUMERATE: `key_size`.
    pub const ENUM_KEY_SIZE: usize = HDR + 8;
    /// ENUMERATE: `value_size`.
    pub const ENUM_VALUE_SIZE: usize = HDR + 12;
    /// ENUMERATE: `key`.
    pub const ENUM_KEY: usize = HDR + 16;
    /// ENUMERATE: `value`.
    pub const ENUM_VALUE: usize = ENUM_KEY + super::MAX_KEY_SIZE;
    /// Bytes an ENUMERATE body must have.
    pub const ENUM_LEN: usize = HDR + 4 + EXCHG_VALUE;
    /// `hv_kvp_ip_msg`: start of `hv_kvp_ipaddr_value` (no pad after operation/pool).
    pub const IP_VALUE: usize = 2;
    /// IP: `adapter_id` (UTF-16, 128 units).
    pub const IP_ADAPTER_ID: usize = IP_VALUE;
    /// IP: `addr_family`.
    pub const IP_ADDR_FAMILY: usize = IP_ADAPTER_ID + 2 * super::MAX_ADAPTER_ID_SIZE;
    /// IP: `dhcp_enabled`.
    pub const IP_DHCP: usize = IP_ADDR_FAMILY + 1;
    /// IP: `ip_addr` (UTF-16, 1024 units).
    pub const IP_ADDR: usize = IP_DHCP + 1;
    /// IP: `sub_net` (UTF-16, 1024 units).
    pub const IP_SUBNET: usize = IP_ADDR + 2 * super::MAX_IP_ADDR_SIZE;
    /// IP: `gate_way` (UTF-16, 512 units).
    pub const IP_GATEWAY: usize = IP_SUBNET + 2 * super::MAX_IP_ADDR_SIZE;
    /// IP: `dns_addr` (UTF-16, 1024 units).
    pub const IP_DNS: usize = IP_GATEWAY + 2 * super::MAX_GATEWAY_SIZE;
    /// Bytes an IP-info body must have (`sizeof(struct hv_kvp_ip_msg)`).
    pub const IP_LEN: usize = IP_DNS + 2 * super::MAX_IP_ADDR_SIZE;

    const _: () = assert!(GETSET_LEN == 2576);
    const _: () = assert!(DELETE_LEN == 520);
    const _: () = assert!(ENUM_LEN == 2580);
    const _: () = assert!(IP_LEN == 7428);
}

/// Why a VMBus KVP body cannot be handled. Each message names the operation and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvpWireError {
    /// The body is shorter than the operation's structure.
    #[error("KVP {op} from host: body is {got} bytes, the message needs {need}")]
    Truncated {
        /// The operation.
        op: KvpOperation,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// `key_size` is beyond the key field.
    #[error("KVP {op} from host: key is {size} bytes, limit {MAX_KEY_SIZE}")]
    KeyTooLong {
        /// The operation.
        op: KvpOperation,
        /// `key_size` as sent.
        size: u32,
    },
    /// `key_size` is 0 (no room even for the terminator).
    #[error(
        "KVP {op} from host: key_size is {size}, an empty key (the terminator alone is 2 bytes)"
    )]
    KeyEmpty {
        /// The operation.
        op: KvpOperation,
        /// `key_size` as sent.
        size: u32,
    },
    /// `value_size` is beyond the value field.
    #[error("KVP {op} from host: value is {size} bytes, limit {MAX_VALUE_SIZE}")]
    ValueTooLong {
        /// The operation.
        op: KvpOperation,
        /// `value_size` as sent.
        size: u32,
    },
    /// A SET with a value type other than REG_SZ, REG_U32, REG_U64 or REG_QWORD.
    #[error(
        "KVP SET from host: value_type {0} is not REG_SZ (1), REG_U32 (4), REG_U64 (8) or REG_QWORD (11)"
    )]
    BadValueType(u32),
    /// An operation outside GET..SET_IP_INFO.
    #[error("KVP from host: unknown operation {0}")]
    UnknownOperation(u8),
    /// The body is shorter than the 2-byte header.
    #[error("KVP from host: body is {0} bytes, shorter than the header")]
    NoHeader(usize),
}

impl KvpWireError {
    /// The `icmsg_hdr.status` hvisd answers with (documented in the KVP differences table).
    pub fn status(&self) -> u32 {
        match self {
            KvpWireError::UnknownOperation(_) => status::HV_ERROR_NOT_SUPPORTED,
            _ => status::HV_INVALIDARG,
        }
    }
}

/// A SET value as the host sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvpValue {
    /// REG_SZ: UTF-16 units, at most `value_size` bytes' worth, not including the terminator
    /// unless the host put units after it.
    String(Vec<u16>),
    /// REG_U32.
    U32(u32),
    /// REG_U64 (8, Linux's number) or REG_QWORD (11, the Windows registry's, which OpenVMM's
    /// host sends).
    U64(u64),
}

/// IP configuration strings as they travel on VMBus (UTF-16 units, terminator excluded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpInfoUtf16 {
    /// MAC (GET) or adapter GUID (SET).
    pub adapter_id: Vec<u16>,
    /// `ADDR_FAMILY_*` bits.
    pub addr_family: u8,
    /// 1 if DHCP is enabled.
    pub dhcp_enabled: u8,
    /// Addresses separated by `;`.
    pub ip_addr: Vec<u16>,
    /// Masks (IPv4 dotted, IPv6 `/len`) separated by `;`.
    pub sub_net: Vec<u16>,
    /// Gateways separated by `;`.
    pub gate_way: Vec<u16>,
    /// DNS servers separated by `;`.
    pub dns_addr: Vec<u16>,
}

/// One parsed host request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvpRequest {
    /// GET: the key's UTF-16 units, the first `key_size` bytes' worth up to the terminator.
    Get {
        /// Pool byte as sent (may be >= 5; the service answers that).
        pool: u8,
        /// Key units.
        key: Vec<u16>,
    },
    /// SET.
    Set {
        /// Pool byte as sent.
        pool: u8,
        /// Key units.
        key: Vec<u16>,
        /// The value.
        value: KvpValue,
    },
    /// DELETE.
    Delete {
        /// Pool byte as sent.
        pool: u8,
        /// Key units.
        key: Vec<u16>,
    },
    /// ENUMERATE.
    Enumerate {
        /// Pool byte as sent.
        pool: u8,
        /// Index the host asks for.
        index: u32,
    },
    /// GET_IP_INFO: `adapter_id` is the MAC, `addr_family` what the host wants.
    GetIpInfo(IpInfoUtf16),
    /// SET_IP_INFO: `adapter_id` is the adapter GUID.
    SetIpInfo(IpInfoUtf16),
}

impl KvpRequest {
    /// The operation code.
    pub fn operation(&self) -> KvpOperation {
        match self {
            KvpRequest::Get { .. } => KvpOperation::GET,
            KvpRequest::Set { .. } => KvpOperation::SET,
            KvpRequest::Delete { .. } => KvpOperation::DELETE,
            KvpRequest::Enumerate { .. } => KvpOperation::ENUMERATE,
            KvpRequest::GetIpInfo(_) => KvpOperation::GET_IP_INFO,
            KvpRequest::SetIpInfo(_) => KvpOperation::SET_IP_INFO,
        }
    }

    /// Parses a host request body (the bytes after `icmsg_hdr`). Bounded: reads only inside
    /// `body`, allocates at most the field sizes, never panics.
    pub fn parse(body: &[u8]) -> Result<KvpRequest, KvpWireError> {
        if body.len() < 2 {
            return Err(KvpWireError::NoHeader(body.len()));
        }
        let op = KvpOperation(body[0]);
        let pool = body[1];
        let need = |n: usize| {
            if body.len() < n {
                Err(KvpWireError::Truncated {
                    op,
                    need: n,
                    got: body.len(),
                })
            } else {
                Ok(())
            }
        };
        // Every field below lies inside the length `need` checked first; a missing one is a
        // truncated body all the same, never a silent 0.
        let u32_at = |off: usize| {
            read_u32(body, off).ok_or(KvpWireError::Truncated {
                op,
                need: off + 4,
                got: body.len(),
            })
        };
        match op {
            KvpOperation::GET | KvpOperation::SET => {
                need(layout::GETSET_LEN)?;
                let key_size = u32_at(layout::GETSET_KEY_SIZE)?;
                let key = key_units(op, body, layout::GETSET_KEY, key_size)?;
                if op == KvpOperation::GET {
                    return Ok(KvpRequest::Get { pool, key });
                }
                let value_type = u32_at(layout::GETSET_VALUE_TYPE)?;
                let value_size = u32_at(layout::GETSET_VALUE_SIZE)?;
                let value = match value_type {
                    REG_SZ => {
                        if value_size as usize > MAX_VALUE_SIZE {
                            return Err(KvpWireError::ValueTooLong {
                                op,
                                size: value_size,
                            });
                        }
                        // Linux passes value_size (bytes) as a count of UTF-16 units, so it
                        // reads up to twice as far; the field bounds that here.
                        let units = (value_size as usize).min(MAX_VALUE_SIZE / 2);
                        KvpValue::String(units_until_nul(
                            &body[layout::GETSET_VALUE..layout::GETSET_VALUE + 2 * units],
                        ))
                    }
                    REG_U32 => KvpValue::U32(u32_at(layout::GETSET_VALUE)?),
                    REG_U64 | REG_QWORD => KvpValue::U64(
                        read_u64(body, layout::GETSET_VALUE).ok_or(KvpWireError::Truncated {
                            op,
                            need: layout::GETSET_VALUE + 8,
                            got: body.len(),
                        })?,
                    ),
                    other => return Err(KvpWireError::BadValueType(other)),
                };
                Ok(KvpRequest::Set { pool, key, value })
            }
            KvpOperation::DELETE => {
                need(layout::DELETE_LEN)?;
                let key_size = u32_at(layout::DELETE_KEY_SIZE)?;
                let key = key_units(op, body, layout::DELETE_KEY, key_size)?;
                Ok(KvpRequest::Delete { pool, key })
            }
            KvpOperation::ENUMERATE => {
                need(layout::ENUM_LEN)?;
                Ok(KvpRequest::Enumerate {
                    pool,
                    index: u32_at(layout::ENUM_INDEX)?,
                })
            }
            KvpOperation::GET_IP_INFO | KvpOperation::SET_IP_INFO => {
                need(layout::IP_LEN)?;
                let field = |off: usize, units: usize| units_until_nul(&body[off..off + 2 * units]);
                let info = IpInfoUtf16 {
                    adapter_id: field(layout::IP_ADAPTER_ID, MAX_ADAPTER_ID_SIZE),
                    addr_family: body[layout::IP_ADDR_FAMILY],
                    dhcp_enabled: body[layout::IP_DHCP],
                    ip_addr: field(layout::IP_ADDR, MAX_IP_ADDR_SIZE),
                    sub_net: field(layout::IP_SUBNET, MAX_IP_ADDR_SIZE),
                    gate_way: field(layout::IP_GATEWAY, MAX_GATEWAY_SIZE),
                    dns_addr: field(layout::IP_DNS, MAX_IP_ADDR_SIZE),
                };
                Ok(if op == KvpOperation::GET_IP_INFO {
                    KvpRequest::GetIpInfo(info)
                } else {
                    KvpRequest::SetIpInfo(info)
                })
            }
            other => Err(KvpWireError::UnknownOperation(other.0)),
        }
    }

    /// Builds the body the host sends (host side: the simulator). Strings longer than their field
    /// are cut to fit, keeping room for the terminator.
    pub fn build(&self) -> Vec<u8> {
        let op = self.operation();
        let (len, pool) = match self {
            KvpRequest::Get { pool, .. } | KvpRequest::Set { pool, .. } => {
                (layout::GETSET_LEN, *pool)
            }
            KvpRequest::Delete { pool, .. } => (layout::DELETE_LEN, *pool),
            KvpRequest::Enumerate { pool, .. } => (layout::ENUM_LEN, *pool),
            KvpRequest::GetIpInfo(_) | KvpRequest::SetIpInfo(_) => (layout::IP_LEN, 0),
        };
        let mut body = vec![0u8; len];
        body[0] = op.0;
        body[1] = pool;
        match self {
            KvpRequest::Get { key, .. } => {
                let n = put_units(&mut body, layout::GETSET_KEY, MAX_KEY_SIZE / 2, key);
                write_u32(&mut body, layout::GETSET_KEY_SIZE, 2 * (n as u32 + 1));
            }
            KvpRequest::Set { key, value, .. } => {
                let n = put_units(&mut body, layout::GETSET_KEY, MAX_KEY_SIZE / 2, key);
                write_u32(&mut body, layout::GETSET_KEY_SIZE, 2 * (n as u32 + 1));
                match value {
                    KvpValue::String(v) => {
                        let n = put_units(&mut body, layout::GETSET_VALUE, MAX_VALUE_SIZE / 2, v);
                        write_u32(&mut body, layout::GETSET_VALUE_TYPE, REG_SZ);
                        write_u32(&mut body, layout::GETSET_VALUE_SIZE, 2 * (n as u32 + 1));
                    }
                    KvpValue::U32(v) => {
                        write_u32(&mut body, layout::GETSET_VALUE_TYPE, REG_U32);
                        write_u32(&mut body, layout::GETSET_VALUE_SIZE, 4);
                        write_u32(&mut body, layout::GETSET_VALUE, *v);
                    }
                    KvpValue::U64(v) => {
                        write_u32(&mut body, layout::GETSET_VALUE_TYPE, REG_U64);
                        write_u32(&mut body, layout::GETSET_VALUE_SIZE, 8);
                        body[layout::GETSET_VALUE..layout::GETSET_VALUE + 8]
                            .copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            KvpRequest::Delete { key, .. } => {
                let n = put_units(&mut body, layout::DELETE_KEY, MAX_KEY_SIZE / 2, key);
                write_u32(&mut body, layout::DELETE_KEY_SIZE, 2 * (n as u32 + 1));
            }
            KvpRequest::Enumerate { index, .. } => write_u32(&mut body, layout::ENUM_INDEX, *index),
            KvpRequest::GetIpInfo(info) | KvpRequest::SetIpInfo(info) => {
                write_ip_info(&mut body, info);
            }
        }
        body
    }
}

/// Writes every field of an `hv_kvp_ip_msg` (guest reply or host request). Each string is cut to
/// its field, then zero-filled to the end of the field, so it is always terminated.
/// Does nothing if `body` is shorter than [`layout::IP_LEN`].
pub fn write_ip_info(body: &mut [u8], info: &IpInfoUtf16) {
    if body.len() < layout::IP_LEN {
        return;
    }
    put_units(
        body,
        layout::IP_ADAPTER_ID,
        MAX_ADAPTER_ID_SIZE,
        &info.adapter_id,
    );
    body[layout::IP_ADDR_FAMILY] = info.addr_family;
    body[layout::IP_DHCP] = info.dhcp_enabled;
    put_units(body, layout::IP_ADDR, MAX_IP_ADDR_SIZE, &info.ip_addr);
    put_units(body, layout::IP_SUBNET, MAX_IP_ADDR_SIZE, &info.sub_net);
    put_units(body, layout::IP_GATEWAY, MAX_GATEWAY_SIZE, &info.gate_way);
    put_units(body, layout::IP_DNS, MAX_IP_ADDR_SIZE, &info.dns_addr);
}

/// Guest reply to ENUMERATE: writes `value_type = REG_SZ`, the key and value (UTF-16) and their
/// sizes `2 * (units + 1)`, as Linux's `kvp_respond_to_host`. Returns `false` (writing nothing) if
/// `body` is too short. Keys are cut at 254 units and values at 1022, Linux's limits.
pub fn write_enumerate_reply(body: &mut [u8], key: &[u16], value: &[u16]) -> bool {
    if body.len() < layout::ENUM_LEN {
        return false;
    }
    let k = put_units(
        body,
        layout::ENUM_KEY,
        MAX_KEY_SIZE / 2,
        &key[..key.len().min(MAX_KEY_SIZE / 2 - 2)],
    );
    let v = put_units(
        body,
        layout::ENUM_VALUE,
        MAX_VALUE_SIZE / 2,
        &value[..value.len().min(MAX_VALUE_SIZE / 2 - 2)],
    );
    write_u32(body, layout::ENUM_VALUE_TYPE, REG_SZ);
    write_u32(body, layout::ENUM_KEY_SIZE, 2 * (k as u32 + 1));
    write_u32(body, layout::ENUM_VALUE_SIZE, 2 * (v as u32 + 1));
    true
}

/// Guest reply to GET: writes `value_type = REG_SZ`, the value and `value_size`; the key is left
/// as the host sent it. Returns `false` if `body` is too short.
pub fn write_get_reply(body: &mut [u8], value: &[u16]) -> bool {
    if body.len() < layout::GETSET_LEN {
        return false;
    }
    let v = put_units(
        body,
        layout::GETSET_VALUE,
        MAX_VALUE_SIZE / 2,
        &value[..value.len().min(MAX_VALUE_SIZE / 2 - 2)],
    );
    write_u32(body, layout::GETSET_VALUE_TYPE, REG_SZ);
    write_u32(body, layout::GETSET_VALUE_SIZE, 2 * (v as u32 + 1));
    true
}

/// What a host reads back from a reply (host side: the simulator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvpReplyView {
    /// ENUMERATE or GET: the key (ENUMERATE; the request's key for GET) and the value, decoded
    /// lossily from UTF-16 up to their sizes and terminators.
    Entry {
        /// `value_type` field.
        value_type: u32,
        /// The key.
        key: String,
        /// The value (REG_U32/REG_U64 rendered in decimal).
        value: String,
    },
    /// GET_IP_INFO.
    IpInfo(IpInfoUtf16),
    /// SET, DELETE, SET_IP_INFO: nothing but the status.
    Empty,
}

impl KvpReplyView {
    /// Parses the reply body to a request of operation `op`. Bounded, never panics.
    pub fn parse(op: KvpOperation, body: &[u8]) -> Result<KvpReplyView, KvpWireError> {
        let need = |n: usize| {
            if body.len() < n {
                Err(KvpWireError::Truncated {
                    op,
                    need: n,
                    got: body.len(),
                })
            } else {
                Ok(())
            }
        };
        let truncated = |need: usize| KvpWireError::Truncated {
            op,
            need,
            got: body.len(),
        };
        let entry = |type_off, ksize_off, vsize_off, key_off: usize, value_off: usize| {
            let u32_at = |off: usize| read_u32(body, off).ok_or(truncated(off + 4));
            let value_type = u32_at(type_off)?;
            let ks = (u32_at(ksize_off)? as usize).min(MAX_KEY_SIZE) / 2;
            let vs = (u32_at(vsize_off)? as usize).min(MAX_VALUE_SIZE) / 2;
            let slice =
                |off: usize, len: usize| body.get(off..off + len).ok_or(truncated(off + len));
            let key = String::from_utf16_lossy(&units_until_nul(slice(key_off, 2 * ks)?));
            let value = match value_type {
                REG_U32 => u32_at(value_off)?.to_string(),
                REG_U64 | REG_QWORD => read_u64(body, value_off)
                    .ok_or(truncated(value_off + 8))?
                    .to_string(),
                _ => String::from_utf16_lossy(&units_until_nul(slice(value_off, 2 * vs)?)),
            };
            Ok(KvpReplyView::Entry {
                value_type,
                key,
                value,
            })
        };
        match op {
            KvpOperation::ENUMERATE => {
                need(layout::ENUM_LEN)?;
                entry(
                    layout::ENUM_VALUE_TYPE,
                    layout::ENUM_KEY_SIZE,
                    layout::ENUM_VALUE_SIZE,
                    layout::ENUM_KEY,
                    layout::ENUM_VALUE,
                )
            }
            KvpOperation::GET => {
                need(layout::GETSET_LEN)?;
                entry(
                    layout::GETSET_VALUE_TYPE,
                    layout::GETSET_KEY_SIZE,
                    layout::GETSET_VALUE_SIZE,
                    layout::GETSET_KEY,
                    layout::GETSET_VALUE,
                )
            }
            KvpOperation::GET_IP_INFO => match KvpRequest::parse(body)? {
                KvpRequest::GetIpInfo(info) => Ok(KvpReplyView::IpInfo(info)),
                _ => Err(KvpWireError::UnknownOperation(body[0])),
            },
            _ => Ok(KvpReplyView::Empty),
        }
    }
}

fn key_units(
    op: KvpOperation,
    body: &[u8],
    off: usize,
    key_size: u32,
) -> Result<Vec<u16>, KvpWireError> {
    if key_size as usize > MAX_KEY_SIZE {
        return Err(KvpWireError::KeyTooLong { op, size: key_size });
    }
    if key_size < 2 {
        return Err(KvpWireError::KeyEmpty { op, size: key_size });
    }
    // Linux's hv_kvp.c hands key_size (bytes) to utf16s_to_utf8s as a count of units; the key
    // field (256 units) bounds what it can mean here.
    let units = (key_size as usize).min(MAX_KEY_SIZE / 2);
    Ok(units_until_nul(&body[off..off + 2 * units]))
}

/// UTF-16LE units from `bytes` up to (not including) the first 0 unit.
pub fn units_until_nul(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect()
}

/// Writes at most `cap - 1` units at `off` and zero-fills the rest of the `cap`-unit field.
/// Returns the number of units written. Out-of-range fields are left alone.
fn put_units(body: &mut [u8], off: usize, cap: usize, units: &[u16]) -> usize {
    let Some(field) = body.get_mut(off..off + 2 * cap) else {
        return 0;
    };
    let n = units.len().min(cap.saturating_sub(1));
    field.fill(0);
    for (i, u) in units[..n].iter().enumerate() {
        field[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    n
}

/// The little-endian u32 at `off`, or `None` if `b` ends before it (never a silent 0).
pub fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The little-endian u64 at `off`, or `None` if `b` ends before it.
pub fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Writes a little-endian u32 at `off`; out of range is ignored.
pub fn write_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

const SURROGATE_MASK: u32 = 0xffff_f800;
const SURROGATE_PAIR: u32 = 0x0000_d800;
const SURROGATE_LOW: u32 = 0x0000_0400;
const SURROGATE_BITS: u32 = 0x0000_03ff;
const PLANE_SIZE: u32 = 0x0001_0000;
const UNICODE_MAX: u32 = 0x0010_ffff;

/// UTF-16 to UTF-8 as Linux's `utf16s_to_utf8s`: stops at a 0 unit or after `units`, writes at
/// most `max_out` bytes, drops unpaired surrogates, and *skips* a character whose encoding does
/// not fit the remaining room (a later, shorter one may still be written).
pub fn utf16_to_utf8_linux(units: &[u16], max_out: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(max_out.min(units.len() * 3));
    let mut room = max_out;
    let mut i = 0;
    while i < units.len() && room > 0 {
        let mut u = u32::from(units[i]);
        if u == 0 {
            break;
        }
        i += 1;
        if u > 0x7f {
            if u & SURROGATE_MASK == SURROGATE_PAIR {
                if u & SURROGATE_LOW != 0 {
                    continue;
                }
                let Some(&next) = units.get(i) else { break };
                let v = u32::from(next);
                if v & SURROGATE_MASK != SURROGATE_PAIR || v & SURROGATE_LOW == 0 {
                    continue;
                }
                u = PLANE_SIZE + ((u & SURROGATE_BITS) << 10) + (v & SURROGATE_BITS);
                i += 1;
            }
            if let Some(c) = char::from_u32(u) {
                let mut buf = [0u8; 4];
                let enc = c.encode_utf8(&mut buf).as_bytes();
                if enc.len() <= room {
                    out.extend_from_slice(enc);
                    room -= enc.len();
                }
            }
        } else {
            out.push(u as u8);
            room -= 1;
        }
    }
    out
}

/// The input is not valid UTF-8 (Linux's `utf8s_to_utf16s` returns `-EINVAL`; the kernel then
/// answers the host `HV_E_FAIL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("string is not valid UTF-8 at byte {0}")]
pub struct InvalidUtf8(pub usize);

/// UTF-8 to UTF-16 as Linux's `utf8s_to_utf16s`: stops at a 0 byte, the end, or `max_units`
/// written (a supplementary character needing 2 units when 1 is left also stops it). Fails on an
/// invalid sequence met before stopping.
pub fn utf8_to_utf16_linux(s: &[u8], max_units: usize) -> Result<Vec<u16>, InvalidUtf8> {
    let mut out = Vec::with_capacity(max_units.min(s.len()));
    let mut room = max_units;
    let mut i = 0;
    while i < s.len() && room > 0 && s[i] != 0 {
        if s[i] & 0x80 != 0 {
            let (u, size) = utf8_to_utf32(&s[i..]).ok_or(InvalidUtf8(i))?;
            i += size;
            if u >= PLANE_SIZE {
                if room < 2 {
                    break;
                }
                let u = u - PLANE_SIZE;
                out.push((SURROGATE_PAIR | ((u >> 10) & SURROGATE_BITS)) as u16);
                out.push((SURROGATE_PAIR | SURROGATE_LOW | (u & SURROGATE_BITS)) as u16);
                room -= 2;
            } else {
                out.push(u as u16);
                room -= 1;
            }
        } else {
            out.push(u16::from(s[i]));
            i += 1;
            room -= 1;
        }
    }
    Ok(out)
}

/// Linux's `utf8_to_utf32` over its 6-row table: rejects overlong forms, surrogates and values
/// past U+10FFFF. Returns the code point and the bytes used.
fn utf8_to_utf32(s: &[u8]) -> Option<(u32, usize)> {
    // (cmask, cval, lmask, lval)
    const TABLE: [(u32, u32, u64, u64); 6] = [
        (0x80, 0x00, 0x7f, 0),
        (0xe0, 0xc0, 0x7ff, 0x80),
        (0xf0, 0xe0, 0xffff, 0x800),
        (0xf8, 0xf0, 0x1f_ffff, 0x1_0000),
        (0xfc, 0xf8, 0x3ff_ffff, 0x20_0000),
        (0xfe, 0xfc, 0x7fff_ffff, 0x400_0000),
    ];
    let c0 = u32::from(*s.first()?);
    let mut l = u64::from(c0);
    for (nc, &(cmask, cval, lmask, lval)) in TABLE.iter().enumerate() {
        let nc = nc + 1;
        if c0 & cmask == cval {
            l &= lmask;
            if l < lval
                || l > u64::from(UNICODE_MAX)
                || (l as u32) & SURROGATE_MASK == SURROGATE_PAIR
            {
                return None;
            }
            return Some((l as u32, nc));
        }
        if s.len() <= nc {
            return None;
        }
        let c = u64::from(s[nc] ^ 0x80);
        if c & 0xc0 != 0 {
            return None;
        }
        l = (l << 6) | c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_past_the_end_are_none_never_a_silent_zero() {
        assert_eq!(read_u32(&[1, 0, 0, 0], 0), Some(1));
        assert_eq!(read_u32(&[1, 2, 3], 0), None);
        assert_eq!(read_u32(&[0; 8], 6), None);
        assert_eq!(read_u32(&[0; 8], usize::MAX - 1), None);
        assert_eq!(read_u64(&[0; 7], 0), None);
        assert_eq!(read_u64(&[9, 0, 0, 0, 0, 0, 0, 0], 0), Some(9));
    }
    use proptest::prelude::*;

    fn u16s(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    #[test]
    fn set_request_round_trips_through_build_and_parse() {
        let req = KvpRequest::Set {
            pool: 1,
            key: u16s("Key"),
            value: KvpValue::String(u16s("välue")),
        };
        let body = req.build();
        assert_eq!(body.len(), layout::GETSET_LEN);
        assert_eq!(read_u32(&body, layout::GETSET_KEY_SIZE), Some(8));
        assert_eq!(KvpRequest::parse(&body).unwrap(), req);
    }

    #[test]
    fn set_with_reg_qword_11_is_read_as_u64_like_reg_u64_8() {
        let mut body = KvpRequest::Set {
            pool: 0,
            key: u16s("Counter"),
            value: KvpValue::U64(0x0123_4567_89ab_cdef),
        }
        .build();
        assert_eq!(read_u32(&body, layout::GETSET_VALUE_TYPE), Some(REG_U64));
        let as_u64 = KvpRequest::parse(&body).unwrap();
        write_u32(&mut body, layout::GETSET_VALUE_TYPE, REG_QWORD);
        let as_qword = KvpRequest::parse(&body).unwrap();
        assert_eq!(as_qword, as_u64);
        assert!(matches!(
            as_qword,
            KvpRequest::Set {
                value: KvpValue::U64(0x0123_4567_89ab_cdef),
                ..
            }
        ));
        for other in [0, 2, 3, 7, 9, 10, 12] {
            write_u32(&mut body, layout::GETSET_VALUE_TYPE, other);
            assert_eq!(
                KvpRequest::parse(&body),
                Err(KvpWireError::BadValueType(other))
            );
        }
    }

    #[test]
    fn key_size_past_the_field_is_rejected_with_the_limit_in_the_message() {
        let mut body = KvpRequest::Get {
            pool: 0,
            key: u16s("k"),
        }
        .build();
        write_u32(&mut body, layout::GETSET_KEY_SIZE, 600);
        let err = KvpRequest::parse(&body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "KVP KVP_OP_GET from host: key is 600 bytes, limit 512"
        );
        assert_eq!(err.status(), status::HV_INVALIDARG);
    }

    #[test]
    fn key_size_zero_is_rejected() {
        let mut body = KvpRequest::Delete {
            pool: 0,
            key: u16s("k"),
        }
        .build();
        write_u32(&mut body, layout::DELETE_KEY_SIZE, 0);
        assert!(matches!(
            KvpRequest::parse(&body),
            Err(KvpWireError::KeyEmpty { .. })
        ));
    }

    #[test]
    fn truncated_enumerate_is_rejected() {
        let body = KvpRequest::Enumerate { pool: 2, index: 3 }.build();
        assert!(matches!(
            KvpRequest::parse(&body[..100]),
            Err(KvpWireError::Truncated {
                need: 2580,
                got: 100,
                ..
            })
        ));
    }

    #[test]
    fn enumerate_reply_sizes_count_the_terminator() {
        let mut body = KvpRequest::Enumerate { pool: 1, index: 0 }.build();
        assert!(write_enumerate_reply(&mut body, &u16s("ab"), &u16s("xyz")));
        assert_eq!(read_u32(&body, layout::ENUM_KEY_SIZE), Some(6));
        assert_eq!(read_u32(&body, layout::ENUM_VALUE_SIZE), Some(8));
        assert_eq!(
            KvpReplyView::parse(KvpOperation::ENUMERATE, &body).unwrap(),
            KvpReplyView::Entry {
                value_type: REG_SZ,
                key: "ab".into(),
                value: "xyz".into()
            }
        );
    }

    #[test]
    fn ip_info_starts_at_offset_two() {
        let info = IpInfoUtf16 {
            adapter_id: u16s("00:15:5D:00:00:01"),
            addr_family: ADDR_FAMILY_IPV4,
            ip_addr: u16s("10.0.0.4"),
            ..Default::default()
        };
        let body = KvpRequest::GetIpInfo(info.clone()).build();
        assert_eq!(body.len(), 7428);
        assert_eq!(body[2], b'0');
        assert_eq!(body[layout::IP_ADDR_FAMILY], 1);
        assert_eq!(
            KvpRequest::parse(&body).unwrap(),
            KvpRequest::GetIpInfo(info)
        );
    }

    #[test]
    fn linux_utf16_conversion_skips_characters_that_do_not_fit() {
        // "é" needs 2 bytes; with 2 bytes of room after "a", "é" is written; with 1 it is
        // skipped and the following ASCII still fits.
        assert_eq!(utf16_to_utf8_linux(&u16s("aéb"), 3), b"a\xc3\xa9".to_vec());
        assert_eq!(utf16_to_utf8_linux(&u16s("aéb"), 2), b"ab".to_vec());
        // An unpaired low surrogate is dropped.
        assert_eq!(
            utf16_to_utf8_linux(&[0x61, 0xdc00, 0x62], 10),
            b"ab".to_vec()
        );
        // Stops at a 0 unit.
        assert_eq!(utf16_to_utf8_linux(&[0x61, 0, 0x62], 10), b"a".to_vec());
    }

    #[test]
    fn linux_utf8_conversion_rejects_overlong_and_surrogates() {
        assert!(utf8_to_utf16_linux(b"\xc0\x80", 10).is_err());
        assert!(utf8_to_utf16_linux(b"\xed\xa0\x80", 10).is_err());
        assert_eq!(
            utf8_to_utf16_linux("a😀".as_bytes(), 10).unwrap(),
            u16s("a😀")
        );
        // A surrogate pair does not fit in 1 remaining unit: conversion stops.
        assert_eq!(utf8_to_utf16_linux("a😀".as_bytes(), 2).unwrap(), u16s("a"));
        // Invalid bytes past the output limit are never looked at.
        assert_eq!(utf8_to_utf16_linux(b"ab\xff", 2).unwrap(), u16s("ab"));
    }

    #[test]
    fn pool_names_parse_back() {
        for p in Pool::ALL {
            assert_eq!(Pool::parse(p.name()), Some(p));
            assert_eq!(Pool::parse(&p.number().to_string()), Some(p));
        }
        assert_eq!(Pool::parse("AutoExternal"), Some(Pool::AutoExternal));
        assert_eq!(Pool::parse("5"), None);
    }

    #[test]
    fn config_pool_names_are_the_operator_names_and_internal_names_pool_4() {
        for p in Pool::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<Pool>(&json).unwrap(), p);
        }
        assert_eq!(
            serde_json::from_str::<Pool>("\"internal\"").unwrap(),
            Pool::AutoInternal
        );
        assert!(serde_json::from_str::<Pool>("\"Guest\"").is_err());
    }

    #[test]
    fn a_value_is_stored_as_text_with_numbers_in_decimal() {
        assert_eq!(Value::Text("v".into()).into_text(), "v");
        assert_eq!(Value::U32(4_000_000_000).into_text(), "4000000000");
        assert_eq!(Value::U64(u64::MAX).into_text(), "18446744073709551615");
    }

    proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..8000)) {
            let _ = KvpRequest::parse(&body);
            for op in 0..6u8 {
                let _ = KvpReplyView::parse(KvpOperation(op), &body);
            }
        }

        #[test]
        fn valid_strings_convert_like_std(s in "\\PC{0,100}") {
            let units: Vec<u16> = s.encode_utf16().collect();
            prop_assert_eq!(utf16_to_utf8_linux(&units, 4096), s.as_bytes().to_vec());
            prop_assert_eq!(utf8_to_utf16_linux(s.as_bytes(), 4096).unwrap(), units);
        }

        #[test]
        fn utf16_output_never_exceeds_the_limit(units in proptest::collection::vec(any::<u16>(), 0..300), max in 0usize..600) {
            let out = utf16_to_utf8_linux(&units, max);
            prop_assert!(out.len() <= max);
            prop_assert!(std::str::from_utf8(&out).is_ok());
        }

        #[test]
        fn utf8_matches_std_validity_when_all_is_read(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let nul_free: Vec<u8> = bytes.iter().copied().take_while(|&b| b != 0).collect();
            let ours = utf8_to_utf16_linux(&nul_free, 4096);
            prop_assert_eq!(ours.is_ok(), std::str::from_utf8(&nul_free).is_ok());
        }
    }
}
