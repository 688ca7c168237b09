//! Plugin manifests: one `[[plugin]]` table of the runtime's TOML config.
//!
//! ```toml
//! [[plugin]]
//! name = "app-version"
//! path = "/usr/lib/hvisd/plugins/app_version.wasm"
//! worlds = ["kvp-provider"]
//! priority = 100                      # hook order: lower runs first
//!
//! [plugin.limits]
//! memory_mib = 16
//! call_deadline_ms = 10
//!
//! [[plugin.kvp]]
//! pool = "guest"
//! keys = ["app.*"]                    # `*` matches any run of characters
//! access = "read-write"
//!
//! [[plugin.dirs]]
//! host = "/var/lib/app"
//! guest = "/app"
//! access = "read-only"                # the default
//!
//! [plugin.hvsock]
//! listen = ["app-status"]
//! connect = []
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::types::{MAX_KEY_LEN, Pool, key_problem};

/// The plugin kinds (WIT worlds) a manifest may claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// `kvp-provider-plugin`: exports `hyperv:integration/kvp-provider`.
    KvpProvider,
    /// `freeze-hook-plugin`: exports `hyperv:integration/freeze-hooks`.
    FreezeHook,
    /// `freeze-policy-plugin`: exports `hyperv:integration/freeze-policy`.
    FreezePolicy,
    /// `hvsock-service-plugin`: exports `hyperv:integration/hvsock-service`.
    HvsockService,
}

impl World {
    /// Every world, in a stable order.
    pub const ALL: [World; 4] = [
        World::KvpProvider,
        World::FreezeHook,
        World::FreezePolicy,
        World::HvsockService,
    ];

    /// The name used in manifests (`kvp-provider`, ...).
    pub fn manifest_name(self) -> &'static str {
        match self {
            World::KvpProvider => "kvp-provider",
            World::FreezeHook => "freeze-hook",
            World::FreezePolicy => "freeze-policy",
            World::HvsockService => "hvsock-service",
        }
    }

    /// The WIT interface a component must export to implement this world.
    pub fn export_interface(self) -> &'static str {
        match self {
            World::KvpProvider => "hyperv:integration/kvp-provider@0.1.0",
            World::FreezeHook => "hyperv:integration/freeze-hooks@0.1.0",
            World::FreezePolicy => "hyperv:integration/freeze-policy@0.1.0",
            World::HvsockService => "hyperv:integration/hvsock-service@0.1.0",
        }
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.manifest_name())
    }
}

/// Read or read-write access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read only (the default).
    #[default]
    ReadOnly,
    /// Read and write.
    ReadWrite,
}

/// A grant on a KVP pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KvpGrant {
    /// The pool.
    pub pool: Pool,
    /// Key patterns; `*` matches any run of characters (`app.*`, `*`).
    pub keys: Vec<String>,
    /// Read-only (default) or read-write.
    #[serde(default)]
    pub access: Access,
}

/// A directory the plugin may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirGrant {
    /// Absolute path on this machine.
    pub host: PathBuf,
    /// The path the plugin sees (absolute, e.g. `/data`).
    pub guest: String,
    /// Read-only (default) or read-write.
    #[serde(default)]
    pub access: Access,
}

/// hvsock services a plugin may listen on or connect to.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HvsockGrant {
    /// Service names hvisd listens on for this plugin (hvsock-service world).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Service names the plugin may connect to through the `hvsock` import.
    #[serde(default)]
    pub connect: Vec<String>,
}

/// Resource limits of one plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory cap per instance, in MiB.
    pub memory_mib: u32,
    /// Deadline of every call into the plugin (provider get, hooks, policy), in ms.
    pub call_deadline_ms: u64,
    /// Deadline of one hvsock connection (the whole `serve` call), in ms.
    pub connection_deadline_ms: u64,
    /// A long-lived provider instance is replaced after this many calls.
    pub recycle_after_calls: u64,
    /// After this many traps in a row the plugin is disabled.
    pub max_consecutive_traps: u32,
    /// Share of one CPU the plugin's worker may use over `cpu_window_s`, in percent; past it the
    /// plugin is throttled for the rest of the window (disabled after three windows).
    pub cpu_percent: u32,
    /// The window of `cpu_percent`, in seconds.
    pub cpu_window_s: u64,
    /// Log lines a minute the plugin may write (after a burst of as many); the rest are counted.
    pub log_lines_per_minute: u32,
    /// hvsock connections (served and opened together) the plugin may have open at once; more
    /// are closed at once (a served one) or refused with `unavailable` (a connect).
    pub hvsock_connections: u32,
    /// An hvsock connection with no byte in either direction for this long is closed, in ms.
    pub hvsock_idle_ms: u64,
    /// Bytes of one hvsock connection buffered between the core and the worker, each way, in
    /// KiB (the socket buffers; the core's copy buffer adds at most 64 KiB).
    pub hvsock_buffer_kib: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 16,
            call_deadline_ms: 50,
            connection_deadline_ms: 60_000,
            recycle_after_calls: 10_000,
            max_consecutive_traps: 3,
            cpu_percent: 25,
            cpu_window_s: 10,
            log_lines_per_minute: 60,
            hvsock_connections: 16,
            hvsock_idle_ms: 60_000,
            hvsock_buffer_kib: 256,
        }
    }
}

/// One `[[plugin]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginManifest {
    /// Unique name; tags the plugin's log lines and status.
    pub name: String,
    /// Path of the component (`.wasm`).
    pub path: PathBuf,
    /// The worlds the component implements.
    pub worlds: Vec<World>,
    /// Hook order: lower runs first in pre-freeze (and last in post-thaw).
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// KVP grants.
    #[serde(default)]
    pub kvp: Vec<KvpGrant>,
    /// Directory grants.
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// hvsock grants.
    #[serde(default)]
    pub hvsock: HvsockGrant,
}

fn default_priority() -> i32 {
    100
}

/// A manifest error: which plugin, which field, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{plugin}`: field `{field}`: {problem}; fix: {fix}")]
pub struct ManifestError {
    /// The plugin's name (or its index when the name itself is bad).
    pub plugin: String,
    /// The offending field, e.g. `kvp[0].keys[1]`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

const MAX_MEMORY_MIB: u32 = 4096;
const MAX_DEADLINE_MS: u64 = 10 * 60 * 1000;

impl PluginManifest {
    /// Checks the manifest; returns every problem found, each naming the plugin, field and fix.
    pub fn validate(&self) -> Result<(), Vec<ManifestError>> {
        let mut errs = Vec::new();
        let name = self.name.clone();
        let mut err = |field: &str, problem: String, fix: &str| {
            errs.push(ManifestError {
                plugin: name.clone(),
                field: field.to_owned(),
                problem,
                fix: fix.to_owned(),
            })
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            err(
                "name",
                format!("`{}` is not a valid plugin name", self.name),
                "use 1 to 64 characters from a-z, 0-9, `-` and `_`",
            );
        }
        if !self.path.is_absolute() {
            err(
                "path",
                format!("`{}` is relative", self.path.display()),
                "give the absolute path of the .wasm component",
            );
        }
        if self.worlds.is_empty() {
            err(
                "worlds",
                "no world is listed".into(),
                "list at least one of kvp-provider, freeze-hook, freeze-policy, hvsock-service",
            );
        }
        for (i, w) in self.worlds.iter().enumerate() {
            if self.worlds[..i].contains(w) {
                err(
                    &format!("worlds[{i}]"),
                    format!("`{w}` is listed twice"),
                    "list each world once",
                );
            }
        }
        let l = &self.limits;
        if l.memory_mib == 0 || l.memory_mib > MAX_MEMORY_MIB {
            err(
                "limits.memory_mib",
                format!("{} MiB is out of range", l.memory_mib),
                "use a value from 1 to 4096",
            );
        }
        for (field, v) in [
            ("limits.call_deadline_ms", l.call_deadline_ms),
            ("limits.connection_deadline_ms", l.connection_deadline_ms),
        ] {
            if v == 0 || v > MAX_DEADLINE_MS {
                err(
                    field,
                    format!("{v} ms is out of range"),
                    "use a value from 1 to 600000",
                );
            }
        }
        if l.recycle_after_calls == 0 {
            err(
                "limits.recycle_after_calls",
                "0 would recycle before the first call".into(),
                "use 1 or more (default 10000)",
            );
        }
        if l.max_consecutive_traps == 0 {
            err(
                "limits.max_consecutive_traps",
                "0 would disable the plugin before it runs".into(),
                "use 1 or more (default 3)",
            );
        }
        if l.cpu_percent == 0 || l.cpu_percent > 100 {
            err(
                "limits.cpu_percent",
                format!("{}% is out of range", l.cpu_percent),
                "use a value from 1 to 100 (default 25)",
            );
        }
        if l.hvsock_connections == 0 || l.hvsock_connections > 256 {
            err(
                "limits.hvsock_connections",
                format!("{} is out of range", l.hvsock_connections),
                "use a value from 1 to 256 (default 16)",
            );
        }
        if l.hvsock_idle_ms == 0 || l.hvsock_idle_ms > 86_400_000 {
            err(
                "limits.hvsock_idle_ms",
                format!("{} ms is out of range", l.hvsock_idle_ms),
                "use a value from 1 to 86400000 (default 60000)",
            );
        }
        if l.hvsock_buffer_kib < 8 || l.hvsock_buffer_kib > 4096 {
            err(
                "limits.hvsock_buffer_kib",
                format!("{} KiB is out of range", l.hvsock_buffer_kib),
                "use a value from 8 to 4096 (default 256)",
            );
        }
        if l.cpu_window_s == 0 || l.cpu_window_s > 3600 {
            err(
                "limits.cpu_window_s",
                format!("{} s is out of range", l.cpu_window_s),
                "use a value from 1 to 3600 (default 10)",
            );
        }
        for (i, g) in self.kvp.iter().enumerate() {
            if g.keys.is_empty() {
                err(
                    &format!("kvp[{i}].keys"),
                    "no key pattern".into(),
                    "list patterns such as \"app.*\" or \"*\"",
                );
            }
            for (j, k) in g.keys.iter().enumerate() {
                if let Some(problem) = key_problem(k) {
                    err(
                        &format!("kvp[{i}].keys[{j}]"),
                        format!("pattern `{}` {problem}", k.escape_default()),
                        &format!("use a pattern of 1 to {MAX_KEY_LEN} bytes without NUL"),
                    );
                }
            }
            if g.pool == Pool::AutoInternal && g.access == Access::ReadWrite {
                err(
                    &format!("kvp[{i}].access"),
                    "the internal pool (auto-internal) belongs to Hyper-V".into(),
                    "grant read-only on the internal pool, or drop the grant",
                );
            }
        }
        for (i, d) in self.dirs.iter().enumerate() {
            if !d.host.is_absolute() {
                err(
                    &format!("dirs[{i}].host"),
                    format!("`{}` is relative", d.host.display()),
                    "give an absolute host directory",
                );
            }
            if !d.guest.starts_with('/') || d.guest.split('/').any(|c| c == "..") {
                err(
                    &format!("dirs[{i}].guest"),
                    format!("`{}` is not an absolute path without `..`", d.guest),
                    "use a guest path such as \"/data\"",
                );
            }
            if self.dirs[..i].iter().any(|o| o.guest == d.guest) {
                err(
                    &format!("dirs[{i}].guest"),
                    format!("`{}` is granted twice", d.guest),
                    "give each directory its own guest path",
                );
            }
        }
        for (field, list) in [
            ("hvsock.listen", &self.hvsock.listen),
            ("hvsock.connect", &self.hvsock.connect),
        ] {
            for (i, s) in list.iter().enumerate() {
                if s.is_empty()
                    || s.len() > 64
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                {
                    err(
                        &format!("{field}[{i}]"),
                        format!("`{s}` is not a valid service name"),
                        "use 1 to 64 characters from A-Z, a-z, 0-9, `-`, `_` and `.`",
                    );
                }
            }
        }
        let serves = self.worlds.contains(&World::HvsockService);
        if serves && self.hvsock.listen.is_empty() {
            err(
                "hvsock.listen",
                "the plugin claims hvsock-service but listens on nothing".into(),
                "add the service names to hvsock.listen",
            );
        }
        if !serves && !self.hvsock.listen.is_empty() {
            err(
                "hvsock.listen",
                "only an hvsock-service plugin can listen".into(),
                "add \"hvsock-service\" to worlds or empty hvsock.listen",
            );
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// The access granted on `key` in `pool`, if any (the widest matching grant wins).
    pub fn kvp_access(&self, pool: Pool, key: &str) -> Option<Access> {
        let mut best = None;
        for g in self.kvp.iter().filter(|g| g.pool == pool) {
            if g.keys.iter().any(|p| pattern_matches(p, key)) {
                if g.access == Access::ReadWrite {
                    return Some(Access::ReadWrite);
                }
                best = Some(Access::ReadOnly);
            }
        }
        best
    }

    /// Whether any grant gives read access on `pool`.
    pub fn can_read_pool(&self, pool: Pool) -> bool {
        self.kvp.iter().any(|g| g.pool == pool)
    }
}

/// Checks every manifest and that names and listened services are unique.
pub fn validate_all(manifests: &[PluginManifest]) -> Result<(), Vec<ManifestError>> {
    let mut errs = Vec::new();
    for (i, m) in manifests.iter().enumerate() {
        if let Err(e) = m.validate() {
            errs.extend(e);
        }
        if manifests[..i].iter().any(|o| o.name == m.name) {
            errs.push(ManifestError {
                plugin: m.name.clone(),
                field: "name".into(),
                problem: "another [[plugin]] has the same name".into(),
                fix: "give every plugin its own name".into(),
            });
        }
        for s in &m.hvsock.listen {
            if let Some(o) = manifests[..i].iter().find(|o| o.hvsock.listen.contains(s)) {
                errs.push(ManifestError {
                    plugin: m.name.clone(),
                    field: "hvsock.listen".into(),
                    problem: format!("service `{s}` is already served by plugin `{}`", o.name),
                    fix: "let one plugin listen on each service".into(),
                });
            }
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Glob match where `*` matches any run of characters (including none).
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    let mut parts = pattern.split('*');
    // split always yields at least one part.
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = key.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*` at all: exact match.
        return rest.is_empty();
    };
    for m in middle {
        match rest.find(m) {
            Some(at) => rest = &rest[at + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PluginManifest {
        toml::from_str(
            r#"
            name = "app"
            path = "/p/app.wasm"
            worlds = ["kvp-provider"]
            [[kvp]]
            pool = "guest"
            keys = ["app.*"]
            access = "read-write"
            "#,
        )
        .expect("sample parses")
    }

    #[test]
    fn glob_patterns_match_prefix_suffix_and_middle() {
        assert!(pattern_matches("app.*", "app.version"));
        assert!(pattern_matches("*", ""));
        assert!(pattern_matches("a*b*c", "aXbYc"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(!pattern_matches("app.*", "other"));
        assert!(!pattern_matches("a*ab", "ab"));
        assert!(pattern_matches("*.version", "app.version"));
    }

    #[test]
    fn valid_manifest_parses_with_defaults_and_validates() {
        let m = sample();
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.priority, 100);
        m.validate().expect("valid");
        assert_eq!(m.kvp_access(Pool::Guest, "app.x"), Some(Access::ReadWrite));
        assert_eq!(m.kvp_access(Pool::Guest, "other"), None);
        assert_eq!(m.kvp_access(Pool::External, "app.x"), None);
    }

    #[test]
    fn validation_errors_name_plugin_field_and_fix() {
        let mut m = sample();
        m.path = "rel.wasm".into();
        m.limits.memory_mib = 0;
        m.kvp[0].keys.push(String::new());
        let errs = m.validate().expect_err("invalid");
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("plugin `app`: field `path`"))
        );
        assert!(text.iter().any(|t| t.contains("field `limits.memory_mib`")));
        assert!(text.iter().any(|t| t.contains("field `kvp[0].keys[1]`")));
        assert!(text.iter().all(|t| t.contains("fix: ")));
    }

    #[test]
    fn pools_are_named_as_the_operator_knows_them_and_internal_is_pool_4() {
        let m: PluginManifest = toml::from_str(
            r#"
            name = "app"
            path = "/p/app.wasm"
            worlds = ["kvp-provider"]
            [[kvp]]
            pool = "internal"
            keys = ["*"]
            [[kvp]]
            pool = "auto-internal"
            keys = ["*"]
            [[kvp]]
            pool = "auto-external"
            keys = ["*"]
            "#,
        )
        .expect("parses");
        let pools: Vec<Pool> = m.kvp.iter().map(|g| g.pool).collect();
        assert_eq!(
            pools,
            [Pool::AutoInternal, Pool::AutoInternal, Pool::AutoExternal]
        );
        m.validate().expect("read-only grants on pool 4 are fine");
    }

    #[test]
    fn a_pattern_over_511_bytes_is_refused() {
        let mut m = sample();
        m.kvp[0].keys = vec!["k".repeat(511)];
        m.validate().expect("511 bytes fit a pool record");
        m.kvp[0].keys = vec!["k".repeat(512)];
        let errs = m.validate().expect_err("512 bytes do not");
        assert!(
            errs[0].problem.contains("is 512 bytes, limit 511"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_by_the_parser() {
        let r: Result<PluginManifest, _> =
            toml::from_str("name = \"a\"\npath = \"/a\"\nworlds = []\nmemroy = 1\n");
        let e = r.expect_err("unknown field");
        assert!(e.to_string().contains("memroy"));
    }

    #[test]
    fn duplicate_names_and_services_are_refused() {
        let mut a = sample();
        a.worlds = vec![World::HvsockService];
        a.hvsock.listen = vec!["echo".into()];
        let b = a.clone();
        let errs = validate_all(&[a, b]).expect_err("dupes");
        assert!(errs.iter().any(|e| e.field == "name"));
        assert!(errs.iter().any(|e| e.problem.contains("already served")));
    }
}
