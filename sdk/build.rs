//! Writes the macro that runs `wit_bindgen::generate!` in a plugin's crate
//! with the absolute path of the WIT package shipped in this crate (`wit/`),
//! so plugin authors need no copy of the WIT files.

use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let wit = dir.join("wit");
    let wit = wit.canonicalize().unwrap_or_else(|e| {
        panic!(
            "hvisd-sdk: the WIT package `{}` is missing ({e})",
            wit.display()
        )
    });
    println!("cargo:rerun-if-changed={}", wit.display());
    let wit = wit.to_str().expect("hvisd-sdk: the WIT path is not UTF-8");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = format!(
        r##"
/// Generates the bindings of one hvisd world in the calling crate. Used by the export macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __hvisd_generate {{
    // Worlds without byte streams: only the basic imports are shared with the SDK.
    (basic $world:literal) => {{
        $crate::__wit_bindgen::generate!({{
            path: {wit:?},
            world: $world,
            runtime_path: "hvisd_sdk::__wit_bindgen::rt",
            with: {{
                "hyperv:integration/types@0.1.0": hvisd_sdk::bindings::hyperv::integration::types,
                "hyperv:integration/logging@0.1.0": hvisd_sdk::bindings::hyperv::integration::logging,
                "hyperv:integration/kvp-store@0.1.0": hvisd_sdk::bindings::hyperv::integration::kvp_store,
            }},
        }});
    }};
    // Worlds with hvsock: the streams are shared with the SDK too.
    (streams $world:literal) => {{
        $crate::__wit_bindgen::generate!({{
            path: {wit:?},
            world: $world,
            runtime_path: "hvisd_sdk::__wit_bindgen::rt",
            with: {{
                "hyperv:integration/types@0.1.0": hvisd_sdk::bindings::hyperv::integration::types,
                "hyperv:integration/logging@0.1.0": hvisd_sdk::bindings::hyperv::integration::logging,
                "hyperv:integration/kvp-store@0.1.0": hvisd_sdk::bindings::hyperv::integration::kvp_store,
                "hyperv:integration/hvsock@0.1.0": hvisd_sdk::bindings::hyperv::integration::hvsock,
                "wasi:io/error@0.2.12": hvisd_sdk::bindings::wasi::io::error,
                "wasi:io/poll@0.2.12": hvisd_sdk::bindings::wasi::io::poll,
                "wasi:io/streams@0.2.12": hvisd_sdk::bindings::wasi::io::streams,
            }},
        }});
    }};
}}
"##
    );
    std::fs::write(out.join("generate.rs"), src)
        .expect("hvisd-sdk: cannot write OUT_DIR/generate.rs");
}
