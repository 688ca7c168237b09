//! Property tests of the operation core against hostile daemon-protocol messages: any 7432 bytes
//! are answered without a panic, and a random sequence of well-formed SET/DELETE requests leaves
//! the pool equal to a simple model (one record per key, first-set order).

mod common;

use hvisd_protocol::kvp::Pool;
use hvisd_protocol::kvp_daemon::{self as dm, DAEMON_MSG_SIZE};
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_message_is_answered_without_panicking(
        op in prop_oneof![0u8..6, any::<u8>()],
        pool in prop_oneof![0u8..5, any::<u8>()],
        noise in proptest::collection::vec(any::<u8>(), 0..64),
        sizes in (any::<u32>(), any::<u32>(), any::<u32>()),
    ) {
        // GET/SET_IP_INFO run helper commands; the sysfs walk is real but harmless, SET_IP_INFO
        // writes only into the temp dir and finds no adapter.
        let d = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let core = common::core_in(d.path());
            let mut msg = dm::zeroed();
            msg[0] = op;
            msg[1] = pool;
            for (i, b) in noise.iter().enumerate() {
                msg[(i * 113) % DAEMON_MSG_SIZE] = *b;
            }
            msg[0] = op;
            msg[1] = pool;
            for (off, v) in [(4usize, sizes.0), (8, sizes.1), (12, sizes.2)] {
                msg[off..off + 4].copy_from_slice(&v.to_le_bytes());
            }
            let out = core.execute(&mut msg).await;
            prop_assert_eq!(dm::error(&msg[..]), out.status);
            Ok(())
        })?;
    }

    #[test]
    fn set_and_delete_sequences_match_a_model(ops in proptest::collection::vec((any::<bool>(), 0u8..6, 0u8..4), 1..40)) {
        let d = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let core = common::core_in(d.path());
            let mut model: Vec<(String, String)> = Vec::new();
            for (is_set, k, v) in ops {
                let key = format!("key{k}");
                let value = format!("value{v}");
                let mut msg = if is_set {
                    dm::build_set(Pool::Guest as u8, key.as_bytes(), value.as_bytes())
                } else {
                    dm::build_delete(Pool::Guest as u8, key.as_bytes())
                };
                let status = core.execute(&mut msg).await.status;
                let pos = model.iter().position(|(mk, _)| *mk == key);
                match (is_set, pos) {
                    (true, Some(i)) => model[i].1 = value,
                    (true, None) => model.push((key, value)),
                    (false, Some(i)) => { model.remove(i); }
                    (false, None) => prop_assert_ne!(status, 0),
                }
            }
            let store = core.store();
            let listed = store.list(Pool::Guest).await.unwrap();
            prop_assert_eq!(listed, model);
            Ok(())
        })?;
    }
}
