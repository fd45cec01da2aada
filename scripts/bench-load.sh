#!/usr/bin/env bash
# The agent under a node's load in the VM test bed (release builds): LVM
# commands and rescans per minute, CreateVolume and stats latencies, beside
# bare lvcreate in the same run. `--agent PATH` measures another build.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release -p csi-agent -p lvmlocal-tests
exec target/release/load-bench "$@"
