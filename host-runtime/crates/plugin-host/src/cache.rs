//! The precompiled-component cache: `.cwasm` files keyed by the wasm's
//! SHA-256 and the engine's compatibility hash, so each component is compiled
//! once per engine configuration and later loads only map the artifact.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::HostError;

/// Where compiled artifacts live and whether they may be trusted.
#[derive(Clone, Debug)]
pub struct ComponentCache {
    dir: PathBuf,
}

/// How a component was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheOutcome {
    /// Loaded from a cached `.cwasm`.
    Hit,
    /// Compiled and written to the cache.
    Compiled,
    /// Compiled; the cache was not usable (reason logged).
    CompiledUncached,
}

impl ComponentCache {
    /// Uses `dir` (created 0700 if missing). The directory must be owned by
    /// the user hvisd runs as (root in production) and writable by nobody
    /// else, because a `.cwasm` is native code that is mapped and run.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, HostError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| HostError::Cache {
            dir: dir.clone(),
            problem: format!("cannot create it: {e}"),
        })?;
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| HostError::Cache {
            dir: dir.clone(),
            problem: format!("cannot stat it: {e}"),
        })?;
        if !meta.is_dir() {
            return Err(HostError::Cache {
                dir,
                problem: "is not a directory (or is a symlink)".into(),
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(HostError::Cache {
                dir,
                problem: format!(
                    "is owned by uid {}, not by uid {me} that runs hvisd",
                    meta.uid()
                ),
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(HostError::Cache {
                dir,
                problem: format!(
                    "mode {:o} lets others write; chmod 700 it",
                    meta.mode() & 0o777
                ),
            });
        }
        Ok(ComponentCache { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key(engine: &Engine, wasm: &[u8]) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = h.finish();
        let digest = Sha256::digest(wasm);
        let mut hex = String::with_capacity(64);
        for b in digest {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        format!("{hex}-{engine_hash:016x}.cwasm")
    }

    /// The component for `wasm`, from the cache or compiled (and cached).
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> Result<(Component, CacheOutcome), HostError> {
        let path = self.dir.join(Self::key(engine, wasm));
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && meta.is_file()
        {
            // SAFETY: the file is in a directory checked in `new` to be owned by
            // and writable only by this user, under a name derived from the
            // wasm's hash and this engine's configuration; only this module
            // writes there (atomically, via rename). wasmtime checks the
            // artifact's header and engine compatibility before using it.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok((c, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    "cached plugin artifact unusable, recompiling: {e:#}"
                ),
            }
        }
        let compiled = engine
            .precompile_component(wasm)
            .map_err(|e| HostError::Compile(format!("{e:#}")))?;
        let outcome = match self.store(&path, &compiled) {
            Ok(()) => CacheOutcome::Compiled,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot write plugin cache: {e}");
                CacheOutcome::CompiledUncached
            }
        };
        // SAFETY: `compiled` was produced just now by this engine's own compiler.
        let component = unsafe { Component::deserialize(engine, &compiled) }
            .map_err(|e| HostError::Compile(format!("{e:#}")))?;
        Ok((component, outcome))
    }

    fn store(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        // Unique per writer, so concurrent loads of one component never share a temp file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}
