#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints execs and crashes per target.
# Usage: host-runtime/fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
targets=$(cargo +nightly fuzz list)
status=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    [ -n "$execs" ] || execs=$(grep -Eo '#[0-9]+' "$log" | tail -1 | tr -d '#')
    crashes=$(find "artifacts/$t" -type f | wc -l)
    printf '%-16s execs=%-12s crashes=%s exit=%s\n' "$t" "${execs:-?}" "$crashes" "$rc"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
        tail -30 "$log"
    fi
    rm -f "$log"
done
exit $status
