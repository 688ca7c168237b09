//! Plugins through their worker processes: the core's supervisor (`hvisd::plugins`, in this test
//! process) starts real `hvisd plugin-worker` processes, confined, and every sandbox limit is
//! exercised by the real misbehaving component beside a well-behaved one (`app-version`), which
//! must keep answering.
//!
//! The tests of this file run one at a time (they count this process's descriptors and read its
//! log), each with its own pools, cache and plugin names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hvisd::config::Config;
use hvisd::plugins::{PluginState, Plugins};
use hvisd::services::Services;
use hvisd_e2e::hvisd_bin;
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use hvisd_plugin_host::manifest::{Access, DirGrant, KvpGrant, Limits, PluginManifest, World};
use hvisd_protocol::kvp::{Pool, Value};
use hvisd_protocol::worker::Mount;

/// One test at a time (each test has its own runtime; this lock is runtime-agnostic).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// One component cache for every test of this file: each component is compiled once.
fn shared_cache() -> PathBuf {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| tempfile::tempdir().expect("cache dir"))
        .path()
        .join("cache")
}

fn built(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::collections::BTreeMap<String, PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_plugins(&plugins_workspace(), "release").expect("building plugins"))
        .get(name)
        .unwrap_or_else(|| panic!("plugin {name} not built"))
        .clone()
}

/// What the core logged (every test shares one subscriber; tests look for their own plugins).
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&log().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

fn grant(keys: &[&str]) -> KvpGrant {
    KvpGrant {
        pool: Pool::Guest,
        keys: keys.iter().map(|k| k.to_string()).collect(),
        access: Access::ReadWrite,
    }
}

fn manifest(name: &str, component: &str, keys: &[&str]) -> PluginManifest {
    PluginManifest {
        name: name.into(),
        path: built(component),
        worlds: vec![World::KvpProvider],
        priority: 100,
        limits: Limits::default(),
        kvp: vec![grant(keys)],
        dirs: Vec::new(),
        hvsock: Default::default(),
    }
}

/// A directory the worker user can read (grants are opened by the core, used by the worker).
fn readable_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A core with `app-version` (the neighbour) and `bad` (the `misbehave` component, granted the
/// keys it needs and a read-only `/data` with `hello.txt`).
struct Core {
    plugins: Arc<Plugins>,
    _services: Services,
    _dir: tempfile::TempDir,
}

impl Core {
    async fn start(bad: &str, tune: impl FnOnce(&mut PluginManifest)) -> Core {
        Self::start_with(bad, tune, |_| {}).await
    }

    async fn start_with(
        bad: &str,
        tune: impl FnOnce(&mut PluginManifest),
        before: impl FnOnce(&Services),
    ) -> Core {
        hvisd::plugins::worker::set_worker_binary(hvisd_bin());
        log();
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        readable_dir(&app);
        std::fs::write(app.join("VERSION"), "4.2.0\n").unwrap();
        std::fs::write(app.join("health"), "ok\n").unwrap();
        let data = dir.path().join("data");
        readable_dir(&data);
        std::fs::write(data.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret\n").unwrap();
        let pools = dir.path().join("pools");
        std::fs::create_dir_all(&pools).unwrap();

        let mut good = manifest("app-version", "app-version", &["app.*"]);
        good.dirs.push(DirGrant {
            host: app,
            guest: "/app".into(),
            access: Access::ReadOnly,
        });
        let mut bad_m = manifest(
            bad,
            "misbehave",
            &[
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
                "sleep",
                "poll-far",
                "fds",
                "near-deadline",
                "log-flood",
                "log-forged",
                "misbehave.*",
            ],
        );
        bad_m.dirs.push(DirGrant {
            host: data,
            guest: "/data".into(),
            access: Access::ReadOnly,
        });
        bad_m.limits.max_consecutive_traps = 100;
        tune(&mut bad_m);

        let mut config = Config::default();
        config.kvp.pool_dir = pools;
        config.plugins.cache_dir = shared_cache();
        config.plugin = vec![good, bad_m];
        let services = Services::new(config.clone()).expect("services");
        before(&services);
        let plugins = Plugins::start(&config, &services)
            .await
            .expect("plugins start")
            .expect("plugins configured");
        Core {
            plugins,
            _services: services,
            _dir: dir,
        }
    }

    /// Panics, with the core's log, unless both plugins loaded.
    async fn assert_loaded(&self) {
        for s in self.plugins.status().await {
            assert_ne!(s.state, PluginState::Refused, "{s:?}\n{}", log_text());
        }
    }

    async fn get(&self, plugin: &str, key: &str) -> Result<String, String> {
        self.plugins
            .provider_get(plugin, Pool::Guest, key)
            .await
            .map(Value::into_text)
    }

    /// The neighbour answers, promptly.
    async fn neighbour_answers(&self) {
        let t = Instant::now();
        assert_eq!(
            self.get("app-version", "app.version").await.as_deref(),
            Ok("4.2.0")
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    async fn state(&self, plugin: &str) -> hvisd::plugins::PluginStatus {
        self.plugins
            .status()
            .await
            .into_iter()
            .find(|s| s.name == plugin)
            .unwrap()
    }

    /// Calls `key` until it answers (a dead worker is restarted after a back-off).
    async fn get_eventually(&self, plugin: &str, key: &str) -> String {
        let start = Instant::now();
        loop {
            match self.get(plugin, key).await {
                Ok(v) => return v,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{plugin} {key}: {e}"),
            }
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_holds_through_the_worker() {
    let _serial = serial().await;
    let core = Core::start("bad-sandbox", |m| m.limits.call_deadline_ms = 200).await;
    core.assert_loaded().await;
    let bad = "bad-sandbox";
    core.neighbour_answers().await;
    assert_eq!(core.get(bad, "ok").await.as_deref(), Ok("fine"));

    let status = core.state(bad).await;
    assert_eq!(status.state, PluginState::Running);
    let pid = status.pid.expect("a worker runs");
    assert_ne!(
        pid,
        std::process::id(),
        "the plugin runs in another process"
    );
    if rustix::process::geteuid().is_root() {
        assert!(
            status.confinement.contains("uid 65534") || status.confinement.contains("uid "),
            "{}",
            status.confinement
        );
        assert!(
            status.confinement.contains("seccomp"),
            "{}",
            status.confinement
        );
        assert!(
            status.confinement.contains("network"),
            "{}",
            status.confinement
        );
    }

    // File-system escapes, the environment, keys outside the grant.
    assert_eq!(
        core.get(bad, "read-granted").await.as_deref(),
        Ok("ESCAPED: hello")
    );
    for key in [
        "write-ro",
        "dotdot",
        "absolute",
        "symlink",
        "undeclared",
        "kvp-steal",
    ] {
        let v = core.get(bad, key).await.expect(key);
        assert!(v.starts_with("blocked"), "{key}: {v}");
    }
    assert_eq!(core.get(bad, "env").await.as_deref(), Ok("[]"));

    // Spinning, memory, recursion, traps: each call fails, the plugin is not disabled
    // (max_consecutive_traps = 100), the neighbour answers.
    for key in ["spin", "alloc", "recurse", "recurse-native", "trap"] {
        let t = Instant::now();
        let e = core.get(bad, key).await.expect_err(key);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{key} took {:?}",
            t.elapsed()
        );
        assert!(e.contains(bad), "{key}: {e}");
        core.neighbour_answers().await;
        assert_eq!(core.get_eventually(bad, "ok").await, "fine", "after {key}");
    }
    // The spinning call was stopped by the worker's own epoch deadline or killed by the core's
    // wall clock: either way within the deadline plus the core's margin.
    let t = Instant::now();
    let _ = core.get(bad, "spin").await;
    assert!(
        t.elapsed() < Duration::from_millis(200 + 400),
        "{:?}",
        t.elapsed()
    );

    // The freeze entry points answer without plugins of those worlds.
    let round = core
        .plugins
        .pre_freeze("b", &["/".into()], Duration::from_secs(1))
        .await;
    assert!(round.veto.is_none() && round.hooks.is_empty(), "{round:?}");
    assert!(
        core.plugins
            .freeze_plan(&[Mount {
                path: "/".into(),
                fs_type: "ext4".into(),
                device: "/dev/vda".into()
            }])
            .await
            .is_none()
    );
    core.plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_parked_in_a_blocking_wasi_call_is_killed_at_its_deadline() {
    let _serial = serial().await;
    let bad = "bad-blocking";
    let core = Core::start(bad, |m| m.limits.call_deadline_ms = 200).await;
    core.assert_loaded().await;
    for key in ["sleep", "poll-far"] {
        let before = core.state(bad).await.pid.expect("a worker");
        let t = Instant::now();
        let e = core.get(bad, key).await.expect_err(key);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
            "{key}: answered after {took:?}: {e}"
        );
        assert!(e.contains("killed") || e.contains("deadline"), "{key}: {e}");
        core.neighbour_answers().await;
        // The next call works, in a fresh worker.
        assert_eq!(core.get_eventually(bad, "ok").await, "fine");
        let after = core.state(bad).await.pid.expect("a worker");
        assert_ne!(before, after, "{key}: the parked worker was replaced");
        assert!(
            !Path::new(&format!("/proc/{before}")).exists()
                || std::fs::read_to_string(format!("/proc/{before}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "{key}: the parked worker {before} still runs"
        );
    }
    core.plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_exhausting_descriptors_affects_only_its_worker() {
    let _serial = serial().await;
    let bad = "bad-fds";
    let core = Core::start(bad, |_| {}).await;
    core.assert_loaded().await;
    core.neighbour_answers().await;
    assert_eq!(core.get(bad, "ok").await.as_deref(), Ok("fine"));
    let core_fds = open_fds();
    let answer = core.get(bad, "fds").await.expect("fds answers");
    assert!(answer.starts_with("opened "), "{answer}");
    let opened: usize = answer["opened ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(opened > 0 && opened < 1024, "{answer}");
    let pid = core.state(bad).await.pid.expect("worker");
    // The worker's table is capped by its RLIMIT_NOFILE (64 + its grants).
    assert!(fds_of(pid) <= 64 + 1, "worker has {} fds", fds_of(pid));
    // Again: nothing more to open, and the core's table has not moved.
    let again = core.get(bad, "fds").await.expect("fds answers again");
    assert!(again.starts_with("opened 0 "), "{again}");
    assert_eq!(open_fds(), core_fds, "the core's descriptor count moved");
    core.neighbour_answers().await;
    assert_eq!(core.get(bad, "ok").await.as_deref(), Ok("fine"));
    core.plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_spinning_just_under_its_deadline_is_throttled_then_disabled() {
    let _serial = serial().await;
    let bad = "bad-cpu";
    let core = Core::start(bad, |m| {
        m.limits.call_deadline_ms = 60;
        m.limits.cpu_percent = 25;
        m.limits.cpu_window_s = 2;
    })
    .await;
    core.assert_loaded().await;
    let start = Instant::now();
    let mut throttled_at = None;
    let mut completed = 0;
    while start.elapsed() < Duration::from_secs(30) {
        match core.get(bad, "near-deadline").await {
            Ok(_) => completed += 1,
            Err(e) if e.contains("throttled") => {
                throttled_at.get_or_insert(start.elapsed());
                let s = core.state(bad).await;
                assert_eq!(s.state, PluginState::Throttled, "{s:?}");
                assert!(s.reason.unwrap_or_default().contains("CPU"));
                core.neighbour_answers().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.contains("disabled") => break,
            Err(e) => panic!("unexpected failure after {completed} calls: {e}"),
        }
    }
    let throttled_at = throttled_at.expect("never throttled");
    // Every call finished under its deadline, yet the plugin was stopped within its first window.
    assert!(completed > 0);
    assert!(
        throttled_at < Duration::from_secs(4),
        "throttled after {throttled_at:?}"
    );
    let s = core.state(bad).await;
    assert_eq!(s.state, PluginState::Disabled, "{s:?}");
    assert!(
        s.reason.as_deref().unwrap_or_default().contains("CPU"),
        "{s:?}"
    );
    core.neighbour_answers().await;
    core.plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_floods_and_forged_lines_are_bounded_escaped_and_attributed() {
    let _serial = serial().await;
    let bad = "bad-logs";
    let core = Core::start(bad, |m| {
        m.limits.log_lines_per_minute = 30;
        m.limits.call_deadline_ms = 5000;
    })
    .await;
    core.assert_loaded().await;
    assert_eq!(core.get(bad, "log-forged").await.as_deref(), Ok("forged"));
    assert_eq!(core.get(bad, "log-flood").await.as_deref(), Ok("flooded"));
    core.neighbour_answers().await;
    // Let the worker's frames drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = log_text();
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!("plugin={bad}")) || l.contains(&format!("plugin=\"{bad}\""))
        })
        .collect();
    let flood = ours.iter().filter(|l| l.contains("flood line")).count();
    assert!(flood > 0, "no flood line at all:\n{}", ours.join("\n"));
    assert!(flood <= 30, "{flood} flood lines passed a budget of 30");
    // No byte of a forged line starts a record of its own, carries an escape sequence or
    // returns the carriage.
    assert!(!log.contains('\u{1b}'), "an ANSI escape reached the log");
    assert!(!log.contains('\r'), "a carriage return reached the log");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-07T00:00:00.000000Z")),
        "a forged record start reached the log"
    );
    // Through the logging import the line stays one record, its newline escaped; through stdout
    // and stderr it is split into lines, each a record of its own. Either way every piece is
    // attributed to the plugin.
    let imported: Vec<&&str> = ours
        .iter()
        .filter(|l| l.contains("innocent") && !l.contains("stream="))
        .collect();
    assert!(
        !imported.is_empty(),
        "the forged line was not logged at all"
    );
    for line in imported {
        assert!(line.contains("\\n"), "newline not escaped: {line}");
    }
    let pieces: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forged: the host asked"))
        .collect();
    assert!(pieces.len() >= 3, "{pieces:?}");
    for piece in pieces {
        assert!(piece.contains("hvisd::plugin"), "{piece}");
        assert!(
            piece.contains(&format!("plugin=\"{bad}\""))
                || piece.contains(&format!("plugin={bad}")),
            "{piece}"
        );
    }
    core.plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_describe_of_aliased_strings_is_bounded_by_hostcall_fuel() {
    let _serial = serial().await;
    let bad = "bad-alias";
    let t = Instant::now();
    let core = Core::start_with(
        bad,
        |m| m.limits.memory_mib = 64,
        |services| {
            let store = services.kvp_core().unwrap().store();
            let rt = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                rt.block_on(store.set(Pool::Guest, "misbehave.describe".into(), "alias".into()))
                    .unwrap()
            });
        },
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let s = core.state(bad).await;
    assert_eq!(s.state, PluginState::Refused, "{s:?}");
    let why = s.reason.unwrap_or_default();
    assert!(why.contains("fuel"), "{why}");
    core.neighbour_answers().await;
    core.plugins.shutdown().await;
}

/// A core with freeze hooks only: `misbehave` components named `names`, with the priorities
/// given, each granted `misbehave.*` in the Guest pool.
async fn hook_core(hooks: &[(&str, i32)]) -> (Arc<Plugins>, Services, tempfile::TempDir) {
    hvisd::plugins::worker::set_worker_binary(hvisd_bin());
    log();
    let dir = tempfile::tempdir().unwrap();
    let pools = dir.path().join("pools");
    std::fs::create_dir_all(&pools).unwrap();
    let mut config = Config::default();
    config.kvp.pool_dir = pools;
    config.plugins.cache_dir = shared_cache();
    config.plugin = hooks
        .iter()
        .map(|&(name, priority)| {
            let mut m = manifest(name, "misbehave", &["misbehave.*"]);
            m.worlds = vec![World::FreezeHook];
            m.priority = priority;
            m.limits.call_deadline_ms = 1000;
            m.limits.max_consecutive_traps = 100;
            m
        })
        .collect();
    let services = Services::new(config.clone()).unwrap();
    let plugins = Plugins::start(&config, &services).await.unwrap().unwrap();
    for s in plugins.status().await {
        assert_ne!(s.state, PluginState::Refused, "{s:?}");
    }
    (plugins, services, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_hooks_of_equal_priority_run_in_parallel_and_groups_in_order() {
    let _serial = serial().await;
    let (plugins, _services, _dir) =
        hook_core(&[("hook-a", 10), ("hook-b", 10), ("hook-c", 20)]).await;
    let mounts = vec!["/mnt/a".to_owned()];
    // Warm the workers' instances.
    let _ = plugins
        .pre_freeze("warm", &mounts, Duration::from_secs(5))
        .await;
    let t = Instant::now();
    let round = plugins
        .pre_freeze("sleep-300", &mounts, Duration::from_secs(5))
        .await;
    let took = t.elapsed();
    assert!(round.veto.is_none(), "{round:?}");
    let names: Vec<&str> = round.hooks.iter().map(|h| h.plugin.as_str()).collect();
    assert_eq!(names, ["hook-a", "hook-b", "hook-c"]);
    // a and b together (300 ms), then c (300 ms): about 600 ms, never 900.
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(850),
        "{took:?} {round:?}"
    );
    for h in &round.hooks {
        assert!(h.elapsed_us >= 300_000, "{h:?}");
    }
    plugins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_keeps_state_to_its_post_thaw_and_a_spinning_hook_vetoes_within_budget() {
    let _serial = serial().await;
    let (plugins, services, _dir) = hook_core(&[("hook-a", 10), ("hook-late", 20)]).await;
    let store = services.kvp_core().unwrap().store();
    let mounts = vec!["/mnt/a".to_owned()];

    let round = plugins
        .pre_freeze("b1", &mounts, Duration::from_secs(5))
        .await;
    assert!(round.veto.is_none(), "{round:?}");
    let thawed = plugins
        .post_thaw(
            "b1",
            &mounts,
            hvisd_protocol::worker::FreezeOutcome::Thawed,
            Duration::from_secs(5),
        )
        .await;
    assert!(thawed.iter().all(|h| h.error.is_none()), "{thawed:?}");
    // Both hooks wrote the key; the last (reverse priority order: hook-a) wins.
    assert_eq!(
        store
            .get(Pool::Guest, "misbehave.thawed".into())
            .await
            .unwrap()
            .as_deref(),
        Some("b1 Thawed pre-freeze-saw=b1")
    );

    // A spinning hook is a veto at its deadline, within the round's budget; the later group
    // does not run; post-thaw still runs for every hook (the spinner's worker was replaced).
    let t = Instant::now();
    let round = plugins
        .pre_freeze("spin", &mounts, Duration::from_millis(400))
        .await;
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    let (who, why) = round.veto.clone().expect("a veto");
    assert_eq!(who, "hook-a");
    assert!(why.contains("deadline"), "{why}");
    assert_eq!(round.hooks.len(), 1, "{round:?}");
    let thawed = plugins
        .post_thaw(
            "after-spin",
            &mounts,
            hvisd_protocol::worker::FreezeOutcome::Vetoed,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(thawed.len(), 2);
    assert!(thawed.iter().all(|h| h.error.is_none()), "{thawed:?}");
    plugins.shutdown().await;
}
