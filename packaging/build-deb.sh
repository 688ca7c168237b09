#!/usr/bin/env bash
# Builds the hvisd Debian package into TARGET_DIR/debian/ and prints its path (its one line on
# stdout).
#
#     packaging/build-deb.sh [--profile dist|release|dev]     # needs cargo-deb: cargo install cargo-deb --locked
#
# The default profile, `dist`, is `release` with whole-program LTO (see the workspace Cargo.toml).
#
# cargo-deb packages files that exist; this script makes the ones that are built, in order:
# 1. the hvisd binary (cargo build, PROFILE);
# 2. the man page and shell completions, printed by that binary (`hvisd man`, `hvisd completions
#    SHELL`) into TARGET_DIR/PROFILE_DIR/packaging/, which the assets in host-runtime/Cargo.toml
#    name as target/release/packaging/ (cargo-deb maps target/release/ to the real directory);
# 3. the example plugins (plugins/ workspace, wasm32-wasip2, release: the same command as
#    hvisd_plugin_host::build::build_plugins, so the tests and this script share the artifacts);
# 4. `cargo deb --no-build`, which strips the binary and writes the maintainer scripts.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dist
if [ "${1:-}" = --profile ]; then
    profile=${2:?--profile needs a profile name}
fi
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
case "$target_dir" in /*) ;; *) target_dir=$PWD/$target_dir ;; esac

cargo build --quiet --locked --profile "$profile" -p hvisd --bin hvisd
hvisd="$target_dir/$profile_dir/hvisd"

generated="$target_dir/$profile_dir/packaging"
mkdir -p "$generated"
# Compressed here: cargo-deb compresses man pages only when they are not build outputs.
"$hvisd" man | gzip -9n > "$generated/hvisd.8.gz"
"$hvisd" completions bash > "$generated/hvisd.bash"
"$hvisd" completions zsh > "$generated/_hvisd"
"$hvisd" completions fish > "$generated/hvisd.fish"

# Flags meant for the host build must not reach the wasm build.
env -u CARGO_TARGET_DIR -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_TARGET \
    cargo build --quiet --workspace --target wasm32-wasip2 --profile release \
    --manifest-path plugins/Cargo.toml --target-dir plugins/target

# cargo-deb prints the package's path, the one line on stdout.
cargo deb --quiet --no-build --locked --profile "$profile" -p hvisd --output "$target_dir/debian/"
