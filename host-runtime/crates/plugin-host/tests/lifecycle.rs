//! Loading, caching, recycling, reloading and the example plugins, all with
//! real components built from `plugins/`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisd_plugin_host::manifest::{Access, DirGrant, KvpGrant, World};
use hvisd_plugin_host::{
    CacheOutcome, ComponentCache, FreezeContext, FreezeOutcome, FreezePlan, HostServices, KvpStore,
    MemoryKvpStore, Mount, PluginHost, PluginState, Pool, PreFreeze, Value,
};

#[test]
fn the_cache_compiles_once_and_later_loads_hit_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ComponentCache::new(dir.path().join("c")).expect("cache");
    let engine = hvisd_plugin_host::build_engine().expect("engine");
    let wasm = std::fs::read(wasm("app-version")).expect("read");
    let (_, first) = cache.load(&engine, &wasm).expect("first");
    assert_eq!(first, CacheOutcome::Compiled);
    let (_, second) = cache.load(&engine, &wasm).expect("second");
    assert_eq!(second, CacheOutcome::Hit);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("c"))
        .expect("ls")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1, "one artifact, no temp files left");
    let name = files[0].file_name().into_string().expect("utf8");
    assert!(
        name.ends_with(".cwasm") && name.len() == 64 + 1 + 16 + 6,
        "{name}"
    );
}

#[test]
fn a_cache_dir_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = dir.path().join("c");
    std::fs::create_dir(&c).expect("mkdir");
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = ComponentCache::new(&c).expect_err("world-writable");
    assert!(e.to_string().contains("lets others write"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_instance_is_long_lived_and_recycled_after_n_calls() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut m = neighbour(&scratch.path("app"));
    m.limits.recycle_after_calls = 5;
    host.load(&[m]).await.expect("load");
    let inst = || host.status()[0].instantiations;
    assert_eq!(inst(), 1, "instantiated once at load");
    for _ in 0..5 {
        assert_neighbour_answers(&host).await;
    }
    assert_eq!(inst(), 1, "five calls on one instance");
    assert_neighbour_answers(&host).await;
    assert_eq!(inst(), 2, "recycled at the sixth call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_version_answers_version_and_health_and_hears_host_sets() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut m = neighbour(&scratch.path("app"));
    m.kvp.push(KvpGrant {
        pool: Pool::External,
        keys: vec!["app.*".into()],
        access: Access::ReadOnly,
    });
    host.load(&[m]).await.expect("load");
    let keys = host.provider_keys();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0]
            .keys
            .iter()
            .map(|k| k.key.as_str())
            .collect::<Vec<_>>(),
        ["app.health", "app.version"]
    );
    assert_eq!(keys[0].subscribe, vec![Pool::External]);
    assert_eq!(
        host.provider_get("app-version", Pool::Guest, "app.health")
            .await
            .expect("health"),
        Value::Text("ok".into())
    );
    std::fs::remove_file(scratch.path("app/health")).expect("rm");
    assert_eq!(
        host.provider_get("app-version", Pool::Guest, "app.health")
            .await
            .expect("health"),
        Value::Text("down".into())
    );
    let e = host
        .provider_get("app-version", Pool::Guest, "other")
        .await
        .expect_err("not owned");
    assert!(e.to_string().contains("does not own"), "{e}");
    let errs = host
        .notify_host_set(
            Pool::External,
            "app.mode",
            &Value::Text("maintenance".into()),
        )
        .await;
    assert!(errs.is_empty(), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_a_grant_for_its_keys_owns_none_of_them() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut m = neighbour(&scratch.path("app"));
    m.kvp[0].keys = vec!["other.*".into()];
    host.load(&[m]).await.expect("load");
    assert!(host.provider_keys()[0].keys.is_empty());
    assert!(host.provider_keys()[0].subscribe.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_hold_holds_the_application_and_always_releases_it() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    let run = scratch.path("run");
    std::fs::create_dir(&run).expect("mkdir");
    let mut m = manifest(
        "flush-hold",
        "flush-hold",
        &[World::FreezeHook],
        &["app.backup.*"],
    );
    m.dirs.push(DirGrant {
        host: run.clone(),
        guest: "/run/app".into(),
        access: Access::ReadWrite,
    });
    host.load(&[m]).await.expect("load");
    let ctx = FreezeContext {
        backup_id: "b-42".into(),
        mounts: vec!["/".into(), "/var".into()],
        deadline: Instant::now() + Duration::from_secs(5),
    };
    assert_eq!(host.pre_freeze(&ctx).await, PreFreeze::Proceed);
    assert_eq!(
        std::fs::read_to_string(run.join("hold")).expect("hold"),
        "b-42"
    );
    assert_eq!(
        kvp.get(Pool::Guest, "app.backup.state".into())
            .await
            .expect("get"),
        Some(Value::Text("held".into()))
    );
    assert!(host.post_thaw(&ctx, FreezeOutcome::Thawed).await.is_empty());
    assert!(!run.join("hold").exists());
    assert_eq!(
        kvp.get(Pool::Guest, "app.backup.state".into())
            .await
            .expect("get"),
        Some(Value::Text("released".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_hold_vetoes_when_it_cannot_reach_the_application() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let run = scratch.path("run");
    std::fs::create_dir(&run).expect("mkdir");
    let mut m = manifest(
        "flush-hold",
        "flush-hold",
        &[World::FreezeHook],
        &["app.backup.*"],
    );
    // Read-only: the hold file cannot be written.
    m.dirs.push(DirGrant {
        host: run.clone(),
        guest: "/run/app".into(),
        access: Access::ReadOnly,
    });
    host.load(&[m]).await.expect("load");
    let ctx = FreezeContext {
        backup_id: "b-43".into(),
        mounts: vec!["/".into()],
        deadline: Instant::now() + Duration::from_secs(5),
    };
    let PreFreeze::Veto { plugin, reason } = host.pre_freeze(&ctx).await else {
        panic!("expected a veto");
    };
    assert_eq!(plugin, "flush-hold");
    assert!(
        reason.contains("cannot ask the application to hold"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_echo_serves_a_unix_socket_pair() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    kvp.set(Pool::Guest, "a".into(), Value::U32(1))
        .await
        .expect("set");
    kvp.set(Pool::Guest, "b".into(), Value::U32(2))
        .await
        .expect("set");
    let mut m = manifest(
        "status-echo",
        "status-echo",
        &[World::HvsockService],
        &["*"],
    );
    m.kvp[0].access = Access::ReadOnly;
    m.hvsock.listen = vec!["status".into()];
    host.load(&[m]).await.expect("load");
    assert_eq!(
        host.hvsock_services(),
        vec![("status".to_string(), "status-echo".to_string())]
    );
    let (client, server) = tokio::net::UnixStream::pair().expect("socketpair");
    let (r, w) = server.into_split();
    let serve = host.serve_hvsock("status", Box::pin(r), Box::pin(w));
    let talk = async move {
        let (r, mut w) = client.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"hello\nstatus\n").await.expect("write");
        let echo = lines.next_line().await.expect("read").expect("line");
        let status = lines.next_line().await.expect("read").expect("line");
        w.write_all(b"quit\n").await.expect("write");
        (echo, status)
    };
    let (served, (echo, status)) = tokio::join!(serve, talk);
    served.expect("served");
    assert_eq!(echo, "hello");
    assert_eq!(status, "ok 2 keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_freeze_policy_orders_mounts_and_its_bad_plans_are_refusals() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    host.load(&[manifest(
        "policy",
        "misbehave",
        &[World::FreezePolicy],
        &["x"],
    )])
    .await
    .expect("load");
    let mount = |p: &str| Mount {
        path: p.into(),
        fs_type: "ext4".into(),
        device: "/dev/sda1".into(),
    };
    assert_eq!(
        host.freeze_plan(&[mount("/"), mount("/var")]).await,
        FreezePlan::Freeze {
            plugin: "policy".into(),
            order: vec!["/var".into(), "/".into()]
        }
    );
    assert_eq!(
        host.freeze_plan(&[mount("/refuse")]).await,
        FreezePlan::Refuse {
            plugin: "policy".into(),
            reason: "misbehave refuses".into()
        }
    );
    let FreezePlan::Refuse { reason, .. } = host.freeze_plan(&[mount("/bogus")]).await else {
        panic!("a plan naming an unknown mount must be refused");
    };
    assert!(reason.contains("/not-offered"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reenables_a_disabled_plugin_and_keeps_unchanged_ones() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let good = neighbour(&scratch.path("app"));
    let mut bad = manifest(
        "misbehave",
        "misbehave",
        &[World::KvpProvider],
        &["trap", "ok"],
    );
    bad.limits.max_consecutive_traps = 1;
    host.load(&[good.clone(), bad.clone()]).await.expect("load");
    assert_neighbour_answers(&host).await;
    let _ = host.provider_get("misbehave", Pool::Guest, "trap").await;
    let st = host.status();
    assert_eq!(
        st.iter().find(|s| s.name == "misbehave").map(|s| s.state),
        Some(PluginState::Disabled)
    );
    let good_calls = st.iter().find(|s| s.name == "app-version").map(|s| s.calls);

    let s = host.reload(&[good, bad]).await.expect("reload");
    assert!(s.refused.is_empty());
    let st = host.status();
    assert_eq!(
        st.iter().find(|s| s.name == "misbehave").map(|s| s.state),
        Some(PluginState::Running)
    );
    // The unchanged plugin kept its instance and counters.
    assert_eq!(
        st.iter().find(|s| s.name == "app-version").map(|s| s.calls),
        good_calls
    );
    assert_eq!(
        host.provider_get("misbehave", Pool::Guest, "ok")
            .await
            .expect("ok"),
        Value::Text("fine".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_during_reload_completes() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut slow = manifest("misbehave", "misbehave", &[World::HvsockService], &["x"]);
    slow.hvsock.listen = vec!["echo".into()];
    host.load(&[slow, neighbour(&scratch.path("app"))])
        .await
        .expect("load");
    let host = Arc::new(host);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ours, theirs) = tokio::io::duplex(64);
    let (r, w) = tokio::io::split(theirs);
    let h = host.clone();
    let conn = tokio::spawn(async move { h.serve_hvsock("echo", Box::pin(r), Box::pin(w)).await });
    ours.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 3];
    ours.read_exact(&mut buf).await.expect("read");
    // Reload to a config without the echo plugin while the connection is open.
    host.reload(&[neighbour(&scratch.path("app"))])
        .await
        .expect("reload");
    assert!(host.hvsock_services().is_empty());
    ours.write_all(b"two").await.expect("write");
    ours.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"two");
    drop(ours);
    conn.await.expect("join").expect("served");
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_manifest_fails_the_load_with_plugin_field_and_fix() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut m = neighbour(&scratch.path("app"));
    m.limits.call_deadline_ms = 0;
    let e = host.load(&[m]).await.expect_err("invalid");
    let text = e.to_string();
    assert!(
        text.contains("plugin `app-version`: field `limits.call_deadline_ms`")
            && text.contains("fix:"),
        "{text}"
    );
    assert!(host.status().is_empty(), "nothing loaded");
}

/// A connector whose only service, `upstream`, answers `pong` to `ping`.
struct Upstream;

impl hvisd_plugin_host::HvsockConnector for Upstream {
    fn connect(&self, service: &str) -> hvisd_plugin_host::ConnectFuture<'_> {
        let service = service.to_owned();
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            if service != "upstream" {
                return Err(hvisd_plugin_host::KvpError::NotFound(service));
            }
            let (mut peer, ours) = tokio::io::duplex(64);
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if peer.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = peer.write_all(b"pong").await;
                }
            });
            let (r, w) = tokio::io::split(ours);
            Ok((
                Box::pin(r) as hvisd_plugin_host::BoxedReader,
                Box::pin(w) as hvisd_plugin_host::BoxedWriter,
            ))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hvsock_connect_reaches_granted_services_only() {
    let host = PluginHost::new(
        shared_cache(),
        HostServices {
            kvp: Arc::new(MemoryKvpStore::default()),
            hvsock: Some(Arc::new(Upstream)),
        },
    )
    .expect("host");
    let mut m = manifest(
        "misbehave",
        "misbehave",
        &[World::KvpProvider],
        &["connect-granted", "connect-other"],
    );
    m.hvsock.connect = vec!["upstream".into()];
    host.load(&[m]).await.expect("load");
    let get = |k: &'static str| host.provider_get("misbehave", Pool::Guest, k);
    assert_eq!(
        get("connect-granted").await.expect("granted"),
        Value::Text("got: pong".into())
    );
    let Value::Text(other) = get("connect-other").await.expect("other") else {
        panic!("text expected");
    };
    assert!(
        other.starts_with("blocked: ")
            && other.contains("Denied")
            && other.contains("hvsock.connect"),
        "{other}"
    );
}
