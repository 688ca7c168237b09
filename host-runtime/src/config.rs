//! The runtime's TOML configuration.
//!
//! Every section is optional; an empty file gives a runtime that answers every IC it knows and only
//! logs a host's shutdown request. Unknown keys are refused so a typo is an error, not a silent default.

use crate::service_kind::ServiceKind;
use hvisd_ic::shutdown::ShutdownAction;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which services answer their offers.
    #[serde(default)]
    pub services: ServicesConfig,
    /// What a shutdown request from the host does.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Key/value exchange.
    #[serde(default)]
    pub kvp: KvpSection,
    /// Backups (VSS): what is frozen, hooks' budgets, the watchdog.
    #[serde(default)]
    pub vss: VssSection,
    /// Where compiled plugins are cached.
    #[serde(default)]
    pub plugins: PluginsSection,
    /// One table per plugin (`[[plugin]]`): see `hvisd_plugin_host::manifest`.
    #[serde(default)]
    pub plugin: Vec<hvisd_plugin_host::PluginManifest>,
    /// hvsock: connect timeout, the Unix stand-in, AF_VSOCK listeners.
    #[serde(default)]
    pub hvsock: HvsockSection,
    /// The local control socket (`hvisd status`) and the metrics.
    #[serde(default)]
    pub control: ControlSection,
    /// How `hvisd run` reaches the host.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Guest file copy (`Copy-VMFile`): where the host may write files.
    #[serde(default)]
    pub fcopy: crate::fcopy::FcopySection,
}

/// `[runtime]`: the transport `hvisd run` serves (`--transport` overrides it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// `kernel` (the default: KVP and VSS on the kernel's hv_utils devices, as today's kernels
    /// bind them), `kernel:DEVICE`, `uio[:SYSFS_DEVICES_DIR[:DEV_DIR]]` or `shm:ROOT`.
    #[serde(default = "default_transport")]
    pub transport: String,
}

fn default_transport() -> String {
    "kernel".into()
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            transport: default_transport(),
        }
    }
}

/// `[control]`: where `hvisd status` reaches the daemon, and the Prometheus metrics.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The control socket (mode 0600). Default: `/run/hvisd/control.sock` on the `kernel` and
    /// `uio` transports; none on `shm` (a simulator's runtime) unless set here.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Also serve the metrics over HTTP here (a loopback address such as `127.0.0.1:9477`;
    /// others are refused). Off by default; the control socket always answers `metrics`.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where `hvisd status` looks by default (and the daemon listens on real transports).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/hvisd/control.sock";

/// `[hvsock]`: how hvsock connections are made and where the local listeners are. Pipe offers
/// from the host are served only once something accepts connections (the plugin broker).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HvsockSection {
    /// How long a guest-initiated connect waits for the host's reply and offer, in ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// The Unix-socket stand-in for local development: a stream socket (created mode 0600)
    /// whose connections, after a first line naming the service (GUID or vsock port), reach
    /// the acceptor as host-initiated ones.
    #[serde(default)]
    pub unix_listen: Option<PathBuf>,
    /// AF_VSOCK ports to listen on (a guest whose kernel runs `hv_sock`); port P is the
    /// service `P-facb-11e6-bd58-64006a7986d3`.
    #[serde(default)]
    pub vsock_listen_ports: Vec<u32>,
    /// Names for hvsock services, as plugin manifests use them (`hvsock.listen`,
    /// `hvsock.connect`): name = GUID or decimal vsock port. A manifest may also name a
    /// service by its GUID or port directly.
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, String>,
    /// Debug builds only (release builds refuse the key): a test echo acceptor and test
    /// connects, for the end-to-end tests before a broker exists.
    #[cfg(debug_assertions)]
    #[serde(default)]
    pub test: Option<HvsockTest>,
}

fn default_connect_timeout_ms() -> u64 {
    crate::hvsock::DEFAULT_CONNECT_TIMEOUT.as_millis() as u64
}

impl Default for HvsockSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("an empty [hvsock] table is valid"))
    }
}

impl HvsockSection {
    /// The hvsock layer's options.
    pub fn options(&self) -> crate::hvsock::HvsockOptions {
        crate::hvsock::HvsockOptions {
            connect_timeout: std::time::Duration::from_millis(self.connect_timeout_ms),
        }
    }
}

/// `[hvsock.test]` (debug builds): see [`HvsockSection::test`].
#[cfg(debug_assertions)]
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HvsockTest {
    /// Echo every host-initiated (and stand-in) connection.
    #[serde(default)]
    pub echo: bool,
    /// Guest-initiated connections made once the runtime runs; each outcome is logged
    /// (`hvsock test connect ...`).
    #[serde(default)]
    pub connect: Vec<HvsockTestConnect>,
}

/// One test connect (debug builds).
#[cfg(debug_assertions)]
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HvsockTestConnect {
    /// The service: a GUID or a vsock port.
    pub service: String,
    /// Text sent, `repeat` times, then the FIN; the reply is read to its end and compared.
    #[serde(default)]
    pub text: String,
    /// How many times `text` is sent.
    #[serde(default = "one")]
    pub repeat: usize,
}

#[cfg(debug_assertions)]
fn one() -> usize {
    1
}

/// `[plugins]`: settings shared by every plugin.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Cache of precompiled plugins (`.cwasm`). Must be owned by the user hvisd runs as and
    /// writable by nobody else: its files are native code.
    #[serde(default = "default_plugin_cache")]
    pub cache_dir: PathBuf,
    /// The user plugin workers run as: a dedicated system user `hvisd-plugin` if the system has
    /// one, else `nobody`. Never root. Grant directories must be readable (and, for read-write
    /// grants, writable) by this user.
    #[serde(default)]
    pub user: Option<String>,
    /// Refuse to start plugins on a kernel without Landlock (default: start them, with a warning).
    #[serde(default)]
    pub require_landlock: bool,
    /// Debug builds only (release builds refuse the key): the compromised-worker test. Once the
    /// plugins are loaded, a worker of `plugin` is started that, once confined, tries each of
    /// `attempts` as arbitrary native code would, and the report is written to `report` as JSON.
    #[cfg(debug_assertions)]
    #[serde(default)]
    pub escape_test: Option<EscapeTest>,
}

/// `[plugins.escape-test]` (debug builds): see [`PluginsSection::escape_test`].
#[cfg(debug_assertions)]
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EscapeTest {
    /// The plugin whose worker is compromised.
    pub plugin: String,
    /// `open:PATH`, `write:PATH`, `socket:inet`, `socket:unix:PATH`, `fifreeze:PATH`,
    /// `ptrace:PID`, `kill:PID`, `exec:PATH`, `fork`, `setuid:0`; `{core}` stands for the
    /// daemon's pid.
    pub attempts: Vec<String>,
    /// Where the JSON report goes: `{"core_pid": N, "results": [[attempt, verdict], ...]}`.
    pub report: PathBuf,
}

fn default_plugin_cache() -> PathBuf {
    "/var/cache/hvisd/plugins".into()
}

impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            cache_dir: default_plugin_cache(),
            user: None,
            require_landlock: false,
            #[cfg(debug_assertions)]
            escape_test: None,
        }
    }
}

impl PluginsSection {
    /// The (uid, gid) plugin workers run as, and the user's name.
    pub fn worker_user(&self) -> Result<(String, u32, u32), String> {
        let candidates: Vec<&str> = match &self.user {
            Some(name) => vec![name.as_str()],
            None => vec!["hvisd-plugin", "nobody"],
        };
        for name in &candidates {
            if let Some((uid, gid)) = hvisd_sys::process::lookup_user(name) {
                if uid == 0 || gid == 0 {
                    return Err(format!(
                        "[plugins] user {name:?} is root (uid {uid}, gid {gid}); plugins never run as root"
                    ));
                }
                return Ok(((*name).to_owned(), uid, gid));
            }
        }
        Err(format!(
            "no user {} on this system for the plugin workers; create one or set [plugins] user",
            candidates.join(" or ")
        ))
    }
}

/// `[kvp]`: where the pools live, the kernel device, the IP-configuration helpers, plugin keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvpSection {
    /// Directory of `.kvp_pool_0` .. `.kvp_pool_4` (shared with cloud-init and other tools).
    #[serde(default = "default_pool_dir")]
    pub pool_dir: PathBuf,
    /// The kernel transport's device (`--transport kernel`). A path that is a Unix
    /// `SOCK_SEQPACKET` socket is connected to instead, carrying the same messages.
    #[serde(default = "default_kvp_device")]
    pub device: PathBuf,
    /// Where SET_IP_INFO writes `ifcfg-<if>` and `<if>.nmconnection`.
    #[serde(default = "default_pool_dir")]
    pub ifcfg_dir: PathBuf,
    /// The script SET_IP_INFO runs with the two files (as `hv_kvp_daemon` runs `hv_set_ifconfig`).
    #[serde(default = "default_set_ifconfig")]
    pub set_ifconfig: PathBuf,
    /// The script that lists DNS servers for GET_IP_INFO.
    #[serde(default = "default_get_dns_info")]
    pub get_dns_info: PathBuf,
    /// The script that says whether an interface uses DHCP.
    #[serde(default = "default_get_dhcp_info")]
    pub get_dhcp_info: PathBuf,
    /// Where network interfaces are listed (`/sys/class/net`); SET_IP_INFO finds the adapter by
    /// its `device/device_id` here, as `hv_kvp_daemon` does.
    #[serde(default = "default_sysfs_net")]
    pub sysfs_net_dir: PathBuf,
    /// How long `set_ifconfig` may run before it is killed (SET_IP_INFO then fails), in ms.
    #[serde(default = "default_set_ifconfig_timeout_ms")]
    pub set_ifconfig_timeout_ms: u64,
    /// How long `get_dns_info`, `get_dhcp_info` and `ip` may run, in milliseconds.
    #[serde(default = "default_get_info_timeout_ms")]
    pub get_info_timeout_ms: u64,
    /// How long a pool operation waits for locks other programs hold before it fails, in ms.
    #[serde(default = "default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// Most records hvisd lets one pool reach by adding keys (a SET of a new key past it fails).
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// `fdatasync` every pool write (survives power loss; costs a disk flush per SET).
    #[serde(default)]
    pub sync_writes: bool,
    /// How long one host request may wait for plugin-provided values, in milliseconds.
    #[serde(default = "default_plugin_deadline_ms")]
    pub plugin_key_deadline_ms: u64,
    /// How long a plugin-provided value is served from cache, in milliseconds.
    #[serde(default = "default_plugin_cache_ms")]
    pub plugin_key_cache_ms: u64,
}

fn default_pool_dir() -> PathBuf {
    "/var/lib/hyperv".into()
}
fn default_kvp_device() -> PathBuf {
    "/dev/vmbus/hv_kvp".into()
}
fn default_set_ifconfig() -> PathBuf {
    "/usr/libexec/hypervkvpd/hv_set_ifconfig".into()
}
fn default_get_dns_info() -> PathBuf {
    "/usr/libexec/hypervkvpd/hv_get_dns_info".into()
}
fn default_get_dhcp_info() -> PathBuf {
    "/usr/libexec/hypervkvpd/hv_get_dhcp_info".into()
}
fn default_sysfs_net() -> PathBuf {
    "/sys/class/net".into()
}
fn default_set_ifconfig_timeout_ms() -> u64 {
    30_000
}
fn default_get_info_timeout_ms() -> u64 {
    5_000
}
fn default_lock_timeout_ms() -> u64 {
    1_000
}
fn default_max_records() -> usize {
    1024
}
fn default_plugin_deadline_ms() -> u64 {
    100
}
fn default_plugin_cache_ms() -> u64 {
    5000
}

impl Default for KvpSection {
    fn default() -> Self {
        // serde's defaults and these must agree: build from an empty table.
        toml::from_str("").unwrap_or_else(|_| unreachable!("an empty [kvp] table is valid"))
    }
}

impl KvpSection {
    /// The KVP service's configuration.
    pub fn to_kvp_config(&self) -> hvisd_kvp::KvpConfig {
        let mut config = hvisd_kvp::KvpConfig {
            pool_dir: self.pool_dir.clone(),
            ..Default::default()
        };
        config.net.config_dir = self.ifcfg_dir.clone();
        config.net.sysfs_net_dir = self.sysfs_net_dir.clone();
        config.net.set_ifconfig_script = self.set_ifconfig.clone();
        config.net.get_dns_info_script = self.get_dns_info.clone();
        config.net.get_dhcp_info_script = self.get_dhcp_info.clone();
        config.net.set_ifconfig_timeout =
            std::time::Duration::from_millis(self.set_ifconfig_timeout_ms);
        config.net.get_info_timeout = std::time::Duration::from_millis(self.get_info_timeout_ms);
        config.store = hvisd_kvp::StoreOptions {
            lock_timeout: std::time::Duration::from_millis(self.lock_timeout_ms),
            max_records: self.max_records,
            sync: self.sync_writes,
        };
        config
    }

    /// Deadline and cache time for plugin-provided keys.
    pub fn guest_key_options(&self) -> hvisd_kvp::GuestKeyOptions {
        hvisd_kvp::GuestKeyOptions {
            deadline: std::time::Duration::from_millis(self.plugin_key_deadline_ms),
            cache_ttl: std::time::Duration::from_millis(self.plugin_key_cache_ms),
        }
    }
}

/// `[vss]`: backups. What may be frozen is `[vss.policy]` (see `hvisd_vss::VssPolicy`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VssSection {
    /// The kernel's VSS device, for `--transport kernel` (a `SOCK_SEQPACKET` socket path works
    /// too: tests play the kernel).
    #[serde(default = "default_vss_device")]
    pub device: PathBuf,
    /// Where the set being frozen is journaled before the first `FIFREEZE`, so a restarted
    /// hvisd thaws what a killed one left frozen. Must be on a tmpfs (never frozen).
    #[serde(default = "default_vss_journal")]
    pub journal: PathBuf,
    /// Total time the pre-freeze hooks of one backup may take.
    #[serde(default = "default_hook_budget_ms")]
    pub pre_freeze_budget_ms: u64,
    /// Total time the post-thaw hooks of one backup may take.
    #[serde(default = "default_hook_budget_ms")]
    pub post_thaw_budget_ms: u64,
    /// What a veto of a pre-freeze hook does: `fail` (the backup fails with `HV_E_FAIL`) or
    /// `freeze` (freeze anyway: file-system-consistent instead of application-consistent).
    #[serde(default)]
    pub on_veto: OnVeto,
    /// Never call `FIFREEZE`: plan, journal, run hooks and report as if (`hvisd sim` without
    /// root, trials of a policy). Unset: `true` on the `shm` transport (a simulated host must
    /// not freeze the machine it runs on) and `false` on the others.
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// What may be frozen and in which order.
    #[serde(default)]
    pub policy: hvisd_vss::VssPolicy,
}

/// `[vss] on_veto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnVeto {
    /// The backup fails.
    #[default]
    Fail,
    /// Freeze anyway (file-system-consistent).
    Freeze,
}

fn default_vss_device() -> PathBuf {
    "/dev/vmbus/hv_vss".into()
}

fn default_vss_journal() -> PathBuf {
    "/run/hvisd/vss-frozen.json".into()
}

fn default_hook_budget_ms() -> u64 {
    30_000
}

impl Default for VssSection {
    fn default() -> Self {
        Self {
            device: default_vss_device(),
            journal: default_vss_journal(),
            pre_freeze_budget_ms: default_hook_budget_ms(),
            post_thaw_budget_ms: default_hook_budget_ms(),
            on_veto: OnVeto::default(),
            dry_run: None,
            policy: hvisd_vss::VssPolicy::default(),
        }
    }
}

/// `[services]`: each service can be turned off, e.g. when another daemon still owns it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// Answer heartbeats.
    #[serde(default = "yes")]
    pub heartbeat: bool,
    /// Answer shutdown requests.
    #[serde(default = "yes")]
    pub shutdown: bool,
    /// Take time samples.
    #[serde(default = "yes")]
    pub timesync: bool,
    /// Key/value exchange.
    #[serde(default = "yes")]
    pub kvp: bool,
    /// Backups (file-system freeze and thaw).
    #[serde(default = "yes")]
    pub vss: bool,
    /// Guest file copy (also `[fcopy] enabled`; both must be on).
    #[serde(default = "yes")]
    pub fcopy: bool,
}

fn yes() -> bool {
    true
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            heartbeat: true,
            shutdown: true,
            timesync: true,
            kvp: true,
            vss: true,
            fcopy: true,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// `log` (default): record the request and do nothing else. `command`: run `command`.
    #[serde(default)]
    pub action: ShutdownActionName,
    /// The program and arguments run when `action = "command"`, e.g. `["systemctl", "poweroff"]`.
    #[serde(default)]
    pub command: Vec<String>,
}

/// The names `[shutdown] action` accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownActionName {
    /// Only log.
    #[default]
    Log,
    /// Run the configured command.
    Command,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more `[[plugin]]` tables are invalid (each error names the plugin, field and fix).
    #[error("config {path}: invalid plugins:\n{}", errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Plugins {
        /// The path.
        path: String,
        /// Every problem found.
        errors: Vec<hvisd_plugin_host::ManifestError>,
    },
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key.
    #[error("config {path}: {source}")]
    Parse {
        /// The path.
        path: String,
        /// What the TOML parser said (with line and column).
        source: toml::de::Error,
    },
    /// A key is unknown, or a value has the wrong type.
    #[error("config {path}: `{field}`: {message}")]
    Schema {
        /// The path.
        path: String,
        /// Where, e.g. `kvp.pool_dirr` or `plugin[1].limits.memory_mib`.
        field: String,
        /// What serde said.
        message: String,
    },
    /// The same key is given in both spellings.
    #[error("config {path}: `{field}` is given twice (as `{kebab}` and `{snake}`); keep `{snake}`")]
    Duplicate {
        /// The path.
        path: String,
        /// The table's path.
        field: String,
        /// The deprecated spelling.
        kebab: String,
        /// The canonical one.
        snake: String,
    },
    /// A value is inconsistent with another.
    #[error("config {path}: {field}: {why}")]
    Invalid {
        /// The path.
        path: String,
        /// The field, e.g. `shutdown.command`.
        field: &'static str,
        /// What is wrong and how to fix it.
        why: &'static str,
    },
}

/// Tables whose keys are names chosen by the operator, not fields: left as written.
const FREE_FORM_TABLES: [&str; 1] = ["hvsock.services"];

/// Renames every kebab-case key of `table` (at `path`) to snake_case, recording each.
fn normalize_keys(
    table: &mut toml::Table,
    path: &str,
    origin: &str,
    deprecated: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if FREE_FORM_TABLES.contains(&path) {
        return Ok(());
    }
    let kebab: Vec<String> = table.keys().filter(|k| k.contains('-')).cloned().collect();
    for key in kebab {
        let snake = key.replace('-', "_");
        if table.contains_key(&snake) {
            return Err(ConfigError::Duplicate {
                path: origin.to_owned(),
                field: path.to_owned(),
                kebab: key,
                snake,
            });
        }
        if let Some(v) = table.remove(&key) {
            deprecated.push(if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            });
            table.insert(snake, v);
        }
    }
    for (key, value) in table.iter_mut() {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match value {
            toml::Value::Table(t) => normalize_keys(t, &here, origin, deprecated)?,
            toml::Value::Array(items) => {
                for item in items.iter_mut() {
                    if let toml::Value::Table(t) = item {
                        normalize_keys(t, &here, origin, deprecated)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates config text; `origin` names it in errors. Keys are snake_case;
    /// kebab-case spellings (`memory_mib`) are accepted with a deprecation warning each.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let (config, deprecated) = Self::parse_keys(text, origin)?;
        for key in deprecated {
            tracing::warn!(
                "config {origin}: `{key}` is spelled in kebab-case, which is deprecated; write `{}`",
                key.replace('-', "_")
            );
        }
        config.validate(origin)
    }

    /// Parses `text` into a config, normalizing kebab-case keys; returns the deprecated
    /// spellings found (their paths).
    pub fn parse_keys(text: &str, origin: &str) -> Result<(Self, Vec<String>), ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        let mut deprecated = Vec::new();
        normalize_keys(&mut table, "", origin, &mut deprecated)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Schema {
                    path: origin.to_owned(),
                    field: e.path().to_string(),
                    message: e.inner().to_string(),
                }
            })?;
        Ok((config, deprecated))
    }

    fn validate(self, origin: &str) -> Result<Self, ConfigError> {
        let config = self;
        if config.shutdown.action == ShutdownActionName::Command
            && config.shutdown.command.is_empty()
        {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "shutdown.command",
                why: "action = \"command\" needs a command, e.g. command = [\"systemctl\", \"poweroff\"]",
            });
        }
        if config.kvp.plugin_key_deadline_ms == 0 || config.kvp.plugin_key_deadline_ms > 10_000 {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "kvp.plugin_key_deadline_ms",
                why: "must be 1..=10000: the host's request waits at most this long for plugin values",
            });
        }
        if config.kvp.lock_timeout_ms > 60_000 {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "kvp.lock_timeout_ms",
                why: "must be at most 60000: a host request waits this long for a locked pool",
            });
        }
        if config.kvp.max_records == 0 {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "kvp.max_records",
                why: "must be at least 1",
            });
        }
        if config.hvsock.connect_timeout_ms == 0 || config.hvsock.connect_timeout_ms > 600_000 {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field: "hvsock.connect_timeout_ms",
                why: "must be 1..=600000",
            });
        }
        for (name, target) in &config.hvsock.services {
            if crate::plugins::broker::ServiceMap::parse_target(target).is_none() {
                return Err(ConfigError::Invalid {
                    path: origin.to_owned(),
                    field: "hvsock.services",
                    why: if name.is_empty() {
                        "a service name is empty"
                    } else {
                        "each value must be a GUID or a decimal vsock port"
                    },
                });
            }
        }
        if let Err((field, why)) = config.fcopy.validate() {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                field,
                why,
            });
        }
        if let Err(errors) = hvisd_plugin_host::manifest::validate_all(&config.plugin) {
            return Err(ConfigError::Plugins {
                path: origin.to_owned(),
                errors,
            });
        }
        Ok(config)
    }

    /// Whether `kind` answers its offers.
    pub fn service_enabled(&self, kind: ServiceKind) -> bool {
        match kind {
            ServiceKind::Heartbeat => self.services.heartbeat,
            ServiceKind::Shutdown => self.services.shutdown,
            ServiceKind::TimeSync => self.services.timesync,
            ServiceKind::Kvp => self.services.kvp,
            ServiceKind::Vss => self.services.vss,
            ServiceKind::Fcopy => self.services.fcopy && self.fcopy.enabled,
        }
    }

    /// The shutdown action as the service takes it.
    pub fn shutdown_action(&self) -> ShutdownAction {
        match self.shutdown.action {
            ShutdownActionName::Log => ShutdownAction::LogOnly,
            ShutdownActionName::Command => ShutdownAction::Command(self.shutdown.command.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_enables_everything_and_only_logs_shutdown() {
        let config = Config::parse("", "test").unwrap();
        assert!(ServiceKind::ALL.iter().all(|k| config.service_enabled(*k)));
        assert!(matches!(config.shutdown_action(), ShutdownAction::LogOnly));
    }

    #[test]
    fn kvp_section_defaults_match_the_c_daemon_paths() {
        let config = Config::parse("", "test").unwrap();
        assert_eq!(config.kvp.pool_dir, Path::new("/var/lib/hyperv"));
        assert_eq!(config.kvp.device, Path::new("/dev/vmbus/hv_kvp"));
        let config = Config::parse("[kvp]\npool_dir = \"/tmp/p\"\n", "test").unwrap();
        assert_eq!(config.kvp.to_kvp_config().pool_dir, Path::new("/tmp/p"));
        let err = Config::parse("[kvp]\nplugin_key_deadline_ms = 0\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("plugin_key_deadline_ms"), "{err}");
    }

    #[test]
    fn hvsock_section_defaults_and_limits() {
        let config = Config::parse("", "test").unwrap();
        assert_eq!(
            config.hvsock.options().connect_timeout,
            crate::hvsock::DEFAULT_CONNECT_TIMEOUT
        );
        let config = Config::parse(
            "[hvsock]\nconnect_timeout_ms = 100\nunix_listen = \"/tmp/h.sock\"\nvsock_listen_ports = [5000]\n",
            "test",
        )
        .unwrap();
        assert_eq!(
            config.hvsock.unix_listen.as_deref(),
            Some(Path::new("/tmp/h.sock"))
        );
        assert_eq!(config.hvsock.vsock_listen_ports, [5000]);
        let err = Config::parse("[hvsock]\nconnect_timeout_ms = 0\n", "t.toml").unwrap_err();
        assert!(
            err.to_string().contains("hvsock.connect_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_incomplete_command_are_refused() {
        let err = Config::parse("[services]\nheartbeet = false\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("heartbeet"), "{err}");
        let err = Config::parse("[shutdown]\naction = \"command\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("shutdown.command"), "{err}");
    }

    #[test]
    fn keys_are_snake_case_and_kebab_case_is_accepted_as_deprecated() {
        let text = "[kvp]\npool-dir = \"/tmp/p\"\n[hvsock.services]\nhost-time = \"6000\"\n\n\
                    [[plugin]]\nname = \"a\"\npath = \"/a.wasm\"\nworlds = [\"kvp-provider\"]\n\
                    [plugin.limits]\nmemory-mib = 8\n[[plugin.kvp]]\npool = \"guest\"\nkeys = [\"a.*\"]\n";
        let (config, deprecated) = Config::parse_keys(text, "t.toml").unwrap();
        assert_eq!(config.kvp.pool_dir, PathBuf::from("/tmp/p"));
        assert_eq!(config.plugin[0].limits.memory_mib, 8);
        // Names the operator chose are not keys: left alone.
        assert_eq!(config.hvsock.services["host-time"], "6000");
        assert_eq!(deprecated, ["kvp.pool-dir", "plugin.limits.memory-mib"]);
        let both = "[kvp]\npool-dir = \"/a\"\npool_dir = \"/b\"\n";
        let err = Config::parse(both, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("given twice") && err.contains("keep `pool_dir`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_their_path() {
        let err = Config::parse("[kvp]\npool_dirr = \"/x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`kvp.pool_dirr`"), "{err}");
        let text = "[[plugin]]\nname = \"a\"\npath = \"/a.wasm\"\nworlds = [\"kvp-provider\"]\n\
                    [plugin.limits]\nmemory_mib = \"lots\"\n";
        let err = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("plugin[0].limits.memory_mib"), "{err}");
    }

    /// Key paths (`vss.policy.max_frozen_ms`) of a TOML value.
    fn key_paths(value: &toml::Value, path: &str, out: &mut std::collections::BTreeSet<String>) {
        let join = |k: &str| {
            if path.is_empty() {
                k.to_owned()
            } else {
                format!("{path}.{k}")
            }
        };
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let here = join(k);
                    out.insert(here.clone());
                    key_paths(v, &here, out);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    key_paths(item, path, out);
                }
            }
            _ => {}
        }
    }

    /// Key paths a commented TOML text mentions, set or commented out (`# key = ...`), under
    /// the tables its headers (commented or not) open.
    fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut table = String::new();
        for line in text.lines() {
            let l = line.trim_start_matches('#').trim();
            if let Some(h) = l.strip_prefix('[') {
                table = h.trim_matches(|c| c == '[' || c == ']').to_owned();
                out.insert(table.clone());
                continue;
            }
            if let Some((key, _)) = l.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.insert(if table.is_empty() {
                        key.to_owned()
                    } else {
                        format!("{table}.{key}")
                    });
                }
            }
        }
        out
    }

    #[test]
    fn the_example_config_parses_and_names_every_key() {
        let text = include_str!("../examples/hvisd.toml");
        let (config, deprecated) = Config::parse_keys(text, "examples/hvisd.toml").unwrap();
        assert!(deprecated.is_empty(), "{deprecated:?}");
        let config = config.validate("examples/hvisd.toml").unwrap();
        assert_eq!(config.runtime.transport, "kernel");
        // Every key of the schema: the defaults' (optional keys included by setting them), and
        // a plugin table with every field.
        let mut full = Config::default();
        full.vss.dry_run = Some(false);
        full.vss.policy.allow_only = Some(vec!["/".into()]);
        full.plugins.user = Some("hvisd-plugin".into());
        full.hvsock.unix_listen = Some("/run/hvisd/hvsock.sock".into());
        full.control.socket = Some("/run/hvisd/control.sock".into());
        full.control.metrics_listen = Some("127.0.0.1:9477".parse().unwrap());
        full.fcopy.allowed_dirs = Some(vec!["/srv".into()]);
        full.fcopy.owner = Some("root".into());
        full.fcopy.group = Some(0);
        let plugin: hvisd_plugin_host::PluginManifest = toml::from_str(
            "name = \"p\"\npath = \"/p.wasm\"\nworlds = [\"kvp-provider\"]\n\
             [[kvp]]\npool = \"guest\"\nkeys = [\"a\"]\n[[dirs]]\nhost = \"/a\"\nguest = \"/a\"\n",
        )
        .unwrap();
        full.plugin = vec![plugin];
        let mut schema = std::collections::BTreeSet::new();
        key_paths(&toml::Value::try_from(&full).unwrap(), "", &mut schema);
        let named = mentioned(text);
        let missing: Vec<&String> = schema.iter().filter(|k| !named.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "examples/hvisd.toml does not name {missing:?}"
        );
    }
}
