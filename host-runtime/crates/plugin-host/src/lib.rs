//! The wasmtime host for hvisd plugins.
