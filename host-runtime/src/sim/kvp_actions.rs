//! Host actions for key/value exchange.

use super::*;

impl HostSimulator {
    pub(super) async fn act_kvp(
        &mut self,
        action: &Action,
        timeout: Duration,
        entry: &mut serde_json::Map<String, Value>,
    ) -> Result<(), SimError> {
        match action {
            Action::KvpSet {
                name,
                pool,
                key,
                value,
                value_type,
            } => {
                let pool = pool.wire().map_err(SimError::BadArgument)?;
                let value = kvp_value(value, value_type)?;
                entry.insert("name".into(), json!(name));
                entry.insert(
                    "sent".into(),
                    json!({"pool": pool, "key": key, "type": value_type}),
                );
                let request = KvpRequest::Set {
                    pool,
                    key: key.encode_utf16().collect(),
                    value,
                };
                let reply = self.request(name, &request.build(), timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                Ok(())
            }
            Action::KvpGet { name, pool, key } => {
                let pool = pool.wire().map_err(SimError::BadArgument)?;
                entry.insert("name".into(), json!(name));
                entry.insert("sent".into(), json!({"pool": pool, "key": key}));
                let request = KvpRequest::Get {
                    pool,
                    key: key.encode_utf16().collect(),
                };
                let reply = self.request(name, &request.build(), timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                if reply.status == 0 {
                    entry.insert(
                        "received".into(),
                        kvp_reply_json(KvpOperation::GET, &reply.body)?,
                    );
                }
                Ok(())
            }
            Action::KvpDelete { name, pool, key } => {
                let pool = pool.wire().map_err(SimError::BadArgument)?;
                entry.insert("name".into(), json!(name));
                entry.insert("sent".into(), json!({"pool": pool, "key": key}));
                let request = KvpRequest::Delete {
                    pool,
                    key: key.encode_utf16().collect(),
                };
                let reply = self.request(name, &request.build(), timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                Ok(())
            }
            Action::KvpEnumerate { name, pool, max } => {
                let pool = pool.wire().map_err(SimError::BadArgument)?;
                entry.insert("name".into(), json!(name));
                entry.insert("pool".into(), json!(pool));
                let mut records = Vec::new();
                let mut last_status = 0;
                for index in 0..*max {
                    let request = KvpRequest::Enumerate { pool, index };
                    let reply = self.request(name, &request.build(), timeout).await?;
                    last_status = reply.status;
                    if reply.status != 0 {
                        break;
                    }
                    records.push(kvp_reply_json(KvpOperation::ENUMERATE, &reply.body)?);
                }
                entry.insert("count".into(), json!(records.len()));
                entry.insert("records".into(), json!(records));
                entry.insert("end_status".into(), status_json(last_status));
                Ok(())
            }
            Action::KvpGetIpInfo { name, mac, family } => {
                let addr_family = match family.as_str() {
                    "ipv4" => kvp::ADDR_FAMILY_IPV4,
                    "ipv6" => kvp::ADDR_FAMILY_IPV6,
                    "both" => kvp::ADDR_FAMILY_IPV4 | kvp::ADDR_FAMILY_IPV6,
                    other => {
                        return Err(SimError::BadArgument(format!(
                            "family {other:?}: ipv4, ipv6 or both"
                        )));
                    }
                };
                entry.insert("name".into(), json!(name));
                entry.insert("sent".into(), json!({"mac": mac, "family": family}));
                let request = KvpRequest::GetIpInfo(IpInfoUtf16 {
                    adapter_id: mac.encode_utf16().collect(),
                    addr_family,
                    ..Default::default()
                });
                let reply = self.request(name, &request.build(), timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                if reply.status == 0 {
                    entry.insert(
                        "received".into(),
                        kvp_reply_json(KvpOperation::GET_IP_INFO, &reply.body)?,
                    );
                }
                Ok(())
            }
            Action::KvpSetIpInfo {
                name,
                adapter_id,
                dhcp,
                addresses,
                masks,
                gateways,
                dns,
            } => {
                entry.insert("name".into(), json!(name));
                entry.insert(
                    "sent".into(),
                    json!({"adapter_id": adapter_id, "dhcp": dhcp, "addresses": addresses}),
                );
                let request = KvpRequest::SetIpInfo(IpInfoUtf16 {
                    adapter_id: adapter_id.encode_utf16().collect(),
                    addr_family: kvp::ADDR_FAMILY_IPV4 | kvp::ADDR_FAMILY_IPV6,
                    dhcp_enabled: u8::from(*dhcp),
                    ip_addr: addresses.encode_utf16().collect(),
                    sub_net: masks.encode_utf16().collect(),
                    gate_way: gateways.encode_utf16().collect(),
                    dns_addr: dns.encode_utf16().collect(),
                });
                let reply = self.request(name, &request.build(), timeout).await?;
                entry.insert("status".into(), status_json(reply.status));
                Ok(())
            }
            other => Err(SimError::BadArgument(format!(
                "{} is not a kvp action",
                other.kind()
            ))),
        }
    }
}
