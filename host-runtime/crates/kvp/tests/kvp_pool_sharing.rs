//! The Guest pool shared with other writers: cloud-init-style appenders (separate processes using
//! `open(O_APPEND)` + `flock`) during a storm of host SETs lose nothing, and `kill -9` in the
//! middle of hvisd's rewrites always leaves a complete pool.
//!
//! The other processes are this test binary re-run with `HVISD_KVP_TEST_ROLE` set, entering the
//! ignored `child_role` test.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hvisd_kvp::pool::RECORD_SIZE;
use hvisd_kvp::{PoolStore, StoreOptions};
use hvisd_protocol::kvp::Pool;
use hvisd_protocol::kvp_daemon as dm;
use rustix::fs::FlockOperation;

const ROLE: &str = "HVISD_KVP_TEST_ROLE";

fn spawn_child(role: &str, path: &Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env("HVISD_KVP_TEST_PATH", path)
        .env("HVISD_KVP_TEST_ARG", arg)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Entry point of the helper processes (run only by the tests below).
#[test]
#[ignore = "helper process entry point, started by the other tests"]
fn child_role() {
    let path = PathBuf::from(std::env::var("HVISD_KVP_TEST_PATH").unwrap());
    let arg = std::env::var("HVISD_KVP_TEST_ARG").unwrap();
    match std::env::var(ROLE).unwrap().as_str() {
        // What cloud-init's HyperVKvpReportingHandler does for each event.
        "appender" => {
            for i in 0..200 {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .unwrap();
                rustix::fs::flock(&f, FlockOperation::LockExclusive).unwrap();
                f.write_all(&common::record(&format!("{arg}-{i}"), "cloud-init report"))
                    .unwrap();
                rustix::fs::flock(&f, FlockOperation::Unlock).unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        // Rewrites the pool forever with values that are internally consistent.
        "rewriter" => {
            let mut store = PoolStore::open(&path, StoreOptions::default()).unwrap();
            for generation in 0u64.. {
                let key = format!("key{:03}", generation % 200);
                let value = format!("gen{generation:012}-").repeat(100);
                store.set(Pool::Guest, &key, &value).unwrap();
            }
        }
        other => panic!("unknown role {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_appends_during_a_storm_of_host_sets_are_all_kept() {
    let d = tempfile::tempdir().unwrap();
    let core = common::core_in(d.path());
    let pool_path = d.path().join("pools/.kvp_pool_1");
    let children: Vec<Child> = (0..2)
        .map(|n| spawn_child("appender", &pool_path, &format!("ci{n}")))
        .collect();
    let start = Instant::now();
    let mut sets = 0;
    // Host SETs (in-place record writes) while the appenders run, then until they finish.
    let mut children = children;
    loop {
        let mut msg = dm::build_set(1, format!("host-{sets}").as_bytes(), b"from the host");
        assert_eq!(core.execute(&mut msg).await.status, 0);
        sets += 1;
        if sets % 20 == 0 {
            let mut msg = dm::build_enumerate(1, 0);
            core.execute(&mut msg).await;
        }
        if children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) && sets >= 300 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "appenders did not finish"
        );
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    // The pool file is written in place (never replaced), so every append is in it at once; the
    // loop only tolerates a slow machine.
    let expected = 400 + sets;
    let mut keys = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        keys.clear();
        for index in 0.. {
            let mut msg = dm::build_enumerate(1, index);
            if core.execute(&mut msg).await.status != 0 {
                break;
            }
            keys.push(String::from_utf8(dm::enumerate_key(&msg[..]).to_vec()).unwrap());
        }
        if keys.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..2 {
        for i in 0..200 {
            let k = format!("ci{n}-{i}");
            assert_eq!(
                keys.iter().filter(|x| **x == k).count(),
                1,
                "{k} must be in the pool exactly once"
            );
        }
    }
    for i in 0..sets {
        assert!(keys.contains(&format!("host-{i}")), "host-{i} lost");
    }
    assert_eq!(keys.len(), 400 + sets);
    assert_eq!(
        std::fs::metadata(&pool_path).unwrap().len() as usize,
        keys.len() * RECORD_SIZE
    );
}

#[test]
fn kill_9_during_rewrites_always_leaves_a_complete_pool() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pools");
    {
        let mut s = PoolStore::open(&dir, StoreOptions::default()).unwrap();
        for i in 0..200 {
            s.set(Pool::Guest, &format!("key{i:03}"), "initial")
                .unwrap();
        }
    }
    let pool = dir.join(".kvp_pool_1");
    for round in 0..6 {
        let mut child = spawn_child("rewriter", &dir, "");
        // Let it get going, then kill it at an arbitrary point of its rewrite loop.
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let bytes = std::fs::read(&pool).unwrap();
        assert_eq!(
            bytes.len(),
            200 * RECORD_SIZE,
            "round {round}: pool must hold all 200 records"
        );
        let mut s = PoolStore::open(&dir, StoreOptions::default()).unwrap();
        let list = s.list(Pool::Guest).unwrap();
        assert_eq!(list.len(), 200);
        for (i, (k, v)) in list.iter().enumerate() {
            assert_eq!(k, &format!("key{i:03}"), "round {round}: order kept");
            let consistent = v == "initial" || (v.len() == 1600 && v == &v[..16].repeat(100));
            assert!(
                consistent,
                "round {round}: torn value for {k}: {}",
                &v[..v.len().min(40)]
            );
        }
    }
    // Leftover temporary files of the killed writers are gone after the last open.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("hvisd-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
