//! The precompiled-component cache: `.cwasm` files keyed by the wasm's
//! SHA-256 and the engine's compatibility hash, so each component is compiled
//! once per engine configuration and later loads only map the artifact.
//!
//! A `.cwasm` is native code that is run without further checks, so the
//! directory is created 0700, must belong to the user hvisd runs as and be
//! writable by nobody else, is pinned by a descriptor when the cache is opened
//! (a later rename of the path changes nothing), and every file in it is opened
//! relative to that descriptor without following links and checked again
//! (owner, mode) before it is loaded (`hvisd_sys::wasm`).

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hvisd_sys::wasm::{ArtifactError, TrustedArtifact, load_component};
use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::HostError;

/// Where compiled artifacts live and whether they may be trusted.
#[derive(Clone, Debug)]
pub struct ComponentCache {
    dir: PathBuf,
    dir_fd: Arc<OwnedFd>,
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
        let problem = |problem: String| HostError::Cache {
            dir: dir.clone(),
            problem,
        };
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| problem(format!("cannot create its parent: {e}")))?;
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(problem(format!("cannot create it: {e}"))),
            }
        }
        let dir_fd = rustix::fs::open(
            &dir,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| problem(format!("cannot open it (a symlink is refused): {e}")))?;
        let stat =
            rustix::fs::fstat(&dir_fd).map_err(|e| problem(format!("cannot stat it: {e}")))?;
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me {
            return Err(problem(format!(
                "is owned by uid {}, not by uid {me} that runs hvisd",
                stat.st_uid
            )));
        }
        if stat.st_mode & 0o022 != 0 {
            return Err(problem(format!(
                "mode {:o} lets others write; chmod 700 it",
                stat.st_mode & 0o777
            )));
        }
        Ok(ComponentCache {
            dir,
            dir_fd: Arc::new(dir_fd),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name of the artifact for `wasm` under `engine`'s configuration.
    pub fn key(engine: &Engine, wasm: &[u8]) -> String {
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
        let name = Self::key(engine, wasm);
        match TrustedArtifact::open_in(self.dir_fd.as_fd(), &name) {
            Ok(artifact) => match load_component(engine, &artifact) {
                Ok(c) => return Ok((c, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(
                    artifact = %name,
                    "cached plugin artifact unusable, recompiling: {e:#}"
                ),
            },
            Err(ArtifactError::Os { source, .. }) if source == rustix::io::Errno::NOENT => {}
            Err(e) => {
                tracing::warn!(artifact = %name, "cached plugin artifact refused, recompiling: {e}")
            }
        }
        let component =
            Component::new(engine, wasm).map_err(|e| HostError::Compile(format!("{e:#}")))?;
        let outcome = match component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|bytes| self.store(&name, &bytes))
        {
            Ok(()) => CacheOutcome::Compiled,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot write plugin cache: {e}");
                CacheOutcome::CompiledUncached
            }
        };
        Ok((component, outcome))
    }

    /// The name of the artifact of `wasm` for `engine` in this cache, compiling and caching it
    /// first if needed. Compiling does not run any of the plugin's code. The core opens it with
    /// [`ComponentCache::open_artifact`] for each worker it starts, so a worker never chooses (or
    /// writes) the native code it runs.
    pub fn artifact(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> Result<(String, CacheOutcome), HostError> {
        let name = Self::key(engine, wasm);
        match self.open_artifact(&name) {
            Ok(_) => return Ok((name, CacheOutcome::Hit)),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(artifact = %name, "cached plugin artifact refused, recompiling: {e}");
                let _ = rustix::fs::unlinkat(
                    self.dir_fd.as_fd(),
                    name.as_str(),
                    rustix::fs::AtFlags::empty(),
                );
            }
            Err(_) => {}
        }
        let compiled = engine
            .precompile_component(wasm)
            .map_err(|e| HostError::Compile(format!("{e:#}")))?;
        self.store(&name, &compiled).map_err(|e| HostError::Cache {
            dir: self.dir.clone(),
            problem: format!("cannot write the compiled plugin: {e}"),
        })?;
        Ok((name, CacheOutcome::Compiled))
    }

    /// Removes the artifact of `wasm` (a worker could not load it: it is recompiled next time).
    pub fn forget(&self, engine: &Engine, wasm: &[u8]) {
        let name = Self::key(engine, wasm);
        let _ = rustix::fs::unlinkat(
            self.dir_fd.as_fd(),
            name.as_str(),
            rustix::fs::AtFlags::empty(),
        );
    }

    /// Opens an artifact read-only, relative to the pinned directory and without following links,
    /// and checks it is a regular file of ours that nobody else can write.
    pub fn open_artifact(&self, name: &str) -> std::io::Result<OwnedFd> {
        let fd = rustix::fs::openat(
            self.dir_fd.as_fd(),
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        let me = rustix::process::geteuid().as_raw();
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file()
            || stat.st_uid != me
            || stat.st_mode & 0o022 != 0
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "not a regular file of ours writable only by us",
            ));
        }
        Ok(fd)
    }

    /// Writes an artifact atomically (temporary file, fsync, rename), relative to the pinned
    /// directory, mode 0600.
    fn store(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        // Unique per writer, so concurrent loads of one component never share a temp file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = format!(".{name}.tmp.{}.{seq}", std::process::id());
        let dir = self.dir_fd.as_fd();
        let fd = rustix::fs::openat(
            dir,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut f = std::fs::File::from(fd);
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        let renamed = written.and_then(|()| {
            rustix::fs::renameat(dir, &tmp, dir, name).map_err(std::io::Error::from)
        });
        if renamed.is_err() {
            let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
        }
        renamed
    }
}
