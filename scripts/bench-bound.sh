#!/usr/bin/env bash
# Pod and claim created to claim Bound on the real control plane, with the
# agent on an emulated NVMe disk in the VM, beside a bare lvcreate in the
# same VM run (release builds).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release --workspace --bins
exec target/release/bound-bench
