//! VSS: file-system-consistent backups. The freezer is the mechanism; the plan (what to freeze)
//! comes from the policy.

pub mod freezer;
