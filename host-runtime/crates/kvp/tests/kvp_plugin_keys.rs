//! Plugin-provided Guest-pool keys through the whole service: a well-behaved, a slow and a
//! trapping provider (in-test implementations of `GuestKeyProvider`; the end-to-end test with real
//! wasm plugins comes with the lead's plugin-host integration).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisd_kvp::guest_keys::ValueFuture;
use hvisd_kvp::{GuestKeyOptions, GuestKeyProvider, GuestKeys};
use hvisd_protocol::ic::status::HV_S_CONT;
use hvisd_protocol::kvp::{KvpReplyView, KvpRequest, Pool};
use hvisd_protocol::kvp_daemon as dm;

struct Provider {
    name: &'static str,
    keys: Vec<&'static str>,
    behaviour: Behaviour,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Good,
    Slow(Duration),
    Trap,
}

impl GuestKeyProvider for Provider {
    fn name(&self) -> &str {
        self.name
    }
    fn keys(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.to_string()).collect()
    }
    fn value(&self, key: &str) -> ValueFuture {
        let (b, key) = (self.behaviour, key.to_string());
        Box::pin(async move {
            match b {
                Behaviour::Good => Ok(format!("{key} value")),
                Behaviour::Slow(d) => {
                    tokio::time::sleep(d).await;
                    Ok(format!("{key} late value"))
                }
                Behaviour::Trap => Err("wasm trap: unreachable instruction executed".into()),
            }
        })
    }
}

fn providers() -> Vec<Arc<dyn GuestKeyProvider>> {
    vec![
        Arc::new(Provider {
            name: "good",
            keys: vec!["PluginA", "Shadowed"],
            behaviour: Behaviour::Good,
        }),
        Arc::new(Provider {
            name: "slow",
            keys: vec!["SlowKey"],
            behaviour: Behaviour::Slow(Duration::from_secs(2)),
        }),
        Arc::new(Provider {
            name: "trap",
            keys: vec!["TrapKey"],
            behaviour: Behaviour::Trap,
        }),
    ]
}

async fn enumerate_guest(core: &hvisd_kvp::KvpCore) -> (Vec<(String, String)>, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    for index in 0.. {
        let mut msg = dm::build_enumerate(Pool::Guest as u8, index);
        if core.execute(&mut msg).await.status == HV_S_CONT {
            break;
        }
        out.push((
            String::from_utf8(dm::enumerate_key(&msg[..]).to_vec()).unwrap(),
            String::from_utf8(dm::enumerate_value(&msg[..]).to_vec()).unwrap(),
        ));
    }
    (out, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_keys_follow_the_file_records_and_bad_plugins_never_delay_the_host() {
    let d = tempfile::tempdir().unwrap();
    let core = common::core_in(d.path());
    {
        let s = core.store();
        s.set(Pool::Guest, "FileKey".into(), "from cloud-init".into())
            .await
            .unwrap();
        s.set(Pool::Guest, "Shadowed".into(), "stale file value".into())
            .await
            .unwrap();
    }
    let deadline = Duration::from_millis(150);
    core.set_guest_keys(GuestKeys::new(
        providers(),
        GuestKeyOptions {
            deadline,
            cache_ttl: Duration::from_secs(30),
        },
    ));
    let (keys, took) = enumerate_guest(&core).await;
    // The file record owned by a plugin is hidden; the slow and the trapping keys have no value
    // yet and are skipped; the whole enumeration waited at most about one deadline.
    assert_eq!(
        keys,
        vec![
            ("FileKey".into(), "from cloud-init".into()),
            ("PluginA".into(), "PluginA value".into()),
            ("Shadowed".into(), "Shadowed value".into()),
        ]
    );
    assert!(took < deadline * 4, "enumeration took {took:?}");
    // Once the slow plugin has answered (late), its value is served from the cache.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (keys, _) = enumerate_guest(&core).await;
    assert!(
        keys.contains(&("SlowKey".into(), "SlowKey late value".into())),
        "{keys:?}"
    );
    assert!(!keys.iter().any(|(k, _)| k == "TrapKey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_key_reaches_the_host_over_vmbus_get_and_enumerate() {
    let d = tempfile::tempdir().unwrap();
    let core = common::core_in(d.path());
    core.set_guest_keys(GuestKeys::new(providers(), GuestKeyOptions::default()));
    let service = hvisd_kvp::KvpService::new(Arc::new(core)).await;
    let mut body = KvpRequest::Get {
        pool: 1,
        key: "PluginA".encode_utf16().collect(),
    }
    .build();
    assert_eq!(service.handle_body(&mut body).await, 0);
    assert!(matches!(
        KvpReplyView::parse(hvisd_protocol::kvp::KvpOperation::GET, &body).unwrap(),
        KvpReplyView::Entry { value, .. } if value == "PluginA value"
    ));
    let mut body = KvpRequest::Enumerate { pool: 1, index: 0 }.build();
    assert_eq!(service.handle_body(&mut body).await, 0);
    assert!(matches!(
        KvpReplyView::parse(hvisd_protocol::kvp::KvpOperation::ENUMERATE, &body).unwrap(),
        KvpReplyView::Entry { key, .. } if key == "PluginA"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_sets_and_deletes_are_published_to_subscribers() {
    let d = tempfile::tempdir().unwrap();
    let core = common::core_in(d.path());
    let mut events = core.subscribe();
    let mut msg = dm::build_set(Pool::External as u8, b"HostName", b"hyperv-host-01");
    assert_eq!(core.execute(&mut msg).await.status, 0);
    let mut msg = dm::build_delete(Pool::External as u8, b"HostName");
    assert_eq!(core.execute(&mut msg).await.status, 0);
    let mut msg = dm::build_delete(Pool::External as u8, b"HostName");
    assert_eq!(core.execute(&mut msg).await.status, HV_S_CONT);
    assert_eq!(
        events.recv().await.unwrap(),
        hvisd_kvp::HostKvpEvent {
            pool: Pool::External,
            key: "HostName".into(),
            value: Some("hyperv-host-01".into())
        }
    );
    assert_eq!(
        events.recv().await.unwrap(),
        hvisd_kvp::HostKvpEvent {
            pool: Pool::External,
            key: "HostName".into(),
            value: None
        }
    );
    // The failed DELETE published nothing.
    assert!(events.try_recv().is_err());
}
