//! Backups on real file systems: `hvisd run` and the host simulator inside a freeze sandbox (a
//! mount namespace whose root is a tmpfs; see `hvisd_e2e::freeze_sandbox`), with loop-mounted
//! ext4 and xfs images this test made as the only freezable file systems, listed in the
//! config's `allow_only`. The sandbox's guard thaws and unmounts on every exit path.
//!
//! What is proved: a backup freezes exactly what the policy says, in order, runs the hooks
//! around it and reports; a writer to a frozen mount blocks and completes after the thaw; KVP
//! writes during the freeze are answered at once and reach the (frozen) pool files after the
//! thaw; a veto, a hook timeout, a hook trap and a hook worker killed mid-hook fail the backup
//! and freeze nothing; a host that never thaws is overruled by the watchdog; a daemon killed
//! while frozen is recovered by the next start from its journal; a policy plugin may reorder but
//! not widen; a hook that would write to a frozen file system is refused at load.
//!
//! Needs root (CI runs as root); otherwise each test prints why it skips.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hvisd_e2e::freeze_sandbox::{FreezeSandbox, ImageSpec, SandboxProcess};
use hvisd_plugin_host::build::{build_plugins, plugins_workspace};
use rustix::process::Signal;
use serde_json::{Value, json};

const START: Duration = Duration::from_secs(60);

fn built() -> BTreeMap<String, PathBuf> {
    build_plugins(&plugins_workspace(), "release").expect("building the plugins")
}

/// A freeze hook (the `misbehave` component) granted `misbehave.*` in the Guest pool.
fn hook(name: &str, priority: i32, extra: &str) -> String {
    format!(
        r#"
[[plugin]]
name = "{name}"
path = "/run/plugins/misbehave.wasm"
worlds = ["freeze-hook"]
priority = {priority}
[plugin.limits]
call_deadline_ms = 1000
max_consecutive_traps = 100
[[plugin.kvp]]
pool = "guest"
keys = ["misbehave.*"]
access = "read-write"
{extra}
"#
    )
}

/// The runtime's config: pools on `pools`, the given mounts (loop-backed, which the default
/// rules skip) included and the only ones allowed, plus `extra`.
fn config(pools: &str, allow: &[&str], policy_extra: &str, extra: &str) -> String {
    format!(
        r#"
[kvp]
pool_dir = "{pools}"
plugin_key_cache_ms = 1

[plugins]
cache_dir = "/run/cache"

[vss]
dry_run = false
journal = "/run/hvisd/vss-frozen.json"
pre_freeze_budget_ms = 5000

[vss.policy]
allow_only = {allow}
{policy_extra}

[vss.policy.include]
mount_points = {allow}

{extra}
"#,
        allow = json!(allow),
    )
}

struct Bed {
    sb: FreezeSandbox,
}

impl Bed {
    /// A sandbox with `images`, the test plugins copied in, and `config` at /run/hvisd.toml.
    fn new(images: &[ImageSpec], config: &str, dirs: &[&str]) -> Option<Bed> {
        let sb = images
            .iter()
            .fold(FreezeSandbox::builder(), |b, spec| b.image(spec.clone()))
            .build_or_skip()?;
        let built = built();
        std::fs::create_dir_all(sb.host_path("/run/plugins")).unwrap();
        std::fs::copy(
            &built["misbehave"],
            sb.host_path("/run/plugins/misbehave.wasm"),
        )
        .unwrap();
        for d in ["/run/sim", "/run/cache"].iter().chain(dirs) {
            std::fs::create_dir_all(sb.host_path(d)).unwrap();
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                sb.host_path("/run/cache"),
                std::fs::Permissions::from_mode(0o700),
            )
            .unwrap();
        }
        std::fs::write(sb.host_path("/run/hvisd.toml"), config).unwrap();
        Some(Bed { sb })
    }

    fn guest(&self) -> SandboxProcess {
        let g = self.sb.spawn(
            &[
                "run",
                "--transport",
                "shm:/run/sim",
                "--config",
                "/run/hvisd.toml",
            ],
            &[],
        );
        g.wait_for_log("watching shm root", START);
        g
    }

    /// Starts the host simulator on `script` (in the background).
    fn host(&self, script: &Value) -> SandboxProcess {
        let n = Instant::now().elapsed().as_nanos();
        let path = format!("/run/script-{n}-{}.json", rand_suffix());
        std::fs::write(self.sb.host_path(&path), script.to_string()).unwrap();
        self.sb
            .spawn(&["host", "--root", "/run/sim", "script", &path], &[])
    }

    /// Runs the host simulator on `script` to the end and returns its transcript.
    fn host_script(&self, script: &Value) -> Vec<Value> {
        let mut host = self.host(script);
        finish(&mut host)
    }

    /// A writer to `mount` inside: `echo > MOUNT/FILE`.
    fn writer(&self, mount: &str, file: &str) -> SandboxProcess {
        self.sb.spawn_program(
            "/bin/sh",
            &["-c", &format!("echo x > {mount}/{file} && echo written")],
            &[],
        )
    }

    fn wait_for_file(&self, inside: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.sb.host_path(inside).exists() {
            assert!(start.elapsed() < timeout, "{inside} never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn finish(host: &mut SandboxProcess) -> Vec<Value> {
    host.wait_exit(Duration::from_secs(120))
        .expect("the host script ended");
    let out = host.stdout();
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(entries)) => entries,
        _ => panic!("no transcript:\n{out}\n{}", host.stderr()),
    }
}

/// Whether `writer` is still blocked after a while.
fn blocked(writer: &mut SandboxProcess) -> bool {
    std::thread::sleep(Duration::from_millis(300));
    writer.is_running()
}

/// Waits for `writer` to complete (it must, once thawed).
fn completes(writer: &mut SandboxProcess, within: Duration) {
    let status = writer.wait_exit(within).expect("the writer completed");
    assert!(status.success(), "{}", writer.stderr());
}

/// The backup reports in a guest's log.
fn reports(guest: &SandboxProcess) -> Vec<Value> {
    guest
        .stderr()
        .lines()
        .filter_map(|l| l.split("vss backup report ").nth(1))
        .map(|j| serde_json::from_str(j).expect("a JSON report"))
        .collect()
}

fn wait_reports(guest: &SandboxProcess, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let r = reports(guest);
        if r.len() >= n {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} reports, waited for {n}:\n{}",
            r.len(),
            guest.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_ok(entries: &[Value], guest: &SandboxProcess) {
    for e in entries {
        assert_eq!(e["ok"], true, "{e}\n{}", guest.stderr());
    }
}

#[test]
fn a_backup_freezes_exactly_the_policy_in_order_runs_hooks_and_holds_kvp_writes() {
    let config = config(
        "/mnt/a/pools",
        &["/mnt/a", "/mnt/b", "/mnt/c"],
        "order = { first = [\"/mnt/b\"] }\n[vss.policy.exclude]\nmount_points = [\"/mnt/c\"]",
        &(hook("hook-a", 10, "") + &hook("hook-b", 20, "")),
    );
    let Some(bed) = Bed::new(
        &[
            ImageSpec::ext4("/mnt/a", 16),
            ImageSpec::xfs("/mnt/b", 300),
            ImageSpec::ext4("/mnt/c", 16),
        ],
        &config,
        &["/mnt/a/pools"],
    ) else {
        return;
    };
    let guest = bed.guest();
    let mut host = bed.host(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "kvp"},
        {"action": "offer", "service": "vss"},
        {"action": "backup", "pause_ms": 1500, "mark": "/run/frozen", "during": [
            {"action": "kvp_set", "pool": "guest", "key": "held.key", "value": "held value"}
        ]},
        {"action": "kvp_get", "pool": "guest", "key": "held.key"}
    ]}));
    bed.wait_for_file("/run/frozen", START);
    let mut a = bed.writer("/mnt/a", "w");
    let mut b = bed.writer("/mnt/b", "w");
    let mut c = bed.writer("/mnt/c", "w");
    assert!(blocked(&mut a), "/mnt/a is not frozen\n{}", guest.stderr());
    assert!(blocked(&mut b), "/mnt/b is not frozen\n{}", guest.stderr());
    completes(&mut c, Duration::from_secs(5));
    let entries = finish(&mut host);
    all_ok(&entries, &guest);
    completes(&mut a, Duration::from_secs(10));
    completes(&mut b, Duration::from_secs(10));

    // The KVP SET during the freeze was answered at once, and reached the pool file, which
    // lies on the frozen /mnt/a, after the thaw.
    let during = &entries[2]["during"][0];
    assert_eq!(during["status"], "HV_S_OK", "{during}");
    assert!(during["elapsed_us"].as_u64().unwrap() < 500_000, "{during}");
    assert_eq!(entries[3]["received"]["value"], "held value");
    let report = wait_reports(&guest, 1).pop().unwrap();
    assert_eq!(report["outcome"], "thawed", "{report}");
    assert_eq!(report["backend"], "fifreeze");
    assert_eq!(report["frozen"], json!(["/mnt/b", "/mnt/a"]), "{report}");
    assert_eq!(report["held_kvp_writes"], 1, "{report}");
    let pre: Vec<&str> = report["pre_freeze"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(pre, ["hook-a", "hook-b"], "{report}");
    let post: Vec<&str> = report["post_thaw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(post, ["hook-b", "hook-a"], "{report}");
    assert!(report["frozen_window_ms"].as_f64().unwrap() >= 1500.0);
    let pool = std::fs::read(bed.sb.host_path("/mnt/a/pools/.kvp_pool_1")).unwrap();
    assert!(
        pool.windows(8).any(|w| w == b"held.key"),
        "the held write is not in the pool file"
    );
    // The hooks kept state from pre-freeze to post-thaw (one instance per backup).
    let id = report["id"].as_str().unwrap();
    let thawed = bed.host_script(&json!([
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_get", "pool": "guest", "key": "misbehave.thawed"}
    ]));
    assert_eq!(
        thawed[1]["received"]["value"],
        format!("{id} Thawed pre-freeze-saw={id}")
    );
    drop(guest);
    bed.sb.close().unwrap();
}

#[test]
fn vetoes_hook_timeouts_traps_and_killed_hook_workers_fail_the_backup_and_freeze_nothing() {
    let config = config("/run/pools", &["/mnt/a"], "", &hook("hook-a", 10, ""));
    let Some(bed) = Bed::new(&[ImageSpec::ext4("/mnt/a", 16)], &config, &["/run/pools"]) else {
        return;
    };
    let guest = bed.guest();
    let set = |mode: &str| json!({"action": "kvp_set", "pool": "guest", "key": "misbehave.pre-freeze", "value": mode});
    let entries = bed.host_script(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "kvp"},
        {"action": "offer", "service": "vss"},
        set("veto"),
        {"action": "backup", "expect": "fail"},
        set("spin"),
        {"action": "backup", "expect": "fail"},
        set("trap"),
        {"action": "backup", "expect": "fail"},
        set("fine"),
        {"action": "backup", "pause_ms": 10}
    ]}));
    all_ok(&entries, &guest);
    // The spinning hook was stopped at its deadline (1 s), well within the pre-freeze budget.
    let spin_us = entries[5]["freeze"]["us"].as_u64().unwrap();
    assert!(spin_us < 3_000_000, "{}", entries[5]);
    let reports = wait_reports(&guest, 4);
    let outcomes: Vec<&str> = reports
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["vetoed", "vetoed", "vetoed", "thawed"],
        "{reports:#?}"
    );
    assert!(
        reports[0]["veto"][1]
            .as_str()
            .unwrap()
            .contains("misbehave vetoes")
    );
    assert!(
        reports[1]["veto"][1].as_str().unwrap().contains("deadline"),
        "{}",
        reports[1]
    );
    for r in &reports[..3] {
        // Nothing was frozen, and post-thaw still ran, told the outcome.
        assert!(r.get("frozen_window_ms").is_none(), "{r}");
        assert_eq!(r["post_thaw"].as_array().unwrap().len(), 1, "{r}");
    }

    // A hook's worker killed in the middle of its pre-freeze: the backup fails, nothing frozen.
    let mut host = bed.host(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "kvp"},
        {"action": "offer", "service": "vss"},
        set("sleep-4000"),
        {"action": "backup", "expect": "fail"}
    ]}));
    let worker = wait_for_worker(guest.pid(), Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(worker as i32).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    let entries = finish(&mut host);
    all_ok(&entries, &guest);
    let report = wait_reports(&guest, 5).pop().unwrap();
    assert_eq!(report["outcome"], "vetoed", "{report}");
    let mut w = bed.writer("/mnt/a", "after");
    completes(&mut w, Duration::from_secs(5));
    drop(guest);
    bed.sb.close().unwrap();
}

/// The plugin worker child of `guest` (host pid), once there is one.
fn wait_for_worker(guest: u32, timeout: Duration) -> u32 {
    let start = Instant::now();
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(guest) && cmd.windows(13).any(|w| w == b"plugin-worker") {
                return pid;
            }
        }
        assert!(start.elapsed() < timeout, "no plugin worker under {guest}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_host_that_never_thaws_is_overruled_by_the_watchdog() {
    let config = config("/run/pools", &["/mnt/a"], "max_frozen_ms = 1500", "");
    let Some(bed) = Bed::new(&[ImageSpec::ext4("/mnt/a", 16)], &config, &["/run/pools"]) else {
        return;
    };
    let guest = bed.guest();
    let mut host = bed.host(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "vss"},
        {"action": "backup", "pause_ms": 0, "thaw": false, "mark": "/run/frozen"},
        {"action": "sleep", "ms": 2500},
        {"action": "vss_op", "op": "thaw"},
        {"action": "backup", "pause_ms": 10}
    ]}));
    bed.wait_for_file("/run/frozen", START);
    let frozen_at = Instant::now();
    let mut w = bed.writer("/mnt/a", "w");
    assert!(blocked(&mut w));
    completes(&mut w, Duration::from_secs(10));
    let thawed_after = frozen_at.elapsed();
    assert!(
        thawed_after >= Duration::from_millis(1000) && thawed_after < Duration::from_secs(4),
        "thawed after {thawed_after:?}"
    );
    let entries = finish(&mut host);
    // The late THAW is answered HV_E_FAIL: the snapshot cannot be trusted.
    assert_eq!(entries[3]["status"], "HV_E_FAIL", "{}", entries[3]);
    assert_eq!(entries[4]["ok"], true, "{}", entries[4]);
    let reports = wait_reports(&guest, 2);
    assert_eq!(reports[0]["outcome"], "watchdog-thawed", "{}", reports[0]);
    assert_eq!(reports[1]["outcome"], "thawed", "{}", reports[1]);
    drop(guest);
    bed.sb.close().unwrap();
}

#[test]
fn sigterm_while_frozen_thaws_before_the_daemon_exits() {
    let config = config("/run/pools", &["/mnt/a"], "", "");
    let Some(bed) = Bed::new(&[ImageSpec::ext4("/mnt/a", 16)], &config, &["/run/pools"]) else {
        return;
    };
    let mut guest = bed.guest();
    let mut host = bed.host(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "vss"},
        {"action": "backup", "pause_ms": 0, "thaw": false, "mark": "/run/frozen"}
    ]}));
    bed.wait_for_file("/run/frozen", START);
    let mut w = bed.writer("/mnt/a", "w");
    assert!(blocked(&mut w));
    guest.signal(Signal::TERM);
    let status = guest.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}: {}",
        guest.stderr()
    );
    // Thawed by the stopping daemon itself, not by a later start or the watchdog.
    completes(&mut w, Duration::from_secs(5));
    assert!(guest.stderr().contains("file systems thawed at shutdown"));
    assert!(!bed.sb.host_path("/run/hvisd/vss-frozen.json").exists());
    let _ = finish(&mut host);
    bed.sb.close().unwrap();
}

#[test]
fn a_daemon_killed_while_frozen_is_recovered_by_the_next_start() {
    let config = config("/run/pools", &["/mnt/a", "/mnt/b"], "", "");
    let Some(bed) = Bed::new(
        &[ImageSpec::ext4("/mnt/a", 16), ImageSpec::ext4("/mnt/b", 16)],
        &config,
        &["/run/pools"],
    ) else {
        return;
    };
    let guest = bed.guest();
    let mut host = bed.host(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "vss"},
        {"action": "backup", "pause_ms": 0, "thaw": false, "mark": "/run/frozen"}
    ]}));
    bed.wait_for_file("/run/frozen", START);
    let mut a = bed.writer("/mnt/a", "w");
    let mut b = bed.writer("/mnt/b", "w");
    assert!(blocked(&mut a) && blocked(&mut b));
    assert!(bed.sb.host_path("/run/hvisd/vss-frozen.json").exists());
    guest.signal(Signal::KILL);
    let _ = finish(&mut host);
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.is_running(), "still frozen after the kill");
    let restarted = bed.guest();
    restarted.wait_for_log("left frozen", START);
    completes(&mut a, Duration::from_secs(10));
    completes(&mut b, Duration::from_secs(10));
    assert!(!bed.sb.host_path("/run/hvisd/vss-frozen.json").exists());
    drop(restarted);
    drop(guest);
    bed.sb.close().unwrap();
}

#[test]
fn a_policy_plugin_may_reorder_but_never_widen_and_hooks_on_frozen_mounts_are_refused() {
    let policy = r#"
[[plugin]]
name = "policy"
path = "/run/plugins/misbehave.wasm"
worlds = ["freeze-policy"]
[[plugin.kvp]]
pool = "guest"
keys = ["misbehave.*"]
access = "read-write"
"#;
    let writes_frozen = hook(
        "writes-frozen",
        10,
        "[[plugin.dirs]]\nhost = \"/mnt/a/hook\"\nguest = \"/data\"\naccess = \"read-write\"",
    );
    let with_hook = config(
        "/run/pools",
        &["/mnt/a", "/mnt/b"],
        "",
        &(policy.to_owned() + &writes_frozen),
    );
    let Some(bed) = Bed::new(
        &[ImageSpec::ext4("/mnt/a", 16), ImageSpec::ext4("/mnt/b", 16)],
        &with_hook,
        &["/run/pools", "/mnt/a/hook"],
    ) else {
        return;
    };
    // A hook with a read-write directory on a file system backups freeze: the daemon refuses
    // to start, naming it.
    let mut refused = bed.sb.spawn(
        &[
            "run",
            "--transport",
            "shm:/run/sim",
            "--config",
            "/run/hvisd.toml",
        ],
        &[],
    );
    let status = refused.wait_exit(START);
    assert!(
        status.is_some_and(|s| !s.success()),
        "started with a hook writing to a frozen file system: {}",
        refused.stderr()
    );
    let log = refused.stderr();
    assert!(
        log.contains("writes-frozen") && log.contains("backups freeze"),
        "{log}"
    );
    // Without it, the policy plugin runs.
    std::fs::write(
        bed.sb.host_path("/run/hvisd.toml"),
        config("/run/pools", &["/mnt/a", "/mnt/b"], "", policy),
    )
    .unwrap();
    let guest = bed.guest();
    let entries = bed.host_script(&json!({"timeout_ms": 60000, "actions": [
        {"action": "offer", "service": "kvp"},
        {"action": "offer", "service": "vss"},
        {"action": "backup", "pause_ms": 10},
        {"action": "kvp_set", "pool": "guest", "key": "misbehave.plan", "value": "widen"},
        {"action": "backup", "expect": "fail"}
    ]}));
    all_ok(&entries, &guest);
    let reports = wait_reports(&guest, 2);
    // The policy reversed the configured order (/mnt/a, /mnt/b).
    assert_eq!(
        reports[0]["frozen"],
        json!(["/mnt/b", "/mnt/a"]),
        "{}",
        reports[0]
    );
    assert_eq!(reports[1]["outcome"], "freeze-failed", "{}", reports[1]);
    assert!(
        reports[1]["error"].as_str().unwrap().contains("/etc"),
        "{}",
        reports[1]
    );
    let mut w = bed.writer("/mnt/a", "after");
    completes(&mut w, Duration::from_secs(5));
    drop(guest);
    bed.sb.close().unwrap();
}
