//! Builds the plugins of the repository's `plugins/` workspace for
//! `wasm32-wasip2` with plain cargo, for the tests, the benchmark and CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Errors from building plugins.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// cargo could not be started.
    #[error("cannot run `{cargo}`: {source}")]
    Spawn {
        /// The cargo binary.
        cargo: String,
        /// Why.
        source: std::io::Error,
    },
    /// cargo failed.
    #[error(
        "`cargo build --target {TARGET}` in {} failed ({status}); is the target installed? (`rustup target add {TARGET}`)\n{stderr}",
        dir.display()
    )]
    Cargo {
        /// The workspace.
        dir: PathBuf,
        /// cargo's exit status.
        status: std::process::ExitStatus,
        /// The end of cargo's stderr.
        stderr: String,
    },
    /// Reading the output directory failed.
    #[error("reading `{}`: {source}", dir.display())]
    Output {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The `plugins/` workspace of this source tree.
pub fn plugins_workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../plugins")
}

/// Builds every plugin in the workspace at `dir` with `cargo build --target
/// wasm32-wasip2 --profile PROFILE` into `dir/target`, and returns the
/// components by crate name (with `-` as in the package name, e.g. `app-version`).
pub fn build_plugins(dir: &Path, profile: &str) -> Result<BTreeMap<String, PathBuf>, BuildError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = dir.join("target");
    let out = Command::new(&cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--workspace")
        .arg("--target")
        .arg(TARGET)
        .arg("--profile")
        .arg(profile)
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|source| BuildError::Spawn {
            cargo: cargo.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        return Err(BuildError::Cargo {
            dir: dir.to_owned(),
            status: out.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    // cargo names the `dev` profile's directory `debug`.
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let out_dir = target_dir.join(TARGET).join(profile_dir);
    let mut found = BTreeMap::new();
    let entries = std::fs::read_dir(&out_dir).map_err(|source| BuildError::Output {
        dir: out_dir.clone(),
        source,
    })?;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "wasm")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            found.insert(stem.replace('_', "-"), path);
        }
    }
    Ok(found)
}
