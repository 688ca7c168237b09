//! The VMBus codec: [`KvpService`] implements [`IcService`] for the KVP channel (shm and uio
//! transports). It does what Linux's `hv_kvp.c` does around the daemon: converts the host's UTF-16
//! request into the daemon message (same conversion functions, same limits), lets the shared
//! [`KvpCore`] answer, and converts the answer back into the host's buffer.
//!
//! Deliberate differences from the kernel + daemon pair:
//! * GET returns the stored value. Linux forwards GET with `value_size` 0 (so the daemon copies
//!   nothing) and then reads the answer 4 bytes off (`kvp_enum_data` instead of `kvp_get`): a
//!   Linux guest always answers GET with an empty string.
//! * Malformed requests (body shorter than the operation's structure, `key_size` 0 or > 512,
//!   `value_size` > 2048, unknown value type or operation) are answered `HV_INVALIDARG` (unknown
//!   operation: `HV_ERROR_NOT_SUPPORTED`) with a log line; Linux reads past the fields or answers
//!   an unknown operation with an empty success.
//! * Reply strings are zero-filled to the end of their field (Linux writes the units without a
//!   terminator over the host's request bytes).

use std::sync::Arc;

use hvisd_ic::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use hvisd_protocol::guid::{Guid, class_id};
use hvisd_protocol::ic::IcVersion;
use hvisd_protocol::ic::status::HV_E_FAIL;
use hvisd_protocol::kvp::{
    self, IpInfoUtf16, KvpRequest, KvpValue, MAX_ADAPTER_ID_SIZE, MAX_GATEWAY_SIZE,
    MAX_IP_ADDR_SIZE, MAX_KEY_SIZE, MAX_VALUE_SIZE, utf8_to_utf16_linux, utf16_to_utf8_linux,
};
use hvisd_protocol::kvp_daemon::{self as dm, DaemonMessage, layout};

use crate::core::KvpCore;

/// `ICMSGTYPE_KVPEXCHANGE`.
const KVP_EXCHANGE: u16 = 2;

/// The KVP integration service over VMBus.
#[derive(Clone, Debug)]
pub struct KvpService {
    core: Arc<KvpCore>,
}

impl KvpService {
    /// Wraps the shared core; sets `IntegrationServicesVersion` to `"3.1"`, the string Linux's
    /// kernel driver registers with the daemon.
    pub async fn new(core: Arc<KvpCore>) -> KvpService {
        core.set_integration_services_version(kvp::HV_DRV_VERSION.as_bytes());
        KvpService { core }
    }

    /// The shared core.
    pub fn core(&self) -> &Arc<KvpCore> {
        &self.core
    }

    /// Handles one KVP body (the bytes after `icmsg_hdr`) in place and returns the status.
    pub async fn handle_body(&self, body: &mut [u8]) -> u32 {
        let request = match KvpRequest::parse(body) {
            Ok(r) => r,
            Err(e) => {
                hvisd_protocol::throttled!(warn, error = %e, "KVP request refused");
                return e.status();
            }
        };
        let mut msg = to_daemon_message(&request);
        let outcome = self.core.execute(&mut msg).await;
        if outcome.status != 0 {
            return outcome.status;
        }
        let converted = match &request {
            KvpRequest::Enumerate { .. } => (|| {
                let key = utf8_to_utf16_linux(
                    dm::cstr(&msg[layout::ENUM_KEY..layout::ENUM_KEY + MAX_KEY_SIZE]),
                    MAX_KEY_SIZE / 2 - 2,
                )?;
                let value = utf8_to_utf16_linux(
                    dm::cstr(&msg[layout::ENUM_VALUE..layout::ENUM_VALUE + MAX_VALUE_SIZE]),
                    MAX_VALUE_SIZE / 2 - 2,
                )?;
                kvp::write_enumerate_reply(body, &key, &value);
                Ok(())
            })(),
            KvpRequest::Get { .. } => (|| {
                let value = utf8_to_utf16_linux(
                    dm::cstr(&msg[layout::SET_VALUE..layout::SET_VALUE + MAX_VALUE_SIZE]),
                    MAX_VALUE_SIZE / 2 - 2,
                )?;
                kvp::write_get_reply(body, &value);
                Ok(())
            })(),
            KvpRequest::GetIpInfo(_) => (|| {
                let info = dm::read_ip_info(&msg[..]);
                let out = IpInfoUtf16 {
                    adapter_id: utf8_to_utf16_linux(&info.adapter_id, MAX_ADAPTER_ID_SIZE)?,
                    addr_family: info.addr_family,
                    dhcp_enabled: info.dhcp_enabled,
                    ip_addr: utf8_to_utf16_linux(&info.ip_addr, MAX_IP_ADDR_SIZE)?,
                    sub_net: utf8_to_utf16_linux(&info.sub_net, MAX_IP_ADDR_SIZE)?,
                    gate_way: utf8_to_utf16_linux(&info.gate_way, MAX_GATEWAY_SIZE)?,
                    dns_addr: utf8_to_utf16_linux(&info.dns_addr, MAX_IP_ADDR_SIZE)?,
                };
                kvp::write_ip_info(body, &out);
                Ok(())
            })(),
            _ => Ok(()),
        };
        match converted {
            Ok(()) => 0,
            Err(e) => {
                let e: kvp::InvalidUtf8 = e;
                hvisd_protocol::throttled!(warn, error = %e, op = %outcome.operation, "KVP reply is not valid UTF-8; answering HV_E_FAIL as Linux does");
                HV_E_FAIL
            }
        }
    }
}

/// Builds the daemon message Linux's `kvp_send_key` would build for `request`.
pub fn to_daemon_message(request: &KvpRequest) -> Box<DaemonMessage> {
    let mut m = dm::zeroed();
    m[layout::OPERATION] = request.operation().0;
    let put_key = |m: &mut DaemonMessage, size_off: usize, key_off: usize, key: &[u16]| {
        let k = utf16_to_utf8_linux(key, MAX_KEY_SIZE - 1);
        m[key_off..key_off + k.len()].copy_from_slice(&k);
        kvp::write_u32(&mut m[..], size_off, k.len() as u32 + 1);
    };
    match request {
        KvpRequest::Get { pool, key } => {
            m[layout::POOL] = *pool;
            put_key(&mut m, layout::SET_KEY_SIZE, layout::SET_KEY, key);
            // Deliberate: ask for the whole value (Linux sends 0 here).
            kvp::write_u32(&mut m[..], layout::SET_VALUE_SIZE, MAX_VALUE_SIZE as u32);
        }
        KvpRequest::Set { pool, key, value } => {
            m[layout::POOL] = *pool;
            let v = match value {
                KvpValue::String(units) => utf16_to_utf8_linux(units, MAX_VALUE_SIZE - 1),
                KvpValue::U32(n) => n.to_string().into_bytes(),
                KvpValue::U64(n) => n.to_string().into_bytes(),
            };
            m[layout::SET_VALUE..layout::SET_VALUE + v.len()].copy_from_slice(&v);
            kvp::write_u32(&mut m[..], layout::SET_VALUE_SIZE, v.len() as u32 + 1);
            kvp::write_u32(&mut m[..], layout::SET_VALUE_TYPE, 0);
            put_key(&mut m, layout::SET_KEY_SIZE, layout::SET_KEY, key);
        }
        KvpRequest::Delete { pool, key } => {
            m[layout::POOL] = *pool;
            put_key(&mut m, layout::DELETE_KEY_SIZE, layout::DELETE_KEY, key);
        }
        KvpRequest::Enumerate { pool, index } => {
            m[layout::POOL] = *pool;
            kvp::write_u32(&mut m[..], layout::ENUM_INDEX, *index);
        }
        KvpRequest::GetIpInfo(info) | KvpRequest::SetIpInfo(info) => {
            let put = |m: &mut DaemonMessage, off: usize, max: usize, units: &[u16]| {
                let s = utf16_to_utf8_linux(units, max);
                m[off..off + s.len()].copy_from_slice(&s);
            };
            if matches!(request, KvpRequest::SetIpInfo(_)) {
                put(&mut m, layout::IP_ADDR, MAX_IP_ADDR_SIZE, &info.ip_addr);
                put(&mut m, layout::IP_SUBNET, MAX_IP_ADDR_SIZE, &info.sub_net);
                put(&mut m, layout::IP_GATEWAY, MAX_GATEWAY_SIZE, &info.gate_way);
                put(&mut m, layout::IP_DNS, MAX_IP_ADDR_SIZE, &info.dns_addr);
                m[layout::IP_DHCP] = info.dhcp_enabled;
            }
            put(
                &mut m,
                layout::IP_ADAPTER_ID,
                MAX_ADAPTER_ID_SIZE,
                &info.adapter_id,
            );
            m[layout::IP_ADDR_FAMILY] = info.addr_family;
        }
    }
    m
}

impl IcService for KvpService {
    fn name(&self) -> &'static str {
        "kvp"
    }

    fn class_id(&self) -> Guid {
        class_id::KVP
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        hvisd_ic::versions::KVP_FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        hvisd_ic::versions::KVP_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        if info.message_type != KVP_EXCHANGE {
            return Err(IcServiceError::UnexpectedType {
                service: "kvp",
                message_type: info.message_type,
            });
        }
        Ok(self.handle_body(body).await)
    }
}
