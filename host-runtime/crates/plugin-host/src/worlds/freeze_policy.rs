//! The `freeze-policy` world: which mounts to freeze, in which order.

use serde::Serialize;

use crate::lifecycle::PluginHost;
use crate::manifest::World;
use crate::state::bindings::exports::hyperv::integration::freeze_policy;
use crate::text::{Escaped, truncate};

/// A mount offered to the freeze policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Mount point.
    pub path: String,
    /// File system type.
    pub fs_type: String,
    /// Device.
    pub device: String,
}

/// The freeze policy's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum FreezePlan {
    /// No policy plugin is loaded: the runtime uses its default.
    Default,
    /// Freeze these mount points in this order.
    Freeze {
        /// The policy plugin.
        plugin: String,
        /// Mount points.
        order: Vec<String>,
    },
    /// The policy refused the backup.
    Refuse {
        /// The policy plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
}

/// Checks a plan: every mount point it names was offered, and is named once.
fn check_plan(mounts: &[Mount], order: &[String]) -> Result<(), String> {
    for (i, path) in order.iter().enumerate() {
        if !mounts.iter().any(|m| m.path == *path) || order[..i].contains(path) {
            return Err(format!(
                "policy named `{}`, which is not an offered mount or is named twice",
                Escaped(path)
            ));
        }
    }
    Ok(())
}

impl PluginHost {
    /// Asks the freeze policy (the loaded policy plugin with the lowest
    /// priority number) what to freeze. A plan naming unknown or duplicate
    /// mounts, or a failed call, is a refusal.
    pub async fn freeze_plan(&self, mounts: &[Mount]) -> FreezePlan {
        let Some(p) = self
            .current()
            .ordered(World::FreezePolicy)
            .into_iter()
            .next()
        else {
            return FreezePlan::Default;
        };
        let Some(idx) = &p.exports.policy else {
            return FreezePlan::Default;
        };
        let wmounts: Vec<freeze_policy::Mount> = mounts
            .iter()
            .map(|m| freeze_policy::Mount {
                path: m.path.clone(),
                fs_type: m.fs_type.clone(),
                device: m.device.clone(),
            })
            .collect();
        let r = p
            .fresh_call(
                p.call_deadline(),
                |s, i| idx.load(s, i),
                async |g: &freeze_policy::Guest, s| g.call_plan(s, &wmounts).await,
            )
            .await;
        let plugin = p.name().to_owned();
        match r {
            Ok(Ok(order)) => match check_plan(mounts, &order) {
                Ok(()) => FreezePlan::Freeze { plugin, order },
                Err(reason) => FreezePlan::Refuse { plugin, reason },
            },
            Ok(Err(reason)) => FreezePlan::Refuse {
                plugin,
                reason: truncate(&reason, 1024).to_owned(),
            },
            Err(e) => FreezePlan::Refuse {
                plugin,
                reason: format!("policy failed: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(p: &str) -> Mount {
        Mount {
            path: p.into(),
            fs_type: "ext4".into(),
            device: "/dev/sda1".into(),
        }
    }

    #[test]
    fn a_plan_may_name_offered_mounts_once_each() {
        let offered = [mount("/"), mount("/var")];
        assert!(check_plan(&offered, &["/var".into(), "/".into()]).is_ok());
        assert!(check_plan(&offered, &[]).is_ok());
        assert!(check_plan(&offered, &["/x".into()]).is_err());
        assert!(check_plan(&offered, &["/".into(), "/".into()]).is_err());
    }
}
