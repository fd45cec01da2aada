#!/usr/bin/env bash
# Every check lvmlocal has: format, lints, host unit tests and the end-to-end
# tests that boot the VM test bed with real disks.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build from scratch gains nothing from incremental caches, which would
# double what the build leaves on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
