#!/usr/bin/env bash
# What erasing a removed volume costs per media class in the VM test bed:
# zeroing in seconds per GiB beside a bare lvremove, and DeleteVolume whole
# (release builds).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release -p csi-agent -p lvmlocal-tests
exec target/release/erase-bench
