//! The declarative freeze policy: the `[vss]` section of the runtime's configuration.
//!
//! ```toml
//! [vss]
//! default_rules = true        # hv_vss_daemon's selection (on by default)
//! max_frozen_ms = 60000       # thaw by then whatever happens
//! allow_only = ["/mnt/a"]     # optional: nothing else is ever frozen
//!
//! [vss.include]               # frozen even where the default rules skip them
//! mount_points = ["/srv/**"]
//! fs_types = ["xfs"]
//! sources = ["/dev/mapper/data-*"]
//!
//! [vss.exclude]               # never frozen, whatever matches include
//! mount_points = ["/var/lib/docker/**"]
//!
//! [vss.order]                 # frozen before / after the others ("/" is always last)
//! first = ["/var/lib/postgresql"]
//! last = ["/boot"]
//! ```
//!
//! Mount-point and source patterns are globs (the `globset` crate): `*`, `?` and `[...]` never
//! match `/`, `**` matches any number of path components, `\` escapes. File system types are
//! compared exactly. Order entries and `allow_only` entries are exact mount points.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};

use crate::mount::{Mount, path_name};

/// Default for [`VssPolicy::max_frozen_ms`]: one minute.
pub const DEFAULT_MAX_FROZEN_MS: u64 = 60_000;

/// Largest [`VssPolicy::max_frozen_ms`] accepted: the 15 minutes Linux's `hv_snapshot.c` lets
/// a freeze take before it gives up on the daemon. A host that keeps a guest frozen longer is
/// not taking a backup.
pub const MAX_FROZEN_MS_LIMIT: u64 = 15 * 60 * 1000;

/// The `[vss]` section: what a backup freezes and in which order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VssPolicy {
    /// Apply `hv_vss_daemon`'s selection to mounts no include rule names: freeze file systems
    /// whose source is under `/dev/`, unless loop-backed, read-only or vfat (and, unlike the C
    /// daemon, unless FUSE). Off: only included mounts are frozen.
    pub default_rules: bool,
    /// Mounts frozen even where the default rules would skip them.
    pub include: MountSelector,
    /// Mounts never frozen. Beats `include`; and since freezing works on a whole file system,
    /// excluding one mount of a file system keeps all its mounts from being frozen.
    pub exclude: MountSelector,
    /// Mount points frozen before and after the others.
    pub order: FreezeOrder,
    /// Longest time file systems may stay frozen before hvisd thaws them itself.
    pub max_frozen_ms: u64,
    /// When set, the only mount points that may ever be frozen, whatever the other rules say. A
    /// file system that is also mounted somewhere outside this list is not frozen either
    /// (freezing it through an allowed mount point would freeze the other one too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_only: Option<Vec<PathBuf>>,
}

impl Default for VssPolicy {
    fn default() -> Self {
        VssPolicy {
            default_rules: true,
            include: MountSelector::default(),
            exclude: MountSelector::default(),
            order: FreezeOrder::default(),
            max_frozen_ms: DEFAULT_MAX_FROZEN_MS,
            allow_only: None,
        }
    }
}

/// Rules naming mounts; a mount matches if any one rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountSelector {
    /// Globs over the mount point (absolute).
    pub mount_points: Vec<String>,
    /// File system types, exactly (`xfs`, `fuse.sshfs`).
    pub fs_types: Vec<String>,
    /// Globs over the mount source (`/dev/sd*`).
    pub sources: Vec<String>,
}

/// Mount points frozen first and last, each list in its order. A listed mount point that the
/// plan does not freeze is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreezeOrder {
    /// Frozen before all others, in this order.
    pub first: Vec<PathBuf>,
    /// Frozen after all others (but before `/`), in this order.
    pub last: Vec<PathBuf>,
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A glob does not compile.
    #[error("vss.{list}: bad glob \"{pattern}\": {reason}")]
    BadGlob {
        /// The list, e.g. `"exclude.mount_points"`.
        list: &'static str,
        /// The pattern.
        pattern: String,
        /// What the glob compiler said.
        reason: String,
    },
    /// A mount-point glob or path that is not absolute (it could never match).
    #[error("vss.{list}: \"{entry}\" is not an absolute path")]
    NotAbsolute {
        /// The list.
        list: &'static str,
        /// The entry, escaped.
        entry: String,
    },
    /// `max_frozen_ms` out of range.
    #[error("vss.max_frozen_ms = {value}: must be between 1 and {MAX_FROZEN_MS_LIMIT}")]
    MaxFrozen {
        /// The value given.
        value: u64,
    },
    /// `/` in an order list.
    #[error("vss.order.{list}: \"/\" is always frozen last; leave it out of the order lists")]
    RootInOrder {
        /// `"first"` or `"last"`.
        list: &'static str,
    },
    /// A mount point listed twice across `order.first` and `order.last`.
    #[error("vss.order: \"{path}\" is listed twice")]
    OrderedTwice {
        /// The mount point, escaped.
        path: String,
    },
}

/// A rule that matched a mount, for the plan's reasons: the list and the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The list, e.g. `"exclude.mount_points"`.
    pub list: &'static str,
    /// The entry as the policy wrote it.
    pub entry: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} \"{}\"", self.list, self.entry.escape_debug())
    }
}

/// A validated policy with compiled globs, ready to plan with.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    policy: VssPolicy,
    include: Selector,
    exclude: Selector,
}

impl CompiledPolicy {
    /// The policy it was compiled from.
    pub fn policy(&self) -> &VssPolicy {
        &self.policy
    }

    /// The include rule matching `mount`, if any.
    pub fn included_by(&self, mount: &Mount) -> Option<Rule> {
        self.include.matching(mount)
    }

    /// The exclude rule matching `mount`, if any.
    pub fn excluded_by(&self, mount: &Mount) -> Option<Rule> {
        self.exclude.matching(mount)
    }

    /// Whether `allow_only` lets `mount_point` be frozen (always, without `allow_only`).
    pub fn allows(&self, mount_point: &Path) -> bool {
        self.policy
            .allow_only
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|a| a == mount_point))
    }
}

impl VssPolicy {
    /// Validates the policy and compiles its globs.
    pub fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        if !(1..=MAX_FROZEN_MS_LIMIT).contains(&self.max_frozen_ms) {
            return Err(PolicyError::MaxFrozen {
                value: self.max_frozen_ms,
            });
        }
        for (list, paths) in [
            ("order.first", &self.order.first),
            ("order.last", &self.order.last),
        ] {
            for p in paths {
                absolute(list, p)?;
                if p.as_os_str().as_bytes() == b"/" {
                    return Err(PolicyError::RootInOrder {
                        list: &list["order.".len()..],
                    });
                }
            }
        }
        let ordered: Vec<&PathBuf> = self.order.first.iter().chain(&self.order.last).collect();
        for (i, p) in ordered.iter().enumerate() {
            if ordered[..i].contains(p) {
                return Err(PolicyError::OrderedTwice { path: path_name(p) });
            }
        }
        for p in self.allow_only.iter().flatten() {
            absolute("allow_only", p)?;
        }
        Ok(CompiledPolicy {
            policy: self.clone(),
            include: Selector::compile(&self.include, INCLUDE_LISTS)?,
            exclude: Selector::compile(&self.exclude, EXCLUDE_LISTS)?,
        })
    }
}

fn absolute(list: &'static str, p: &Path) -> Result<(), PolicyError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(PolicyError::NotAbsolute {
            list,
            entry: path_name(p),
        })
    }
}

const INCLUDE_LISTS: [&str; 3] = [
    "include.mount_points",
    "include.fs_types",
    "include.sources",
];
const EXCLUDE_LISTS: [&str; 3] = [
    "exclude.mount_points",
    "exclude.fs_types",
    "exclude.sources",
];

#[derive(Debug, Clone)]
struct Selector {
    mount_points: Vec<(Rule, GlobMatcher)>,
    fs_types: Vec<Rule>,
    sources: Vec<(Rule, GlobMatcher)>,
}

impl Selector {
    fn compile(
        sel: &MountSelector,
        [mp_list, fs_list, src_list]: [&'static str; 3],
    ) -> Result<Selector, PolicyError> {
        let mount_points = sel
            .mount_points
            .iter()
            .map(|p| {
                if !p.starts_with('/') {
                    return Err(PolicyError::NotAbsolute {
                        list: mp_list,
                        entry: p.clone(),
                    });
                }
                glob(mp_list, p)
            })
            .collect::<Result<_, _>>()?;
        let sources = sel
            .sources
            .iter()
            .map(|p| glob(src_list, p))
            .collect::<Result<_, _>>()?;
        let fs_types = sel
            .fs_types
            .iter()
            .map(|t| Rule {
                list: fs_list,
                entry: t.clone(),
            })
            .collect();
        Ok(Selector {
            mount_points,
            fs_types,
            sources,
        })
    }

    fn matching(&self, mount: &Mount) -> Option<Rule> {
        let by_glob = |rules: &[(Rule, GlobMatcher)], text: &OsStr| {
            rules
                .iter()
                .find(|(_, g)| g.is_match(Path::new(text)))
                .map(|(r, _)| r.clone())
        };
        by_glob(&self.mount_points, mount.mount_point.as_os_str())
            .or_else(|| {
                self.fs_types
                    .iter()
                    .find(|r| r.entry.as_bytes() == mount.fs_type.as_bytes())
                    .cloned()
            })
            .or_else(|| by_glob(&self.sources, &mount.source))
    }
}

fn glob(list: &'static str, pattern: &str) -> Result<(Rule, GlobMatcher), PolicyError> {
    let matcher = GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| PolicyError::BadGlob {
            list,
            pattern: pattern.to_owned(),
            reason: e.kind().to_string(),
        })?
        .compile_matcher();
    Ok((
        Rule {
            list,
            entry: pattern.to_owned(),
        },
        matcher,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_protocol::mountinfo::MountInfo;

    fn mount(line: &str) -> Mount {
        Mount::from_mountinfo(&MountInfo::parse_line(line.as_bytes()).unwrap())
    }

    #[test]
    fn toml_section_with_every_field_deserialises() {
        let p: VssPolicy = toml::from_str(
            r#"
            default_rules = false
            max_frozen_ms = 5000
            allow_only = ["/mnt/a", "/mnt/b"]
            [include]
            mount_points = ["/srv/**"]
            fs_types = ["xfs"]
            sources = ["/dev/mapper/data-*"]
            [exclude]
            mount_points = ["/srv/scratch"]
            [order]
            first = ["/srv/db"]
            last = ["/boot"]
            "#,
        )
        .unwrap();
        assert!(!p.default_rules);
        assert_eq!(p.max_frozen_ms, 5000);
        assert_eq!(p.allow_only.as_ref().unwrap().len(), 2);
        assert_eq!(p.include.fs_types, ["xfs"]);
        assert_eq!(p.order.last, [PathBuf::from("/boot")]);
        p.compile().unwrap();
    }

    #[test]
    fn empty_section_is_the_default() {
        let p: VssPolicy = toml::from_str("").unwrap();
        assert_eq!(p, VssPolicy::default());
        assert!(p.default_rules);
        assert_eq!(p.max_frozen_ms, 60_000);
        assert!(p.allow_only.is_none());
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        for text in [
            "max_frozen = 5",
            "[include]\nmountpoints = []",
            "[order]\nmiddle = []",
        ] {
            assert!(toml::from_str::<VssPolicy>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn invalid_policies_say_what_is_wrong() {
        let with = |f: fn(&mut VssPolicy)| {
            let mut p = VssPolicy::default();
            f(&mut p);
            p.compile().unwrap_err()
        };
        assert_eq!(
            with(|p| p.max_frozen_ms = 0),
            PolicyError::MaxFrozen { value: 0 }
        );
        assert!(matches!(
            with(|p| p.max_frozen_ms = MAX_FROZEN_MS_LIMIT + 1),
            PolicyError::MaxFrozen { .. }
        ));
        assert!(matches!(
            with(|p| p.exclude.mount_points = vec!["/a/[".into()]),
            PolicyError::BadGlob {
                list: "exclude.mount_points",
                ..
            }
        ));
        assert_eq!(
            with(|p| p.include.mount_points = vec!["mnt/*".into()]),
            PolicyError::NotAbsolute {
                list: "include.mount_points",
                entry: "mnt/*".into()
            }
        );
        assert_eq!(
            with(|p| p.order.first = vec!["/".into()]),
            PolicyError::RootInOrder { list: "first" }
        );
        assert_eq!(
            with(|p| {
                p.order.first = vec!["/a".into()];
                p.order.last = vec!["/a".into()];
            }),
            PolicyError::OrderedTwice { path: "/a".into() }
        );
        assert!(matches!(
            with(|p| p.allow_only = Some(vec!["rel".into()])),
            PolicyError::NotAbsolute {
                list: "allow_only",
                ..
            }
        ));
        let e = with(|p| p.max_frozen_ms = 0).to_string();
        assert!(e.starts_with("vss.max_frozen_ms = 0"), "{e}");
    }

    #[test]
    fn star_stops_at_slash_and_double_star_crosses_it() {
        let mut p = VssPolicy::default();
        p.include.mount_points = vec!["/mnt/*".into()];
        p.exclude.mount_points = vec!["/srv/**".into()];
        let c = p.compile().unwrap();
        let a = mount("1 1 8:1 / /mnt/a rw - ext4 /dev/sda1 rw");
        let ab = mount("2 1 8:2 / /mnt/a/b rw - ext4 /dev/sda2 rw");
        let deep = mount("3 1 8:3 / /srv/x/y/z rw - ext4 /dev/sda3 rw");
        assert_eq!(
            c.included_by(&a).unwrap().to_string(),
            "include.mount_points \"/mnt/*\""
        );
        assert!(c.included_by(&ab).is_none());
        assert!(c.excluded_by(&deep).is_some());
    }

    #[test]
    fn fs_type_is_exact_and_sources_are_globs() {
        let mut p = VssPolicy::default();
        p.include.fs_types = vec!["fuse.sshfs".into()];
        p.exclude.sources = vec!["/dev/mapper/scratch-*".into()];
        let c = p.compile().unwrap();
        let sshfs = mount("1 1 0:50 / /home/a/r rw - fuse.sshfs a@h: rw");
        let fuse = mount("2 1 0:51 / /home/a/s rw - fuse s rw");
        let scratch = mount("3 1 253:1 / /scratch rw - xfs /dev/mapper/scratch-vol rw");
        assert!(c.included_by(&sshfs).is_some());
        assert!(c.included_by(&fuse).is_none());
        assert_eq!(c.excluded_by(&scratch).unwrap().list, "exclude.sources");
    }

    #[test]
    fn globs_match_mount_points_that_are_not_utf8() {
        let mut p = VssPolicy::default();
        p.exclude.mount_points = vec!["/mnt/*".into()];
        let c = p.compile().unwrap();
        let m = mount("1 1 8:1 / /mnt/\\377x rw - ext4 /dev/sda1 rw");
        assert!(c.excluded_by(&m).is_some());
    }

    #[test]
    fn allow_only_is_exact() {
        let p = VssPolicy {
            allow_only: Some(vec!["/mnt/a".into()]),
            ..VssPolicy::default()
        };
        let c = p.compile().unwrap();
        assert!(c.allows(Path::new("/mnt/a")));
        assert!(!c.allows(Path::new("/mnt/a/b")));
        assert!(!c.allows(Path::new("/mnt")));
        assert!(
            VssPolicy::default()
                .compile()
                .unwrap()
                .allows(Path::new("/"))
        );
    }
}
