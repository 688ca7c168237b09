//! `hvisd plugin check FILE.wasm`: what a component implements and imports,
//! and whether a manifest entry accepts it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use wasmtime::component::Component;

use crate::HostError;
use crate::engine::build_engine;
use crate::manifest::{PluginManifest, World};
use crate::state::bindings::exports::hyperv::integration::{
    freeze_hooks, freeze_policy, hvsock_service, kvp_provider,
};
use crate::state::build_linker;

/// What `check` found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The file checked.
    pub path: PathBuf,
    /// Worlds whose export the component provides with the right types.
    pub worlds: Vec<World>,
    /// Every import, by name.
    pub imports: Vec<String>,
    /// Every export, by name.
    pub exports: Vec<String>,
    /// `None` if every import is one hvisd provides; otherwise why not.
    pub unsatisfied_imports: Option<String>,
    /// The verdict on the manifest entry, if one was given.
    pub manifest: Option<ManifestVerdict>,
}

/// Whether a manifest entry accepts the component.
#[derive(Clone, Debug, Serialize)]
pub struct ManifestVerdict {
    /// The plugin's name.
    pub plugin: String,
    /// True if `hvisd` would load it.
    pub accepted: bool,
    /// Reasons it would not, each with a fix.
    pub problems: Vec<String>,
    /// Things that load but will not work as the author may expect.
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// True if the component loads (and the manifest, if given, accepts it).
    pub fn ok(&self) -> bool {
        self.unsatisfied_imports.is_none()
            && !self.worlds.is_empty()
            && self.manifest.as_ref().is_none_or(|m| m.accepted)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.path.display())?;
        if self.worlds.is_empty() {
            writeln!(f, "  implements: no hvisd world")?;
        } else {
            let w: Vec<&str> = self.worlds.iter().map(|w| w.manifest_name()).collect();
            writeln!(f, "  implements: {}", w.join(", "))?;
        }
        writeln!(f, "  imports:")?;
        for i in &self.imports {
            writeln!(f, "    {i}")?;
        }
        match &self.unsatisfied_imports {
            None => writeln!(f, "  imports: all provided by hvisd")?,
            Some(why) => writeln!(f, "  imports: NOT satisfiable: {why}")?,
        }
        if let Some(m) = &self.manifest {
            if m.accepted {
                writeln!(f, "  manifest `{}`: accepted", m.plugin)?;
            } else {
                writeln!(f, "  manifest `{}`: REFUSED", m.plugin)?;
            }
            for p in &m.problems {
                writeln!(f, "    error: {p}")?;
            }
            for w in &m.warnings {
                writeln!(f, "    warning: {w}")?;
            }
        }
        Ok(())
    }
}

/// Inspects the component at `wasm_path`, and checks it against `manifest` if given.
pub fn check(
    wasm_path: &Path,
    manifest: Option<&PluginManifest>,
) -> Result<CheckReport, HostError> {
    let wasm = std::fs::read(wasm_path).map_err(|source| HostError::Io {
        what: format!("reading `{}`", wasm_path.display()),
        source,
    })?;
    if let Some(why) = not_a_component(&wasm) {
        return Err(HostError::NotAComponent {
            path: wasm_path.to_owned(),
            why,
        });
    }
    let engine = build_engine()?;
    let component =
        Component::new(&engine, &wasm).map_err(|e| HostError::Compile(format!("{e:#}")))?;
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(&engine).map(|(n, _)| n.to_owned()).collect();
    let exports: Vec<String> = ty.exports(&engine).map(|(n, _)| n.to_owned()).collect();
    let linker = build_linker(&engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
    let (worlds, unsatisfied_imports) = match linker.instantiate_pre(&component) {
        Ok(pre) => {
            let mut w = Vec::new();
            if kvp_provider::GuestIndices::new(&pre).is_ok() {
                w.push(World::KvpProvider);
            }
            if freeze_hooks::GuestIndices::new(&pre).is_ok() {
                w.push(World::FreezeHook);
            }
            if freeze_policy::GuestIndices::new(&pre).is_ok() {
                w.push(World::FreezePolicy);
            }
            if hvsock_service::GuestIndices::new(&pre).is_ok() {
                w.push(World::HvsockService);
            }
            (w, None)
        }
        Err(e) => {
            // Without a linkable component, judge exports by name only.
            let w = World::ALL
                .into_iter()
                .filter(|w| exports.iter().any(|e| e == w.export_interface()))
                .collect();
            (w, Some(format!("{e:#}")))
        }
    };
    let manifest = manifest.map(|m| verdict(m, &worlds, &imports, unsatisfied_imports.as_deref()));
    Ok(CheckReport {
        path: wasm_path.to_owned(),
        worlds,
        imports,
        exports,
        unsatisfied_imports,
        manifest,
    })
}

/// Why `bytes` cannot be a component, from the preamble alone (`\0asm`, a version and a layer:
/// 0 for a core module, 1 for a component); `None` if they may be one. Without this, a text
/// file or a core module reaches the compiler, whose several-line parse error does not say it.
pub fn not_a_component(bytes: &[u8]) -> Option<&'static str> {
    const MAGIC: &[u8] = b"\0asm";
    const LAYER_CORE: [u8; 2] = [0, 0];
    const LAYER_COMPONENT: [u8; 2] = [1, 0];
    if !bytes.starts_with(MAGIC) {
        return Some("no WebAssembly header (`\\0asm`)");
    }
    match bytes.get(6..8) {
        None => Some("the file ends inside the WebAssembly header"),
        Some(layer) if layer == LAYER_COMPONENT => None,
        Some(layer) if layer == LAYER_CORE => Some(
            "it is a core WebAssembly module; build a component (`cargo build --target wasm32-wasip2`, or `wasm-tools component new`)",
        ),
        Some(_) => Some("unknown WebAssembly layer in the header"),
    }
}

fn verdict(
    m: &PluginManifest,
    worlds: &[World],
    imports: &[String],
    unsatisfied: Option<&str>,
) -> ManifestVerdict {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if let Err(errs) = m.validate() {
        problems.extend(errs.iter().map(|e| e.to_string()));
    }
    if let Some(why) = unsatisfied {
        problems.push(format!(
            "the component imports something hvisd does not provide ({why}); rebuild it without that import (wasi:sockets is never provided)"
        ));
    }
    for w in &m.worlds {
        if !worlds.contains(w) {
            problems.push(format!(
                "the manifest claims `{w}` but the component does not export `{}`; fix `worlds` or rebuild the plugin",
                w.export_interface()
            ));
        }
    }
    for w in worlds {
        if !m.worlds.contains(w) {
            warnings.push(format!(
                "the component also implements `{w}`, which the manifest does not list, so hvisd will not call it"
            ));
        }
    }
    let imports_iface = |name: &str| imports.iter().any(|i| i.starts_with(name));
    if imports_iface("hyperv:integration/kvp-store") && m.kvp.is_empty() {
        warnings.push(
            "the component imports kvp-store but the manifest grants no pool; every call will be denied".into(),
        );
    }
    if imports_iface("hyperv:integration/hvsock@") && m.hvsock.connect.is_empty() {
        warnings.push(
            "the component imports hvsock but hvsock.connect is empty; every connect will be denied".into(),
        );
    }
    if imports_iface("wasi:filesystem/preopens") && m.dirs.is_empty() {
        warnings.push(
            "the component can use the filesystem but the manifest grants no directory".into(),
        );
    }
    ManifestVerdict {
        plugin: m.name.clone(),
        accepted: problems.is_empty(),
        problems,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::not_a_component;

    #[test]
    fn only_a_component_preamble_passes_the_header_check() {
        let component = b"\0asm\x0d\x00\x01\x00";
        let core_module = b"\0asm\x01\x00\x00\x00";
        assert_eq!(not_a_component(component), None);
        assert!(
            not_a_component(core_module)
                .unwrap()
                .contains("core WebAssembly module")
        );
        assert!(
            not_a_component(b"#!/bin/sh\necho hi\n")
                .unwrap()
                .contains("no WebAssembly header")
        );
        assert!(not_a_component(b"").is_some());
        assert!(
            not_a_component(b"\0asm\x0d")
                .unwrap()
                .contains("ends inside")
        );
        assert!(
            not_a_component(b"\0asm\x0d\x00\x02\x00")
                .unwrap()
                .contains("unknown")
        );
    }
}
