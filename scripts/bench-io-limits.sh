#!/usr/bin/env bash
# IO limits on a real node (kubelet and containerd in the VM): per media
# class, a pod's writes without a limit and under three limits set through
# the claim's VolumeAttributesClass, and how long each change took to hold
# (release builds).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release --workspace --bins
exec target/release/io-limit-bench
