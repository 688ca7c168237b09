//! VSS: file-system-consistent (and, with hooks, application-consistent) backups.
//!
//! A Hyper-V backup asks the guest to freeze its file systems, snapshots the disks, then asks it
//! to thaw. [`VssCore`] is that service, written once: the VMBus channel ([`vmbus`]) and the
//! kernel's `/dev/vmbus/hv_vss` daemon protocol ([`kernel`]) only carry its operations.
//!
//! A FREEZE:
//! 1. plans: the mount table (`/proc/self/mountinfo`) and the `[vss.policy]` decide what may be
//!    frozen and in which order (`hvisd-vss`); a freeze-policy plugin may narrow and reorder
//!    that, never widen it;
//! 2. runs the pre-freeze hooks (plugins, in their workers; groups of equal priority in
//!    parallel, all within `pre_freeze_budget_ms`); a veto fails the backup (`HV_E_FAIL`) or,
//!    with `on_veto = "freeze"`, is logged and the freeze goes on;
//! 3. holds what hvisd would write: log output and KVP pool writes stay in memory until the
//!    thaw (a write to a frozen file system would block);
//! 4. freezes through the [`freezer`]: journal first, mount ids checked, one failure thaws all,
//!    a watchdog thaws everything after `max_frozen_ms` whatever happens.
//!
//! A THAW thaws (reverse order), lets the held writes out, answers the host, then runs the
//! post-thaw hooks (reverse priority order, told the outcome) and records the backup's report:
//! one JSON line in the log (`vss backup report`) and [`VssCore::history`].

pub mod freezer;
pub mod kernel;
pub mod vmbus;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hvisd_kvp::PoolHandle;
use hvisd_protocol::ic::status::{HV_E_FAIL, HV_S_OK};
use hvisd_protocol::vss::VssOperation;
use hvisd_protocol::worker::{FreezeOutcome, Mount as PluginMount};
use hvisd_vss::{CompiledPolicy, Plan};
use serde::Serialize;

use crate::config::{OnVeto, VssSection};
use crate::plugins::{HookReport, Plugins};
use freezer::{FreezeBackend, Freezer, Target};

/// Backup reports kept for [`VssCore::history`].
const HISTORY: usize = 32;

/// How a backup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Frozen, not yet thawed.
    Frozen,
    /// Frozen and thawed by the host's THAW within the window.
    Thawed,
    /// A pre-freeze hook vetoed (or a policy plugin refused): nothing was frozen.
    Vetoed,
    /// Planning or freezing failed: nothing is frozen.
    FreezeFailed,
    /// The watchdog thawed everything before the host's THAW.
    WatchdogThawed,
    /// The THAW could not thaw everything (the rest stays journaled for the next start).
    ThawFailed,
}

/// One backup, as the log line and the status query report it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// Made up by hvisd (the VSS protocol carries no id): `<unix ms>-<n>`.
    pub id: String,
    /// When the FREEZE arrived, Unix milliseconds.
    pub started_unix_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// `fifreeze` or `dry-run`.
    pub backend: &'static str,
    /// Mount points frozen, in order.
    pub frozen: Vec<String>,
    /// Mount points the plan left alone.
    pub skipped: usize,
    /// From the FREEZE request to its answer, milliseconds.
    pub freeze_request_ms: f64,
    /// Planning (mount table, policy, policy plugin), milliseconds.
    pub plan_ms: f64,
    /// The pre-freeze round, milliseconds.
    pub pre_freeze_ms: f64,
    /// Holding log output and KVP writes, milliseconds.
    pub hold_ms: f64,
    /// Opening and checking the mount points, journaling and `FIFREEZE`, milliseconds.
    pub fifreeze_ms: f64,
    /// From the first `FIFREEZE` to the last `FITHAW`, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_window_ms: Option<f64>,
    /// Each pre-freeze hook: latency and outcome.
    pub pre_freeze: Vec<HookReport>,
    /// Each post-thaw hook.
    pub post_thaw: Vec<HookReport>,
    /// The veto that failed the backup (or that `on_veto = "freeze"` overrode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub veto: Option<(String, String)>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// KVP changes the host made while frozen, written after the thaw.
    pub held_kvp_writes: usize,
}

/// The backup between its FREEZE and its THAW.
struct Backup {
    report: BackupReport,
    mounts: Vec<String>,
}

/// The VSS service shared by every transport.
pub struct VssCore {
    config: VssSection,
    policy: CompiledPolicy,
    freezer: Arc<Freezer>,
    kvp: Option<PoolHandle>,
    plugins: RwLock<Option<Arc<Plugins>>>,
    /// The backup in progress; the lock also keeps operations in order (a FREEZE waits for the
    /// previous backup's post-thaw round).
    backup: Arc<tokio::sync::Mutex<Option<Backup>>>,
    history: Mutex<VecDeque<BackupReport>>,
    next_id: AtomicU64,
    mountinfo: RwLock<Option<std::path::PathBuf>>,
}

/// Why the VSS service could not start.
#[derive(Debug, thiserror::Error)]
pub enum VssSetupError {
    /// `[vss.policy]` is invalid.
    #[error("[vss.policy]: {0}")]
    Policy(#[from] hvisd_vss::PolicyError),
    /// The watchdog thread could not start.
    #[error("VSS watchdog: {0}")]
    Watchdog(std::io::Error),
}

/// Reads the mount table (`/proc/self/mountinfo`, or `mountinfo`) and plans by `policy`.
fn plan_now(mountinfo: Option<&Path>, policy: &CompiledPolicy) -> Result<Plan, String> {
    let mounts = match mountinfo {
        Some(path) => hvisd_vss::system::read_mounts_from(path, Path::new("/sys")),
        None => hvisd_vss::system::read_mounts(),
    }
    .map_err(|e| e.to_string())?;
    Ok(hvisd_vss::plan(&mounts, policy))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl VssCore {
    /// The service for `config`, holding KVP writes through `kvp` while frozen. First thaws what
    /// a killed hvisd left frozen (from the journal). Call inside a tokio runtime.
    pub fn new(
        config: &VssSection,
        kvp: Option<PoolHandle>,
    ) -> Result<Arc<VssCore>, VssSetupError> {
        let policy = config.policy.compile()?;
        let backend: Arc<dyn FreezeBackend> = if config.dry_run.unwrap_or(false) {
            Arc::new(freezer::DryRun)
        } else {
            Arc::new(freezer::Fifreeze)
        };
        if let Some(recovery) = freezer::recover(&*backend, &config.journal) {
            tracing::warn!(
                pid = ?recovery.pid,
                thawed = ?recovery.thawed,
                failed = ?recovery.failed,
                "VSS: thawed what a previous hvisd left frozen (from its journal)"
            );
        }
        let max_window = Duration::from_millis(config.policy.max_frozen_ms);
        let runtime = tokio::runtime::Handle::current();
        // The watchdog thread calls back into the core, which does not exist yet.
        let cell: Arc<std::sync::OnceLock<std::sync::Weak<VssCore>>> = Arc::default();
        let target = cell.clone();
        let on_watchdog: freezer::OnWatchdog = Arc::new(move |_thawed| {
            if let Some(core) = target.get().and_then(std::sync::Weak::upgrade) {
                runtime.spawn(async move { core.after_watchdog().await });
            }
        });
        let freezer = Freezer::new(backend, config.journal.clone(), max_window, on_watchdog)
            .map_err(VssSetupError::Watchdog)?;
        let core = Arc::new(VssCore {
            config: config.clone(),
            policy,
            freezer: Arc::new(freezer),
            kvp,
            plugins: RwLock::new(None),
            backup: Arc::new(tokio::sync::Mutex::new(None)),
            history: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
            mountinfo: RwLock::new(None),
        });
        let _ = cell.set(Arc::downgrade(&core));
        Ok(core)
    }

    /// Plans from `mountinfo` instead of `/proc/self/mountinfo` (tests of the planning path).
    pub fn set_mountinfo(&self, mountinfo: &Path) {
        *self.mountinfo.write().unwrap_or_else(|p| p.into_inner()) = Some(mountinfo.to_owned());
    }

    /// The plugins whose hooks and policy run around each backup (set once they are loaded).
    pub fn set_plugins(&self, plugins: Arc<Plugins>) {
        *self.plugins.write().unwrap_or_else(|p| p.into_inner()) = Some(plugins);
    }

    fn plugins(&self) -> Option<Arc<Plugins>> {
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The backend (`fifreeze` or `dry-run`).
    pub fn backend(&self) -> &'static str {
        self.freezer.backend()
    }

    /// The last backups, oldest first.
    pub fn history(&self) -> Vec<BackupReport> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// What a FREEZE would freeze now, by the config alone (no plugin is asked).
    pub fn plan(&self) -> Result<Plan, String> {
        let mountinfo = self
            .mountinfo
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        plan_now(mountinfo.as_deref(), &self.policy)
    }

    /// The plan, narrowed by the freeze-policy plugin if there is one.
    async fn plan_with_plugin(&self) -> Result<Plan, String> {
        let plan = {
            let mountinfo = self
                .mountinfo
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // procfs and sysfs only (no stat of a mount's source, which could enter a FUSE
            // mount): bounded kernel reads, cheaper here than a hop to a blocking thread.
            plan_now(mountinfo.as_deref(), &self.policy)?
        };
        let Some(plugins) = self.plugins() else {
            return Ok(plan);
        };
        let offered: Vec<PluginMount> = plan
            .freeze
            .iter()
            .map(|p| PluginMount {
                path: p.mount.name(),
                fs_type: hvisd_vss::mount::escape_name(std::os::unix::ffi::OsStrExt::as_bytes(
                    p.mount.fs_type.as_os_str(),
                )),
                device: p.mount.device.to_string(),
            })
            .collect();
        match plugins.freeze_plan(&offered).await {
            None => Ok(plan),
            Some(Ok(order)) => {
                hvisd_vss::narrow(plan, &order).map_err(|e| format!("freeze policy plugin: {e}"))
            }
            Some(Err(reason)) => Err(format!("freeze policy plugin refused: {reason}")),
        }
    }

    /// Answers one VSS operation: the status for the host.
    pub async fn handle(self: &Arc<Self>, operation: VssOperation) -> u32 {
        let result = match operation {
            VssOperation::FREEZE => self.freeze().await,
            VssOperation::THAW => self.thaw().await,
            // HOT_BACKUP (its flags are the transport's), GET_DM_INFO, BU_COMPLETE and anything
            // else: success, as Linux answers them.
            _ => Ok(()),
        };
        match result {
            Ok(()) => HV_S_OK,
            Err(e) => {
                tracing::error!(operation = %operation, "VSS: {e}");
                HV_E_FAIL
            }
        }
    }

    /// FREEZE: plan, pre-freeze hooks, hold writes, freeze. `Err`: nothing is frozen.
    pub async fn freeze(self: &Arc<Self>) -> Result<(), String> {
        let started = Instant::now();
        let mut slot = self.backup.clone().lock_owned().await;
        if slot.is_some() || self.freezer.frozen_count() > 0 {
            return Err("FREEZE while a backup is frozen; THAW first".into());
        }
        let id = format!(
            "{}-{}",
            now_unix_ms(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut report = BackupReport {
            id: id.clone(),
            started_unix_ms: now_unix_ms(),
            outcome: Outcome::FreezeFailed,
            backend: self.freezer.backend(),
            frozen: Vec::new(),
            skipped: 0,
            freeze_request_ms: 0.0,
            plan_ms: 0.0,
            pre_freeze_ms: 0.0,
            hold_ms: 0.0,
            fifreeze_ms: 0.0,
            frozen_window_ms: None,
            pre_freeze: Vec::new(),
            post_thaw: Vec::new(),
            veto: None,
            error: None,
            held_kvp_writes: 0,
        };
        let plan = match self.plan_with_plugin().await {
            Ok(plan) => plan,
            Err(e) => {
                report.error = Some(e.clone());
                report.freeze_request_ms = ms(started.elapsed());
                self.finish_failed(slot, report, Vec::new(), FreezeOutcome::FreezeFailed);
                return Err(e);
            }
        };
        report.plan_ms = ms(started.elapsed());
        let mounts = plan.freeze_names();
        report.frozen = mounts.clone();
        report.skipped = plan.skipped.len();
        tracing::info!(backup = %id, mounts = ?mounts, backend = self.freezer.backend(), "VSS FREEZE");

        let phase = Instant::now();
        if let Some(plugins) = self.plugins() {
            let round = plugins
                .pre_freeze(
                    &id,
                    &mounts,
                    Duration::from_millis(self.config.pre_freeze_budget_ms),
                )
                .await;
            report.pre_freeze = round.hooks;
            if let Some((plugin, reason)) = round.veto {
                report.veto = Some((plugin.clone(), reason.clone()));
                if self.config.on_veto == OnVeto::Fail {
                    report.outcome = Outcome::Vetoed;
                    report.freeze_request_ms = ms(started.elapsed());
                    let e = format!("pre-freeze hook `{plugin}`: {reason}");
                    report.error = Some(e.clone());
                    self.finish_failed(slot, report, mounts, FreezeOutcome::Vetoed);
                    return Err(e);
                }
                tracing::warn!(backup = %id, plugin = %plugin, "VSS: pre-freeze veto overridden (on_veto = \"freeze\"): the backup is file-system-consistent only");
            }
        }

        report.pre_freeze_ms = ms(phase.elapsed());

        // From here until the thaw hvisd writes nothing a frozen file system could block on.
        let phase = Instant::now();
        crate::log_gate::hold();
        if let Some(kvp) = &self.kvp
            && let Err(e) = kvp.hold().await
        {
            tracing::warn!("VSS: cannot hold KVP writes: {e}");
        }
        report.hold_ms = ms(phase.elapsed());
        let phase = Instant::now();
        let targets: Vec<Target> = plan
            .freeze
            .iter()
            .map(|p| Target {
                mount_point: p.mount.mount_point.clone(),
                mount_id: u64::from(p.mount.mount_id),
            })
            .collect();
        let freezer = self.freezer.clone();
        let frozen = tokio::task::spawn_blocking(move || freezer.freeze(&targets))
            .await
            .map_err(|e| format!("the freezer thread: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match frozen {
            Ok(done) => {
                report.outcome = Outcome::Frozen;
                report.fifreeze_ms = ms(phase.elapsed());
                report.frozen = done
                    .frozen
                    .iter()
                    .map(|p| hvisd_vss::mount::path_name(p))
                    .collect();
                report.freeze_request_ms = ms(started.elapsed());
                *slot = Some(Backup { report, mounts });
                Ok(())
            }
            Err(e) => {
                self.release_holds().await;
                report.error = Some(e.clone());
                report.freeze_request_ms = ms(started.elapsed());
                self.finish_failed(slot, report, mounts, FreezeOutcome::FreezeFailed);
                Err(e)
            }
        }
    }

    /// THAW: thaw, let held writes out, answer; then post-thaw hooks and the report, in the
    /// background (a next FREEZE waits for them).
    pub async fn thaw(self: &Arc<Self>) -> Result<(), String> {
        let mut slot = self.backup.clone().lock_owned().await;
        let freezer = self.freezer.clone();
        let thawed = tokio::task::spawn_blocking(move || freezer.thaw())
            .await
            .map_err(|e| format!("the freezer thread: {e}"))?;
        let Some(mut backup) = slot.take() else {
            // A THAW with nothing of ours frozen (a repeated THAW; or the watchdog already
            // thawed and reported): success as Linux answers it, unless the window ran out.
            crate::log_gate::release();
            return if thawed.watchdog_fired {
                Err(
                    "the frozen window ran out before the THAW; the backup is not consistent"
                        .into(),
                )
            } else {
                Ok(())
            };
        };
        crate::log_gate::release();
        backup.report.frozen_window_ms = Some(thawed.window_us as f64 / 1e3);
        let result = if !thawed.failed.is_empty() {
            backup.report.outcome = Outcome::ThawFailed;
            let e = format!("could not thaw {:?}", thawed.failed);
            backup.report.error = Some(e.clone());
            Err(e)
        } else if thawed.watchdog_fired {
            backup.report.outcome = Outcome::WatchdogThawed;
            Err("the frozen window ran out before the THAW; the backup is not consistent".into())
        } else {
            backup.report.outcome = Outcome::Thawed;
            Ok(())
        };
        let outcome = if thawed.watchdog_fired {
            FreezeOutcome::Aborted
        } else {
            FreezeOutcome::Thawed
        };
        let core = self.clone();
        tokio::spawn(async move {
            let _order = slot;
            core.release_holds_into(&mut backup.report).await;
            core.post_thaw(&mut backup, outcome).await;
            core.record(backup.report);
        });
        result
    }

    /// The watchdog thawed everything: finish the backup (the host's THAW, if it ever comes,
    /// is answered `HV_E_FAIL`).
    async fn after_watchdog(self: Arc<Self>) {
        let mut slot = self.backup.clone().lock_owned().await;
        let Some(mut backup) = slot.take() else {
            return;
        };
        let freezer = self.freezer.clone();
        let thawed = tokio::task::spawn_blocking(move || freezer.thaw()).await;
        crate::log_gate::release();
        if let Ok(t) = thawed {
            backup.report.frozen_window_ms = Some(t.window_us as f64 / 1e3);
        }
        backup.report.outcome = Outcome::WatchdogThawed;
        backup.report.error = Some(format!(
            "no THAW within max_frozen_ms ({} ms): the watchdog thawed everything",
            self.config.policy.max_frozen_ms
        ));
        self.release_holds_into(&mut backup.report).await;
        self.post_thaw(&mut backup, FreezeOutcome::Aborted).await;
        self.record(backup.report);
        drop(slot);
    }

    async fn release_holds(&self) {
        let mut scratch = 0;
        self.release_kvp(&mut scratch).await;
        crate::log_gate::release();
    }

    async fn release_holds_into(&self, report: &mut BackupReport) {
        self.release_kvp(&mut report.held_kvp_writes).await;
        crate::log_gate::release();
    }

    async fn release_kvp(&self, written: &mut usize) {
        if let Some(kvp) = &self.kvp {
            match kvp.release().await {
                Ok(released) => {
                    *written = released.written;
                    for e in released.failed {
                        tracing::error!("VSS: a KVP change held during the freeze was lost: {e}");
                    }
                }
                Err(e) => tracing::error!("VSS: releasing held KVP writes: {e}"),
            }
        }
    }

    async fn post_thaw(&self, backup: &mut Backup, outcome: FreezeOutcome) {
        if let Some(plugins) = self.plugins() {
            backup.report.post_thaw = plugins
                .post_thaw(
                    &backup.report.id,
                    &backup.mounts,
                    outcome,
                    Duration::from_millis(self.config.post_thaw_budget_ms),
                )
                .await;
        }
    }

    /// A backup that froze nothing: its post-thaw round and report, in the background.
    fn finish_failed(
        self: &Arc<Self>,
        slot: tokio::sync::OwnedMutexGuard<Option<Backup>>,
        report: BackupReport,
        mounts: Vec<String>,
        outcome: FreezeOutcome,
    ) {
        let core = self.clone();
        tokio::spawn(async move {
            let _order = slot;
            let mut backup = Backup { report, mounts };
            core.post_thaw(&mut backup, outcome).await;
            core.record(backup.report);
        });
    }

    fn record(&self, report: BackupReport) {
        match serde_json::to_string(&report) {
            Ok(json) => tracing::info!(target: "hvisd::vss", "vss backup report {json}"),
            Err(e) => tracing::warn!("VSS: cannot serialise the backup report: {e}"),
        }
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(report);
    }

    /// The daemon is stopping: thaws anything still frozen (the host's THAW will not come), lets
    /// held writes out and waits for the post-thaw hooks. Returns whether something was frozen.
    pub async fn shutdown(self: &Arc<Self>) -> bool {
        let frozen = self.freezer.frozen_count() > 0 || self.backup.lock().await.is_some();
        if frozen {
            tracing::warn!("stopping while frozen: thawing now");
            if let Err(e) = self.thaw().await {
                tracing::error!("VSS: thaw at shutdown: {e}");
            }
        }
        self.idle().await;
        frozen
    }

    /// Waits until no backup operation is in progress (tests, shutdown).
    pub async fn idle(&self) {
        let _ = self.backup.lock().await;
    }
}
