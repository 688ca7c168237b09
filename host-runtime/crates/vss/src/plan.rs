//! The freeze plan: which mounts a FREEZE freezes, in which order, and why every other mount is
//! left alone; and how a freeze-policy plugin may narrow it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hvisd_protocol::mountinfo::DeviceNumber;
use hvisd_protocol::text::escape;

use crate::mount::{Mount, escape_name, parse_mount_point_name, path_name};
use crate::policy::{CompiledPolicy, Rule};

/// What a FREEZE does: `freeze` in order, THAW in reverse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Mounts to freeze, one per file system, in freeze order (`/` last). Thaw is the reverse.
    pub freeze: Vec<Planned>,
    /// Every other mount of the table, with the reason it is not frozen (mount-table order,
    /// then mounts a plugin dropped).
    pub skipped: Vec<Skipped>,
    /// The policy's `max_frozen_ms`: thaw by then whatever happens.
    pub max_frozen_ms: u64,
}

/// A mount the plan freezes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Planned {
    /// The mount (the file system is frozen through its mount point).
    pub mount: Mount,
    /// Why it is frozen.
    #[serde(serialize_with = "display")]
    pub selected_by: Selection,
}

/// Why a mount is frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `hv_vss_daemon`'s rules (`default_rules`).
    DefaultRules,
    /// An include rule.
    Included(Rule),
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::DefaultRules => f.write_str("default rules"),
            Selection::Included(rule) => write!(f, "included by {rule}"),
        }
    }
}

/// A mount the plan leaves alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The mount.
    pub mount: Mount,
    /// Why.
    pub reason: SkipReason,
}

/// Why a mount is not frozen. `Display` is the sentence `hvisd vss plan` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `allow_only` is set and does not list it.
    NotInAllowOnly,
    /// Its file system is also mounted at a mount point `allow_only` does not list.
    SharesFileSystemOutsideAllowOnly {
        /// That other mount point.
        other: PathBuf,
    },
    /// An exclude rule matches it.
    Excluded(Rule),
    /// An exclude rule matches another mount of the same file system.
    SharesFileSystemWithExcluded {
        /// The excluded mount point.
        other: PathBuf,
        /// The rule.
        rule: Rule,
    },
    /// Another mount at the same mount point is on top of it: its path leads to that one.
    Hidden {
        /// Mount ID of the mount on top.
        by_mount_id: u32,
    },
    /// Default rules: the source is not under `/dev/`.
    NotBlockDevice,
    /// Default rules: loop-backed.
    LoopBacked,
    /// Default rules: read-only.
    ReadOnly,
    /// Default rules: vfat.
    Vfat,
    /// Default rules (hvisd's addition): FUSE.
    Fuse,
    /// Default rules are off and no include rule matches.
    NotIncluded,
    /// The same file system is frozen through another mount point.
    SameFileSystem {
        /// The mount point it is frozen through.
        frozen_through: PathBuf,
        /// The file system's device.
        device: DeviceNumber,
    },
    /// A freeze-policy plugin left it out of its answer.
    DroppedByPlugin,
}

impl SkipReason {
    /// A stable short code for scripts (`"read-only"`, `"same-file-system"`...).
    pub fn code(&self) -> &'static str {
        match self {
            SkipReason::NotInAllowOnly => "not-in-allow-only",
            SkipReason::SharesFileSystemOutsideAllowOnly { .. } => "shares-fs-outside-allow-only",
            SkipReason::Excluded(_) => "excluded",
            SkipReason::SharesFileSystemWithExcluded { .. } => "shares-fs-with-excluded",
            SkipReason::Hidden { .. } => "hidden",
            SkipReason::NotBlockDevice => "not-block-device",
            SkipReason::LoopBacked => "loop-backed",
            SkipReason::ReadOnly => "read-only",
            SkipReason::Vfat => "vfat",
            SkipReason::Fuse => "fuse",
            SkipReason::NotIncluded => "not-included",
            SkipReason::SameFileSystem { .. } => "same-file-system",
            SkipReason::DroppedByPlugin => "dropped-by-plugin",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotInAllowOnly => f.write_str("not in allow_only"),
            SkipReason::SharesFileSystemOutsideAllowOnly { other } => write!(
                f,
                "its file system is also mounted at {}, which allow_only does not list",
                path_name(other)
            ),
            SkipReason::Excluded(rule) => write!(f, "excluded by {rule}"),
            SkipReason::SharesFileSystemWithExcluded { other, rule } => write!(
                f,
                "same file system as {}, excluded by {rule}",
                path_name(other)
            ),
            SkipReason::Hidden { by_mount_id } => write!(
                f,
                "hidden under mount {by_mount_id} at the same mount point, so it cannot be \
                 reached to freeze"
            ),
            SkipReason::NotBlockDevice => f.write_str("source is not a /dev/ device"),
            SkipReason::LoopBacked => f.write_str("backed by a loop device"),
            SkipReason::ReadOnly => f.write_str("mounted read-only"),
            SkipReason::Vfat => f.write_str("vfat (hv_vss_daemon never freezes it)"),
            SkipReason::Fuse => f.write_str(
                "FUSE: freezing would wait on its user-space daemon, which any user may run",
            ),
            SkipReason::NotIncluded => {
                f.write_str("default rules are off and no include rule matches")
            }
            SkipReason::SameFileSystem {
                frozen_through,
                device,
            } => write!(
                f,
                "same file system ({device}) as {}, frozen once through it",
                path_name(frozen_through)
            ),
            SkipReason::DroppedByPlugin => f.write_str("dropped by policy plugin"),
        }
    }
}

impl serde::Serialize for SkipReason {
    /// `{"code": "...", "message": "..."}`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("SkipReason", 2)?;
        s.serialize_field("code", self.code())?;
        s.serialize_field("message", &self.to_string())?;
        s.end()
    }
}

fn display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// `hv_vss_daemon`'s selection (`vss_operate`), in its order, plus hvisd's FUSE rule.
fn default_rules(m: &Mount) -> Result<(), SkipReason> {
    if !m.source.as_bytes().starts_with(b"/dev/") {
        return Err(SkipReason::NotBlockDevice);
    }
    if m.loop_backed {
        return Err(SkipReason::LoopBacked);
    }
    if m.read_only {
        return Err(SkipReason::ReadOnly);
    }
    let fs_type = m.fs_type.as_bytes();
    if fs_type == b"vfat" {
        return Err(SkipReason::Vfat);
    }
    // A FUSE file system whose source a user set to "/dev/..." passes the C daemon's rules, and
    // FIFREEZE waits for the writes in flight and the sync, which the FUSE daemon serves: a user
    // could stall every freeze, with the file systems frozen before it staying frozen.
    // `fuseblk` needs privilege to mount and stays in.
    if fs_type == b"fuse" || fs_type.starts_with(b"fuse.") {
        return Err(SkipReason::Fuse);
    }
    Ok(())
}

/// Plans a freeze of `mounts` (in mount-table order) under `policy`.
///
/// Per mount, the first of these that applies decides:
/// 1. `allow_only` is set and does not list it: skipped;
/// 2. an exclude rule matches: skipped;
/// 3. another mount at the same mount point is on top of it: skipped (the path leads there);
/// 4. an include rule matches: frozen;
/// 5. with `default_rules`, `hv_vss_daemon`'s rules decide; without, skipped.
///
/// Then per file system (mounts with the same device): if any of its mounts is outside
/// `allow_only` or excluded, none is frozen; otherwise it is frozen once, through `/` if that is
/// one of its mounts, else through one named in `order`, else the first in the table. Order:
/// `order.first`, the rest in table order, `order.last`, and `/` last of all, as
/// `hv_vss_daemon` does.
pub fn plan(mounts: &[Mount], policy: &CompiledPolicy) -> Plan {
    let p = policy.policy();
    let hidden_by = hidden_mounts(mounts);

    // Per-mount verdicts.
    let mut verdicts: Vec<Result<Selection, SkipReason>> = mounts
        .iter()
        .zip(&hidden_by)
        .map(|(m, hidden)| {
            if !policy.allows(&m.mount_point) {
                return Err(SkipReason::NotInAllowOnly);
            }
            if let Some(rule) = policy.excluded_by(m) {
                return Err(SkipReason::Excluded(rule));
            }
            if let Some(by_mount_id) = *hidden {
                return Err(SkipReason::Hidden { by_mount_id });
            }
            if let Some(rule) = policy.included_by(m) {
                return Ok(Selection::Included(rule));
            }
            if p.default_rules {
                default_rules(m).map(|()| Selection::DefaultRules)
            } else {
                Err(SkipReason::NotIncluded)
            }
        })
        .collect();

    // Per file system.
    let mut by_device: BTreeMap<DeviceNumber, Vec<usize>> = BTreeMap::new();
    for (i, m) in mounts.iter().enumerate() {
        by_device.entry(m.device).or_default().push(i);
    }
    let ordered =
        |m: &Mount| p.order.first.contains(&m.mount_point) || p.order.last.contains(&m.mount_point);
    let mut frozen: Vec<usize> = Vec::new();
    for members in by_device.values() {
        let candidates: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| verdicts[i].is_ok())
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let outside = members
            .iter()
            .find(|&&i| !policy.allows(&mounts[i].mount_point));
        let excluded = members.iter().find_map(|&i| match &verdicts[i] {
            Err(SkipReason::Excluded(rule)) => Some((i, rule.clone())),
            _ => None,
        });
        let shared_reason = match (outside, excluded) {
            (Some(&i), _) => Some(SkipReason::SharesFileSystemOutsideAllowOnly {
                other: mounts[i].mount_point.clone(),
            }),
            (None, Some((i, rule))) => Some(SkipReason::SharesFileSystemWithExcluded {
                other: mounts[i].mount_point.clone(),
                rule,
            }),
            (None, None) => None,
        };
        if let Some(reason) = shared_reason {
            for &i in &candidates {
                verdicts[i] = Err(reason.clone());
            }
            continue;
        }
        let chosen = candidates
            .iter()
            .copied()
            .find(|&i| mounts[i].is_root())
            .or_else(|| candidates.iter().copied().find(|&i| ordered(&mounts[i])))
            .unwrap_or(candidates[0]);
        for &i in &candidates {
            if i != chosen {
                verdicts[i] = Err(SkipReason::SameFileSystem {
                    frozen_through: mounts[chosen].mount_point.clone(),
                    device: mounts[chosen].device,
                });
            }
        }
        frozen.push(chosen);
    }

    // Freeze order.
    let position = |i: usize| {
        let m = &mounts[i];
        if m.is_root() {
            return (3, 0);
        }
        if let Some(k) = p.order.first.iter().position(|f| *f == m.mount_point) {
            return (0, k);
        }
        if let Some(k) = p.order.last.iter().position(|l| *l == m.mount_point) {
            return (2, k);
        }
        (1, i)
    };
    frozen.sort_by_key(|&i| position(i));

    let mut freeze = Vec::with_capacity(frozen.len());
    let mut skipped = Vec::new();
    let mut verdicts: Vec<Option<Result<Selection, SkipReason>>> =
        verdicts.into_iter().map(Some).collect();
    for &i in &frozen {
        if let Some(Ok(selected_by)) = verdicts[i].take() {
            freeze.push(Planned {
                mount: mounts[i].clone(),
                selected_by,
            });
        }
    }
    for (m, v) in mounts.iter().zip(verdicts) {
        if let Some(Err(reason)) = v {
            skipped.push(Skipped {
                mount: m.clone(),
                reason,
            });
        }
    }
    Plan {
        freeze,
        skipped,
        max_frozen_ms: p.max_frozen_ms,
    }
}

/// For each mount, the ID of the mount that hides it: of the mounts at one mount point only the
/// top one is reached through the path (and so frozen by `FIFREEZE` on it). The top one is the
/// one no other mount at that point is stacked on (whose ID is no other's parent ID); if the
/// table names several such (or none), the last of them in table order, the most recent mount.
/// Either way exactly one mount per mount point is visible, which keeps plan names unique.
fn hidden_mounts(mounts: &[Mount]) -> Vec<Option<u32>> {
    let mut by_point: HashMap<&Path, Vec<usize>> = HashMap::new();
    for (i, m) in mounts.iter().enumerate() {
        by_point.entry(&m.mount_point).or_default().push(i);
    }
    let mut hidden = vec![None; mounts.len()];
    for group in by_point.values().filter(|g| g.len() > 1) {
        let mut parents: HashMap<u32, usize> = HashMap::new();
        for &i in group {
            *parents.entry(mounts[i].parent_id).or_default() += 1;
        }
        let covered = |i: usize| {
            let m = &mounts[i];
            let own = usize::from(m.parent_id == m.mount_id);
            parents.get(&m.mount_id).copied().unwrap_or(0) > own
        };
        let last = group[group.len() - 1];
        let top = group
            .iter()
            .rev()
            .copied()
            .find(|&i| !covered(i))
            .unwrap_or(last);
        for &i in group {
            if i != top {
                hidden[i] = Some(mounts[top].mount_id);
            }
        }
    }
    hidden
}

/// Why a freeze-policy plugin's answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyPluginError {
    /// It named a mount point the plan does not freeze.
    #[error(
        "freeze-policy plugin named {mount_point}, which the plan does not freeze{}: a plugin \
         may drop and reorder mounts, never add one",
        skipped_because.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    NotInPlan {
        /// The name it gave, escaped.
        mount_point: String,
        /// The plan's reason for skipping it, if the table has such a mount.
        skipped_because: Option<String>,
    },
    /// It named a mount point twice.
    #[error("freeze-policy plugin named {mount_point} twice")]
    Duplicate {
        /// The name, escaped.
        mount_point: String,
    },
    /// It put `/` before another mount.
    #[error("freeze-policy plugin put / at position {position} of {len}: / is always frozen last")]
    RootNotLast {
        /// 1-based position it gave `/`.
        position: usize,
        /// Length of its answer.
        len: usize,
    },
    /// A name with a backslash sequence [`crate::mount::escape_name`] never writes.
    #[error("freeze-policy plugin answered {name:?}, which is not a mount point name")]
    BadName {
        /// The name, escaped.
        name: String,
    },
}

/// Longest plugin answer entry shown in an error.
const NAME_SHOWN: usize = 200;

/// Narrows `plan` to a freeze-policy plugin's answer: the mount points to freeze, in freeze
/// order, named as [`Mount::name`] gives them. The plugin may reorder and drop mounts (dropped
/// ones become skipped, "dropped by policy plugin") but never add one, name one twice, or put `/`
/// anywhere but last.
pub fn narrow(plan: Plan, plugin_answer: &[String]) -> Result<Plan, PolicyPluginError> {
    let Plan {
        freeze,
        mut skipped,
        max_frozen_ms,
    } = plan;
    let mut slots: Vec<Option<Planned>> = freeze.into_iter().map(Some).collect();
    let index: HashMap<PathBuf, usize> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|p| (p.mount.mount_point.clone(), i)))
        .collect();
    let mut narrowed = Vec::with_capacity(slots.len());
    for name in plugin_answer {
        let path = parse_mount_point_name(name).ok_or_else(|| PolicyPluginError::BadName {
            name: escape(name, NAME_SHOWN),
        })?;
        let shown = || escape_name(path.as_os_str().as_bytes());
        let Some(&i) = index.get(&path) else {
            return Err(PolicyPluginError::NotInPlan {
                mount_point: shown(),
                skipped_because: skipped
                    .iter()
                    .find(|s| s.mount.mount_point == path)
                    .map(|s| s.reason.to_string()),
            });
        };
        let planned = slots[i]
            .take()
            .ok_or_else(|| PolicyPluginError::Duplicate {
                mount_point: shown(),
            })?;
        narrowed.push(planned);
    }
    if let Some(at) = narrowed.iter().position(|p| p.mount.is_root())
        && at + 1 != narrowed.len()
    {
        return Err(PolicyPluginError::RootNotLast {
            position: at + 1,
            len: narrowed.len(),
        });
    }
    skipped.extend(slots.into_iter().flatten().map(|p| Skipped {
        mount: p.mount,
        reason: SkipReason::DroppedByPlugin,
    }));
    Ok(Plan {
        freeze: narrowed,
        skipped,
        max_frozen_ms,
    })
}

impl Plan {
    /// The mounts in thaw order (the reverse of freeze order).
    pub fn thaw_order(&self) -> impl Iterator<Item = &Planned> {
        self.freeze.iter().rev()
    }

    /// The mount points to freeze, in order, as a plugin sees them.
    pub fn freeze_names(&self) -> Vec<String> {
        self.freeze.iter().map(|p| p.mount.name()).collect()
    }
}

fn describe(m: &Mount) -> String {
    format!(
        "{}, {}, {}",
        escape_name(m.fs_type.as_bytes()),
        escape_name(m.source.as_bytes()),
        m.device
    )
}

impl fmt::Display for Plan {
    /// What `hvisd vss plan` prints: the mounts to freeze in order, then each skipped mount with
    /// its reason. Every name is escaped ([`crate::mount::escape_name`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.freeze.is_empty() {
            writeln!(f, "Nothing to freeze.")?;
        } else {
            writeln!(
                f,
                "Freeze in this order (thaw in reverse, at most {} ms frozen):",
                self.max_frozen_ms
            )?;
            for (n, p) in self.freeze.iter().enumerate() {
                writeln!(
                    f,
                    "  {:>2}. {}  ({}; {})",
                    n + 1,
                    p.mount.name(),
                    describe(&p.mount),
                    p.selected_by
                )?;
            }
        }
        if !self.skipped.is_empty() {
            writeln!(f, "Skipped:")?;
            for s in &self.skipped {
                writeln!(
                    f,
                    "      {}  ({}): {}",
                    s.mount.name(),
                    describe(&s.mount),
                    s.reason
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::VssPolicy;
    use hvisd_protocol::mountinfo::MountInfo;
    use proptest::prelude::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn table(text: &str) -> Vec<Mount> {
        hvisd_protocol::mountinfo::parse(text.as_bytes())
            .unwrap()
            .iter()
            .map(Mount::from_mountinfo)
            .collect()
    }

    fn plan_with(text: &str, policy: VssPolicy) -> Plan {
        plan(&table(text), &policy.compile().unwrap())
    }

    fn frozen(plan: &Plan) -> Vec<String> {
        plan.freeze_names()
    }

    fn reason<'a>(plan: &'a Plan, mount_point: &str) -> &'a SkipReason {
        &plan
            .skipped
            .iter()
            .find(|s| s.mount.mount_point == Path::new(mount_point))
            .unwrap_or_else(|| panic!("{mount_point} is not skipped in\n{plan}"))
            .reason
    }

    /// This development VM's mount table (trimmed), plus a data disk, a bind mount of it, the
    /// EFI partition, a read-only mount and a FUSE mount whose user named its source /dev/x.
    const VM: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334792k,nr_inodes=3083698,mode=755
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683784k
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
28 27 0:25 / /mnt/sandboxing/model_tools_env/v1/python ro,nosuid,nodev,relatime - tmpfs model_tools_unavailable ro,size=4k,mode=755
45 27 7:0 / /tmp/.tmpuP675w/mnt rw,relatime - ext4 /dev/loop0 rw
50 27 8:17 / /data rw,relatime shared:5 - xfs /dev/sdb1 rw,attr2,inode64
51 27 8:17 /www /srv/www rw,relatime shared:5 - xfs /dev/sdb1 rw,attr2,inode64
52 27 8:1 / /boot/efi rw,relatime - vfat /dev/sda1 rw,fmask=0077
53 27 8:2 / /archive ro,relatime - ext4 /dev/sda2 ro
54 27 0:60 / /home/eve/x rw,nosuid,nodev - fuse.evil /dev/x rw,user_id=1000
";

    #[test]
    fn default_rules_are_hv_vss_daemons_with_root_last() {
        let p = plan_with(VM, VssPolicy::default());
        assert_eq!(frozen(&p), ["/data", "/"]);
        assert_eq!(p.freeze[0].selected_by, Selection::DefaultRules);
        assert_eq!(*reason(&p, "/proc"), SkipReason::NotBlockDevice);
        assert_eq!(*reason(&p, "/dev/shm"), SkipReason::NotBlockDevice);
        assert_eq!(*reason(&p, "/tmp/.tmpuP675w/mnt"), SkipReason::LoopBacked);
        assert_eq!(*reason(&p, "/boot/efi"), SkipReason::Vfat);
        assert_eq!(*reason(&p, "/archive"), SkipReason::ReadOnly);
        assert_eq!(*reason(&p, "/home/eve/x"), SkipReason::Fuse);
        assert_eq!(
            *reason(&p, "/srv/www"),
            SkipReason::SameFileSystem {
                frozen_through: "/data".into(),
                device: DeviceNumber {
                    major: 8,
                    minor: 17
                }
            }
        );
        // Every mount is either frozen or skipped, once.
        assert_eq!(p.freeze.len() + p.skipped.len(), table(VM).len());
        assert_eq!(
            p.thaw_order().map(|p| p.mount.name()).collect::<Vec<_>>(),
            ["/", "/data"]
        );
    }

    #[test]
    fn root_is_frozen_last_wherever_it_is_in_the_table() {
        let p = plan_with(
            "1 1 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 8:1 / /var rw - ext4 /dev/sda1 rw\n\
             3 1 8:2 / /data rw - ext4 /dev/sda2 rw\n",
            VssPolicy::default(),
        );
        assert_eq!(frozen(&p), ["/var", "/data", "/"]);
    }

    #[test]
    fn a_file_system_is_frozen_once_and_through_root_if_root_is_one_of_its_mounts() {
        // A bind mount of the root file system listed before / (and btrfs subvolumes share the
        // super block's anonymous device).
        let p = plan_with(
            "40 1 0:40 /@ / rw - btrfs /dev/nvme0n1p2 rw,subvol=/@\n\
             41 40 0:40 /@home /home rw - btrfs /dev/nvme0n1p2 rw,subvol=/@home\n\
             42 40 0:40 /@/srv /mnt/bind rw - btrfs /dev/nvme0n1p2 rw,subvol=/@\n",
            VssPolicy::default(),
        );
        assert_eq!(frozen(&p), ["/"]);
        assert!(matches!(
            reason(&p, "/home"),
            SkipReason::SameFileSystem { frozen_through, .. } if frozen_through == Path::new("/")
        ));
        assert!(matches!(
            reason(&p, "/mnt/bind"),
            SkipReason::SameFileSystem { .. }
        ));
    }

    #[test]
    fn an_ordered_mount_point_is_the_one_a_shared_file_system_is_frozen_through() {
        let mut policy = VssPolicy::default();
        policy.order.first = vec!["/srv/www".into()];
        let p = plan_with(VM, policy);
        assert_eq!(frozen(&p), ["/srv/www", "/"]);
        assert!(matches!(
            reason(&p, "/data"),
            SkipReason::SameFileSystem { frozen_through, .. } if frozen_through == Path::new("/srv/www")
        ));
    }

    #[test]
    fn allow_only_beats_include_default_rules_and_order() {
        let mut policy = VssPolicy::default();
        policy.include.mount_points = vec!["/**".into()];
        policy.include.fs_types = vec!["ext4".into()];
        policy.order.first = vec!["/data".into()];
        policy.allow_only = Some(vec!["/tmp/.tmpuP675w/mnt".into()]);
        let p = plan_with(VM, policy);
        assert_eq!(frozen(&p), ["/tmp/.tmpuP675w/mnt"]);
        assert!(matches!(
            p.freeze[0].selected_by,
            Selection::Included(ref r) if r.list == "include.mount_points"
        ));
        for s in &p.skipped {
            assert_eq!(s.reason, SkipReason::NotInAllowOnly, "{}", s.mount.name());
        }
    }

    #[test]
    fn allow_only_refuses_a_file_system_also_mounted_outside_it() {
        let mut policy = VssPolicy::default();
        policy.include.fs_types = vec!["ext4".into()];
        policy.allow_only = Some(vec!["/mnt/img".into()]);
        let p = plan_with(
            "1 1 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 7:3 / /mnt/img rw - ext4 /dev/loop3 rw\n\
             3 1 7:3 /sub /home/u/peek rw - ext4 /dev/loop3 rw\n",
            policy,
        );
        assert!(p.freeze.is_empty(), "{p}");
        assert_eq!(
            *reason(&p, "/mnt/img"),
            SkipReason::SharesFileSystemOutsideAllowOnly {
                other: "/home/u/peek".into()
            }
        );
        assert_eq!(*reason(&p, "/home/u/peek"), SkipReason::NotInAllowOnly);
    }

    #[test]
    fn exclude_beats_include_and_covers_the_whole_file_system() {
        let mut policy = VssPolicy::default();
        policy.include.mount_points = vec!["/data".into(), "/srv/*".into()];
        policy.exclude.mount_points = vec!["/data".into()];
        let p = plan_with(VM, policy);
        assert_eq!(frozen(&p), ["/"]);
        assert!(
            matches!(reason(&p, "/data"), SkipReason::Excluded(r) if r.list == "exclude.mount_points")
        );
        assert!(matches!(
            reason(&p, "/srv/www"),
            SkipReason::SharesFileSystemWithExcluded { other, .. } if other == Path::new("/data")
        ));
    }

    #[test]
    fn include_overrides_the_default_rules() {
        let mut policy = VssPolicy::default();
        policy.include.sources = vec!["/dev/loop*".into()];
        policy.include.fs_types = vec!["vfat".into()];
        let p = plan_with(VM, policy);
        assert_eq!(
            frozen(&p),
            ["/tmp/.tmpuP675w/mnt", "/data", "/boot/efi", "/"]
        );
    }

    #[test]
    fn without_default_rules_only_included_mounts_are_frozen() {
        let mut policy = VssPolicy {
            default_rules: false,
            ..VssPolicy::default()
        };
        let p = plan_with(VM, policy.clone());
        assert!(p.freeze.is_empty());
        assert_eq!(*reason(&p, "/"), SkipReason::NotIncluded);
        policy.include.mount_points = vec!["/data".into()];
        assert_eq!(frozen(&plan_with(VM, policy)), ["/data"]);
    }

    #[test]
    fn order_first_and_last_then_root() {
        let mut policy = VssPolicy::default();
        policy.order.first = vec!["/c".into(), "/absent".into(), "/b".into()];
        policy.order.last = vec!["/a".into()];
        let p = plan_with(
            "1 1 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 8:1 / /a rw - ext4 /dev/sda1 rw\n\
             3 1 8:2 / /b rw - ext4 /dev/sda2 rw\n\
             4 1 8:3 / /c rw - ext4 /dev/sda3 rw\n\
             5 1 8:4 / /d rw - ext4 /dev/sda4 rw\n",
            policy,
        );
        assert_eq!(frozen(&p), ["/c", "/b", "/d", "/a", "/"]);
    }

    #[test]
    fn a_mount_hidden_under_another_at_the_same_path_is_skipped() {
        let p = plan_with(
            "1 1 0:2 / / rw - rootfs rootfs rw\n\
             20 1 254:0 / / rw - ext4 /dev/vda rw\n\
             30 20 8:1 / /data rw - ext4 /dev/sda1 rw\n\
             31 30 8:2 / /data rw - ext4 /dev/sda2 rw\n",
            VssPolicy::default(),
        );
        assert_eq!(frozen(&p), ["/data", "/"]);
        assert_eq!(p.freeze[0].mount.device.minor, 2);
        assert_eq!(
            p.skipped
                .iter()
                .map(|s| s.reason.clone())
                .collect::<Vec<_>>(),
            [
                SkipReason::Hidden { by_mount_id: 20 },
                SkipReason::Hidden { by_mount_id: 31 }
            ]
        );
    }

    #[test]
    fn of_two_mounts_at_one_path_without_stacking_the_later_is_the_visible_one() {
        let p = plan_with(
            "20 1 254:0 / / rw - ext4 /dev/vda rw\n\
             30 20 8:1 / /c rw - ext4 /dev/sda1 rw\n\
             31 20 8:2 / /c rw - ext4 /dev/sda2 rw\n",
            VssPolicy::default(),
        );
        assert_eq!(frozen(&p), ["/c", "/"]);
        assert_eq!(p.freeze[0].mount.mount_id, 31);
        assert_eq!(*reason(&p, "/c"), SkipReason::Hidden { by_mount_id: 31 });
    }

    #[test]
    fn plan_prints_frozen_mounts_in_order_then_skipped_ones_with_reasons() {
        let p = plan_with(
            "22 27 0:21 / /proc rw - proc proc rw\n\
             27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             50 27 8:17 / /data rw - xfs /dev/sdb1 rw\n\
             54 27 0:60 / /x\\012\\040\\0331.\\040/ rw - fuse.evil /dev/x rw\n",
            VssPolicy::default(),
        );
        let expected = "\
Freeze in this order (thaw in reverse, at most 60000 ms frozen):
   1. /data  (xfs, /dev/sdb1, 8:17; default rules)
   2. /  (ext4, /dev/vda, 254:0; default rules)
Skipped:
      /proc  (proc, proc, 0:21): source is not a /dev/ device
      /x\\x0a \\x1b1. /  (fuse.evil, /dev/x, 0:60): FUSE: freezing would wait on its user-space daemon, which any user may run
";
        assert_eq!(p.to_string(), expected);
        let empty = plan_with(
            "22 27 0:21 / /proc rw - proc proc rw\n",
            VssPolicy::default(),
        );
        assert!(
            empty
                .to_string()
                .starts_with("Nothing to freeze.\nSkipped:\n")
        );
    }

    #[test]
    fn plan_serialises_to_json_with_reason_codes() {
        let p = plan_with(VM, VssPolicy::default());
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["max_frozen_ms"], 60_000);
        assert_eq!(json["freeze"][0]["mount"]["mount_point"], "/data");
        assert_eq!(json["freeze"][0]["selected_by"], "default rules");
        assert_eq!(json["skipped"][0]["mount"]["mount_point"], "/proc");
        assert_eq!(json["skipped"][0]["reason"]["code"], "not-block-device");
        assert_eq!(
            json["skipped"][0]["reason"]["message"],
            "source is not a /dev/ device"
        );
    }

    fn three() -> Plan {
        plan_with(
            "1 1 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 8:1 / /a rw - ext4 /dev/sda1 rw\n\
             3 1 8:2 / /b rw - ext4 /dev/sda2 rw\n\
             4 1 0:5 / /proc rw - proc proc rw\n",
            VssPolicy::default(),
        )
    }

    fn answer(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plugin_may_reorder() {
        let p = narrow(three(), &answer(&["/b", "/a", "/"])).unwrap();
        assert_eq!(frozen(&p), ["/b", "/a", "/"]);
        assert_eq!(p.skipped.len(), 1);
    }

    #[test]
    fn plugin_may_drop_and_the_dropped_are_skipped_with_a_reason() {
        let p = narrow(three(), &answer(&["/b"])).unwrap();
        assert_eq!(frozen(&p), ["/b"]);
        assert_eq!(*reason(&p, "/a"), SkipReason::DroppedByPlugin);
        assert_eq!(reason(&p, "/").to_string(), "dropped by policy plugin");
        assert!(narrow(three(), &[]).unwrap().freeze.is_empty());
    }

    #[test]
    fn plugin_that_widens_the_plan_is_refused_naming_the_mount() {
        assert_eq!(
            narrow(three(), &answer(&["/a", "/etc"])),
            Err(PolicyPluginError::NotInPlan {
                mount_point: "/etc".into(),
                skipped_because: None
            })
        );
        let err = narrow(three(), &answer(&["/proc", "/"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "freeze-policy plugin named /proc, which the plan does not freeze (source is not a \
             /dev/ device): a plugin may drop and reorder mounts, never add one"
        );
    }

    #[test]
    fn plugin_cannot_name_a_mount_twice_or_move_root() {
        assert_eq!(
            narrow(three(), &answer(&["/a", "/a"])),
            Err(PolicyPluginError::Duplicate {
                mount_point: "/a".into()
            })
        );
        assert_eq!(
            narrow(three(), &answer(&["/", "/a"])),
            Err(PolicyPluginError::RootNotLast {
                position: 1,
                len: 2
            })
        );
        assert!(matches!(
            narrow(three(), &answer(&["/a\\q"])),
            Err(PolicyPluginError::BadName { .. })
        ));
    }

    #[test]
    fn plugin_names_a_non_utf8_mount_point_by_its_escaped_name() {
        let p = plan_with(
            "1 1 254:0 / / rw - ext4 /dev/vda rw\n2 1 8:1 / /m\\377 rw - ext4 /dev/sda1 rw\n",
            VssPolicy::default(),
        );
        assert_eq!(frozen(&p), ["/m\\xff", "/"]);
        let n = narrow(p, &answer(&["/m\\xff"])).unwrap();
        assert_eq!(
            n.freeze[0].mount.mount_point,
            PathBuf::from(OsString::from_vec(b"/m\xff".to_vec()))
        );
    }

    fn arb_table() -> impl Strategy<Value = Vec<Mount>> {
        let names = ["/", "/a", "/b", "/a/b", "/c", "/mnt/x"];
        let sources = ["/dev/sda1", "/dev/loop0", "tmpfs", "/dev/vdb", "none"];
        let types = ["ext4", "xfs", "vfat", "fuse.x", "tmpfs"];
        proptest::collection::vec(
            (
                0..names.len(),
                0..sources.len(),
                0..types.len(),
                0u32..4,
                any::<bool>(),
                any::<bool>(),
                0u32..8,
            ),
            0..10,
        )
        .prop_map(move |rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (n, s, t, minor, ro, lo, parent))| {
                    let line = format!(
                        "{} {} 8:{minor} / {} {} - {} {} rw",
                        i + 1,
                        parent,
                        names[n],
                        if ro { "ro" } else { "rw" },
                        types[t],
                        sources[s]
                    );
                    let mut m =
                        Mount::from_mountinfo(&MountInfo::parse_line(line.as_bytes()).unwrap());
                    m.loop_backed |= lo;
                    m
                })
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = VssPolicy> {
        let paths = ["/", "/a", "/b", "/a/b", "/c", "/mnt/x"];
        (
            any::<bool>(),
            proptest::option::of(proptest::sample::subsequence(paths.to_vec(), 0..4)),
            proptest::sample::subsequence(vec!["/a/*", "/mnt/**", "/c"], 0..2),
            proptest::sample::subsequence(vec!["/b", "/a/**"], 0..2),
            proptest::sample::subsequence(vec!["/c", "/a"], 0..2),
        )
            .prop_map(|(default_rules, allow, include, exclude, first)| {
                let mut p = VssPolicy {
                    default_rules,
                    allow_only: allow.map(|a| a.into_iter().map(PathBuf::from).collect()),
                    ..VssPolicy::default()
                };
                p.include.mount_points = include.into_iter().map(String::from).collect();
                p.exclude.mount_points = exclude.into_iter().map(String::from).collect();
                p.order.first = first.into_iter().map(PathBuf::from).collect();
                p
            })
    }

    proptest! {
        #[test]
        fn plan_invariants_hold_for_any_table_and_policy(
            mounts in arb_table(),
            policy in arb_policy(),
            keep in proptest::collection::vec(any::<bool>(), 10),
            reverse in any::<bool>(),
        ) {
            let compiled = policy.compile().unwrap();
            let p = plan(&mounts, &compiled);
            // Every mount is accounted for exactly once.
            prop_assert_eq!(p.freeze.len() + p.skipped.len(), mounts.len());
            // One freeze per file system.
            let mut devices: Vec<_> = p.freeze.iter().map(|f| f.mount.device).collect();
            devices.sort();
            devices.dedup();
            prop_assert_eq!(devices.len(), p.freeze.len());
            // Root last.
            if let Some(at) = p.freeze.iter().position(|f| f.mount.is_root()) {
                prop_assert_eq!(at + 1, p.freeze.len());
            }
            // allow_only: nothing frozen outside it, and no file system mounted outside it.
            if let Some(allowed) = &policy.allow_only {
                for f in &p.freeze {
                    for m in mounts.iter().filter(|m| m.device == f.mount.device) {
                        prop_assert!(allowed.contains(&m.mount_point));
                    }
                }
            }
            // Exclusion: no frozen file system has an excluded mount.
            for f in &p.freeze {
                for m in mounts.iter().filter(|m| m.device == f.mount.device) {
                    prop_assert!(compiled.excluded_by(m).is_none());
                }
            }
            // Any subset, in any order that keeps / last, narrows; the rest is dropped.
            let mut names: Vec<String> = p
                .freeze
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(f, _)| f.mount.name())
                .collect();
            if reverse {
                let root = names.iter().position(|n| n == "/").map(|i| names.remove(i));
                names.reverse();
                names.extend(root);
            }
            let n = narrow(p.clone(), &names).unwrap();
            prop_assert_eq!(n.freeze_names(), names);
            prop_assert_eq!(n.freeze.len() + n.skipped.len(), mounts.len());
        }

        #[test]
        fn narrow_never_panics_on_any_answer(answer in proptest::collection::vec("\\PC{0,8}", 0..6)) {
            let p = three();
            if let Ok(n) = narrow(p.clone(), &answer) {
                prop_assert!(n.freeze.len() <= p.freeze.len());
            }
        }
    }
}
