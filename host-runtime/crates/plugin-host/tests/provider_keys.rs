//! The keys KVP providers own, and reloads that are all or nothing, with the
//! real `misbehave` component claiming every kind of key hvisd must drop.

mod common;

use common::*;
use hvisd_plugin_host::manifest::{Access, KvpGrant};
use hvisd_plugin_host::{
    CallError, KvpError, MAX_KEY_LEN, MAX_OWNED_KEYS, PluginHost, Pool, ProviderKeys, Value,
};

fn keys_of<'a>(all: &'a [ProviderKeys], plugin: &str) -> Vec<(Pool, &'a str)> {
    all.iter()
        .find(|p| p.plugin == plugin)
        .unwrap_or_else(|| panic!("no provider `{plugin}` in {all:?}"))
        .keys
        .iter()
        .map(|k| (k.pool, k.key.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_claiming_bad_keys_loads_and_owns_only_the_keys_it_may() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    describe_mode(&kvp, "bad-keys").await;
    let summary = host
        .load(&[
            neighbour(&scratch.path("app")),
            bad_keys_provider("misbehave"),
        ])
        .await
        .expect("one provider's bad keys never fail the load");
    assert!(summary.refused.is_empty(), "{:?}", summary.refused);

    let all = host.provider_keys();
    let owned = keys_of(&all, "misbehave");
    let longest = format!("bad.{}", "y".repeat(MAX_KEY_LEN - 4));
    let too_long = format!("bad.{}", "x".repeat(MAX_KEY_LEN - 3));
    for kept in ["bad.ok", "bad.shared", "bad.many.0", longest.as_str()] {
        assert!(owned.contains(&(Pool::Guest, kept)), "`{kept}` was dropped");
    }
    assert_eq!(
        owned.iter().filter(|(_, k)| *k == "bad.ok").count(),
        1,
        "claimed twice, owned once"
    );
    for dropped in [
        "",
        "bad.nul\0key",
        too_long.as_str(),
        "ungranted\u{1b}[31m\u{e9}",
    ] {
        assert!(
            !owned.iter().any(|(_, k)| *k == dropped),
            "`{}` was kept",
            dropped.escape_default()
        );
    }
    assert!(
        owned.iter().all(|(pool, _)| *pool == Pool::Guest),
        "no grant outside the guest pool: {owned:?}"
    );
    // The plugin claims 5009 keys: only the first MAX_OWNED_KEYS are considered.
    assert!(owned.len() <= MAX_OWNED_KEYS);
    assert!(!owned.contains(&(Pool::Guest, "bad.many.4999")));
    // A dropped key is not asked for: the 512-byte key cannot be cut into someone's grant.
    let e = host
        .provider_get("misbehave", Pool::Guest, &too_long)
        .await
        .expect_err("not owned");
    assert!(
        matches!(&e, CallError::Plugin(KvpError::NotFound(m)) if m.contains("does not own")),
        "{e:?}"
    );
    assert_neighbour_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_two_providers_claim_stays_with_the_first_by_name_whatever_the_config_order() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    describe_mode(&kvp, "bad-keys").await;
    let alpha = bad_keys_provider("alpha");
    let mut zeta = bad_keys_provider("zeta");
    // Only zeta may own `bad.ok` in the external pool.
    zeta.kvp.push(KvpGrant {
        pool: Pool::External,
        keys: vec!["bad.*".into()],
        access: Access::ReadOnly,
    });
    for order in [[zeta.clone(), alpha.clone()], [alpha.clone(), zeta.clone()]] {
        host.reload(&order).await.expect("load");
        let all = host.provider_keys();
        assert_eq!(
            all.iter().map(|p| p.plugin.as_str()).collect::<Vec<_>>(),
            ["alpha", "zeta"]
        );
        let alpha_keys = keys_of(&all, "alpha");
        assert!(alpha_keys.contains(&(Pool::Guest, "bad.shared")));
        assert_eq!(keys_of(&all, "zeta"), [(Pool::External, "bad.ok")]);
        let e = host
            .provider_get("zeta", Pool::Guest, "bad.shared")
            .await
            .expect_err("alpha owns it");
        assert!(e.to_string().contains("does not own"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_after_a_recycle_does_not_change_the_keys_owned() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    let mut m = bad_keys_provider("misbehave");
    m.limits.recycle_after_calls = 1;
    host.load(&[m]).await.expect("load");
    let before = host.provider_keys();
    assert_eq!(keys_of(&before, "misbehave"), [(Pool::Guest, "ok")]);
    describe_mode(&kvp, "bad-keys").await;
    for _ in 0..3 {
        let v = host
            .provider_get("misbehave", Pool::Guest, "ok")
            .await
            .expect("ok");
        assert_eq!(v, Value::Text("fine".into()));
    }
    assert!(host.status()[0].instantiations >= 3, "recycled");
    assert_eq!(host.provider_keys(), before);
}

/// The neighbour's status line: calls and instantiations tell whether it was swapped.
fn neighbour_counters(host: &PluginHost) -> Option<(u64, u64)> {
    host.status()
        .iter()
        .find(|s| s.name == "app-version")
        .map(|s| (s.calls, s.instantiations))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_set_serves_its_providers_but_changes_nothing_until_committed() {
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    describe_mode(&kvp, "bad-keys").await;
    let app = neighbour(&scratch.path("app"));
    host.load(std::slice::from_ref(&app)).await.expect("load");
    assert_neighbour_answers(&host).await;
    let running = host.provider_keys();
    let counters = neighbour_counters(&host);

    let next = [app.clone(), bad_keys_provider("misbehave")];
    let prepared = host.prepare(&next).await.expect("prepare");
    assert_eq!(prepared.summary().loaded, ["app-version", "misbehave"]);
    let names: Vec<&str> = prepared.providers().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["app-version", "misbehave"]);
    // What the runtime builds its key map from answers already, from the new set...
    let v = prepared.providers()[0]
        .get(Pool::Guest, "app.version")
        .await
        .expect("the prepared provider answers");
    assert_eq!(v, Value::Text("4.2.0".into()));
    // ... while the set in force is untouched.
    assert_eq!(host.provider_keys(), running);
    assert_eq!(host.status().len(), 1);
    drop(prepared);
    assert_eq!(host.provider_keys(), running);
    assert!(matches!(
        host.provider_get("misbehave", Pool::Guest, "bad.ok").await,
        Err(CallError::NoSuchPlugin(_))
    ));

    let prepared = host.prepare(&next).await.expect("prepare");
    let summary = host.commit(prepared);
    assert!(summary.refused.is_empty(), "{:?}", summary.refused);
    assert_eq!(host.status().len(), 2);
    assert_eq!(host.provider_keys().len(), 2);
    // The unchanged neighbour was carried over, instance and counters.
    let (calls, instantiations) = neighbour_counters(&host).expect("neighbour");
    let (calls_before, instantiations_before) = counters.expect("neighbour");
    assert_eq!(instantiations, instantiations_before);
    assert_eq!(calls, calls_before + 1, "the call through the prepared set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_an_invalid_manifest_changes_nothing() {
    let scratch = Scratch::new();
    let (host, _) = host(&scratch);
    let app = neighbour(&scratch.path("app"));
    host.load(std::slice::from_ref(&app)).await.expect("load");
    let running = host.provider_keys();
    let mut broken = bad_keys_provider("misbehave");
    broken.kvp[0].keys.push("k".repeat(MAX_KEY_LEN + 1));
    let e = host
        .reload(&[broken])
        .await
        .expect_err("a 512-byte pattern is refused");
    assert!(e.to_string().contains("is 512 bytes, limit 511"), "{e}");
    assert_eq!(host.provider_keys(), running);
    assert_eq!(host.status().len(), 1);
    assert_neighbour_answers(&host).await;
}
