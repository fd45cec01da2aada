#!/usr/bin/env bash
# Pod created to container running on a real node (kubelet and containerd in
# the VM), with a new 1 GiB claim and without a volume, alternating in the
# same run (release builds).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release --workspace --bins
exec target/release/pod-bench
