#!/usr/bin/env bash
# Every check lvmlocal has: format, lints, host unit tests and the end-to-end
# tests that boot the VM test bed with real disks. Ends with a table of where
# the time went (also in target/test-times.tsv).
#
# The Kubernetes components build in the background while Rust builds; the
# tests then run side by side, each test of tests/ in a process of its own:
# LVMLOCAL_TEST_JOBS processes at once (2), of which LVMLOCAL_HEAVY_JOBS (2)
# start a control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build from scratch gains nothing from incremental caches, which would
# double what the build leaves on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
start_ms=$(date +%s%3N)
export LVMLOCAL_SUITE_START=${start_ms:0:-3}.${start_ms: -3}
mkdir -p target/logs
times=$PWD/target/test-times.tsv
summary=$PWD/target/test-summary.txt
: >"$times"
rm -f "$summary"

# phase NAME COMMAND...: runs COMMAND and records when it started and how
# long it took, in seconds.
phase() {
    local name=$1 from took rc=0
    shift
    from=$(($(date +%s%3N) - start_ms))
    "$@" || rc=$?
    took=$(($(date +%s%3N) - start_ms - from))
    printf 'phase\t%s\t%d.%03d\t%d.%03d\n' "$name" $((from / 1000)) $((from % 1000)) \
        $((took / 1000)) $((took % 1000)) >>"$times"
    return "$rc"
}

# The time table, then the tests' count as the run's last line.
finish() {
    echo
    if [ -x target/debug/suite ]; then
        target/debug/suite table "$times"
    else
        cat "$times"
    fi
    if [ -s "$summary" ]; then cat "$summary"; fi
}
trap finish EXIT

phase "packages" scripts/packages.sh
phase "VM boot files" vm/image.sh
phase "test images" scripts/images.sh
# Go and cargo share the two cores; each has idle stretches (links, the
# last crates of a chain) the other fills.
phase "Kubernetes components (background)" scripts/components.sh >target/logs/components.log 2>&1 &
components=$!

phase "cargo fmt" cargo fmt --all -- --check
phase "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
phase "cargo build of the tests" cargo test --workspace --no-run --message-format=json-render-diagnostics >target/test-build.json

echo "test.sh: waiting for the Kubernetes components"
if ! phase "waiting for the components" wait "$components"; then
    cat target/logs/components.log
    exit 1
fi
tail -n 20 target/logs/components.log

rm -rf target/test-logs
phase "tests" target/debug/suite run \
    --jobs "${LVMLOCAL_TEST_JOBS:-2}" --heavy-jobs "${LVMLOCAL_HEAVY_JOBS:-2}" \
    --heavy cluster --heavy pods \
    --logs target/test-logs --times "$times" --summary "$summary" <target/test-build.json
