//! The warnings a provider's dropped keys leave in the log: each names the
//! plugin and the key, escaped. Alone in its test binary, because it captures
//! the log (see `common::Lines`).

mod common;

use common::*;
use hvisd_plugin_host::MAX_KEY_LEN;

// current_thread: the log capture is this thread's, and every plugin call runs on it.
#[tokio::test(flavor = "current_thread")]
async fn every_dropped_provider_key_is_named_escaped_in_a_warning_tagged_with_the_plugin() {
    let lines = Lines::default();
    let _guard = lines.capture(tracing::Level::WARN);
    let scratch = Scratch::new();
    let (host, kvp) = host(&scratch);
    describe_mode(&kvp, "bad-keys").await;
    host.load(&[bad_keys_provider("misbehave")])
        .await
        .expect("load");
    let too_long = format!("bad.{}", "x".repeat(MAX_KEY_LEN - 3));
    let log = lines.text();
    for needle in [
        "KVP provider key `` in pool guest dropped: the key is empty".to_string(),
        "KVP provider key `bad.nul\\u{0}key` in pool guest dropped: the key contains NUL".into(),
        // Cut after 64 characters.
        format!(
            "KVP provider key `{}...` in pool guest dropped: the key is 512 bytes, limit 511",
            &too_long[..64]
        ),
        "KVP provider key `ungranted\\u{1b}[31m\\u{e9}` in pool guest dropped: the manifest grants no access to it".into(),
        "KVP provider key `bad.ok` in pool external dropped".into(),
        "KVP provider claims 5009 keys; only the first 4096 are considered".into(),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("`{needle}` missing from the log:\n{log}"));
        assert!(line.contains("plugin=\"misbehave\""), "untagged: {line}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "a raw control character reached the log"
    );
}
