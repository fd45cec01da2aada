#!/usr/bin/env bash
# The agent's volume figures in the VM test bed, each beside the bare LVM
# command it stands on, measured in the same run (release builds).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release -p csi-agent -p lvmlocal-tests
exec target/release/volume-bench
