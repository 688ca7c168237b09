#!/usr/bin/env bash
# Builds the Python KVP provider (app.py) into a WebAssembly component with componentize-py:
#
#     pip install componentize-py==0.25.1
#     plugins/python-kvp/build.sh [OUT.wasm]     # default plugins/target/python/python_kvp.wasm
#
# componentize-py bundles CPython (built for WASI p2) with app.py and the bindings it generates
# from the WIT package in wit/ for the world `kvp-provider-plugin`: the same world a Rust
# provider built with hvisd-sdk targets. $COMPONENTIZE_PY names another componentize-py.
#
# --stub-wasi: CPython's WASI build imports wasi:sockets (its socket module), which hvisd never
# links for a plugin, so the component as componentize-py makes it is refused at load. The flag
# replaces every WASI import with a stub that traps if called; what the plugin uses is hvisd's
# own interfaces (logging, kvp-store), which stay. The cost: no files, clocks, stdout or fresh
# randomness inside the plugin (print() traps: log with wit_world.imports.logging instead).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/plugins/target/python/python_kvp.wasm}
mkdir -p "$(dirname "$out")"
"${COMPONENTIZE_PY:-componentize-py}" --quiet -d "$repo/wit" -w kvp-provider-plugin \
    componentize --stub-wasi -p "$here" app -o "$out"
echo "$out"
