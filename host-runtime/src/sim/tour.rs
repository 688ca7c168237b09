//! `hvisd sim`'s guided tour: the simulated host exercises every service against the runtime,
//! with the example plugins, and each step is checked and reported in one line.
//!
//! Steps: negotiation of every IC, heartbeat, time sync, a shutdown request (logged, never a
//! power-off), KVP enumeration of every pool (a plugin's key among the Guest pool's), a
//! host-pushed value reaching a plugin (which records it in the Guest pool, read back by the
//! host), a backup with the example freeze hook (a real `FIFREEZE` of a loop-mounted image the
//! tour made, in a private mount namespace, when run as root; the dry-run freezer otherwise), an
//! hvsock session with the example hvsock plugin (which also opens a host service), an fcopy
//! transfer into the drop directory (and two refusals), and a re-offered channel.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::Config;

/// How the tour's backup freezes.
#[derive(Debug, Clone)]
pub enum FreezeSetup {
    /// A loop-mounted ext4 image in this process's private mount namespace, the only mount the
    /// policy allows.
    Loop {
        /// Its mount point.
        mount: PathBuf,
    },
    /// The dry-run freezer (plans, runs the hooks, freezes nothing).
    DryRun {
        /// Why not a real freeze.
        why: String,
    },
}

/// A loop mount made for the tour (root only): thawed and unmounted on drop; the namespace dies
/// with the process anyway.
pub struct TourMount {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl TourMount {
    /// Moves this (still single-threaded) process into a private mount namespace and mounts a
    /// fresh 16 MiB ext4 image there. Root only.
    pub fn make() -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root: the dry-run freezer freezes nothing".into());
        }
        hvisd_sys::process::unshare_mount_namespace()
            .map_err(|e| format!("no private mount namespace ({e})"))?;
        let dir = tempfile::Builder::new()
            .prefix("hvisd-sim-freeze")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let image = dir.path().join("tour.ext4");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 << 20))
            .map_err(|e| format!("image: {e}"))?;
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<(), String> {
            let out = std::process::Command::new(program)
                .args(args)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("{program}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        )?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        )?;
        std::fs::write(mount.join("data"), "written before the backup\n")
            .map_err(|e| e.to_string())?;
        Ok(Self { dir, mount })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for TourMount {
    fn drop(&mut self) {
        if let Ok(fd) = std::fs::File::open(&self.mount) {
            let _ = hvisd_sys::freeze::thaw(&fd);
        }
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .status();
        let _ = self.dir.path();
    }
}

/// Where the example plugins' components are: `dir` if given, else `$HVISD_PLUGINS_DIR`, the
/// installed `/usr/lib/hvisd/plugins`, or this source tree's `plugins/target` build.
pub fn find_example_plugins(dir: Option<&Path>) -> Result<PathBuf, String> {
    let names = ["app_version.wasm", "flush_hold.wasm", "status_echo.wasm"];
    let source_build =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release");
    let candidates: Vec<PathBuf> = match dir {
        Some(d) => vec![d.to_owned()],
        None => std::env::var_os("HVISD_PLUGINS_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("/usr/lib/hvisd/plugins"), source_build])
            .collect(),
    };
    for c in &candidates {
        if names.iter().all(|n| c.join(n).is_file()) {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    Err(format!(
        "the example plugins ({}) are in none of {}; build them with `cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml` or pass --plugins DIR",
        names.join(", "),
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// One step's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// What the step exercised.
    pub title: String,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took, milliseconds.
    pub ms: f64,
    /// What was seen (or why it failed).
    pub detail: String,
}

/// The tour's result.
#[derive(Debug, Clone, Serialize)]
pub struct TourReport {
    /// The steps, in order.
    pub steps: Vec<StepReport>,
    /// How the backup froze.
    pub freezer: String,
    /// Where the example plugins came from.
    pub plugins: String,
    /// Steps passed.
    pub passed: usize,
    /// Steps failed.
    pub failed: usize,
    /// Wall time, milliseconds.
    pub total_ms: f64,
    /// The host's full transcript (for `--json`).
    pub transcript: Vec<Value>,
}

impl TourReport {
    /// Whether every step passed.
    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    /// The report for a person: one line per step, then the summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "hvisd sim: the simulated Hyper-V host against the runtime and its example plugins\n",
        );
        out.push_str(&format!(
            "  plugins: {}\n  backup:  {}\n\n",
            self.plugins, self.freezer
        ));
        let width = self.steps.iter().map(|s| s.title.len()).max().unwrap_or(0);
        for (i, s) in self.steps.iter().enumerate() {
            out.push_str(&format!(
                "{:>2}. {:<width$}  {:<4} {:>8.1} ms  {}\n",
                i + 1,
                s.title,
                if s.ok { "ok" } else { "FAIL" },
                s.ms,
                s.detail
            ));
        }
        out.push_str(&format!(
            "\n{} of {} steps passed in {:.0} ms{}\n",
            self.passed,
            self.steps.len(),
            self.total_ms,
            if self.ok() { "" } else { ": FAILED" }
        ));
        out
    }
}

type Check = Box<dyn Fn(&[&Value]) -> Result<String, String>>;

struct Step {
    title: &'static str,
    actions: Vec<Value>,
    check: Check,
}

fn status(e: &Value) -> String {
    e["status"].as_str().unwrap_or("?").to_owned()
}

fn records(e: &Value) -> Vec<(String, String)> {
    e["records"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| {
                    (
                        r["key"].as_str().unwrap_or("").to_owned(),
                        r["value"].to_string().trim_matches('"').to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the tour's fcopy step copies.
const FCOPY_TEXT: &str = "copied by the simulated host with Copy-VMFile\n";

fn steps(loop_mount: bool, drop_dir: &Path) -> Vec<Step> {
    let offer = |s: &str| json!({"action": "offer", "service": s});
    let copied = drop_dir.join("tour/hello.txt");
    let drop = drop_dir.display().to_string();
    vec![
        Step {
            title: "negotiate every IC (heartbeat, shutdown, timesync, KVP, VSS, fcopy)",
            actions: ["heartbeat", "shutdown", "timesync", "kvp", "vss", "fcopy"]
                .iter()
                .map(|s| offer(s))
                .collect(),
            check: Box::new(|e| {
                let v: Vec<String> = e
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}/{}",
                            e["service"].as_str().unwrap_or("?"),
                            e["negotiated"]["framework"].as_str().unwrap_or("?"),
                            e["negotiated"]["message"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                Ok(format!("framework/message: {}", v.join(", ")))
            }),
        },
        Step {
            title: "heartbeat",
            actions: vec![json!({"action": "heartbeat", "count": 3, "sequence": 100})],
            check: Box::new(|e| {
                let rounds = e[0]["rounds"].as_array().map(Vec::len).unwrap_or(0);
                Ok(format!("{rounds} rounds, sequence numbers echoed +1"))
            }),
        },
        Step {
            title: "time sync sample",
            actions: vec![json!({"action": "timesync"})],
            check: Box::new(|e| Ok(format!("answered {}", status(e[0])))),
        },
        Step {
            title: "shutdown request (logged, never a power-off)",
            actions: vec![
                json!({"action": "shutdown", "reason_code": 0, "message": "simulated host asks for a shutdown"}),
            ],
            check: Box::new(|e| Ok(format!("answered {}", status(e[0])))),
        },
        Step {
            title: "KVP: enumerate every pool",
            actions: (0..5)
                .map(|p| json!({"action": "kvp_enumerate", "pool": p}))
                .collect(),
            check: Box::new(|e| {
                let counts: Vec<String> = e
                    .iter()
                    .map(|e| format!("pool {}: {}", e["pool"], e["count"]))
                    .collect();
                let guest = records(e[1]);
                let plugin_key = guest.iter().find(|(k, _)| k == "app.version");
                match plugin_key {
                    Some((_, v)) => Ok(format!(
                        "{}; the plugin key app.version = {v:?} in the Guest pool",
                        counts.join(", ")
                    )),
                    None => Err(format!(
                        "{}; the example plugin's app.version is missing from the Guest pool",
                        counts.join(", ")
                    )),
                }
            }),
        },
        Step {
            title: "KVP: a host-pushed value reaches a plugin",
            actions: vec![
                json!({"action": "kvp_set", "pool": "external", "key": "app.greeting", "value": "hello from the host"}),
                json!({"action": "sleep", "ms": 300}),
                json!({"action": "kvp_get", "pool": "guest", "key": "app.last-host-set"}),
            ],
            check: Box::new(|e| {
                let got = e[2]["received"]["value"].as_str().unwrap_or("");
                if got == "app.greeting=hello from the host" {
                    Ok("app-version heard the SET and published app.last-host-set, read back by the host".into())
                } else {
                    Err(format!("app.last-host-set is {got:?}"))
                }
            }),
        },
        Step {
            title: if loop_mount {
                "VSS backup: FIFREEZE of the tour's loop mount, with the flush-hold hook"
            } else {
                "VSS backup (dry-run freezer), with the flush-hold hook"
            },
            actions: vec![
                json!({"action": "backup", "pause_ms": 50, "during": [
                    {"action": "kvp_get", "pool": "guest", "key": "app.backup.state"}
                ]}),
                // Post-thaw hooks run after THAW is answered.
                json!({"action": "sleep", "ms": 300}),
                json!({"action": "kvp_get", "pool": "guest", "key": "app.backup.state"}),
            ],
            check: Box::new(|e| {
                let during = e[0]["during"][0]["received"]["value"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let after = e[2]["received"]["value"].as_str().unwrap_or("");
                let freeze = &e[0]["freeze"];
                if during != "held" || after != "released" {
                    return Err(format!(
                        "the hook's app.backup.state: {during:?} while frozen, {after:?} after THAW"
                    ));
                }
                Ok(format!(
                    "FREEZE {} in {} us, hook held the app (state {during:?} while frozen, {after:?} after THAW)",
                    freeze["status"].as_str().unwrap_or("?"),
                    freeze["us"]
                ))
            }),
        },
        Step {
            title: "hvsock: a host tool talks to the status-echo plugin",
            actions: vec![
                json!({"action": "hvsock_listen", "name": "host-time", "port": 6000, "reply": "text", "text": "12:00 UTC\n", "count": 1}),
                json!({"action": "hvsock_connect", "port": 5001, "expect": "none",
                       "text": "status\nask host-time what time is it?\nhello hvsock\nquit\n"}),
                json!({"action": "hvsock_wait", "name": "host-time"}),
            ],
            check: Box::new(|e| {
                let reply = e[1]["reply_text"].as_str().unwrap_or("");
                let lines: Vec<&str> = reply.lines().collect();
                let ok = lines.len() == 3
                    && lines[0].starts_with("ok ")
                    && lines[1] == "reply 12:00 UTC"
                    && lines[2] == "hello hvsock";
                if ok {
                    Ok(format!(
                        "status {:?}; the plugin asked the host's host-time service: {:?}; echo ok; FIN both ways",
                        lines[0], lines[1]
                    ))
                } else {
                    Err(format!("the plugin answered {reply:?}"))
                }
            }),
        },
        Step {
            title: "hvsock: 8192 lines echoed through the plugin",
            actions: vec![
                json!({"action": "hvsock_connect", "port": 5001, "expect": "echo",
                                 "text": "the quick brown fox jumps over the lazy dog, 0123456789\n",
                                 "repeat": 8192}),
            ],
            check: Box::new(|e| {
                if e[0]["echo_ok"] == json!(true) {
                    Ok(format!(
                        "{} bytes back, {} MiB/s",
                        e[0]["bytes_received"], e[0]["mib_per_s"]
                    ))
                } else {
                    Err("the echo differs".into())
                }
            }),
        },
        Step {
            title: "fcopy: Copy-VMFile into the drop directory",
            actions: vec![
                json!({"action": "fcopy", "path": format!("{drop}/tour"), "file_name": "hello.txt",
                       "text": FCOPY_TEXT, "create_path": true}),
                json!({"action": "fcopy", "path": format!("{drop}/tour"), "file_name": "hello.txt",
                       "text": "again", "expect": "HV_ERROR_ALREADY_EXISTS"}),
                json!({"action": "fcopy", "path": "/etc", "file_name": "passwd",
                       "text": "x", "overwrite": true, "expect": "HV_E_ACCESSDENIED"}),
            ],
            check: Box::new(move |_| match std::fs::read_to_string(&copied) {
                Ok(t) if t == FCOPY_TEXT => Ok(format!(
                    "{} written whole (temporary file, fsync, rename); a second copy without overwrite refused; /etc/passwd refused by the policy",
                    copied.display()
                )),
                Ok(t) => Err(format!("{} holds {t:?}", copied.display())),
                Err(e) => Err(format!("{}: {e}", copied.display())),
            }),
        },
        Step {
            title: "rescind and re-offer a channel",
            actions: vec![
                json!({"action": "rescind", "name": "heartbeat"}),
                offer("heartbeat"),
                json!({"action": "heartbeat", "count": 2, "sequence": 7}),
            ],
            check: Box::new(|_| {
                Ok("the runtime closed the old channel and served the new one".into())
            }),
        },
    ]
}

/// The example plugins and the tour's own settings added to `config`; the data they need is
/// made under `state`.
pub fn tour_config(
    mut config: Config,
    plugins_dir: &Path,
    state: &Path,
    freeze: &FreezeSetup,
) -> Result<Config, String> {
    let app = state.join("app");
    let run_app = state.join("run-app");
    for d in [&app, &run_app] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        // Workers run as an unprivileged user: the granted directories must let it in.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(
        app.join("VERSION"),
        format!("{} (hvisd sim)\n", env!("CARGO_PKG_VERSION")),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(app.join("health"), "ok\n").map_err(|e| e.to_string())?;
    let text = format!(
        r#"
[[plugin]]
name = "app-version"
path = '{dir}/app_version.wasm'
worlds = ["kvp-provider"]
[[plugin.kvp]]
pool = "guest"
keys = ["app.*"]
access = "read-write"
[[plugin.kvp]]
pool = "external"
keys = ["app.*"]
[[plugin.dirs]]
host = '{app}'
guest = "/app"

[[plugin]]
name = "flush-hold"
path = '{dir}/flush_hold.wasm'
worlds = ["freeze-hook"]
[[plugin.dirs]]
host = '{run_app}'
guest = "/run/app"
access = "read-write"
[[plugin.kvp]]
pool = "guest"
keys = ["app.backup.*"]
access = "read-write"

[[plugin]]
name = "status-echo"
path = '{dir}/status_echo.wasm'
worlds = ["hvsock-service"]
[plugin.hvsock]
listen = ["status"]
connect = ["host-time"]
[[plugin.kvp]]
pool = "guest"
keys = ["*"]
"#,
        dir = plugins_dir.display(),
        app = app.display(),
        run_app = run_app.display(),
    );
    #[derive(serde::Deserialize)]
    struct Plugins {
        plugin: Vec<hvisd_plugin_host::PluginManifest>,
    }
    let examples: Plugins = toml::from_str(&text).map_err(|e| e.to_string())?;
    if config.plugin.is_empty() {
        config.plugin = examples.plugin;
    }
    config
        .hvsock
        .services
        .entry("status".into())
        .or_insert_with(|| "5001".into());
    config
        .hvsock
        .services
        .entry("host-time".into())
        .or_insert_with(|| "6000".into());
    if config.plugins.cache_dir == Config::default().plugins.cache_dir {
        config.plugins.cache_dir = sim_cache_dir(state);
    }
    config.vss.journal = state.join("vss-journal.json");
    config.fcopy.drop_dir = state.join("fcopy");
    config.fcopy.allowed_dirs = None;
    match freeze {
        FreezeSetup::Loop { mount } => {
            config.vss.dry_run = Some(false);
            config.vss.policy.allow_only = Some(vec![mount.clone()]);
            config.vss.policy.default_rules = false;
            config.vss.policy.include.mount_points = vec![mount.display().to_string()];
        }
        FreezeSetup::DryRun { .. } => config.vss.dry_run = Some(true),
    }
    Ok(config)
}

/// A compile cache that outlives one run (the examples compile once), private to this user.
fn sim_cache_dir(state: &Path) -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".cache/hvisd/sim-plugins"),
        _ => state.join("cache"),
    }
}

/// Runs the tour against an in-process runtime on a fresh shm root.
pub async fn run(
    config: Config,
    freeze: &FreezeSetup,
    plugins: String,
) -> anyhow::Result<TourReport> {
    let loop_mount = matches!(freeze, FreezeSetup::Loop { .. });
    let steps = steps(loop_mount, &config.fcopy.drop_dir);
    let mut actions = Vec::new();
    let mut spans = Vec::new();
    for s in &steps {
        spans.push((actions.len(), s.actions.len()));
        actions.extend(s.actions.iter().cloned());
    }
    let script = super::Script::parse(
        &json!({"timeout_ms": 20000, "actions": actions}).to_string(),
        "built-in tour",
    )?;
    let started = Instant::now();
    let transcript = super::run_embedded(&script, None, config).await?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let entries = transcript.entries();
    let mut reports = Vec::new();
    for (step, (at, n)) in steps.iter().zip(spans) {
        let slice: Vec<&Value> = entries.iter().skip(at).take(n).collect();
        let ms = slice
            .iter()
            .map(|e| e["elapsed_us"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / 1e3;
        let failed = slice.iter().find(|e| e["ok"] != json!(true));
        let (ok, detail) = if slice.len() != n {
            (false, "the host did not run this step".to_owned())
        } else if let Some(f) = failed {
            (
                false,
                format!(
                    "{}: {}",
                    f["action"].as_str().unwrap_or("?"),
                    f["error"].as_str().unwrap_or("failed")
                ),
            )
        } else {
            match (step.check)(&slice) {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            }
        };
        reports.push(StepReport {
            title: step.title.to_owned(),
            ok,
            ms,
            detail,
        });
    }
    let passed = reports.iter().filter(|r| r.ok).count();
    Ok(TourReport {
        failed: reports.len() - passed,
        passed,
        steps: reports,
        freezer: match freeze {
            FreezeSetup::Loop { mount } => format!(
                "real FIFREEZE/FITHAW of a 16 MiB ext4 image loop-mounted at {} in a private mount namespace (the only mount the policy allows)",
                mount.display()
            ),
            FreezeSetup::DryRun { why } => format!("dry-run freezer ({why})"),
        },
        plugins,
        total_ms,
        transcript: entries.to_vec(),
    })
}
