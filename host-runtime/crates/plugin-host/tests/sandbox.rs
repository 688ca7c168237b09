//! Every sandbox limit, exercised by a real misbehaving component beside a
//! well-behaved one: the bad plugin must be stopped and the good one must
//! keep answering.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hvisd_plugin_host::manifest::{Access, DirGrant, World};
use hvisd_plugin_host::{CallError, KvpStore, PluginState, Pool, Value};

fn misbehave(scratch: &Scratch) -> hvisd_plugin_host::PluginManifest {
    let mut m = manifest("misbehave", "misbehave", &[World::KvpProvider], &[]);
    // Only the guest pool keys the plugin owns, not `stolen`.
    m.kvp[0].keys = vec![
        "ok",
        "spin",
        "alloc",
        "recurse",
        "recurse-native",
        "trap",
        "read-granted",
        "write-ro",
        "dotdot",
        "absolute",
        "symlink",
        "undeclared",
        "env",
        "kvp-steal",
        "print",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    m.dirs.push(DirGrant {
        host: scratch.path("data"),
        guest: "/data".into(),
        access: Access::ReadOnly,
    });
    m.limits.max_consecutive_traps = 100;
    m
}

async fn setup(scratch: &Scratch) -> hvisd_plugin_host::PluginHost {
    let (host, _) = host(scratch);
    let s = host
        .load(&[neighbour(&scratch.path("app")), misbehave(scratch)])
        .await
        .expect("load");
    assert!(s.refused.is_empty(), "refused: {:?}", s.refused);
    host
}

async fn get(host: &hvisd_plugin_host::PluginHost, key: &str) -> Result<Value, CallError> {
    host.provider_get("misbehave", Pool::Guest, key).await
}

fn text(v: Value) -> String {
    match v {
        Value::Text(s) => s,
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_stopped_at_the_call_deadline_and_the_neighbour_keeps_answering() {
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    assert_eq!(text(get(&host, "ok").await.expect("ok")), "fine");
    let t = Instant::now();
    let e = get(&host, "spin").await.expect_err("spin must be stopped");
    let took = t.elapsed();
    assert!(
        matches!(
            e,
            CallError::Deadline {
                deadline_ms: 50,
                ..
            }
        ),
        "got {e:?}"
    );
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert_neighbour_answers(&host).await;
    // The instance was replaced; the plugin itself still serves.
    assert_eq!(text(get(&host, "ok").await.expect("ok after spin")), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_stands_still_while_idle_and_a_spinning_call_is_still_stopped_at_its_deadline() {
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    // The ticker lingers for 100 ticks after the load's last call, then parks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = host.epoch_ticks();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        host.epoch_ticks(),
        idle,
        "the epoch ticker ran with no call in flight"
    );
    let t = Instant::now();
    let e = get(&host, "spin").await.expect_err("spin must be stopped");
    assert!(
        matches!(
            e,
            CallError::Deadline {
                deadline_ms: 50,
                ..
            }
        ),
        "got {e:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // The epoch deadline (51 ticks of 1 ms) is what stopped it.
    assert!(
        host.epoch_ticks() >= idle + 50,
        "{}",
        host.epoch_ticks() - idle
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = host.epoch_ticks();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        host.epoch_ticks(),
        after,
        "the ticker kept running after the call"
    );
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_fails_at_the_memory_cap_and_the_neighbour_keeps_answering() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut bad = misbehave(&scratch);
    // Generous time, so only the memory cap can stop it.
    bad.limits.call_deadline_ms = 10_000;
    bad.limits.memory_mib = 8;
    host.load(&[neighbour(&scratch.path("app")), bad])
        .await
        .expect("load");
    let e = get(&host, "alloc").await.expect_err("alloc must fail");
    let CallError::Trap { message, .. } = &e else {
        panic!("expected a trap, got {e:?}");
    };
    assert!(
        message.contains("growing memory to") && message.contains("bytes"),
        "trap message: {message}"
    );
    assert_neighbour_answers(&host).await;
    assert_eq!(
        text(get(&host, "ok").await.expect("ok after alloc")),
        "fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps_on_the_stack_limit_and_the_neighbour_keeps_answering() {
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    // On the engine's stack: stopped by the wasm stack cap.
    let e = get(&host, "recurse-native")
        .await
        .expect_err("recursion must trap");
    let CallError::Trap { message, .. } = &e else {
        panic!("expected a trap, got {e:?}");
    };
    assert!(
        message.contains("stack overflow"),
        "trap message: {message}"
    );
    assert_neighbour_answers(&host).await;
    // With frames in linear memory: Rust's shadow stack runs off the bottom of
    // the plugin's own memory first, which the engine also stops.
    let e = get(&host, "recurse")
        .await
        .expect_err("recursion must trap");
    let CallError::Trap { message, .. } = &e else {
        panic!("expected a trap, got {e:?}");
    };
    assert!(
        message.contains("stack overflow") || message.contains("out of bounds memory access"),
        "trap message: {message}"
    );
    assert_neighbour_answers(&host).await;
    assert_eq!(
        text(get(&host, "ok").await.expect("ok after recursion")),
        "fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_traps_repeatedly_is_disabled_with_a_status_entry() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut bad = misbehave(&scratch);
    bad.limits.max_consecutive_traps = 3;
    host.load(&[neighbour(&scratch.path("app")), bad])
        .await
        .expect("load");
    for _ in 0..3 {
        let e = get(&host, "trap").await.expect_err("trap");
        assert!(matches!(e, CallError::Trap { .. }), "got {e:?}");
        assert_neighbour_answers(&host).await;
    }
    let e = get(&host, "ok").await.expect_err("disabled");
    assert!(matches!(e, CallError::Disabled { .. }), "got {e:?}");
    let status = host.status();
    let bad = status
        .iter()
        .find(|s| s.name == "misbehave")
        .expect("status entry");
    assert_eq!(bad.state, PluginState::Disabled);
    assert_eq!(bad.traps, 3);
    assert!(
        bad.reason
            .as_deref()
            .unwrap_or("")
            .contains("3 calls in a row"),
        "{bad:?}"
    );
    let good = status
        .iter()
        .find(|s| s.name == "app-version")
        .expect("neighbour status");
    assert_eq!(good.state, PluginState::Running);
    // The disabled plugin no longer advertises keys.
    assert!(host.provider_keys().iter().all(|k| k.plugin != "misbehave"));
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_escapes_through_dotdot_absolute_symlink_and_undeclared_paths_are_blocked() {
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    // The grant itself works, so the blocks below are not an accident.
    assert_eq!(
        text(get(&host, "read-granted").await.expect("read")),
        "ESCAPED: hello from the grant"
    );
    for key in ["dotdot", "absolute", "symlink", "undeclared", "write-ro"] {
        let answer = text(get(&host, key).await.expect(key));
        assert!(
            answer.starts_with("blocked: "),
            "escape through `{key}` was not blocked: {answer}"
        );
    }
    assert!(!scratch.path("data/new.txt").exists());
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_empty() {
    // SAFETY of the test: the variable only needs to exist in this process.
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    assert!(std::env::vars().count() > 0);
    assert_eq!(text(get(&host, "env").await.expect("env")), "[]");
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvp_writes_outside_the_grant_are_denied() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    host.load(&[neighbour(&scratch.path("app")), misbehave(&scratch)])
        .await
        .expect("load");
    let answer = text(get(&host, "kvp-steal").await.expect("kvp-steal"));
    assert!(
        answer.starts_with("blocked: ") && answer.contains("Denied") && answer.contains("stolen"),
        "{answer}"
    );
    assert_eq!(
        kvp.get(Pool::Guest, "stolen".into()).await.expect("get"),
        None
    );
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_importing_sockets_is_refused_at_load_and_the_others_load() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let s = host
        .load(&[
            neighbour(&scratch.path("app")),
            manifest("net", "uses-sockets", &[World::KvpProvider], &["net"]),
        ])
        .await
        .expect("load");
    assert_eq!(s.loaded, vec!["app-version".to_string()]);
    let (name, why) = &s.refused[0];
    assert_eq!(name, "net");
    assert!(why.contains("wasi:sockets"), "{why}");
    let st = host.status();
    let net = st.iter().find(|s| s.name == "net").expect("status");
    assert_eq!(net.state, PluginState::Refused);
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_not_matching_its_claimed_world_is_refused_at_load() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let s = host
        .load(&[
            neighbour(&scratch.path("app")),
            manifest("liar", "app-version", &[World::FreezeHook], &["app.*"]),
        ])
        .await
        .expect("load");
    let (name, why) = &s.refused[0];
    assert_eq!(name, "liar");
    assert!(
        why.contains("claims world `freeze-hook`") && why.contains("freeze-hooks"),
        "{why}"
    );
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_pre_freeze_hook_is_a_veto_and_post_thaw_still_runs_for_every_hook() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    let mut hook = manifest(
        "misbehave",
        "misbehave",
        &[World::FreezeHook],
        &["misbehave.*"],
    );
    hook.limits.max_consecutive_traps = 100;
    host.load(&[neighbour(&scratch.path("app")), hook])
        .await
        .expect("load");
    let ctx = |id: &str| hvisd_plugin_host::FreezeContext {
        backup_id: id.into(),
        mounts: vec!["/".into()],
        deadline: Instant::now() + Duration::from_secs(5),
    };
    let t = Instant::now();
    let r = host.pre_freeze(&ctx("spin")).await;
    assert!(t.elapsed() < Duration::from_secs(1));
    let hvisd_plugin_host::PreFreeze::Veto { plugin, reason } = r else {
        panic!("a spinning hook must veto, got {r:?}");
    };
    assert_eq!(plugin, "misbehave");
    assert!(reason.contains("deadline"), "{reason}");
    assert_neighbour_answers(&host).await;
    let errs = host
        .post_thaw(&ctx("after"), hvisd_plugin_host::FreezeOutcome::Vetoed)
        .await;
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(
        kvp.get(Pool::Guest, "misbehave.thawed".into())
            .await
            .expect("get"),
        Some(Value::Text("after Vetoed pre-freeze-saw=nothing".into()))
    );
    assert_eq!(
        host.pre_freeze(&ctx("veto")).await,
        hvisd_plugin_host::PreFreeze::Veto {
            plugin: "misbehave".into(),
            reason: "misbehave vetoes".into()
        }
    );
    assert_eq!(
        host.pre_freeze(&ctx("fine")).await,
        hvisd_plugin_host::PreFreeze::Proceed
    );
    // The hook's post-thaw of the same backup runs on the instance its pre-freeze left: what it
    // kept in memory is still there.
    let errs = host
        .post_thaw(&ctx("fine"), hvisd_plugin_host::FreezeOutcome::Thawed)
        .await;
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(
        kvp.get(Pool::Guest, "misbehave.thawed".into())
            .await
            .expect("get"),
        Some(Value::Text("fine Thawed pre-freeze-saw=fine".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_hvsock_service_is_stopped_and_an_echo_connection_still_works() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let mut svc = manifest("misbehave", "misbehave", &[World::HvsockService], &["x"]);
    svc.hvsock.listen = vec!["spin".into(), "echo".into()];
    svc.limits.connection_deadline_ms = 200;
    svc.limits.max_consecutive_traps = 100;
    host.load(&[neighbour(&scratch.path("app")), svc])
        .await
        .expect("load");
    let (_ours, theirs) = tokio::io::duplex(1024);
    let (r, w) = tokio::io::split(theirs);
    let e = host
        .serve_hvsock("spin", Box::pin(r), Box::pin(w))
        .await
        .expect_err("spin");
    assert!(matches!(e, CallError::Deadline { .. }), "{e:?}");
    assert_neighbour_answers(&host).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ours, theirs) = tokio::io::duplex(1024);
    let (r, w) = tokio::io::split(theirs);
    let serve = host.serve_hvsock("echo", Box::pin(r), Box::pin(w));
    let client = async {
        ours.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        ours.read_exact(&mut buf).await.expect("read");
        drop(ours);
        buf
    };
    let (served, echoed) = tokio::join!(serve, client);
    assert_eq!(&echoed, b"ping");
    served.expect("echo connection ends cleanly");
}

#[tokio::test(flavor = "current_thread")]
async fn stdout_stderr_and_logging_reach_tracing_tagged_with_the_plugin() {
    let lines = Lines::default();
    let _guard = lines.capture(tracing::Level::INFO);
    let scratch = Scratch::new();
    let host = setup(&scratch).await;
    assert_eq!(text(get(&host, "print").await.expect("print")), "printed");
    let out = lines.text();
    for needle in ["to stdout", "to stderr", "through the logging import"] {
        let line = out
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("`{needle}` missing from the log:\n{out}"));
        assert!(line.contains("plugin=\"misbehave\""), "untagged: {line}");
    }
}
