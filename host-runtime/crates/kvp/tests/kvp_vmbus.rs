//! The VMBus codec driven in-process through the IC framework (`IcGuest` with `IcHost` playing
//! Hyper-V): negotiation, then every operation on every pool with UTF-16 keys and values.

mod common;

use std::sync::Arc;

use hvisd_ic::IcGuest;
use hvisd_ic::host::IcHost;
use hvisd_kvp::KvpService;
use hvisd_protocol::ic::MessageType;
use hvisd_protocol::ic::status::{HV_E_FAIL, HV_INVALIDARG, HV_S_CONT};
use hvisd_protocol::kvp::{
    ADDR_FAMILY_IPV4, IpInfoUtf16, KvpOperation, KvpReplyView, KvpRequest, KvpValue, REG_SZ,
    layout, write_u32,
};

fn u16s(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

struct Channel {
    host: IcHost,
    guest: IcGuest<KvpService>,
}

impl Channel {
    async fn open(dir: &std::path::Path) -> Channel {
        let core = Arc::new(common::core_in(dir));
        let mut guest = IcGuest::new(KvpService::new(core).await);
        let mut host = IcHost::new(
            MessageType::KVP_EXCHANGE,
            hvisd_ic::versions::KVP_FRAMEWORK_VERSIONS,
            hvisd_ic::versions::KVP_VERSIONS,
        );
        let nego = host.negotiate_request().unwrap();
        let reply = guest.on_packet(&nego).await.unwrap().unwrap();
        host.on_negotiate_response(&reply).unwrap();
        Channel { host, guest }
    }

    /// Sends a body, returns (status, reply body).
    async fn raw(&mut self, body: &[u8]) -> (u32, Vec<u8>) {
        let packet = self.host.request(body).unwrap();
        let reply = self
            .guest
            .on_packet(&packet)
            .await
            .unwrap()
            .expect("the guest answers");
        let r = self.host.on_reply(&reply).unwrap();
        (r.status, r.body[..body.len()].to_vec())
    }

    async fn call(&mut self, req: KvpRequest) -> (u32, KvpReplyView) {
        let op = req.operation();
        let (status, body) = self.raw(&req.build()).await;
        (status, KvpReplyView::parse(op, &body).unwrap())
    }
}

fn entry(key: &str, value: &str) -> KvpReplyView {
    KvpReplyView::Entry {
        value_type: REG_SZ,
        key: key.into(),
        value: value.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_every_pool_over_vmbus() {
    let d = tempfile::tempdir().unwrap();
    let mut ch = Channel::open(d.path()).await;
    for pool in [0u8, 1, 3, 4] {
        let sets = [
            ("Name", KvpValue::String(u16s("Wert ü €")), "Wert ü €"),
            ("Count", KvpValue::U32(4_000_000_000), "4000000000"),
            (
                "Big",
                KvpValue::U64(18_000_000_000_000_000_000),
                "18000000000000000000",
            ),
        ];
        for (key, value, _) in &sets {
            let (status, _) = ch
                .call(KvpRequest::Set {
                    pool,
                    key: u16s(key),
                    value: value.clone(),
                })
                .await;
            assert_eq!(status, 0, "SET {key} pool {pool}");
        }
        for (i, (key, _, text)) in sets.iter().enumerate() {
            assert_eq!(
                ch.call(KvpRequest::Enumerate {
                    pool,
                    index: i as u32
                })
                .await,
                (0, entry(key, text))
            );
            // GET returns the stored value (Linux would answer an empty string here).
            assert_eq!(
                ch.call(KvpRequest::Get {
                    pool,
                    key: u16s(key)
                })
                .await,
                (0, entry(key, text))
            );
        }
        assert_eq!(
            ch.call(KvpRequest::Enumerate { pool, index: 3 }).await.0,
            HV_S_CONT
        );
        assert_eq!(
            ch.call(KvpRequest::Get {
                pool,
                key: u16s("missing")
            })
            .await
            .0,
            HV_S_CONT
        );
        assert_eq!(
            ch.call(KvpRequest::Delete {
                pool,
                key: u16s("Name")
            })
            .await
            .0,
            0
        );
        assert_eq!(
            ch.call(KvpRequest::Delete {
                pool,
                key: u16s("Name")
            })
            .await
            .0,
            HV_S_CONT
        );
        assert_eq!(
            ch.call(KvpRequest::Enumerate { pool, index: 0 }).await,
            (0, entry("Count", "4000000000"))
        );
    }
    // The Guest pool file holds UTF-8, as cloud-init and hv_kvp_daemon expect.
    let raw = std::fs::read(d.path().join("pools/.kvp_pool_1")).unwrap();
    assert_eq!(&raw[..5], b"Count");
    assert_eq!(&raw[512..522], b"4000000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_pool_over_vmbus_reports_integration_services_version_3_1() {
    let d = tempfile::tempdir().unwrap();
    let mut ch = Channel::open(d.path()).await;
    assert_eq!(
        ch.call(KvpRequest::Enumerate { pool: 2, index: 1 }).await,
        (0, entry("IntegrationServicesVersion", "3.1"))
    );
    assert_eq!(
        ch.call(KvpRequest::Enumerate { pool: 2, index: 5 }).await,
        (0, entry("OSName", "Test OS"))
    );
    assert_eq!(
        ch.call(KvpRequest::Enumerate { pool: 2, index: 10 })
            .await
            .0,
        HV_S_CONT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_with_a_status() {
    let d = tempfile::tempdir().unwrap();
    let mut ch = Channel::open(d.path()).await;
    let mut body = KvpRequest::Set {
        pool: 1,
        key: u16s("k"),
        value: KvpValue::String(u16s("v")),
    }
    .build();
    write_u32(&mut body, layout::GETSET_KEY_SIZE, 0);
    assert_eq!(ch.raw(&body).await.0, HV_INVALIDARG);
    write_u32(&mut body, layout::GETSET_KEY_SIZE, 600);
    assert_eq!(ch.raw(&body).await.0, HV_INVALIDARG);
    let body = KvpRequest::Enumerate { pool: 1, index: 0 }.build();
    assert_eq!(ch.raw(&body[..64]).await.0, HV_INVALIDARG);
    assert_eq!(
        ch.call(KvpRequest::Enumerate { pool: 9, index: 0 }).await.0,
        HV_INVALIDARG
    );
    // Nothing was stored by any of these.
    assert_eq!(
        ch.call(KvpRequest::Enumerate { pool: 1, index: 0 }).await.0,
        HV_S_CONT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ip_info_reports_this_machines_interface_by_mac() {
    let d = tempfile::tempdir().unwrap();
    let mut ch = Channel::open(d.path()).await;
    // Pick an interface with a global IPv4 address, as `ip` shows it.
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((ifname, addr)) = text.lines().filter(|l| !l.contains(" lo ")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        Some((
            f.get(1)?.to_string(),
            f.get(3)?.split('/').next()?.to_string(),
        ))
    }) else {
        panic!("this test needs a non-loopback IPv4 interface; `ip -o -4 addr` shows none");
    };
    let mac = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap()
        .trim()
        .to_uppercase();
    let (status, view) = ch
        .call(KvpRequest::GetIpInfo(IpInfoUtf16 {
            adapter_id: u16s(&mac),
            addr_family: 0,
            ..Default::default()
        }))
        .await;
    assert_eq!(status, 0);
    let KvpReplyView::IpInfo(info) = view else {
        panic!("{view:?}")
    };
    let ips = String::from_utf16_lossy(&info.ip_addr);
    assert!(
        ips.split(';').any(|a| a == addr),
        "{ips} should list {addr}"
    );
    assert!(info.addr_family & ADDR_FAMILY_IPV4 != 0);
    let masks = String::from_utf16_lossy(&info.sub_net);
    assert!(!masks.is_empty(), "a subnet per address");
    // An unknown MAC is HV_E_FAIL, as kvp_mac_to_ip answers.
    let (status, _) = ch
        .call(KvpRequest::GetIpInfo(IpInfoUtf16 {
            adapter_id: u16s("00:00:5E:00:53:FF"),
            ..Default::default()
        }))
        .await;
    assert_eq!(status, HV_E_FAIL);
    let _ = KvpOperation::GET_IP_INFO;
}
